"""`loraens sweep`: the grid, the methods of each cell, resuming after an interruption, the summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import loraens.sweep as sweep_mod
from loraens.cli import main
from loraens.config import ConfigError, RunConfig
from loraens.data import load_examples
from loraens.metrics import evaluate_ensemble
from loraens.predictions import Predictions
from loraens.sweep import PRESETS, cells, is_complete, load_sweep, run_sweep


def write_sweep(tmp_path, model_dir, mirror, **overrides) -> str:
    spec = {
        "name": "tiny",
        "output_dir": str(tmp_path / "sweep"),
        "seeds": [0],
        "mc_dropout_passes": 3,
        "base": {"model": {"name": str(model_dir), "dtype": "float32"},
                 "data": {"data_dir": str(mirror)},
                 "ensemble": {"num_members": 2, "rank": 4},
                 "train": {"epochs": 2, "batch_size": 4, "lr": 0.01}},
        "datasets": [{"name": "arc_easy", "label": "ARC-Easy", "test_split": "test", "val_split": "validation"}],
        "variants": [
            {"name": "plain", "group": "base", "methods": list(sweep_mod.METHODS[:6]) + ["early_stop_single",
                                                                                          "early_stop_ensemble"]},
            {"name": "dropout", "label": "dropout 0.2", "config": {"ensemble": {"dropout": 0.2},
                                                                   "train": {"eval_every_epoch": False}},
             "methods": ["single", "ensemble", "mc_dropout"]},
        ],
        **overrides,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_sweep_runs_every_cell_resumes_after_an_interruption_and_aggregates(tmp_path, tiny_setup, monkeypatch):
    model_dir, mirror = tiny_setup
    spec = load_sweep(write_sweep(tmp_path, model_dir, mirror, seeds=[0, 1]))
    grid = cells(spec)
    assert [c.title for c in grid] == ["arc_easy / plain / seed 0", "arc_easy / plain / seed 1",
                                       "arc_easy / dropout / seed 0", "arc_easy / dropout / seed 1"]
    assert grid[1].config.ensemble.seed == 1 and grid[2].config.ensemble.dropout == 0.2
    assert grid[0].config.data.eval_splits == ["validation", "test"]

    # Interrupt the third cell midway (after its training started).
    real_train_run = sweep_mod.train_run
    calls: list[str] = []

    def interrupted(config, progress=True, **kwargs):
        calls.append(config.output_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train_run(config, progress=False, **kwargs)

    monkeypatch.setattr(sweep_mod, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, progress=False, log=lambda line: None)
    assert [is_complete(c) for c in grid] == [True, True, False, False]

    # The same command again: only the interrupted cell and the one after it are trained.
    calls.clear()
    records = run_sweep(spec, progress=False, log=lambda line: None)
    assert calls == [str(grid[2].folder), str(grid[3].folder)]
    assert len(records) == 4 and all(is_complete(c) for c in grid)
    calls.clear()
    run_sweep(spec, progress=False, log=lambda line: None)  # a third run trains nothing
    assert calls == []

    # The cell record: methods, costs, curves.
    plain = json.loads((grid[0].folder / "cell.json").read_text())
    assert set(plain["methods"]) == set(spec.variants[0].methods)
    assert plain["cost"]["trainable_params_per_member"] > 0 and plain["cost"]["peak_rss_mb"] > 0
    assert [row["epoch"] for row in plain["epochs"]] == [1, 2]
    assert [row["m"] for row in plain["ensemble_size"]] == [1, 2]
    dropout = json.loads((grid[2].folder / "cell.json").read_text())
    assert set(dropout["methods"]) == {"single", "ensemble", "mc_dropout"}
    assert dropout["methods"]["mc_dropout"]["members"] == 3
    assert dropout["methods"]["mc_dropout"]["pass_disagreement"] >= 0

    # Methods read from the run's own predictions agree with them.
    test = Predictions.load(grid[0].folder / "predictions" / "arc_easy_test.safetensors")
    ev = evaluate_ensemble(test.member_probs, test.targets)
    assert plain["methods"]["ensemble"]["test"]["nll"] == pytest.approx(ev["ensemble"]["nll"])
    assert plain["methods"]["single"]["test"]["nll"] == pytest.approx(ev["mean_member"]["nll"])
    assert plain["methods"]["single+ts"]["test"]["accuracy"] == pytest.approx(ev["mean_member"]["accuracy"])
    assert plain["methods"]["early_stop_ensemble"]["best_epoch"] in (1, 2)

    summary = tmp_path / "sweep" / "summary.md"
    text = summary.read_text()
    assert "LoRA ensemble" in text and "MC dropout" in text and "weight-averaged" in text
    assert (tmp_path / "sweep" / "summary.html").is_file()


def test_changing_a_cell_setting_reruns_that_cell_only(tmp_path, tiny_setup, monkeypatch):
    model_dir, mirror = tiny_setup
    path = write_sweep(tmp_path, model_dir, mirror)
    spec = load_sweep(path)
    run_sweep(spec, progress=False, log=lambda line: None)
    raw = yaml.safe_load(Path(path).read_text())
    raw["variants"][1]["config"]["ensemble"]["dropout"] = 0.3
    Path(path).write_text(yaml.safe_dump(raw))
    changed = load_sweep(path)
    assert [is_complete(c) for c in cells(changed)] == [True, False]


def test_holdout_split_is_disjoint_from_training(tmp_path, tiny_setup):
    _, mirror = tiny_setup
    cfg = RunConfig.from_dict({"data": {"data_dir": str(mirror), "holdout": 4, "eval_splits": ["holdout", "test"]}})
    held = load_examples(cfg.data, "holdout", None)
    train = load_examples(cfg.data, "train", None)
    assert len(held) == 4 and len(train) == 12 - 4
    assert not {e.id for e in held} & {e.id for e in train}
    limited = RunConfig.from_dict({"data": {"data_dir": str(mirror), "holdout": 4, "train_limit": 3}})
    assert len(load_examples(limited.data, "train", 3)) == 3
    assert not {e.id for e in load_examples(limited.data, "train", 3)} & {e.id for e in held}
    with pytest.raises(ConfigError, match="--data.holdout"):
        RunConfig.from_dict({"data": {"eval_splits": ["holdout"]}})


def test_early_stopping_keeps_the_best_epoch(tmp_path, tiny_setup):
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    # A large learning rate overfits 12 questions fast, so validation NLL rises after epoch 1.
    args = ["train", "--output_dir", str(run), "--model.name", str(model_dir), "--model.dtype", "float32",
            "--data.data_dir", str(mirror), "--ensemble.num_members", "2", "--train.epochs", "6",
            "--train.batch_size", "4", "--train.lr", "0.3", "--train.warmup_ratio", "0",
            "--train.early_stopping_patience", "1", "--quiet"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    nlls = [r["ensemble"]["nll"] for r in rows]
    best = int(np.argmin(nlls)) + 1
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == best
    assert len(rows) == min(6, best + 1)  # stopped one epoch after the best (patience 1)
    assert results["splits"]["arc_easy_validation"]["ensemble"]["nll"] == pytest.approx(nlls[best - 1])
    final = Predictions.load(run / "predictions" / "arc_easy_validation.safetensors")
    kept = Predictions.load(run / "predictions" / "epochs" / f"epoch_{best}" / "arc_easy_validation.safetensors")
    assert torch.equal(final.member_probs, kept.member_probs)


def test_early_stopping_needs_a_validation_split():
    with pytest.raises(ConfigError, match="needs a validation split"):
        RunConfig.from_dict({"data": {"eval_splits": ["test"]}, "train": {"early_stopping_patience": 2}})


def test_sweep_file_errors_name_the_problem(tmp_path, tiny_setup):
    model_dir, mirror = tiny_setup
    bad_method = write_sweep(tmp_path, model_dir, mirror, variants=[{"name": "x", "methods": ["bagging"]}])
    with pytest.raises(ConfigError, match="unknown method"):
        load_sweep(bad_method)
    no_dropout = write_sweep(tmp_path, model_dir, mirror, variants=[{"name": "x", "methods": ["mc_dropout"]}])
    with pytest.raises(ConfigError, match="ensemble.dropout > 0"):
        load_sweep(no_dropout)
    bad_key = write_sweep(tmp_path, model_dir, mirror, variants=[{"name": "x", "config": {"train": {"lr": -1}}}])
    with pytest.raises(ConfigError, match="train.lr"):
        load_sweep(bad_key)
    with pytest.raises(ConfigError, match="not a preset"):
        load_sweep(tmp_path / "missing.yaml")


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    spec = load_sweep(preset)
    assert len(spec.seeds) >= 2 and len(spec.datasets) >= 2 and cells(spec)


def test_the_small_presets_together_and_the_paper_preset_cover_every_method_and_lever():
    for names in (("paper-small", "ablations-small", "diversity-small"), ("paper",)):
        specs = [load_sweep(n) for n in names]
        methods = {m for s in specs for v in s.variants for m in v.methods}
        assert methods == set(sweep_mod.METHODS), names
        configs = [c.config for s in specs for c in cells(s)]
        assert any(c.train.weight_decay > 0 for c in configs) and any(c.train.kl_coef > 0 for c in configs)
        assert any(c.train.delta_l2 > 0 for c in configs) and any(c.ensemble.dropout > 0 for c in configs)
        assert any(not c.ensemble.member_init for c in configs)
        assert any(not c.ensemble.member_data_order for c in configs)
        assert len({c.train.weight_decay for c in configs}) >= 3  # a sweep over weight decay values
        assert any(c.ensemble.bagging for c in configs) and any(c.ensemble.lr_range for c in configs)
        assert any(c.ensemble.member_targets for c in configs) and any(c.ensemble.member_prompts for c in configs)
        assert any(d.ood for s in specs for d in s.datasets) and any(v.ood for s in specs for v in s.variants)
    # The study's question samples: at least 500 per split, and each seed its own.
    for c in cells(load_sweep("paper-small")):
        assert c.config.data.eval_limit >= 500 and c.config.data.seed == c.seed


def test_sweep_dry_run_lists_the_cells(tmp_path, tiny_setup, capsys):
    model_dir, mirror = tiny_setup
    assert main(["sweep", write_sweep(tmp_path, model_dir, mirror), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to run" in out and "arc_easy / dropout / seed 0" in out


def test_report_only_with_notes_writes_to_the_given_path(tmp_path, tiny_setup):
    model_dir, mirror = tiny_setup
    path = write_sweep(tmp_path, model_dir, mirror, variants=[{"name": "plain", "group": "base"}])
    assert main(["sweep", path, "--report-only"]) == 2  # nothing complete yet: a clear error
    assert main(["sweep", path, "--quiet"]) == 0
    notes = tmp_path / "reading.md"
    notes.write_text("## Reading\n\nWritten by hand.")
    out = tmp_path / "docs" / "EXPERIMENTS"
    assert main(["sweep", path, "--report-only", "--report-to", str(out), "--notes", str(notes)]) == 0
    text = (tmp_path / "docs" / "EXPERIMENTS.md").read_text()
    assert "Written by hand." in text and "EXPERIMENTS_files/figure_1.png" in text
    assert (tmp_path / "docs" / "EXPERIMENTS_files" / "figure_1.png").is_file()


def test_per_epoch_methods_need_per_epoch_evaluation(tmp_path, tiny_setup):
    model_dir, mirror = tiny_setup
    path = write_sweep(tmp_path, model_dir, mirror, variants=[
        {"name": "x", "config": {"train": {"eval_every_epoch": False}}, "methods": ["checkpoint_ensemble"]}])
    with pytest.raises(ConfigError, match="eval_every_epoch: true"):
        load_sweep(path)


def test_laplace_methods_resamples_and_the_ood_block(tmp_path, tiny_setup):
    """A cell with Laplace methods and an OOD set: the Laplace entries, the paired question resamples
    (equal to the bootstrap module's on the saved predictions), per-seed question samples, and the
    transfer / OOD block with an AUROC for every score and method; the summary shows them."""
    from loraens.bootstrap import metric_resamples
    from loraens.metrics import ensemble_probs

    model_dir, mirror = tiny_setup
    path = write_sweep(tmp_path, model_dir, mirror, seeds=[0, 1], resamples=50,
                       datasets=[{"name": "arc_easy", "test_split": "test", "val_split": "validation",
                                  "ood": [{"name": "arc_easy", "split": "validation", "label": "ARC-E val"}]}],
                       variants=[{"name": "plain", "group": "base", "ood": True,
                                  "methods": ["single", "ensemble", "laplace", "ensemble+laplace"]},
                                 {"name": "bagged", "group": "diversity", "config": {"ensemble": {"bagging": True}},
                                  "methods": ["single", "ensemble"]}])
    spec = load_sweep(path)
    grid = cells(spec)
    assert [c.config.data.seed for c in grid] == [0, 1, 0, 1]  # each seed its own question samples
    run_sweep(spec, progress=False, log=lambda line: None)
    cell = json.loads((grid[0].folder / "cell.json").read_text())
    assert set(cell["methods"]) == {"single", "ensemble", "laplace", "ensemble+laplace"}
    lap = cell["methods"]["ensemble+laplace"]
    assert lap["laplace"]["fit_seconds"] >= 0 and lap["laplace"]["posterior_bytes"] > 0
    assert 0 <= lap["test"]["accuracy"] <= 1 and lap["test"]["nll"] > 0
    assert len(lap["laplace"]["prior_precision"]) == 2

    # The resamples: the questions in id order, one seed for every cell (seed 1's cell too), so two
    # seeds that scored the same questions have the same resample in each row.
    for c in grid[:2]:
        record = json.loads((c.folder / "cell.json").read_text())
        test = Predictions.load(c.folder / "predictions" / "arc_easy_test.safetensors")
        order = sorted(range(len(test.ids)), key=lambda i: test.ids[i])
        again = metric_resamples(ensemble_probs(test.member_probs[order]).double(), test.targets[order], 50,
                                 seed=sweep_mod.RESAMPLE_SEED)
        np.testing.assert_allclose(record["resamples"]["ensemble"]["nll"], again["nll"], atol=1e-6)
        assert record["resamples_requested"] == 50
    assert set(cell["resamples"]) == set(cell["methods"])
    assert all(len(v) == 50 for r in cell["resamples"].values() for v in r.values())

    block = cell["ood"]["arc_easy"]
    assert block["label"] == "ARC-E val" and block["num_questions"] > 0
    assert set(block["metrics"]) == set(block["auroc"]) == {"single", "ensemble", "laplace", "ensemble+laplace"}
    assert set(block["auroc"]["single"]) == {"1-max_prob", "predictive_entropy_norm"}
    assert "mutual_information" in block["auroc"]["ensemble"] and "member_disagreement" in block["auroc"]["ensemble"]
    assert all(0 <= v <= 1 for scores in block["auroc"].values() for v in scores.values())
    assert json.loads((grid[2].folder / "cell.json").read_text())["ood"] == {}  # ood: false variant

    text = (tmp_path / "sweep" / "summary.md").read_text()
    assert "Laplace-LoRA (mean member)" in text and "ensemble + Laplace" in text
    assert "Transfer and OOD detection" in text and "arc_easy -> ARC-E val" in text and "Diversity levers" in text
    # A sweep that gains an OOD set reruns the cells that must score it, and only those.
    raw = yaml.safe_load(Path(path).read_text())
    raw["datasets"][0]["ood"].append({"name": "arc_easy", "split": "train", "limit": 3})
    Path(path).write_text(yaml.safe_dump(raw))
    assert [is_complete(c, resamples=50) for c in cells(load_sweep(path))] == [False, False, True, True]


def test_ood_sets_are_checked_when_the_sweep_is_read(tmp_path, tiny_setup):
    model_dir, mirror = tiny_setup
    path = write_sweep(tmp_path, model_dir, mirror, datasets=[{"name": "arc_easy", "ood": [{"split": "test"}]}])
    with pytest.raises(ConfigError, match="OOD set"):
        load_sweep(path)

"""End to end through the command line on a tiny model saved to a folder: the files a run writes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from loraens.cli import field_docs, main
from loraens.config import RunConfig
from loraens.metrics import evaluate_ensemble
from loraens.predictions import Predictions
from loraens.run import load_run

from .conftest import make_questions


def _train_args(run, model_dir, mirror, *extra: str) -> list[str]:
    return ["train", "--output_dir", str(run), "--model.name", str(model_dir), "--model.dtype", "float32",
            "--data.dataset", "arc_easy", "--data.data_dir", str(mirror), "--ensemble.num_members", "2",
            "--train.epochs", "2", "--train.batch_size", "4", "--train.lr", "0.01", "--quiet", *extra]


def test_train_writes_a_complete_run_folder_and_evaluate_extends_it(tmp_path, tiny_setup, capsys):
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    assert main(_train_args(run, model_dir, mirror)) == 0
    out = capsys.readouterr().out
    assert "ensemble" in out and "mean member" in out

    # config.yaml: the resolved configuration, enough to rerun.
    config = RunConfig.load(run / "config.yaml")
    assert config.ensemble.num_members == 2 and config.train.epochs == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == str(model_dir)

    # members/: one standard PEFT adapter folder per member.
    for k in range(2):
        folder = run / "members" / f"member_{k}"
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == config.ensemble.rank
        assert (folder / "adapter_model.safetensors").stat().st_size > 0

    # metrics.jsonl: one line per epoch for the validation split.
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in lines] == [(1, "arc_easy_validation"), (2, "arc_easy_validation")]
    assert len(lines[0]["train_loss"]) == 2 and len(lines[0]["members"]) == 2

    # predictions: member probabilities [N, M, C], matching results.json.
    preds = Predictions.load(run / "predictions" / "arc_easy_validation.safetensors")
    assert preds.member_probs.shape == (7, 2, 5)
    assert preds.ids == [f"q{i}" for i in range(7)]
    results = json.loads((run / "results.json").read_text())
    split = results["splits"]["arc_easy_validation"]
    expected = evaluate_ensemble(preds.member_probs, preds.targets)
    assert split["ensemble"] == pytest.approx(expected["ensemble"])
    assert split["mean_member"] == pytest.approx(expected["mean_member"])
    assert [m == pytest.approx(e) for m, e in zip(split["members"], expected["members"])] == [True, True]
    assert lines[-1]["ensemble"] == split["ensemble"]  # the final metrics are the last epoch's

    # The members reload from the folder and reproduce the saved predictions.
    ens = load_run(run)
    from loraens.data import load_mcqa

    again = ens.predict(load_mcqa("arc_easy", "validation", data_dir=mirror), progress=False)
    torch.testing.assert_close(again.member_probs, preds.member_probs, atol=1e-5, rtol=1e-5)

    # evaluate: a saved run on another dataset (a user JSONL file).
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"question": q.question, "choices": list(q.choices), "answer": "ABCDE"[q.answer]})
                           + "\n" for q in make_questions(5, seed=3)))
    assert main(["evaluate", str(run), "--dataset", str(own), "--quiet"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert set(results["splits"]) == {"arc_easy_validation", "own_validation"}
    assert Predictions.load(run / "predictions" / "own_validation.safetensors").member_probs.shape[:2] == (5, 2)


def test_member_chunk_and_gradient_checkpointing_train_the_same_members(tmp_path, tiny_setup, monkeypatch):
    """The memory options, from the command line to the run folder, leave the trained members unchanged."""
    from safetensors.torch import load_file

    import loraens.run
    import loraens.train

    enabled, groups = [], []
    real_enable, real_active = loraens.run.enable_gradient_checkpointing, loraens.train.active_members
    monkeypatch.setattr(loraens.run, "enable_gradient_checkpointing", lambda m: enabled.append(1) or real_enable(m))
    monkeypatch.setattr(loraens.train, "active_members", lambda m, a, b: groups.append((a, b)) or real_active(m, a, b))
    model_dir, mirror = tiny_setup
    runs = {"plain": (), "lean": ("--train.member_chunk", "1", "--train.gradient_checkpointing", "true")}
    for name, extra in runs.items():
        assert main(_train_args(tmp_path / name, model_dir, mirror, "--ensemble.dropout", "0", *extra)) == 0
    lean = RunConfig.load(tmp_path / "lean" / "config.yaml")
    assert lean.train.member_chunk == 1 and lean.train.gradient_checkpointing
    assert enabled == [1] and set(groups) == {(0, 1), (1, 2)}  # only the lean run used them
    for k in range(2):
        plain_w, lean_w = (load_file(tmp_path / name / "members" / f"member_{k}" / "adapter_model.safetensors")
                           for name in runs)
        assert plain_w.keys() == lean_w.keys()
        for key in plain_w:
            torch.testing.assert_close(lean_w[key], plain_w[key], atol=1e-5, rtol=1e-4)


def test_retraining_replaces_the_previous_run_only_with_overwrite_and_own_files_use_split_placeholder(
        tmp_path, tiny_setup, capsys):
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    (run / "predictions" / "stale_test.safetensors").write_bytes(b"old")
    (run / "results.json").write_text(json.dumps({"splits": {"stale_test": {}}, "ood": {"x": {}}}))
    for split, seed in (("train", 0), ("validation", 1)):
        (tmp_path / f"own_{split}.jsonl").write_text("".join(
            json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer}) + "\n"
            for q in make_questions(6, seed=seed)))
    args = _train_args(run, model_dir, mirror, "--data.dataset", str(tmp_path / "own_{split}.jsonl"),
                       "--train.epochs", "1")
    # Without --overwrite the old folder is refused and left exactly as it was.
    assert main(args) == 2
    assert "Pass --overwrite to replace it" in capsys.readouterr().err
    assert (run / "predictions" / "stale_test.safetensors").read_bytes() == b"old"
    assert json.loads((run / "results.json").read_text())["splits"] == {"stale_test": {}}
    assert main([*args, "--overwrite"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert set(results["splits"]) == {"own_validation"} and "ood" not in results
    assert not (run / "predictions" / "stale_test.safetensors").exists()
    ids = Predictions.load(run / "predictions" / "own_validation.safetensors").ids
    assert ids == [f"own_validation/{i}" for i in range(6)]  # the validation file, not the training file


def test_bad_values_give_an_error_naming_the_flag(tmp_path, tiny_setup, capsys):
    model_dir, mirror = tiny_setup
    assert main(_train_args(tmp_path / "r", model_dir, mirror, "--train.lr", "-3")) == 2
    err = capsys.readouterr().err
    assert "--train.lr" in err and "-3" in err
    assert main(["evaluate", str(tmp_path / "missing-run")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_every_verb_has_help(capsys):
    for verb in ("train", "evaluate", "demo"):
        with pytest.raises(SystemExit) as done:
            main([verb, "--help"])
        assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--ensemble.num_members" in text and "--train.lr" in text and "RUN" in text


@dataclasses.dataclass
class _Documented:
    """A dataclass whose comments become --help text."""

    plain: int = 1
    # One block that documents
    # the two fields below it.
    first: int = 2
    second: float = 3.0
    own: str = "x"  # its own trailing comment wins
    # A block cut off by the blank line below.

    after_blank: bool = False


def test_flag_help_comes_from_the_config_comments(capsys):
    assert field_docs(_Documented) == {
        "first": "One block that documents the two fields below it.",
        "second": "One block that documents the two fields below it.",
        "own": "its own trailing comment wins",
    }
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "M, the LoRA members of the ensemble (default: 4)" in text
    assert "weight of KL(member || frozen base) over each training question's choices (default: 0.0)" in text


def test_demo_prints_the_ensembles_paired_gain_with_intervals(tmp_path, tiny_setup, capsys):
    """The demo's verdict table: ensemble minus mean member with the paired-bootstrap interval that
    bootstrap.ensemble_gain gives on the run's saved predictions, and whether it excludes 0."""
    from loraens.bootstrap import ensemble_gain
    from loraens.cli import DEMO_RESAMPLES

    model_dir, mirror = tiny_setup
    run = tmp_path / "demo"
    args = ["demo", "--output_dir", str(run), "--model.name", str(model_dir), "--model.dtype", "float32",
            "--data.data_dir", str(mirror), "--data.train_limit", "null", "--ensemble.num_members", "2",
            "--ensemble.top_layers", "null", "--train.epochs", "1", "--train.batch_size", "4", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    preds = Predictions.load(run / "predictions" / "arc_easy_validation.safetensors")
    gain = ensemble_gain(preds.member_probs, preds.targets, DEMO_RESAMPLES)
    assert f"ensemble minus mean member, paired bootstrap over its 7 questions ({DEMO_RESAMPLES} resamples)" in out
    nll = next(line for line in out.splitlines() if line.startswith("NLL "))
    assert f"[{gain['nll']['low']:+.4f}, {gain['nll']['high']:+.4f}]" in nll
    expected = ("ensemble better" if gain["nll"]["high"] < 0 else "ensemble worse" if gain["nll"]["low"] > 0
                else "no difference shown")
    assert expected in nll

"""Sweep report: aggregation over seeds checked by hand, row order and labels, files, absent sections."""

from __future__ import annotations

import re

from loraens.sweep_report import build_sweep_report

DATASETS = {"arc_easy": "ARC-Easy", "obqa": "OpenBookQA"}
VARIANTS = {  # name -> (label, group, methods)
    "plain": ("no regulariser", "base", ("single", "ensemble", "single+ts", "ensemble+ts")),
    "kl": ("KL 0.1", "regulariser", ("single", "ensemble")),
    "init_only": ("random init only", "randomness", ("single", "ensemble")),
}


def _metrics(acc: float, nll: float, ece: float) -> dict:
    return {"accuracy": acc, "nll": nll, "ece": ece, "brier": 1.0 - acc}


def _cell(dataset: str, variant: str, seed: int, history: bool = True) -> dict:
    """Ensemble test accuracy 0.60 + 0.04 seed on ARC-Easy (0.50 + ... on OBQA), NLL 0.9 + 0.1 seed (+0.2 OBQA).

    Single LoRA: 5 points less accurate, NLL higher by 0.2 + 0.1 seed (+0.1 on OBQA), ECE higher by 0.05.
    """
    obqa = dataset == "obqa"
    shift = {"plain": 0.0, "kl": 0.01, "init_only": -0.02, "bagging": 0.01}.get(variant, 0.0)
    acc = (0.50 if obqa else 0.60) + 0.04 * seed + shift
    nll = 0.9 + 0.1 * seed + (0.2 if obqa else 0.0)
    ece = 0.05 + 0.01 * seed
    values = {"ensemble": _metrics(acc, nll, ece),
              "single": _metrics(acc - 0.05, nll + 0.2 + 0.1 * seed + (0.1 if obqa else 0.0), ece + 0.05),
              "single+ts": _metrics(acc - 0.05, nll + 0.1, ece),
              "ensemble+ts": _metrics(acc, nll - 0.05, ece - 0.02)}
    label, group, methods = VARIANTS[variant]
    cell = {
        "dataset": dataset, "dataset_label": DATASETS[dataset], "variant": variant, "variant_label": label,
        "variant_group": group, "seed": seed, "status": "complete", "num_members": 4,
        "test_key": f"{dataset}_test", "val_key": f"{dataset}_holdout",
        "cost": {"train_seconds": 80.0 + 20 * seed, "eval_seconds": 30.0, "wall_seconds": 115.0,
                 "peak_rss_mb": 1500.0, "trainable_params_per_member": 307200},
        "methods": {m: {"test": values[m], "val": values[m], "extra_seconds": 1.0 if "ts" in m else 0.0,
                        "trainable_params": 1228800 if "ensemble" in m else 307200,
                        "members": 4 if "ensemble" in m else 1} for m in methods},
    }
    if history:
        cell["epochs"] = [{"epoch": e, "single": _metrics(acc - 0.05, nll + 0.1 * e, ece + 0.02 * e),
                           "ensemble": _metrics(acc, nll, ece + 0.005 * e)} for e in (1, 2, 3)]
        cell["ensemble_size"] = [{"m": m, "accuracy": acc, "nll": nll + 0.1 / m, "ece": ece + 0.02 / m}
                                 for m in (1, 2, 3, 4)]
        cell["diversity"] = {"disagreement": 0.1 + 0.02 * seed, "mutual_information": 0.03}
    return cell


def _cells(variants=tuple(VARIANTS), history: bool = True) -> list[dict]:
    # Randomness variant first in the input: the report still orders base, regulariser, randomness.
    return [_cell(d, v, s, history) for v in reversed(variants) for d in DATASETS for s in (0, 1)]


def _section(md: str, title_start: str) -> str:
    parts = [p for p in md.split("\n## ") if p.startswith(title_start)]
    assert len(parts) == 1, f"no single section starting with {title_start!r}"
    return parts[0]


def _titles(md: str) -> list[str]:
    """First word of every section title."""
    return [t.split(" ")[0] for t in re.findall(r"^## (.+)$", md, flags=re.MULTILINE)]


def _rows(section: str) -> list[list[str]]:
    """Cells of the first table of a section (header and separator dropped), bold markers removed."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    end = next((i for i in range(2, len(lines)) if lines[i].startswith("|---")), len(lines))
    return [[c.strip().strip("*") for c in line.strip("|").split(" | ")] for line in lines[2:end]]


def test_main_table_values_order_and_labels(tmp_path):
    _, md_path = build_sweep_report(_cells(), tmp_path / "sweep")
    md = md_path.read_text()
    main = _section(md, "Main table")
    header = next(line for line in main.splitlines() if line.startswith("|"))
    assert header == ("| method | ARC-Easy ACC | ARC-Easy ECE | ARC-Easy NLL | OpenBookQA ACC | OpenBookQA ECE "
                      "| OpenBookQA NLL | n seeds |")
    rows = _rows(main)
    assert [r[0] for r in rows] == [
        "mean member", "LoRA ensemble", "mean member + temperature", "ensemble + temperature",
        "mean member · KL 0.1", "LoRA ensemble · KL 0.1",  # kl has no temperature-scaled methods: no rows
        "mean member · random init only", "LoRA ensemble · random init only",
    ]
    ensemble = rows[1]
    # ARC-Easy, seeds 0 and 1: accuracy 0.60 / 0.64, ECE 0.05 / 0.06, NLL 0.9 / 1.0.
    assert ensemble[1:4] == ["62.0 [60.0, 64.0]", "0.055 [0.050, 0.060]", "0.950 [0.900, 1.000]"]
    # OpenBookQA NLL: 1.1 / 1.2; 2 seeds everywhere.
    assert ensemble[6] == "1.150 [1.100, 1.200]" and ensemble[7] == "2"
    # Best ARC-Easy ACC (KL ensemble, 0.61 / 0.65) and best ARC-Easy NLL (ensemble + temperature) are bold.
    assert "| **63.0 [61.0, 65.0]** |" in main and "| **0.900 [0.850, 0.950]** |" in main


def test_randomness_regulariser_and_cost_numbers(tmp_path):
    _, md_path = build_sweep_report(_cells(), tmp_path / "sweep")
    md = md_path.read_text()
    rand = {r[0]: r for r in _rows(_section(md, "Randomness ablation"))}
    assert list(rand) == ["no regulariser", "random init only"]
    # ensemble minus mean member NLL: seed 0: ARC -0.2, OBQA -0.3 -> -0.25; seed 1: -0.3, -0.4 -> -0.35.
    assert rand["random init only"][1:3] == ["-0.300 [-0.350, -0.250]", "-0.050 [-0.050, -0.050]"]
    # ensemble ACC: seed 0 (0.58 + 0.48) / 2 = 0.53, seed 1 0.57; disagreement 0.10 / 0.12.
    assert rand["random init only"][3:5] == ["55.0 [53.0, 57.0]", "0.110 [0.100, 0.120]"]
    assert "| variant | ensemble minus mean member NLL | ensemble minus mean member ECE |" in md
    assert "| variant | ECE mean member | ECE ensemble |" in md
    assert "ARC-Easy ECE mean member / ensemble" in md
    reg = {r[0]: r for r in _rows(_section(md, "Regularisers"))}
    assert list(reg) == ["no regulariser", "KL 0.1"]
    # ACC ensemble for KL: seed 0 (0.61 + 0.51) / 2 = 0.56, seed 1 0.60.
    assert reg["KL 0.1"][6] == "58.0 [56.0, 60.0]"
    cost = {r[0]: r for r in _rows(_section(md, "Compute cost"))}
    # No Laplace fit and no posterior in these cells: those columns are dashes.
    assert cost["LoRA ensemble"][1:] == ["1,228,800", "90.0 [80.0, 100.0]", "—", "0.0 [0.0, 0.0]", "1,500", "—", "4"]
    assert cost["mean member + temperature"][4] == "1.0 [1.0, 1.0]"
    assert "training time is per run (all members)" in md.lower()


def test_files_and_embedded_images(tmp_path):
    html_path, md_path = build_sweep_report(_cells(), tmp_path / "out" / "sweep", title="test sweep")
    assert html_path == tmp_path / "out" / "sweep.html" and md_path == tmp_path / "out" / "sweep.md"
    md, page = md_path.read_text(), html_path.read_text()
    images = re.findall(r"!\[[^\]]*\]\(<([^>]+)>\)", md)
    assert len(images) == 3  # epochs, regularisers, ensemble size
    for rel in images:
        png = md_path.parent / rel
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count('src="data:image/png;base64,') == len(images)
    assert "<h1>test sweep</h1>" in page and "resample both the seeds" in page
    assert _titles(md) == ["Main", "Metrics", "Regularisers", "Randomness", "Ensemble", "Compute"]


def test_absent_data_skip_sections(tmp_path):
    cells = _cells(variants=("plain", "kl"), history=False)
    cells.append({**_cell("arc_easy", "plain", 2), "status": "failed"})  # left out
    html_path, md_path = build_sweep_report(cells, tmp_path / "sweep")
    md = md_path.read_text()
    assert _titles(md) == ["Main", "Regularisers", "Compute"]
    assert "1 run(s) whose status is not \"complete\"" in md
    assert _rows(_section(md, "Main table"))[1][-1] == "2"
    assert html_path.read_text().count("<img") == len(re.findall(r"!\[", md)) == 1

    only_base = [_cell(d, "plain", 0) for d in DATASETS]
    _, md_path = build_sweep_report(only_base, tmp_path / "base")
    assert _titles(md_path.read_text()) == ["Main", "Metrics", "Ensemble", "Compute"]

    _, md_path = build_sweep_report([], tmp_path / "empty")
    assert "0 complete runs" in md_path.read_text()


def test_a_variant_on_fewer_datasets_is_compared_on_those_datasets_only(tmp_path):
    cells = [c for c in _cells() if not (c["variant"] in ("init_only", "kl") and c["dataset"] == "obqa")]
    _, md_path = build_sweep_report(cells, tmp_path / "sweep")
    md = md_path.read_text()
    regs = [r[0] for r in _rows(_section(md, "Regularisers"))]
    assert regs[0] == "no regulariser"  # the base on every dataset (no full-coverage regulariser here)
    assert "no regulariser (on ARC-Easy)" in regs and "KL 0.1 (on ARC-Easy)" in regs
    rand = [r[0] for r in _rows(_section(md, "Randomness"))]
    assert rand == ["no regulariser (on ARC-Easy)", "random init only (on ARC-Easy)"]


def _with_resamples(cell: dict, noise: float = 0.0) -> dict:
    """Resamples of every method: its point value, plus or minus `noise` on alternate resamples."""
    signs = [(-1) ** r for r in range(100)]
    cell["resamples"] = {m: {k: [v + noise * s for s in signs] for k, v in entry["test"].items()}
                         for m, entry in cell["methods"].items()}
    return cell


def test_main_table_intervals_resample_seeds_and_questions(tmp_path):
    """With resamples, an entry is mean [interval over seeds and questions]: equal to the seeds' [min, max]
    when the questions add no noise (by hand: a draw averages two seed picks), wider when they do."""
    from loraens.bootstrap import seeds_and_questions_interval

    quiet = [_with_resamples(c) for c in _cells(("plain",))]
    main = _section(build_sweep_report(quiet, tmp_path / "a")[1].read_text(), "Main table")
    assert _rows(main)[1][1:4] == ["62.0 [60.0, 64.0]", "0.055 [0.050, 0.060]", "0.950 [0.900, 1.000]"]
    noisy = [_with_resamples(c, noise=0.05) for c in _cells(("plain",))]
    main = _section(build_sweep_report(noisy, tmp_path / "b")[1].read_text(), "Main table")
    per_seed = [c["resamples"]["ensemble"]["accuracy"] for c in noisy if c["dataset"] == "arc_easy"]
    low, high = seeds_and_questions_interval(per_seed, seed=0)
    assert _rows(main)[1][1] == f"62.0 [{100 * low:.1f}, {100 * high:.1f}]" and low < 0.60 and high > 0.64
    assert "95% interval over seeds and questions" in main


def test_diversity_section_gives_paired_gains(tmp_path):
    """The differences use the paired resamples: every method carries the same question noise in row r
    (+-0.05), which cancels in ensemble minus mean member, so those intervals are the seeds' spread
    alone, while the ensemble's own accuracy interval is wider than its seeds' [min, max]."""
    VARIANTS["bagging"] = ("bagging", "diversity", ("single", "ensemble"))
    try:
        cells = [_with_resamples(c, noise=0.05) for c in _cells(("plain", "bagging"))]
    finally:
        del VARIANTS["bagging"]
    md = build_sweep_report(cells, tmp_path / "sweep")[1].read_text()
    rows = _rows(_section(md, "Diversity levers"))
    assert [r[0] for r in rows] == ["no regulariser", "bagging"]
    # Ensemble minus mean member NLL: -(0.2 + 0.1 seed) on ARC-Easy and -(0.3 + 0.1 seed) on OBQA, so the
    # per-seed means over datasets are -0.25 and -0.35; ECE: -0.05 everywhere; ACC +5 points.
    assert rows[1][1:3] == ["-0.300 [-0.350, -0.250]", "-0.050 [-0.050, -0.050]"]
    assert rows[1][4] == "+5.0 [+5.0, +5.0]"
    mean, interval = rows[1][3].split(" ", 1)
    low, high = (float(x) for x in interval.strip("[]").split(", "))
    assert mean == "58.0" and low < 56.0 and high > 60.0  # seeds 56 and 60, plus the question noise
    # Against the base variant's ensemble (same seed, same questions): this bagging is 1 point more
    # accurate at the same NLL and ECE; the shared question noise cancels, so the intervals are points.
    assert rows[0][5:8] == ["—", "—", "—"]
    assert rows[1][5:8] == ["+0.000 [+0.000, +0.000]", "+0.000 [+0.000, +0.000]", "+1.0 [+1.0, +1.0]"]
    assert rows[1][8] == "0.110 [0.100, 0.120]"  # disagreement over seeds


def test_a_lever_is_compared_with_the_base_only_on_the_same_questions(tmp_path):
    """Cells whose test questions differ from the base's (another data sample) get no paired
    comparison with it, rather than a difference of two unrelated samples."""
    VARIANTS["bagging"] = ("bagging", "diversity", ("single", "ensemble"))
    try:
        cells = [_with_resamples(c, noise=0.05) for c in _cells(("plain", "bagging"))]
    finally:
        del VARIANTS["bagging"]
    for c in cells:
        c["config"] = {"data": {"seed": c["seed"] + (10 if c["variant"] == "bagging" else 0), "eval_limit": 500}}
    rows = _rows(_section(build_sweep_report(cells, tmp_path / "sweep")[1].read_text(), "Diversity levers"))
    assert rows[1][5:8] == ["—", "—", "—"]
    assert rows[1][1] == "-0.300 [-0.350, -0.250]"  # its own gain over its members is still there


def test_transfer_section_lists_every_ood_set_and_method(tmp_path):
    cells = _cells(("plain",))
    for c in cells:
        auroc = {"single": {"1-max_prob": 0.5 + 0.1 * c["seed"], "predictive_entropy_norm": 0.55},
                 "ensemble": {"1-max_prob": 0.6, "predictive_entropy_norm": 0.6, "mutual_information": 0.4,
                              "mutual_information_norm": 0.45, "member_disagreement": 0.5}}
        c["ood"] = {"mmlu:stem": {"label": "MMLU STEM", "split": "test", "num_questions": 200,
                                  "metrics": {m: _metrics(0.3, 1.4, 0.1) for m in auroc}, "auroc": auroc}}
    md = build_sweep_report(cells, tmp_path / "sweep")[1].read_text()
    rows = _rows(_section(md, "Transfer and OOD"))
    assert [r[:2] for r in rows] == [["ARC-Easy -> MMLU STEM", "mean member"],
                                     ["ARC-Easy -> MMLU STEM", "LoRA ensemble"],
                                     ["OpenBookQA -> MMLU STEM", "mean member"],
                                     ["OpenBookQA -> MMLU STEM", "LoRA ensemble"]]
    assert rows[0][2:5] == ["30.0 [30.0, 30.0]", "1.400 [1.400, 1.400]", "0.550 [0.500, 0.600]"]
    assert rows[0][6] == "—" and rows[1][6] == "0.400 [0.400, 0.400]"  # raw MI: ensembles only


def test_runs_scored_after_their_last_epoch_only_get_no_epoch_curve(tmp_path):
    cells = _cells(("plain",))
    for c in cells:
        c["epochs"] = c["epochs"][-1:]  # eval_every_epoch false: one point per run
    md = build_sweep_report(cells, tmp_path / "sweep")[1].read_text()
    assert "Metrics vs training epoch" not in md and "Main table" in md

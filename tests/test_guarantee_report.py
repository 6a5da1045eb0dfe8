"""The report's guarantees section: conformal coverage and set size, and the risk-controlled abstention,
single member vs ensemble, from a run's calibration split to its test split."""

from __future__ import annotations

import numpy as np
import torch

from loraens.calibration import fit_calibration
from loraens.cli import main
from loraens.predictions import Predictions


def _preds(n: int, seed: int, prefix: str, m: int = 4, c: int = 4) -> Predictions:
    """Members that err independently around a signal: the ensemble ranks its answers better than one member."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, c, n)
    logits = 2.0 * np.eye(c)[targets][:, None, :] + rng.normal(size=(n, m, c)) * 1.5
    probs = torch.softmax(torch.tensor(logits), -1).float()
    return Predictions(probs, torch.tensor(targets), torch.ones(n, c, dtype=torch.bool),
                       [f"{prefix}{i}" for i in range(n)])


def _run(folder, calibrated: bool):
    (folder / "predictions").mkdir(parents=True)
    val, test = _preds(400, 0, "v"), _preds(600, 1, "t")
    val.save(folder / "predictions" / "arc_easy_validation.safetensors")
    test.save(folder / "predictions" / "arc_easy_test.safetensors")
    if calibrated:
        fit_calibration(val, "arc_easy", "validation", alphas=(0.1, 0.2), risks=(0.1, 0.2)).save(folder)
    return folder


def test_report_measures_the_guarantees_on_the_test_split(tmp_path):
    run = _run(tmp_path / "run", calibrated=True)
    out = tmp_path / "report"
    assert main(["report", str(run), "--output", str(out), "--resamples", "20"]) == 0
    md = out.with_suffix(".md").read_text()
    assert "run: guarantees on arc_easy_test (calibrated on arc_easy_validation)" in md
    assert "settings from calibration.json" in md and "SGR (Geifman & El-Yaniv 2017)" in md
    section = md[md.index("guarantees on arc_easy_test"):]
    rows = [line for line in section.splitlines() if line.startswith("| ensemble | LAC | 0.90")]
    assert rows, section[:2000]
    coverage = float(rows[0].split("|")[4].split()[0])
    assert coverage >= 0.85  # 1 - alpha = 0.9, on 600 test questions
    assert "| ensemble | 0.1 |" in section and "test coverage kept" in section
    assert "Reading: LAC sets at alpha 0.1: mean size" in section
    assert "Guarantees on arc_easy_test" in md  # the figure


def test_report_without_calibration_pairs_validation_with_test(tmp_path):
    run = _run(tmp_path / "plain", calibrated=False)
    out = tmp_path / "report"
    assert main(["report", str(run), "--output", str(out), "--resamples", "20"]) == 0
    md = out.with_suffix(".md").read_text()
    assert "guarantees on arc_easy_test (calibrated on arc_easy_validation)" in md
    assert "defaults (no calibration.json)" in md
    # Three alphas of the defaults x two set methods x three models.
    section = md[md.index("guarantees on arc_easy_test"):]
    assert sum(line.startswith(("| single member", "| mean member", "| ensemble")) for line in
               section.split("| model | target risk r")[0].splitlines()) == 18


def test_sweep_report_compares_the_guarantees_of_mean_member_and_ensemble(tmp_path):
    from loraens.sweep import guarantees
    from loraens.sweep_report import build_sweep_report

    cells = []
    for seed in (0, 1):
        record = guarantees(_preds(300, 10 + seed, "v"), _preds(400, 20 + seed, "t"))
        assert set(record) >= {"mean_member", "ensemble", "alphas", "risks"}
        cells.append({"dataset": "arc_easy", "dataset_label": "ARC-Easy", "variant": "plain",
                      "variant_label": "no regulariser", "variant_group": "base", "seed": seed, "status": "complete",
                      "methods": {}, "guarantees": record})
    html, md = build_sweep_report(cells, tmp_path / "summary")
    text = md.read_text()
    section = text[text.index("## Answers with guarantees"):]
    assert "| ARC-Easy: mean member |" in section and "| ARC-Easy: ensemble |" in section
    assert "LAC set size (alpha 0.1)" in section and "answered at risk 0.1" in section
    row = next(line for line in section.splitlines() if line.startswith("| ARC-Easy: ensemble |"))
    coverage = float(row.split("|")[2].strip().strip("*").split()[0])
    assert 0.8 < coverage <= 1.0
    # Without guarantees in the cells (older sweeps), the section is left out.
    for c in cells:
        del c["guarantees"]
    _, md = build_sweep_report(cells, tmp_path / "old")
    assert "Answers with guarantees" not in md.read_text()


def test_sweep_report_leaves_out_guarantees_measured_on_their_calibration_split(tmp_path):
    from loraens.sweep import guarantees
    from loraens.sweep_report import build_sweep_report

    preds = _preds(300, 10, "v")
    cell = {"dataset": "arc_easy", "dataset_label": "ARC-Easy", "variant": "plain", "variant_label": "plain",
            "variant_group": "base", "seed": 0, "status": "complete", "methods": {},
            "test_key": "arc_easy_validation", "val_key": "arc_easy_validation", "guarantees": guarantees(preds, preds)}
    _, md = build_sweep_report([cell], tmp_path / "summary")
    assert "Answers with guarantees" not in md.read_text()

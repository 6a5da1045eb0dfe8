"""`loraens report`: files written, sections present, and the HTML checked in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from loraens.cli import main
from loraens.predictions import Predictions


def _fake_predictions(n: int, m: int, c: int, sharpness: float, seed: int, choices: int | None = None) -> Predictions:
    """Member probabilities of a made-up ensemble: right more often than not, members differ."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, choices or c, n)
    logits = rng.normal(size=(n, m, c)) + sharpness * np.eye(c)[targets][:, None, :]
    mask = np.zeros((n, c), dtype=bool)
    mask[:, : (choices or c)] = True
    logits[:, :, ~mask[0]] = -np.inf
    probs = torch.softmax(torch.tensor(logits), -1).float()
    return Predictions(probs, torch.tensor(targets), torch.tensor(mask), [f"q{i}" for i in range(n)])


def _fake_run(folder, sharpness_in: float, seed: int):
    (folder / "predictions").mkdir(parents=True)
    _fake_predictions(120, 4, 4, sharpness_in, seed).save(folder / "predictions" / "openbookqa_test.safetensors")
    # OOD sets: the model is less sure there; one of them has 5 choices.
    _fake_predictions(80, 4, 4, 0.5, seed + 1).save(folder / "predictions" / "arc_challenge_test.safetensors")
    _fake_predictions(80, 4, 5, 0.5, seed + 2).save(folder / "predictions" / "mmlu-stem_test.safetensors")
    results = {"splits": {}, "ood": {"openbookqa_test": {"arc_challenge_test": {}, "mmlu-stem_test": {}}}}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def two_runs(tmp_path):
    return _fake_run(tmp_path / "run_a", 2.5, 0), _fake_run(tmp_path / "run_b", 1.5, 0)


def test_report_writes_html_and_markdown_with_every_part(two_runs, tmp_path):
    out = tmp_path / "cmp" / "report"
    assert main(["report", str(two_runs[0]), str(two_runs[1]), "--output", str(out), "--resamples", "50"]) == 0
    md = (tmp_path / "cmp" / "report.md").read_text()
    for needle in ("Runs side by side", "paired bootstrap", "Reliability diagram", "AURC", "acc @ 80% coverage",
                   "out-of-distribution detection", "AUROC [95% interval]", "FPR @ 95% TPR", "Ensemble-size curve",
                   "arc_challenge_test", "mmlu-stem_test"):
        assert needle in md, needle
    # One meaning per word (as in the sweep report): "single member" is always member 0, named so;
    # "mean member" is the mean of the members' metrics.
    assert "| single member (member 0) |" in md and "| mean member |" in md
    assert not re.findall(r"single member(?! \(member 0\))", md)
    # Every metric cell carries an interval: "value [low, high]".
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", md)
    figures = sorted((tmp_path / "cmp" / "report_files").glob("*.png"))
    assert len(figures) >= 8 and all(f.read_bytes()[:4] == b"\x89PNG" for f in figures)
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figures)  # self-contained


def test_report_output_name_with_a_dot(two_runs, tmp_path):
    assert main(["report", str(two_runs[0]), "--output", str(tmp_path / "obqa.v2"), "--resamples", "20"]) == 0
    assert (tmp_path / "obqa.v2.html").is_file() and (tmp_path / "obqa.v2.md").is_file()
    assert "](<obqa.v2_files/figure_1.png>)" in (tmp_path / "obqa.v2.md").read_text()


def test_report_needs_predictions(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no predictions/" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_html_loads_in_a_headless_browser(two_runs, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser check: .ci/run installs Debian's chromium.")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out = tmp_path / "report"
    assert main(["report", str(two_runs[0]), "--output", str(out), "--resamples", "20"]) == 0
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
           (out.with_suffix(".html")).as_uri()]
    dom = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120).stdout
    images = re.search(r'data-images="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    errors = re.search(r'data-errors="(\d+)"', dom)
    assert images and loaded and errors, f"the page's load handler did not run; DOM starts {dom[:300]!r}"
    assert int(images.group(1)) >= 6
    assert loaded.group(1) == images.group(1), "some images did not render"
    assert errors.group(1) == "0", "the page raised errors while loading"
    assert "Reliability diagram" in dom and "AUROC" in dom


def test_the_ood_section_gives_each_ood_set_its_transfer_metrics_and_raw_mutual_information(two_runs, tmp_path):
    """The OOD sets' own accuracy / NLL (with intervals, equal to metric_cis on their predictions) and the
    raw mutual information's AUROC are in the report, not only in results.json."""
    from loraens.bootstrap import metric_cis
    from loraens.metrics import ensemble_probs

    out = tmp_path / "report"
    assert main(["report", str(two_runs[0]), "--output", str(out), "--resamples", "50"]) == 0
    md = out.with_suffix(".md").read_text()
    p = Predictions.load(two_runs[0] / "predictions" / "arc_challenge_test.safetensors")
    ci = metric_cis(ensemble_probs(p.member_probs.double().numpy()).numpy(), p.targets.numpy(), n_resamples=50, seed=0)
    row = next(line for line in md.splitlines() if line.startswith("| arc_challenge_test | ensemble |"))
    assert f"{ci['accuracy']['value']:.3f} [{ci['accuracy']['low']:.3f}, {ci['accuracy']['high']:.3f}]" in row
    assert f"{ci['nll']['value']:.3f} [{ci['nll']['low']:.3f}, {ci['nll']['high']:.3f}]" in row
    assert "| mmlu-stem_test | ensemble minus mean member |" in md
    assert "| arc_challenge_test | mutual_information |" in md
    assert "| arc_challenge_test | mutual_information_norm |" in md

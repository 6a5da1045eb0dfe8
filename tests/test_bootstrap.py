"""Bootstrap intervals, paired differences, and the ensemble-size curve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraens.bootstrap import bootstrap_ci, format_ci, metric_cis, paired_bootstrap
from loraens.ensemble_size import ensemble_size_curve
from loraens.metrics import compute_metrics, ece, evaluate_ensemble, nll


def _probs(n: int, seed: int, c: int = 4, sharp: float = 2.0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + sharp * np.eye(c)[targets]
    return torch.softmax(torch.tensor(logits), -1).numpy(), targets


def _mean(x):
    return float(np.mean(x))


def test_seeded_and_contains_the_mean():
    x = np.random.default_rng(0).normal(size=300)
    a, b = bootstrap_ci(_mean, x, n_resamples=200, seed=1), bootstrap_ci(_mean, x, n_resamples=200, seed=1)
    assert a == b
    assert a["value"] == pytest.approx(x.mean())
    assert a["low"] < a["value"] < a["high"]
    assert bootstrap_ci(_mean, x, n_resamples=200, seed=2) != a


def test_interval_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=100), rng.normal(size=1600)
    w_small = bootstrap_ci(_mean, small, n_resamples=400)
    w_large = bootstrap_ci(_mean, large, n_resamples=400)
    ratio = (w_small["high"] - w_small["low"]) / (w_large["high"] - w_large["low"])
    assert 3.0 < ratio < 5.3  # sqrt(1600 / 100) = 4


def test_paired_against_itself_is_zero():
    p, t = _probs(200, 0)
    d = paired_bootstrap(nll, (p, t), (p, t), n_resamples=100)
    assert d["diff"] == d["low"] == d["high"] == 0.0 and d["p_value"] == 1.0


def test_paired_detects_a_clearly_better_method():
    p, t = _probs(300, 0)
    flat = np.full_like(p, 0.25)
    d = paired_bootstrap(nll, (p, t), (flat, t), n_resamples=200)
    assert d["diff"] < 0 and d["high"] < 0 and d["p_value"] < 0.05


def test_paired_needs_the_same_questions():
    p, t = _probs(10, 0)
    with pytest.raises(ValueError, match="N = 10 and N = 9"):
        paired_bootstrap(nll, (p, t), (p[:9], t[:9]))


def test_metric_cis_point_values_and_vectorised_resamples_match_plain_metrics():
    p, t = _probs(150, 4, sharp=1.0)
    cis = metric_cis(p, t, n_resamples=50, seed=7)
    full = compute_metrics(p, t)
    for k in full:
        assert cis[k]["value"] == pytest.approx(full[k])
        assert cis[k]["low"] <= full[k] <= cis[k]["high"] or k == "ece"  # ECE is biased upward under resampling
    # Reproduce the resample draw: the vectorised ECE of resample r equals ece() on those questions.
    idx = np.random.default_rng(7).integers(0, 150, size=(50, 150))
    one = metric_cis(p, t, n_resamples=50, seed=7)
    plain = np.array([ece(p[i], t[i]) for i in idx])
    assert one["ece"]["low"] == pytest.approx(np.quantile(plain, 0.025))
    assert one["ece"]["high"] == pytest.approx(np.quantile(plain, 0.975))
    assert one["ece"]["std"] == pytest.approx(plain.std())


def test_format_ci():
    assert format_ci({"value": 0.7123, "low": 0.675, "high": 0.7481}) == "0.712 [0.675, 0.748]"


# ---------------------------------------------------------------- ensemble size


def _member_probs(n: int, m: int, seed: int):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, m, 4)) * 2 + 1.5 * np.eye(4)[targets][:, None]
    return torch.softmax(torch.tensor(logits), -1).numpy(), targets


def test_single_member_curve():
    mp, t = _member_probs(50, 1, 0)
    rows = ensemble_size_curve(mp, t)
    assert len(rows) == 1 and rows[0]["first"] == pytest.approx(compute_metrics(mp[:, 0], t))
    assert all(v == 0 for v in rows[0]["random_std"].values())


def test_identical_members_give_a_flat_curve():
    mp, t = _member_probs(40, 1, 1)
    rows = ensemble_size_curve(np.repeat(mp, 3, axis=1), t)
    for r in rows:
        assert r["first"] == pytest.approx(rows[0]["first"])
        assert r["random_mean"] == pytest.approx(rows[0]["first"])


def test_full_ensemble_row_matches_evaluate_ensemble_and_beats_mean_member_nll():
    mp, t = _member_probs(80, 4, 2)
    rows = ensemble_size_curve(mp, t, n_subsets=5, seed=3)
    assert [r["m"] for r in rows] == [1, 2, 3, 4]
    full = evaluate_ensemble(mp, t)
    assert rows[-1]["first"] == pytest.approx(full["ensemble"])
    assert rows[-1]["random_std"]["nll"] == 0.0  # one subset of size M
    # By convexity of -log, the full ensemble's NLL is at most the mean member's.
    assert rows[-1]["first"]["nll"] <= full["mean_member"]["nll"]
    # m = 1 over all subsets (4 <= n_subsets? no: 4 members, 5 subsets -> all 4 singletons).
    assert rows[0]["random_mean"]["nll"] == pytest.approx(full["mean_member"]["nll"])

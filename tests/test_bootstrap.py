"""Tests for loraens.bootstrap: seeding, coverage, scaling, paired differences, vectorised metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loraens.bootstrap as bootstrap
from loraens.bootstrap import (
    bootstrap_ci,
    format_ci,
    metric_cis,
    metric_resamples,
    paired_bootstrap,
    paired_metric_diffs,
    resample_indices,
)
from loraens.metrics import METRIC_NAMES, accuracy, brier, compute_metrics, ece, nll

METRIC_FNS = {"accuracy": accuracy, "nll": nll, "ece": ece, "brier": brier}


def _probs(n: int, seed: int, c: int = 4, sharp: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of noise plus ``sharp`` on the target: better than chance, not perfect."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + sharp * np.eye(c)[targets]
    return torch.softmax(torch.tensor(logits), -1).numpy(), targets


def _mean(x) -> float:
    return float(np.mean(x))


# --------------------------------------------------------------------------- any metric


def test_seeded_and_contains_the_mean():
    x = np.random.default_rng(0).normal(size=300)
    a = bootstrap_ci(_mean, x, n_resamples=200, seed=1)
    assert a == bootstrap_ci(_mean, x, n_resamples=200, seed=1)
    assert a != bootstrap_ci(_mean, x, n_resamples=200, seed=2)
    assert set(a) == {"value", "low", "high", "std"}
    assert a["value"] == pytest.approx(x.mean())
    assert a["low"] < a["value"] < a["high"]


def test_resample_r_uses_row_r_of_the_index_matrix():
    x = np.arange(7.0)
    idx = resample_indices(7, 5, seed=3)
    # The documented draw: one seeded generator, integers in [0, N), shape [R, N].
    assert np.array_equal(idx, np.random.default_rng(3).integers(0, 7, size=(5, 7)))
    seen = []
    bootstrap_ci(lambda v: seen.append(v.copy()) or 0.0, x, n_resamples=5, seed=3)
    assert np.array_equal(np.stack(seen[:5]), x[idx])  # seen[5] is the point estimate on all of x


def test_interval_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(0)
    # Standardised samples (population std exactly 1), so only the resampling is random and the
    # bootstrap std of the mean is 1/sqrt(N): 0.1 at N = 100, 0.025 at N = 1600, ratio 4.
    small, large = (z := rng.normal(size=100)) - z.mean(), (w := rng.normal(size=1600)) - w.mean()
    small, large = small / small.std(), large / large.std()
    ci_small = bootstrap_ci(_mean, small, n_resamples=400)
    ci_large = bootstrap_ci(_mean, large, n_resamples=400)
    assert ci_small["std"] == pytest.approx(0.1, rel=0.15)
    assert ci_large["std"] == pytest.approx(0.025, rel=0.15)
    assert 3.4 < ci_small["std"] / ci_large["std"] < 4.7
    width_ratio = (ci_small["high"] - ci_small["low"]) / (ci_large["high"] - ci_large["low"])
    assert 3.0 < width_ratio < 5.3


def test_torch_tensors_reach_the_metric_as_tensors():
    p, t = _probs(50, 1)
    pt, tt = torch.tensor(p), torch.tensor(t)

    def acc(probs, targets):
        assert isinstance(probs, torch.Tensor) and isinstance(targets, torch.Tensor)
        return accuracy(probs, targets)

    assert bootstrap_ci(acc, pt, tt, n_resamples=20) == pytest.approx(
        bootstrap_ci(accuracy, p, t, n_resamples=20)
    )


def test_arrays_must_share_n():
    with pytest.raises(ValueError, match=r"same number of questions N on axis 0.*\(5, 3\), \(4,\)"):
        bootstrap_ci(accuracy, np.full((5, 3), 1 / 3), np.zeros(4, dtype=int))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_resamples": 0}, "`n_resamples` should be a positive integer"), ({"alpha": 1.5}, "`alpha` should be in")],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(_mean, np.arange(3.0), **kwargs)


# --------------------------------------------------------------------------- paired


def test_paired_against_itself_is_zero():
    p, t = _probs(200, 0)
    d = paired_bootstrap(nll, (p, t), (p, t), n_resamples=100)
    # Every resampled difference is exactly 0: both tails hold all of them -> p = min(1, 2 * 1).
    assert d == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}


def test_paired_detects_a_clearly_better_method():
    p, t = _probs(300, 0)
    flat = np.full_like(p, 0.25)
    d = paired_bootstrap(nll, (p, t), (flat, t), n_resamples=200)
    assert d["diff"] == pytest.approx(nll(p, t) - nll(flat, t))
    assert d["diff"] < 0 and d["high"] < 0 and d["p_value"] < 0.05


def test_paired_is_antisymmetric():
    p, t = _probs(120, 2, sharp=0.5)
    q, _ = _probs(120, 3, sharp=0.5)  # another method's probabilities on the same questions
    ab = paired_bootstrap(brier, (p, t), (q, t), n_resamples=200, seed=4)
    ba = paired_bootstrap(brier, (q, t), (p, t), n_resamples=200, seed=4)
    assert ba["diff"] == pytest.approx(-ab["diff"])
    assert (ba["low"], ba["high"]) == pytest.approx((-ab["high"], -ab["low"]))
    assert ba["p_value"] == pytest.approx(ab["p_value"])
    assert 0.0 <= ab["p_value"] <= 1.0


def test_paired_needs_the_same_questions():
    p, t = _probs(10, 0)
    with pytest.raises(ValueError,
                       match=r"N = 10 and N = 9 \(shapes \[\(10, 4\), \(10,\)\] and \[\(9, 4\), \(9,\)\]\)"):
        paired_bootstrap(nll, (p, t), (p[:9], t[:9]))


# --------------------------------------------------------------------------- vectorised metrics


def test_metric_cis_point_values_are_compute_metrics():
    p, t = _probs(150, 4, sharp=1.0)
    cis = metric_cis(p, t, n_resamples=200, seed=7)
    full = compute_metrics(p, t)
    assert list(cis) == list(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert cis[k]["value"] == full[k]
        assert cis[k]["low"] <= cis[k]["high"]
        if k != "ece":  # ECE is biased upward under resampling; its interval may sit above it
            assert cis[k]["low"] <= full[k] <= cis[k]["high"]


def test_vectorised_resamples_equal_plain_metrics_on_the_same_indices():
    p, t = _probs(150, 4, sharp=1.0)
    values = metric_resamples(p, t, n_resamples=50, seed=7)
    idx = np.random.default_rng(7).integers(0, 150, size=(50, 150))  # reproduce the draw
    for r in range(5):
        for k, fn in METRIC_FNS.items():
            assert values[k][r] == pytest.approx(fn(p[idx[r]], t[idx[r]]), abs=1e-12), (k, r)
    # ...and so the summaries match the plain per-resample ECE as well.
    plain = np.array([ece(p[i], t[i]) for i in idx])
    ci = metric_cis(p, t, n_resamples=50, seed=7)["ece"]
    assert ci["low"] == pytest.approx(np.quantile(plain, 0.025))
    assert ci["high"] == pytest.approx(np.quantile(plain, 0.975))
    assert ci["std"] == pytest.approx(plain.std())


def test_vectorised_ece_respects_n_bins_and_bin_edges():
    # Confidences exactly on 5-bin edges (0.4, 0.6, 0.8, 1.0) must fall into the lower bin, as ece() does.
    p = np.array([[0.4, 0.3, 0.3], [0.6, 0.4, 0.0], [0.8, 0.2, 0.0], [1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
    t = np.array([0, 1, 0, 0, 2])
    values = metric_resamples(p, t, n_resamples=30, seed=1, n_bins=5)
    for r, i in enumerate(resample_indices(5, 30, seed=1)):
        assert values["ece"][r] == pytest.approx(ece(p[i], t[i], n_bins=5), abs=1e-12)


def test_blocked_draw_equals_one_draw(monkeypatch):
    p, t = _probs(40, 5)
    whole = metric_resamples(p, t, n_resamples=30, seed=2)
    monkeypatch.setattr(bootstrap, "_BLOCK_ELEMENTS", 7 * 40)  # blocks of 7 resamples
    blocked = metric_resamples(p, t, n_resamples=30, seed=2)
    for k in METRIC_NAMES:
        np.testing.assert_array_equal(blocked[k], whole[k])


def test_metric_cis_agree_with_the_generic_bootstrap():
    p, t = _probs(80, 6, sharp=1.0)
    cis = metric_cis(p, t, n_resamples=60, seed=9)
    for k, fn in METRIC_FNS.items():
        assert bootstrap_ci(fn, p, t, n_resamples=60, seed=9) == pytest.approx(cis[k], abs=1e-12), k


def test_paired_metric_diffs_agree_with_paired_bootstrap():
    p, t = _probs(80, 6, sharp=1.0)
    q, _ = _probs(80, 8, sharp=0.3)
    diffs = paired_metric_diffs(p, q, t, n_resamples=60, seed=9)
    for k, fn in METRIC_FNS.items():
        expected = paired_bootstrap(fn, (p, t), (q, t), n_resamples=60, seed=9)
        assert diffs[k] == pytest.approx(expected, abs=1e-12), k


def test_metric_cis_accept_torch():
    p, t = _probs(60, 3)
    assert metric_cis(torch.tensor(p, dtype=torch.float64), torch.tensor(t), n_resamples=40) == metric_cis(
        p, t, n_resamples=40
    )


def test_format_ci():
    assert format_ci({"value": 0.7123, "low": 0.675, "high": 0.7481, "std": 0.02}) == "0.712 [0.675, 0.748]"
    assert format_ci({"diff": -0.01234, "low": -0.03, "high": 0.02, "p_value": 0.2}, digits=2) == "-0.01 [-0.03, 0.02]"


# ---------------------------------------------------------------- ensemble gain, seeds and questions

def test_ensemble_gain_equals_the_loop_over_resamples():
    from loraens.bootstrap import ensemble_gain, resample_indices
    from loraens.metrics import compute_metrics

    rng = np.random.default_rng(3)
    n, m, c = 60, 3, 4
    targets = rng.integers(0, c, n)
    mp = torch.softmax(torch.tensor(rng.normal(size=(n, m, c)) * 2 + 1.5 * np.eye(c)[targets][:, None]), -1)
    gain = ensemble_gain(mp, targets, n_resamples=40, seed=5)
    diffs = {k: [] for k in ("accuracy", "nll", "ece", "brier")}
    for idx in resample_indices(n, 40, 5):
        ens = compute_metrics(mp[idx].mean(1), targets[idx])
        mean = {k: np.mean([compute_metrics(mp[idx, j], targets[idx])[k] for j in range(m)]) for k in diffs}
        for k in diffs:
            diffs[k].append(ens[k] - mean[k])
    for k, d in diffs.items():
        low, high = np.quantile(d, [0.025, 0.975])
        assert gain[k]["low"] == pytest.approx(low, abs=1e-9) and gain[k]["high"] == pytest.approx(high, abs=1e-9)
    point_ens = compute_metrics(mp.mean(1), targets)["nll"]
    point_mean = np.mean([compute_metrics(mp[:, j], targets)["nll"] for j in range(m)])
    assert gain["nll"]["diff"] == pytest.approx(point_ens - point_mean)
    assert gain["nll"]["diff"] < 0  # averaging probabilities lowers NLL (Jensen)


def test_seeds_and_questions_interval_by_hand():
    from loraens.bootstrap import seeds_and_questions_interval

    # Two seeds whose question resamples are constant (no question noise): a draw averages two
    # seed picks, so it is a (1/4), (a + b) / 2 (1/2) or b (1/4): the 95% interval is [a, b].
    low, high = seeds_and_questions_interval([np.full(10, 1.0), np.full(10, 3.0)], n_draws=4000)
    assert (low, high) == (1.0, 3.0)
    # One seed: the interval is that seed's question bootstrap alone.
    values = np.linspace(0.0, 1.0, 1001)
    low, high = seeds_and_questions_interval([values], n_draws=20000)
    assert low == pytest.approx(0.025, abs=0.01) and high == pytest.approx(0.975, abs=0.01)
    # Question noise widens the interval beyond the seeds' spread.
    noisy = seeds_and_questions_interval([1.0 + values - 0.5, 3.0 + values - 0.5], n_draws=4000)
    assert noisy[0] < 1.0 and noisy[1] > 3.0
    # Two seeds that scored the same questions (the same resample in each row) are paired: their
    # interval is that of one seed, not narrower as if their question noise were independent.
    one = seeds_and_questions_interval([values], n_draws=20000)
    both = seeds_and_questions_interval([values, values], n_draws=20000)
    assert both[0] == pytest.approx(one[0], abs=0.01) and both[1] == pytest.approx(one[1], abs=0.01)
    with pytest.raises(ValueError, match="at least one seed"):
        seeds_and_questions_interval([])
    with pytest.raises(ValueError, match="same number of resamples"):
        seeds_and_questions_interval([values, values[:10]])

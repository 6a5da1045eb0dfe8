"""Tests for loraens.ensemble_size: hand-built members, and agreement with evaluate_ensemble."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from loraens.ensemble_size import _subsets, ensemble_size_curve
from loraens.metrics import METRIC_NAMES, compute_metrics, ensemble_probs, evaluate_ensemble


def _member_probs(n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, m, 4] members, each better than chance and different from the others."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, m, 4)) * 2 + 1.5 * np.eye(4)[targets][:, None]
    return torch.softmax(torch.tensor(logits), -1).numpy(), targets


def test_single_member_curve():
    mp, t = _member_probs(50, 1, 0)
    rows = ensemble_size_curve(mp, t)
    assert len(rows) == 1
    assert rows[0]["m"] == 1 and rows[0]["num_subsets"] == 1
    assert rows[0]["first"] == pytest.approx(compute_metrics(mp[:, 0], t))
    assert rows[0]["random_mean"] == pytest.approx(rows[0]["first"])
    assert all(v == 0 for v in rows[0]["random_std"].values())


def test_identical_members_give_a_flat_curve():
    mp, t = _member_probs(40, 1, 1)
    rows = ensemble_size_curve(np.repeat(mp, 3, axis=1), t)
    single = compute_metrics(mp[:, 0], t)
    assert [r["m"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["first"] == pytest.approx(single)
        assert r["random_mean"] == pytest.approx(single)
        assert r["random_std"] == pytest.approx(dict.fromkeys(METRIC_NAMES, 0.0), abs=1e-12)


def test_first_m_nll_falls_when_members_are_built_so():
    # Two choices, target 0 on every question; member k puts p_k = 0.2, 0.4, 0.6, 0.8 on it.
    # The first m members average to 0.2, 0.3, 0.4, 0.5, so NLL = -ln of those:
    # 1.6094, 1.2040, 0.9163, 0.6931, falling with m.
    p_true = np.array([0.2, 0.4, 0.6, 0.8])
    member = np.stack([p_true, 1 - p_true], axis=-1)  # [M, C]
    mp = np.repeat(member[None], 6, axis=0)  # [N=6, M=4, C=2]
    rows = ensemble_size_curve(mp, np.zeros(6, dtype=int))
    nlls = [r["first"]["nll"] for r in rows]
    assert nlls == pytest.approx([-math.log(0.2), -math.log(0.3), -math.log(0.4), -math.log(0.5)])
    assert all(a > b for a, b in itertools.pairwise(nlls))


def test_full_ensemble_row_matches_evaluate_ensemble_and_beats_mean_member_nll():
    mp, t = _member_probs(80, 4, 2)
    rows = ensemble_size_curve(mp, t, n_subsets=5, seed=3)
    full = evaluate_ensemble(mp, t)
    assert [r["m"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["first"] == pytest.approx(full["ensemble"])
    assert rows[-1]["random_mean"] == pytest.approx(full["ensemble"])
    assert rows[-1]["num_subsets"] == 1 and rows[-1]["random_std"]["nll"] == 0.0
    # By convexity of -log, the full ensemble's NLL is at most the mean member's.
    assert rows[-1]["first"]["nll"] <= full["mean_member"]["nll"]
    # m = 1: C(4, 1) = 4 <= 5 subsets, so every singleton is used: the mean member.
    assert rows[0]["num_subsets"] == 4
    assert rows[0]["random_mean"] == pytest.approx(full["mean_member"])


def test_all_subsets_when_there_are_few():
    mp, t = _member_probs(30, 4, 4)
    row = ensemble_size_curve(mp, t, n_subsets=20)[1]  # m = 2: C(4, 2) = 6 <= 20
    pairs = [compute_metrics(ensemble_probs(mp[:, list(s)]), t) for s in itertools.combinations(range(4), 2)]
    assert row["num_subsets"] == 6
    for k in METRIC_NAMES:
        values = [x[k] for x in pairs]
        assert row["random_mean"][k] == pytest.approx(np.mean(values))
        assert row["random_std"][k] == pytest.approx(np.std(values))


def test_random_subsets_are_distinct_seeded_and_counted():
    subsets = _subsets(6, 3, 5, np.random.default_rng(0))  # C(6, 3) = 20 > 5: drawn at random
    assert len(set(subsets)) == 5 and all(list(s) == sorted(s) and len(s) == 3 for s in subsets)
    mp, t = _member_probs(30, 6, 5)
    rows = ensemble_size_curve(mp, t, n_subsets=5, seed=1)
    assert [r["num_subsets"] for r in rows] == [5, 5, 5, 5, 5, 1]  # C(6, 5) = 6 > 5 too
    assert ensemble_size_curve(mp, t, n_subsets=5, seed=1) == rows
    assert ensemble_size_curve(mp, t, n_subsets=5, seed=2) != rows


def test_accepts_torch():
    mp, t = _member_probs(20, 3, 6)
    assert ensemble_size_curve(torch.tensor(mp, dtype=torch.float64), torch.tensor(t)) == ensemble_size_curve(mp, t)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.full((4, 2, 3), 1 / 3), np.zeros(4, dtype=int)), {"n_subsets": 0}, "`n_subsets` should be a positive"),
        ((np.full((4, 3), 1 / 3), np.zeros(4, dtype=int)), {}, r"`member_probs` should have shape \[N, M, C\]"),
        ((np.full((4, 2, 3), 1 / 3), np.zeros(5, dtype=int)), {}, r"`targets` should have shape \[N\] with N = 4"),
    ],
)
def test_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ensemble_size_curve(*args, **kwargs)

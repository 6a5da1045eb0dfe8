"""OOD detection metrics: hand-computed cases, a pairwise reference, and torchmetrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from loraens.ood import ood_metrics, roc_points


def _pairwise_auroc(s_in, s_out) -> float:
    """Reference: P(score_out > score_in) + 1/2 P(tie), counted over every pair."""
    wins = sum((o > i) + 0.5 * (o == i) for o, i in itertools.product(s_out, s_in))
    return wins / (len(s_in) * len(s_out))


def test_perfect_separation():
    m = ood_metrics([0.1, 0.2, 0.3], [0.7, 0.8, 0.9])
    assert m == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}


def test_constant_scores_are_chance():
    m = ood_metrics([0.5] * 4, [0.5] * 4)
    assert m["auroc"] == 0.5
    assert m["fpr95"] == 1.0  # flagging all OOD questions flags every in-distribution one too


def test_three_by_three_by_hand():
    s_in, s_out = [0.1, 0.4, 0.6], [0.3, 0.5, 0.9]
    # Pairs (out > in): 0.3 beats 0.1 (1); 0.5 beats 0.1, 0.4 (2); 0.9 beats all three (3) -> 6 of 9.
    m = ood_metrics(s_in, s_out)
    assert m["auroc"] == pytest.approx(6 / 9)
    # Catching >= 95% of OOD means catching all three: threshold 0.3 flags in-dist 0.4 and 0.6 -> 2/3.
    assert m["fpr95"] == pytest.approx(2 / 3)
    # AUPR (average precision), ranking 0.9(out) 0.6(in) 0.5(out) 0.4(in) 0.3(out):
    # precision at each OOD hit: 1/1, 2/3, 3/5 -> mean = (1 + 2/3 + 3/5) / 3.
    assert m["aupr"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_pairwise_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    s_in = rng.integers(0, 6, 30) / 5  # coarse values: many ties
    s_out = rng.integers(1, 7, 25) / 5
    assert ood_metrics(s_in, s_out)["auroc"] == pytest.approx(_pairwise_auroc(s_in, s_out))
    flipped = ood_metrics(-s_in, -s_out)["auroc"]
    assert flipped == pytest.approx(1 - ood_metrics(s_in, s_out)["auroc"])


def test_auroc_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    rng = np.random.default_rng(3)
    s_in, s_out = rng.normal(0, 1, 200), rng.normal(0.7, 1, 150)
    expected = tm.binary_auroc(torch.tensor(np.r_[s_in, s_out]), torch.tensor(np.r_[np.zeros(200), np.ones(150)]).long())
    assert ood_metrics(s_in, s_out)["auroc"] == pytest.approx(float(expected), abs=1e-6)


def test_roc_points_run_from_origin_to_one():
    fpr, tpr = roc_points([0.1, 0.4], [0.3, 0.9])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1


@pytest.mark.parametrize(("s_in", "s_out", "match"), [([], [1.0], "score_in"), ([0.1], [np.nan], "score_out")])
def test_bad_inputs(s_in, s_out, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(s_in, s_out)

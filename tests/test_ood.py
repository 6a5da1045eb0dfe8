"""Tests for loraens.ood: hand-computed cases, a pairwise reference, and torchmetrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from loraens.ood import OOD_METRIC_NAMES, fpr_at_tpr, ood_metrics, roc_points


def _pairwise_auroc(s_in, s_out) -> float:
    """Reference: P(score_out > score_in) + 1/2 P(tie), counted over every (out, in) pair."""
    wins = sum((o > i) + 0.5 * (o == i) for o, i in itertools.product(s_out, s_in))
    return wins / (len(s_in) * len(s_out))


# --------------------------------------------------------------------------- hand-computed


def test_perfect_separation():
    # Every OOD score is above every in-distribution score: all 9 pairs won, precision 1 at every
    # OOD hit, and the threshold 0.7 flags all OOD questions and no in-distribution one.
    m = ood_metrics([0.1, 0.2, 0.3], [0.7, 0.8, 0.9])
    assert m == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    assert tuple(m) == OOD_METRIC_NAMES


def test_constant_scores_are_chance():
    m = ood_metrics([0.5] * 4, [0.5] * 4)
    assert m["auroc"] == 0.5  # all 16 pairs tied: 16 * 1/2 / 16
    assert m["fpr95"] == 1.0  # flagging all OOD questions flags every in-distribution one too
    assert m["aupr"] == 0.5  # one threshold, precision 4/8 at recall 1


def test_three_by_three_by_hand():
    s_in, s_out = [0.1, 0.4, 0.6], [0.3, 0.5, 0.9]
    # Pairs (out > in): 0.3 beats 0.1 (1); 0.5 beats 0.1, 0.4 (2); 0.9 beats all three (3) -> 6/9.
    m = ood_metrics(s_in, s_out)
    assert m["auroc"] == pytest.approx(6 / 9)
    # Catching >= 95% of OOD means catching all three: threshold 0.3 flags in-dist 0.4 and 0.6 -> 2/3.
    assert m["fpr95"] == pytest.approx(2 / 3)
    # Average precision, ranking 0.9(out) 0.6(in) 0.5(out) 0.4(in) 0.3(out):
    # precision at each OOD hit 1/1, 2/3, 3/5, each a recall step of 1/3 -> (1 + 2/3 + 3/5) / 3.
    assert m["aupr"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_three_by_three_with_a_tie_by_hand():
    s_in, s_out = [0.1, 0.4, 0.35], [0.8, 0.4, 0.2]
    # Pairs: out 0.8 beats all three (3); out 0.4 beats 0.1 and 0.35, ties 0.4 (2 + 1/2);
    # out 0.2 beats 0.1 only (1) -> 6.5 / 9.
    m = ood_metrics(s_in, s_out)
    assert m["auroc"] == pytest.approx(6.5 / 9)
    assert _pairwise_auroc(s_in, s_out) == pytest.approx(6.5 / 9)
    # Flagging all OOD needs threshold 0.2, which flags in-dist 0.4 and 0.35 -> 2/3.
    assert m["fpr95"] == pytest.approx(2 / 3)
    # Thresholds 0.8: TP 1, FP 0 -> P 1,   R 1/3
    #            0.4: TP 2, FP 1 -> P 2/3, R 2/3   (the tie enters as a block)
    #           0.35: TP 2, FP 2 -> no recall step
    #            0.2: TP 3, FP 2 -> P 3/5, R 1
    # AP = 1/3 * (1 + 2/3 + 3/5) = 34/45.
    assert m["aupr"] == pytest.approx(34 / 45)


def test_fpr95_reads_the_full_curve_not_the_thinned_one():
    # In and OOD both score 1..20, tied in pairs. Threshold 2 flags 19 of 20 OOD (TPR 0.95) and
    # 19 of 20 in-distribution (FPR 0.95). The points are collinear, so sklearn's default
    # drop_intermediate would keep only (0, 0) and (1, 1) and report 1.0.
    s = np.arange(1, 21, dtype=float)
    assert ood_metrics(s, s)["fpr95"] == pytest.approx(0.95)
    assert fpr_at_tpr(s, s, 0.5) == pytest.approx(0.5)  # threshold 11: 10/20 on each side


def test_fpr95_when_95_percent_is_not_all():
    # 20 OOD at 1.0 .. 20.0 (19/20 = 0.95 caught by threshold 2.0); in-dist 1.5 is below it,
    # 2.5 and 30 are above -> FPR 2/3. The OOD question at 1.0 need not be caught.
    s_out = np.arange(1, 21, dtype=float)
    assert ood_metrics([1.5, 2.5, 30.0], s_out)["fpr95"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_pairwise_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    s_in = rng.integers(0, 6, 30) / 5  # coarse values: many ties
    s_out = rng.integers(1, 7, 25) / 5
    auroc = ood_metrics(s_in, s_out)["auroc"]
    assert auroc == pytest.approx(_pairwise_auroc(s_in, s_out))
    # Inverting the scores swaps wins and losses; ties stay ties.
    assert ood_metrics(-s_in, -s_out)["auroc"] == pytest.approx(1 - auroc)


def test_auroc_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    rng = np.random.default_rng(3)
    s_in, s_out = rng.random(200), rng.random(150) ** 0.6  # in [0, 1], OOD shifted upward
    preds = torch.tensor(np.concatenate([s_in, s_out]))
    target = torch.cat([torch.zeros(200), torch.ones(150)]).long()
    expected = float(tm.binary_auroc(preds, target))
    assert ood_metrics(s_in, s_out)["auroc"] == pytest.approx(expected, abs=1e-6)


def test_accepts_torch_and_lists_alike():
    rng = np.random.default_rng(4)
    s_in, s_out = rng.normal(size=40), rng.normal(0.5, size=30)
    expected = ood_metrics(s_in, s_out)
    assert ood_metrics(torch.tensor(s_in, dtype=torch.float32).double(), torch.tensor(s_out)) == pytest.approx(expected)
    assert ood_metrics(s_in.tolist(), s_out.tolist()) == expected


def test_roc_points_run_from_origin_to_one_and_enclose_the_auroc():
    rng = np.random.default_rng(5)
    s_in, s_out = rng.normal(size=60), rng.normal(1.0, size=50)
    fpr, tpr = roc_points(s_in, s_out)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids
    assert area == pytest.approx(ood_metrics(s_in, s_out)["auroc"])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("s_in", "s_out", "match"),
    [
        ([], [1.0], r"`score_in` should have at least one question"),
        ([0.1], [], r"`score_out` should have at least one question"),
        ([0.1], [np.nan, 0.2], r"`score_out` should hold finite scores, but got 1 NaN"),
        ([np.inf], [0.2], r"`score_in` should hold finite scores, but got 0 NaN and 1 infinite"),
        ([[0.1, 0.2]], [0.2], r"`score_in` should have shape \[N\]"),
    ],
)
def test_bad_inputs(s_in, s_out, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(s_in, s_out)
    with pytest.raises(ValueError, match=match):
        roc_points(s_in, s_out)


def test_fpr_at_tpr_rejects_a_bad_rate():
    with pytest.raises(ValueError, match=r"`tpr` should be in \(0, 1\], but got 0"):
        fpr_at_tpr([0.1], [0.2], 0)

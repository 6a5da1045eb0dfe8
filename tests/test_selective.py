"""Tests for loraens.selective: hand-computed curves, AURC bounds, ties, a reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from loraens.selective import (
    accuracy_at_coverage,
    accuracy_coverage_curve,
    aurc,
    selective_metrics,
)
from loraens.uncertainty import SCORE_NAMES, mutual_information

# Five questions; q1 and q4 are wrong.
CORRECT = [True, False, True, True, False]
# Ranking by increasing uncertainty: q0 (right), q1 (wrong), q3 (right), q4 (wrong), q2 (right).
UNCERTAINTY = [0.1, 0.2, 0.5, 0.3, 0.4]


# --------------------------------------------------------------------------- hand-computed


def test_curve_by_hand() -> None:
    # k most certain:  1: {q0}      1/1
    #                  2: +q1 wrong 1/2
    #                  3: +q3 right 2/3
    #                  4: +q4 wrong 2/4
    #                  5: +q2 right 3/5
    coverage, acc = accuracy_coverage_curve(CORRECT, UNCERTAINTY)
    np.testing.assert_allclose(coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(acc, [1.0, 1 / 2, 2 / 3, 2 / 4, 3 / 5])


def test_aurc_by_hand() -> None:
    # Risks 1 - acc: 0, 1/2, 1/3, 1/2, 2/5 -> sum 0 + 0.5 + 0.3333 + 0.5 + 0.4 = 1.7333
    # AURC = 1.7333 / 5 = 0.346667
    assert aurc(CORRECT, UNCERTAINTY) == pytest.approx(1.7333333 / 5)


@pytest.mark.parametrize(
    ("coverage", "expected"),
    [
        (0.2, 1.0),  # k = ceil(1.0) = 1 -> 1/1
        (0.5, 2 / 3),  # k = ceil(2.5) = 3 -> 2/3
        (0.8, 0.5),  # k = ceil(4.0) = 4 -> 2/4
        (0.9, 0.6),  # k = ceil(4.5) = 5 -> 3/5
        (1.0, 0.6),  # k = 5, overall accuracy
        (0.01, 1.0),  # k = ceil(0.05) = 1
    ],
)
def test_accuracy_at_coverage_by_hand(coverage: float, expected: float) -> None:
    assert accuracy_at_coverage(CORRECT, UNCERTAINTY, coverage) == pytest.approx(expected)


def test_coverage_float_error_does_not_add_a_question() -> None:
    # 0.14 * 50 = 7.000000000000001 in floats; a bare ceil would take k = 8.
    # 7 most certain all right (acc 1), the 8th wrong (acc 7/8).
    correct = [True] * 7 + [False] * 43
    uncertainty = np.arange(50.0)
    assert 0.14 * 50 > 7
    assert accuracy_at_coverage(correct, uncertainty, 0.14) == 1.0


def test_perfect_ranking_gives_minimal_aurc() -> None:
    # Perfect (wrong ones most uncertain): order r r r w w.
    #   acc 1, 1, 1, 3/4, 3/5 -> risks 0, 0, 0, 1/4, 2/5 -> AURC = 0.65 / 5 = 0.13
    # Worst (wrong ones most certain): order w w r r r.
    #   acc 0, 0, 1/3, 2/4, 3/5 -> risks 1, 1, 2/3, 1/2, 2/5 -> AURC = 3.5667 / 5 = 0.713333
    perfect = [0.0, 4.0, 1.0, 2.0, 3.0]  # q1, q4 (wrong) get the two largest
    worst = [2.0, 0.0, 3.0, 4.0, 1.0]
    assert aurc(CORRECT, perfect) == pytest.approx(0.13)
    assert aurc(CORRECT, worst) == pytest.approx(3.5666667 / 5)
    # Every one of the 5! rankings lies between the two.
    all_aurcs = [aurc(CORRECT, list(p)) for p in itertools.permutations(range(5))]
    assert min(all_aurcs) == pytest.approx(0.13)
    assert max(all_aurcs) == pytest.approx(3.5666667 / 5)


def test_full_coverage_equals_overall_accuracy() -> None:
    rng = np.random.default_rng(0)
    correct = rng.random(97) < 0.6
    uncertainty = rng.integers(0, 5, size=97).astype(float)  # many ties
    _, acc = accuracy_coverage_curve(correct, uncertainty)
    assert acc[-1] == pytest.approx(correct.mean(), abs=1e-15)
    assert accuracy_at_coverage(correct, uncertainty, 1.0) == pytest.approx(correct.mean())


# --------------------------------------------------------------------------- ties


def test_all_tied_gives_overall_accuracy_everywhere() -> None:
    # No ranking information: expected accuracy at every k is the overall 2/4 = 0.5,
    # so AURC = 1 - 0.5 = 0.5 whatever the input order.
    _, acc = accuracy_coverage_curve([True, False, True, False], [0.3] * 4)
    np.testing.assert_allclose(acc, [0.5] * 4)
    assert aurc([False, False, True, True], [0.3] * 4) == pytest.approx(0.5)


def test_partial_tie_uses_expected_count() -> None:
    # q0 alone at 0.1 (right); q1, q2, q3 tied at 0.3 with 2 of 3 right (2/3 each on average).
    #   k=1: 1                     -> 1
    #   k=2: 1 + 1 * 2/3 = 5/3     -> 5/6
    #   k=3: 1 + 2 * 2/3 = 7/3     -> 7/9
    #   k=4: 1 + 2 = 3             -> 3/4
    correct = [True, True, False, True]
    uncertainty = [0.1, 0.3, 0.3, 0.3]
    expected = [1.0, 5 / 6, 7 / 9, 3 / 4]
    np.testing.assert_allclose(accuracy_coverage_curve(correct, uncertainty)[1], expected)
    # Any reordering of the input gives the same curve.
    perm = [3, 2, 0, 1]
    shuffled = accuracy_coverage_curve(np.array(correct)[perm], np.array(uncertainty)[perm])[1]
    np.testing.assert_allclose(shuffled, expected)


# --------------------------------------------------------------------------- reference


def test_aurc_matches_independent_reference_without_ties() -> None:
    rng = np.random.default_rng(1)
    correct = rng.random(200) < 0.7
    uncertainty = rng.random(200)  # continuous: no ties
    order = np.argsort(uncertainty)
    risk = 1 - np.cumsum(correct[order]) / np.arange(1, 201)
    assert aurc(correct, uncertainty) == pytest.approx(risk.mean(), abs=1e-12)
    assert aurc(torch.tensor(correct), torch.tensor(uncertainty)) == pytest.approx(risk.mean())


# --------------------------------------------------------------------------- selective_metrics


def test_selective_metrics_by_hand_with_probs() -> None:
    # argmax of each row vs targets gives CORRECT: q0 0=0 right, q1 0!=1 wrong, q2 1=1 right,
    # q3 2=2 right, q4 1!=0 wrong. Values as in the hand tests above.
    probs = [[0.7, 0.3, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]]
    targets = [0, 1, 1, 2, 0]
    out = selective_metrics(probs, targets, {"u": UNCERTAINTY, "perfect": [0, 4, 1, 2, 3]})
    assert list(out) == ["u", "perfect"]
    assert out["u"] == pytest.approx({"aurc": 1.7333333 / 5, "acc@80": 0.5, "acc@90": 0.6})
    # Perfect: acc 1, 1, 1, 3/4, 3/5 -> acc@80 (k=4) 0.75, acc@90 (k=5) 0.6.
    assert out["perfect"] == pytest.approx({"aurc": 0.13, "acc@80": 0.75, "acc@90": 0.6})


def test_selective_metrics_default_scores_from_member_probs() -> None:
    rng = np.random.default_rng(2)
    mp = rng.dirichlet(np.ones(4), size=(40, 3))
    targets = rng.integers(0, 4, size=40)
    out = selective_metrics(torch.tensor(mp), targets, coverages=(0.5, 0.95))
    assert tuple(out) == SCORE_NAMES
    assert set(out["predictive_entropy"]) == {"aurc", "acc@50", "acc@95"}
    # Same as scoring the ensemble's correctness with the score computed by hand.
    correct = mp.mean(axis=1).argmax(axis=1) == targets
    mi = mutual_information(mp)
    assert out["mutual_information"]["aurc"] == pytest.approx(aurc(correct, mi))
    assert out["mutual_information"]["acc@95"] == pytest.approx(
        accuracy_at_coverage(correct, mi, 0.95)
    )


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda: aurc(CORRECT, [0.1, 0.2]),
            r"`uncertainty` should have shape \[N\] with N = 5 to match `correct`.*\(2,\)",
        ),
        (lambda: aurc([[True, False]], [0.1, 0.2]), r"`correct` should have shape \[N\].*\(1, 2\)"),
        (lambda: aurc([], []), r"`correct` .*at least one question"),
        (lambda: aurc([0, 2, 1], [0.1, 0.2, 0.3]), r"`correct` should hold booleans"),
        (lambda: aurc([True, False], [0.1, np.nan]), r"`uncertainty` should not contain NaN.*1"),
        (
            lambda: accuracy_at_coverage(CORRECT, UNCERTAINTY, 0.0),
            r"`coverage` should be a number in \(0, 1\], but got 0.0",
        ),
        (lambda: accuracy_at_coverage(CORRECT, UNCERTAINTY, 1.5), r"`coverage` .*1.5"),
        (
            lambda: selective_metrics(np.full((5, 2), 0.5), [0] * 5, {"u": [0.1, 0.2]}),
            r"`scores\['u'\]` should have shape \[N\] with N = 5 to match `probs`.*\(2,\)",
        ),
        (
            lambda: selective_metrics(np.full((5, 2), 0.5), [0] * 5),
            r"`scores` should be given when `probs` has shape \[N, C\]",
        ),
        (
            lambda: selective_metrics(np.full(5, 0.5), [0] * 5, {}),
            r"`probs` should have shape \[N, C\] or \[N, M, C\].*\(5,\)",
        ),
        (
            lambda: selective_metrics(np.full((5, 2, 3), 1 / 3), [0] * 4),
            r"`targets` .*N = 5 to match `member_probs`.*\(4,\)",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()

"""Tests for loraens.uncertainty: hand-computed values, properties, an scipy cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loraens.uncertainty import (
    SCORE_NAMES,
    expected_entropy,
    max_prob,
    member_disagreement,
    mutual_information,
    predictive_entropy,
    uncertainty_scores,
)

LN2, LN3, LN4, LN5 = (math.log(k) for k in (2, 3, 4, 5))


def _random_members(seed: int, n: int = 200, m: int = 4, c: int = 5) -> np.ndarray:
    # alpha 0.3 gives many near-one-hot members, where float error in the entropies shows.
    return np.random.default_rng(seed).dirichlet(np.full(c, 0.3), size=(n, m))


# --------------------------------------------------------------------------- hand-computed


def test_opposite_members() -> None:
    # Members [1, 0] and [0, 1]; ensemble [0.5, 0.5].
    # Predictive H([0.5, 0.5]) = ln 2; expected (H([1, 0]) + H([0, 1])) / 2 = (0 + 0) / 2 = 0
    # (0 * log 0 = 0); MI = ln 2 - 0 = ln 2.
    # Disagreement: the ensemble's tie [0.5, 0.5] goes to the lower index, choice 0; member 0
    # picks 0 (agrees), member 1 picks 1 (differs) -> 1 / 2 = 0.5.
    mp = [[[1.0, 0.0], [0.0, 1.0]]]
    assert predictive_entropy(mp) == pytest.approx([LN2])
    assert expected_entropy(mp) == pytest.approx([0.0], abs=0)
    assert mutual_information(mp) == pytest.approx([LN2])
    assert member_disagreement(mp) == pytest.approx([0.5])
    # Normalised by ln C = ln 2: 1, 0, 1.
    assert predictive_entropy(mp, normalize_by_choices=True) == pytest.approx([1.0])
    assert mutual_information(mp, normalize_by_choices=True) == pytest.approx([1.0])


def test_one_sure_one_unsure_member() -> None:
    # Members [0.5, 0.5] and [1, 0]; ensemble [0.75, 0.25].
    # Predictive: -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.75 * 0.287682 + 0.25 * 1.386294
    #           = 0.215762 + 0.346574 = 0.562335
    # Expected:   (ln 2 + 0) / 2 = 0.346574
    # MI:         0.562335 - 0.346574 = 0.215762
    mp = [[[0.5, 0.5], [1.0, 0.0]]]
    assert predictive_entropy(mp)[0] == pytest.approx(0.562335, abs=1e-6)
    assert expected_entropy(mp)[0] == pytest.approx(LN2 / 2)
    assert mutual_information(mp)[0] == pytest.approx(0.215762, abs=1e-6)


def test_disagreement_counts_against_the_ensemble_not_the_majority() -> None:
    # Members [0.6, 0.4], [0.6, 0.4], [0.1, 0.9]: ensemble [1.3/3, 1.7/3] = [0.433, 0.567],
    # argmax 1. Two members pick 0 -> disagreement 2/3, although they are the majority.
    mp = [[[0.6, 0.4], [0.6, 0.4], [0.1, 0.9]]]
    assert member_disagreement(mp) == pytest.approx([2 / 3])
    # Three members that all pick choice 1 -> 0.
    assert member_disagreement([[[0.2, 0.8], [0.4, 0.6], [0.0, 1.0]]]) == pytest.approx([0.0])


def test_identical_members_have_zero_mutual_information() -> None:
    mp = np.array([[[0.7, 0.2, 0.1]] * 3, [[0.1, 0.3, 0.6]] * 3])  # [N=2, M=3, C=3]
    mi = mutual_information(mp)
    assert np.all(mi >= 0.0)  # clamped: float error may not make it negative
    np.testing.assert_allclose(mi, 0.0, atol=1e-15)
    np.testing.assert_allclose(predictive_entropy(mp), expected_entropy(mp), rtol=1e-12)
    assert member_disagreement(mp).tolist() == [0.0, 0.0]


def test_uniform_four_choices() -> None:
    # H(uniform over 4) = ln 4; normalised by ln C = ln 4 -> 1.
    mp = np.full((1, 2, 4), 0.25)
    assert predictive_entropy(mp) == pytest.approx([LN4])
    assert predictive_entropy(mp, normalize_by_choices=True) == pytest.approx([1.0])
    assert expected_entropy(mp, normalize_by_choices=True) == pytest.approx([1.0])
    assert mutual_information(mp, normalize_by_choices=True) == pytest.approx([0.0], abs=1e-15)


def test_normalising_by_real_choices_with_mask() -> None:
    # C = 5 slots; q0 uniform over 3 real choices, q1 over 4, q2 over 5.
    # Raw entropies ln 3, ln 4, ln 5 reveal the choice count; divided by ln k they are all 1.
    # Without the mask the divisor is ln 5 for all: ln 3 / ln 5 = 1.0986 / 1.6094 = 0.6826.
    counts = [3, 4, 5]
    mask = np.array([[j < k for j in range(5)] for k in counts])
    probs = mask / mask.sum(1, keepdims=True)
    mp = np.stack([probs, probs], axis=1)  # [3, 2, 5]
    assert predictive_entropy(mp, mask) == pytest.approx([LN3, LN4, LN5])
    assert predictive_entropy(mp, mask, normalize_by_choices=True) == pytest.approx([1.0] * 3)
    assert predictive_entropy(mp, normalize_by_choices=True)[0] == pytest.approx(LN3 / LN5)
    scores = uncertainty_scores(mp, mask)
    assert scores["predictive_entropy_norm"] == pytest.approx([1.0] * 3)
    assert scores["predictive_entropy"] == pytest.approx([LN3, LN4, LN5])


def test_single_choice_question_normalises_to_zero_not_nan() -> None:
    # One real choice: entropy 0, log 1 = 0; the score is defined as 0.
    mask = np.array([[True, False, False]])
    mp = np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    out = predictive_entropy(mp, mask, normalize_by_choices=True)
    assert out.tolist() == [0.0]


def test_max_prob_and_confidence_score() -> None:
    # Ensemble of [0.6, 0.3, 0.1] and [0.2, 0.7, 0.1] is [0.4, 0.5, 0.1]: 1 - max = 0.5.
    mp = [[[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]]
    assert max_prob([[0.6, 0.3, 0.1]]) == pytest.approx([0.6])
    assert uncertainty_scores(mp)["1-max_prob"] == pytest.approx([0.5])


# --------------------------------------------------------------------------- uncertainty_scores


def test_uncertainty_scores_names_shapes_and_consistency() -> None:
    mp = _random_members(seed=0, n=30)
    scores = uncertainty_scores(mp)
    assert tuple(scores) == SCORE_NAMES
    for name, value in scores.items():
        assert isinstance(value, np.ndarray) and value.dtype == np.float64, name
        assert value.shape == (30,), name
    np.testing.assert_allclose(scores["predictive_entropy"], predictive_entropy(mp))
    np.testing.assert_allclose(scores["expected_entropy"], expected_entropy(mp))
    np.testing.assert_allclose(scores["mutual_information"], mutual_information(mp))
    np.testing.assert_allclose(scores["member_disagreement"], member_disagreement(mp))
    np.testing.assert_allclose(scores["1-max_prob"], 1 - mp.mean(axis=1).max(axis=1))
    np.testing.assert_allclose(
        scores["mutual_information_norm"], mutual_information(mp, normalize_by_choices=True)
    )


def test_every_score_is_higher_for_the_more_uncertain_question() -> None:
    # q0: both members certain of choice 0. q1: members [0.5, 0.5, 0] and [0, 0.5, 0.5],
    # ensemble [0.25, 0.5, 0.25]: 1 - max 0.5 > 0; predictive 1.0397 > 0; expected ln 2 > 0;
    # MI 1.0397 - 0.6931 = 0.3466 > 0; disagreement: member 0's tie goes to choice 0, which
    # differs from the ensemble's choice 1 -> 0.5 > 0.
    mp = [[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]]
    for name, value in uncertainty_scores(mp).items():
        assert value[1] > value[0], name
        assert value[0] == 0.0, name


def test_torch_float32_and_numpy_inputs_agree() -> None:
    mp = _random_members(seed=1, n=20).astype(np.float32)
    from_numpy = uncertainty_scores(mp)
    from_torch = uncertainty_scores(torch.tensor(mp))
    for name in SCORE_NAMES:
        np.testing.assert_allclose(from_torch[name], from_numpy[name], rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("seed", range(3))
def test_mutual_information_is_nonnegative_and_bounded(seed: int) -> None:
    mp = _random_members(seed, m=4, c=5)
    mi = mutual_information(mp)
    assert np.all(mi >= 0.0)
    assert np.all(mi <= math.log(4) + 1e-12)  # at most ln M
    np.testing.assert_allclose(mi, predictive_entropy(mp) - expected_entropy(mp), atol=1e-12)
    norm = uncertainty_scores(mp)
    for name in ("predictive_entropy_norm", "expected_entropy_norm", "mutual_information_norm"):
        assert np.all((norm[name] >= 0.0) & (norm[name] <= 1.0 + 1e-12)), name


def test_predictive_entropy_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    mp = _random_members(seed=5, n=50)
    ref = stats.entropy(mp.mean(axis=1), axis=1)  # natural log by default
    np.testing.assert_allclose(predictive_entropy(mp), ref, rtol=1e-12)
    np.testing.assert_allclose(expected_entropy(mp), stats.entropy(mp, axis=2).mean(1), rtol=1e-12)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda: predictive_entropy(np.full((4, 3), 1 / 3)),
            r"`member_probs` should have shape \[N, M, C\].*\(4, 3\)",
        ),
        (
            lambda: member_disagreement(np.zeros((2, 0, 3))),
            r"`member_probs` .*at least one member.*\(2, 0, 3\)",
        ),
        (lambda: max_prob(np.full((2, 2, 2), 0.5)), r"`probs` should have shape \[N, C\]"),
        (
            lambda: predictive_entropy(
                np.full((2, 1, 4), 0.25), np.ones((2, 5), bool), normalize_by_choices=True
            ),
            (r"`choice_mask` should have shape \[N, C\] = \[2, 4\] to match `member_probs`"
             r".*\(2, 5\)"),
        ),
        (
            lambda: uncertainty_scores(np.full((2, 1, 2), 0.5), [[True, True], [False, False]]),
            r"`choice_mask` should mark at least one real choice",
        ),
        (lambda: expected_entropy([["a"]]), r"`member_probs` should be a numeric array"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()

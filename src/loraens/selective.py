"""Selective prediction: answer only the questions the model is most certain about.

Given per-question correctness ``correct`` bool ``[N]`` and an uncertainty score ``[N]``
(HIGHER = MORE UNCERTAIN, as every score of :mod:`loraens.uncertainty`), rank questions from
most to least certain and keep the k most certain ones: coverage ``k / N``, selective accuracy
``acc(k)``, selective risk ``1 - acc(k)``.

Ties: questions with exactly equal uncertainty are not ordered by their position in the input
(that would let the order of a dataset file change the result, and discrete scores such as
member disagreement tie a lot). Instead, where k cuts through a group of tied questions, the
correct count of the partly taken group is its expected value under a random order within the
group: ``(number taken) * (accuracy of the group)``. This is deterministic, does not depend on
the input order, and equals the exact count wherever k falls on a group boundary; a score that
is constant over all questions thus gives the overall accuracy at every coverage.

Outputs are numpy float64 arrays and Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .arrays import ArrayLike, as_correct, as_float, as_targets, as_uncertainty, check_shape
from .metrics import ensemble_probs
from .uncertainty import uncertainty_scores


def _curve(c: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Selective accuracy acc(k) for k = 1..N, ties resolved by their expected value."""
    n = len(c)
    order = np.argsort(u, kind="stable")
    u_sorted, c_sorted = u[order], c[order]
    # Groups of exactly equal uncertainty (-0.0 == 0.0; inf == inf), in increasing order.
    _, starts, sizes = np.unique(u_sorted, return_index=True, return_counts=True)
    group_correct = np.add.reduceat(c_sorted, starts)
    before = np.cumsum(group_correct) - group_correct  # correct answers in the earlier groups
    group = np.repeat(np.arange(len(starts)), sizes)  # group index of each sorted position
    k = np.arange(1, n + 1)
    # Multiply before dividing, so a whole group adds exactly its integer count.
    n_correct = before[group] + (k - starts[group]) * group_correct[group] / sizes[group]
    return n_correct / k


def accuracy_coverage_curve(
    correct: ArrayLike, uncertainty: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Selective accuracy of the k most certain questions, for k = 1..N.

    Args:
        correct: bool ``[N]``, whether each question was answered correctly.
        uncertainty: float ``[N]``, HIGHER = MORE UNCERTAIN; questions are taken in increasing
            order of uncertainty, ties as in the module docstring.

    Returns:
        ``(coverage, accuracy)``, float64 ``[N]`` each: ``coverage[k-1] = k / N`` and
        ``accuracy[k-1]`` = accuracy over the k most certain. ``accuracy[-1]`` is the overall
        accuracy.
    """
    c = as_correct(correct)
    u = as_uncertainty(uncertainty, len(c), "uncertainty", "correct")
    return np.arange(1, len(c) + 1) / len(c), _curve(c, u)


def aurc(correct: ArrayLike, uncertainty: ArrayLike) -> float:
    """Area under the risk-coverage curve (Geifman, Uziel & El-Yaniv 2019), lower is better.

    ``AURC = (1/N) * sum_{k=1..N} (1 - acc(k))``: the mean selective risk over the N coverage
    levels k/N of :func:`accuracy_coverage_curve`. It mixes the error rate with how well the
    score ranks errors last; the best possible value for a given error rate comes from ranking
    every wrong answer as more uncertain than every right one.

    Args:
        correct: bool ``[N]``.  uncertainty: float ``[N]``, HIGHER = MORE UNCERTAIN.
    """
    _, acc = accuracy_coverage_curve(correct, uncertainty)
    return float(np.mean(1.0 - acc))


def accuracy_at_coverage(correct: ArrayLike, uncertainty: ArrayLike, coverage: float) -> float:
    """Accuracy over the ``k = ceil(coverage * N)`` most certain questions.

    ``coverage * N`` is rounded to 9 decimals before the ceiling, so that float error
    (0.14 * 50 = 7.000000000000001) does not take one question too many.

    Args:
        correct: bool ``[N]``.  uncertainty: float ``[N]``, HIGHER = MORE UNCERTAIN.
        coverage: share of questions to answer, in (0, 1].
    """
    if isinstance(coverage, bool) or not isinstance(coverage, int | float | np.floating) or not (
        0.0 < coverage <= 1.0
    ):
        raise ValueError(f"`coverage` should be a number in (0, 1], but got {coverage!r}")
    _, acc = accuracy_coverage_curve(correct, uncertainty)
    k = max(1, math.ceil(round(coverage * len(acc), 9)))
    return float(acc[k - 1])


def _coverage_key(coverage: float) -> str:
    return f"acc@{100 * coverage:g}"  # 0.8 -> "acc@80", 0.95 -> "acc@95"


def selective_metrics(
    probs: ArrayLike,
    targets: ArrayLike,
    scores: Mapping[str, ArrayLike] | None = None,
    *,
    choice_mask: ArrayLike | None = None,
    coverages: Sequence[float] = (0.8, 0.9),
) -> dict[str, dict[str, float]]:
    """AURC and accuracy at fixed coverages of the ensemble prediction, per uncertainty score.

    Args:
        probs: float ``[N, M, C]`` member probabilities (the prediction is their mean, see
            :func:`loraens.metrics.ensemble_probs`) or ``[N, C]`` probabilities.
        targets: int ``[N]``.
        scores: ``{name: float [N]}``, HIGHER = MORE UNCERTAIN. If None, ``probs`` must be
            ``[N, M, C]`` and the scores are :func:`loraens.uncertainty.uncertainty_scores`.
        choice_mask: optional bool ``[N, C]``, passed to ``uncertainty_scores`` when
            ``scores`` is None.
        coverages: each in (0, 1]; 0.8 gives the key "acc@80".

    Returns:
        ``{score name: {"aurc": ..., "acc@80": ..., "acc@90": ...}}`` in the order of
        ``scores``. Correctness is ``argmax == target`` (ties to the lower index).
    """
    p = as_float(probs, "probs")
    if p.ndim == 3:
        name = "member_probs"
        ens = ensemble_probs(p)  # validates [N, M, C]
    elif p.ndim == 2:
        name = "probs"
        check_shape(p, "probs", "NC")
        ens = p
    else:
        raise ValueError(
            "`probs` should have shape [N, C] or [N, M, C] (member probabilities), "
            f"but got shape {tuple(p.shape)}"
        )
    t = as_targets(targets, ens.shape[0], ens.shape[1], name)
    correct = (ens.argmax(dim=1) == t).double().numpy()
    if scores is None:
        if p.ndim != 3:
            raise ValueError(
                "`scores` should be given when `probs` has shape [N, C]; only member "
                f"probabilities [N, M, C] have default scores, but got shape {tuple(p.shape)}"
            )
        scores = uncertainty_scores(p, choice_mask)
    out: dict[str, dict[str, float]] = {}
    for score_name, score in scores.items():
        u = as_uncertainty(score, len(correct), f"scores[{score_name!r}]", name)
        acc = _curve(correct, u)
        row = {"aurc": float(np.mean(1.0 - acc))}
        for cov in coverages:
            row[_coverage_key(cov)] = accuracy_at_coverage(correct, u, cov)
        out[score_name] = row
    return out

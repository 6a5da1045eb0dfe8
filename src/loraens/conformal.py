"""Decisions with a guarantee: split-conformal answer sets and selective prediction at a bounded risk.

Two procedures, both fitted on a labelled calibration split and then applied to new questions:

**Split-conformal prediction sets** (Vovk et al. 2005; Papadopoulos et al. 2002). A score
``s(x, y)`` says how unusual answer y is for question x. On n calibration questions the scores of
the true answers are sorted, and ``q = `` the ``ceil((n + 1)(1 - alpha))``-th smallest of them;
a new question's set holds every choice with ``s(x, y) <= q``. If calibration and test questions
are exchangeable, the set contains the true answer with probability at least ``1 - alpha``
(over the draw of both), whatever the model. Two scores:

- LAC, the least ambiguous set-valued classifier (Sadinle, Lei & Wasserman 2019):
  ``s(x, y) = 1 - p_y``. The smallest sets on average; a set may be empty (no choice is likely
  enough), which is a warning in itself.
- APS, adaptive prediction sets (Romano, Sesia & Candès 2020), not randomised:
  ``s(x, y)`` = the total probability of the choices at least as likely as y, y included
  (choices sorted by probability, ties by index). A set holds the choices with ``s(x, y) <= q``
  and always the top choice (MAPIE's ``include_last_label=False``): a superset of the score rule,
  so at least as well covered, and never empty. Sets grow where the model is unsure.

When ``ceil((n + 1)(1 - alpha)) > n`` the calibration split is too small for that alpha and ``q``
is infinite: every choice is in every set. Comparisons allow ``1e-8`` of float error (as MAPIE
does), which can only add choices, so it never lowers coverage.

**Selection with guaranteed risk** (SGR; Geifman & El-Yaniv, *Selective classification for deep
neural networks*, NeurIPS 2017, Algorithm 1). Answer a question when its uncertainty score
``u <= theta``, abstain otherwise. For a target risk r and confidence ``1 - delta``, SGR finds
the threshold by a binary search over the calibration questions sorted by u: at each of
``k = ceil(log2 n)`` steps, the answered calibration questions' error count gives an exact
one-sided binomial (Clopper-Pearson) upper bound on the selective risk at level ``delta / k``;
the threshold is kept when that bound is at most r. With probability at least ``1 - delta`` over
the calibration split, the error rate among the questions the rule answers (the selective risk,
in the population the split was drawn from) is at most the returned bound, and so at most r.
When no tested threshold meets r, the rule answers nothing.

Plain coverage thresholds answer the most certain share c of the calibration questions (no
guarantee on the risk; the risk they had on calibration is recorded).

Inputs follow :mod:`loraens.arrays`: ``probs`` float ``[N, C]`` (padded choices at 0),
``choice_mask`` bool ``[N, C]``, ``targets`` int ``[N]``, an uncertainty score float ``[N]`` with
HIGHER = MORE UNCERTAIN (every score of :mod:`loraens.uncertainty`). Everything is numpy float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta as beta_dist

from .arrays import ArrayLike, as_choice_mask, as_correct, as_float, as_targets, as_uncertainty, check_shape
from .metrics import ensemble_probs
from .uncertainty import SCORE_NAMES, uncertainty_scores

SET_METHODS = ("lac", "aps")
SGR_METHOD = ("SGR: selection with guaranteed risk (Geifman & El-Yaniv 2017), binary search with "
              "Clopper-Pearson binomial tail bounds at delta / ceil(log2 n)")
EPSILON = 1e-8  # float slack in set membership (MAPIE's); it only adds choices


# ---------------------------------------------------------------- inputs


def _probs_and_mask(probs: ArrayLike, choice_mask: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """float64 [N, C] and bool [N, C] (all True without a mask; padded choices forced to p = 0)."""
    p = as_float(probs, "probs")
    check_shape(p, "probs", "NC")
    if choice_mask is None:
        mask = np.ones(tuple(p.shape), dtype=bool)
    else:
        mask = as_choice_mask(choice_mask, p.shape[0], p.shape[1], "probs").numpy()
    return np.where(mask, p.numpy(), 0.0), mask


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` (the miscoverage) must be a number in (0, 1), but got {alpha!r}")
    return float(alpha)


def _check_method(method: str) -> str:
    if method not in SET_METHODS:
        raise ValueError(f"the conformal set method must be one of {', '.join(SET_METHODS)}, but got {method!r}")
    return method


# ---------------------------------------------------------------- conformal scores and sets


def lac_scores(probs: ArrayLike, choice_mask: ArrayLike | None = None) -> np.ndarray:
    """LAC score of every choice, ``1 - p_y``: float64 [N, C] (padded choices: +inf)."""
    p, mask = _probs_and_mask(probs, choice_mask)
    return np.where(mask, 1.0 - p, np.inf)


def aps_scores(probs: ArrayLike, choice_mask: ArrayLike | None = None) -> np.ndarray:
    """APS score of every choice: the probability of the choices ranked at or above it, float64 [N, C].

    Choices are ranked by probability, highest first, ties by index (a stable sort), so the top
    choice scores its own probability and the last real choice scores 1. Padded choices: +inf.
    """
    p, mask = _probs_and_mask(probs, choice_mask)
    order = np.argsort(-p, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
    out = np.empty_like(p)
    np.put_along_axis(out, order, cum, axis=1)
    return np.where(mask, out, np.inf)


def choice_scores(probs: ArrayLike, choice_mask: ArrayLike | None = None, method: str = "lac") -> np.ndarray:
    """The conformal score of every choice for `method` ("lac" or "aps"): float64 [N, C]."""
    return (lac_scores if _check_method(method) == "lac" else aps_scores)(probs, choice_mask)


def true_scores(probs: ArrayLike, targets: ArrayLike, choice_mask: ArrayLike | None = None,
                method: str = "lac") -> np.ndarray:
    """The conformal score of each question's true answer: float64 [N]."""
    scores = choice_scores(probs, choice_mask, method)
    t = as_targets(targets, scores.shape[0], scores.shape[1], "probs").numpy()
    out = scores[np.arange(len(t)), t]
    if np.isinf(out).any():
        raise ValueError("a target points at a padded choice (outside `choice_mask`)")
    return out


def conformal_quantile(scores: ArrayLike, alpha: float) -> float:
    """The split-conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest of n scores.

    +inf when that rank exceeds n (too few calibration questions for this alpha: sets must hold
    every choice to keep the guarantee).
    """
    alpha = _check_alpha(alpha)
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("conformal_quantile needs at least one calibration score")
    if np.isnan(s).any():
        raise ValueError("conformal scores must not be NaN")
    rank = math.ceil(round((s.size + 1) * (1.0 - alpha), 9))  # round: 0.9 * 10 must not become 9.000000000000002
    return float("inf") if rank > s.size else float(s[rank - 1])


def prediction_sets(probs: ArrayLike, quantile: float, choice_mask: ArrayLike | None = None,
                    method: str = "lac") -> np.ndarray:
    """bool [N, C]: each question's conformal set at threshold `quantile`; never a padded choice.

    LAC: the choices whose score ``1 - p`` is at most `quantile` (+ EPSILON); a set may be empty.
    APS: the choices whose APS score is at most `quantile`, and always the top choice (with any
    choice tied with the last one taken), as MAPIE's APS with ``include_last_label=False``. A
    superset of the score rule, so its coverage is at least 1 - alpha, and never empty: where the
    top choice alone holds more than `quantile`, the set is that choice.
    """
    scores = choice_scores(probs, choice_mask, method)
    finite = np.isfinite(scores)
    if quantile is None or math.isinf(quantile):
        return finite
    if method == "lac":
        return finite & (scores - quantile <= EPSILON)
    p, _ = _probs_and_mask(probs, choice_mask)
    top = np.where(finite, scores, np.inf).min(axis=1)  # the top choice's score is its own probability
    threshold = np.maximum(quantile, top)
    within = finite & (scores - threshold[:, None] <= EPSILON)
    last = np.where(within, scores, -np.inf).argmax(axis=1)  # the lowest-ranked choice within the threshold
    p_last = p[np.arange(p.shape[0]), last]
    # As MAPIE: a last choice of probability ~0 would pull in every choice; use the smallest non-zero one.
    tiny = p_last <= EPSILON
    if tiny.any():
        p_last[tiny] = np.where(finite & (p > EPSILON), p, np.inf)[tiny].min(axis=1)
    return finite & (p - p_last[:, None] >= -EPSILON)


@dataclass(frozen=True)
class SetEvaluation:
    """How conformal sets did on labelled questions."""

    coverage: float  # share of questions whose set holds the true answer
    mean_size: float  # mean number of choices per set
    empty: float  # share of empty sets
    singleton: float  # share of sets with exactly one choice
    n: int

    def to_dict(self) -> dict[str, float]:
        return {"coverage": self.coverage, "mean_size": self.mean_size, "empty": self.empty,
                "singleton": self.singleton, "n": self.n}


def evaluate_sets(sets: np.ndarray, targets: ArrayLike) -> SetEvaluation:
    """Coverage and size of prediction sets bool [N, C] against targets [N]."""
    sets = np.asarray(sets, dtype=bool)
    t = as_targets(targets, sets.shape[0], sets.shape[1], "sets").numpy()
    size = sets.sum(axis=1)
    return SetEvaluation(coverage=float(sets[np.arange(len(t)), t].mean()), mean_size=float(size.mean()),
                         empty=float((size == 0).mean()), singleton=float((size == 1).mean()), n=len(t))


# ---------------------------------------------------------------- selective prediction with a risk bound


def binomial_upper_bound(errors: int, n: int, delta: float) -> float:
    """Exact one-sided upper confidence bound on an error rate: P(rate <= bound) >= 1 - delta.

    The Clopper-Pearson bound, i.e. the b solving ``P(Binomial(n, b) <= errors) = delta``
    (Geifman & El-Yaniv's B*). 1.0 when n = 0 or every answer is wrong.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be in (0, 1), but got {delta!r}")
    if n < 0 or not 0 <= errors <= max(n, 0):
        raise ValueError(f"need 0 <= errors <= n, but got errors = {errors}, n = {n}")
    if n == 0 or errors >= n:
        return 1.0
    return float(beta_dist.ppf(1.0 - delta, errors + 1, n - errors))


def _check_correct(correct: ArrayLike) -> np.ndarray:
    """`arrays.as_correct` as booleans, and not empty: a rule fitted on no question means nothing."""
    c = as_correct(correct)
    if c.size == 0:
        raise ValueError("`correct` must hold at least one question, but got none")
    return c.astype(bool)


@dataclass(frozen=True)
class RiskThreshold:
    """The SGR rule for one target risk: answer when uncertainty <= threshold (None: answer nothing)."""

    target: float  # the risk r the rule must stay under
    delta: float  # 1 - delta: the confidence of the guarantee
    threshold: float | None
    bound: float  # the rule's upper confidence bound on its selective risk (<= target), 0 when it answers nothing
    coverage: float  # share of calibration questions answered
    risk: float  # error rate among the answered calibration questions (0 when none)
    answered: int
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "delta": self.delta, "threshold": self.threshold, "bound": self.bound,
                "coverage": self.coverage, "risk": self.risk, "answered": self.answered, "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RiskThreshold:
        return cls(float(d["target"]), float(d["delta"]), None if d["threshold"] is None else float(d["threshold"]),
                   float(d["bound"]), float(d["coverage"]), float(d["risk"]), int(d["answered"]), int(d["n"]))


def sgr_threshold(correct: ArrayLike, uncertainty: ArrayLike, target: float, delta: float = 0.1) -> RiskThreshold:
    """Geifman & El-Yaniv's SGR: the threshold on `uncertainty` whose selective risk is at most
    `target` with probability at least ``1 - delta`` (see the module docstring).

    Args:
        correct: bool [N], whether each calibration question was answered correctly.
        uncertainty: float [N], HIGHER = MORE UNCERTAIN; answered means ``u <= threshold`` (ties
            are answered together, so a threshold never splits a group of equal scores).
        target: the risk r, in (0, 1).  delta: in (0, 1).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"the target risk must be in (0, 1), but got {target!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be in (0, 1), but got {delta!r}")
    c = _check_correct(correct)
    u = as_uncertainty(uncertainty, len(c), "uncertainty", "correct")
    n = len(c)
    order = np.argsort(u, kind="stable")
    u_sorted, errors_sorted = u[order], np.cumsum(~c[order])
    steps = max(1, math.ceil(math.log2(n)))
    level = delta / steps
    best = RiskThreshold(float(target), float(delta), None, 0.0, 0.0, 0.0, 0, n)
    # The paper's search, on the questions sorted by confidence ascending (uncertainty descending):
    # position z answers every question at least as certain as the z-th least certain one.
    z_min, z_max = 1, n
    for _ in range(steps):
        z = math.ceil((z_min + z_max) / 2)
        theta = float(u_sorted[n - z])
        answered = int(np.searchsorted(u_sorted, theta, side="right"))  # ties of theta are answered too
        errors = int(errors_sorted[answered - 1])
        bound = binomial_upper_bound(errors, answered, level)
        if bound <= target:
            if answered > best.answered:
                best = RiskThreshold(float(target), float(delta), theta, bound, answered / n, errors / answered,
                                     answered, n)
            z_max = z
        else:
            z_min = z
    return best


@dataclass(frozen=True)
class CoverageThreshold:
    """Answer the most certain share `target` of the calibration questions (no risk guarantee)."""

    target: float
    threshold: float
    coverage: float  # share answered on calibration (ties can add a few)
    risk: float  # error rate among them on calibration

    def to_dict(self) -> dict[str, float]:
        return {"target": self.target, "threshold": self.threshold, "coverage": self.coverage, "risk": self.risk}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CoverageThreshold:
        return cls(float(d["target"]), float(d["threshold"]), float(d["coverage"]), float(d["risk"]))


def coverage_threshold(correct: ArrayLike, uncertainty: ArrayLike, target: float) -> CoverageThreshold:
    """The uncertainty of the ``ceil(target * N)``-th most certain calibration question."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"the target coverage must be in (0, 1], but got {target!r}")
    c = _check_correct(correct)
    u = as_uncertainty(uncertainty, len(c), "uncertainty", "correct")
    u_sorted = np.sort(u)
    k = max(1, math.ceil(round(target * len(u), 9)))
    theta = float(u_sorted[k - 1])
    keep = u <= theta
    return CoverageThreshold(float(target), theta, float(keep.mean()), float(1.0 - c[keep].mean()))


def answers(uncertainty: ArrayLike, threshold: float | None) -> np.ndarray:
    """bool [N]: answer (True) or abstain, for the rule ``u <= threshold`` (None: abstain always)."""
    u = np.asarray(as_float(uncertainty, "uncertainty").numpy(), dtype=np.float64)
    return np.zeros(u.shape, dtype=bool) if threshold is None else u <= threshold


@dataclass(frozen=True)
class SelectiveEvaluation:
    """How an answer/abstain rule did on labelled questions."""

    coverage: float  # share answered
    risk: float  # error rate among the answered (0 when none)
    answered: int
    n: int

    def to_dict(self) -> dict[str, float]:
        return {"coverage": self.coverage, "risk": self.risk, "answered": self.answered, "n": self.n}


def evaluate_selective(correct: ArrayLike, uncertainty: ArrayLike, threshold: float | None) -> SelectiveEvaluation:
    c = _check_correct(correct)
    keep = answers(as_uncertainty(uncertainty, len(c), "uncertainty", "correct"), threshold)
    m = int(keep.sum())
    return SelectiveEvaluation(m / len(c), float(1.0 - c[keep].mean()) if m else 0.0, m, len(c))


# ---------------------------------------------------------------- calibration split -> test split


def correct_answers(probs: np.ndarray, targets: ArrayLike) -> np.ndarray:
    """bool [N]: argmax (ties to the lower index, as `metrics.accuracy`) == target."""
    t = as_targets(targets, probs.shape[0], probs.shape[1], "probs").numpy()
    return probs.argmax(axis=1) == t


def model_scores(member_probs: np.ndarray, choice_mask: np.ndarray | None, member: int | None) -> tuple[
        np.ndarray, dict[str, np.ndarray]]:
    """(probs [N, C], uncertainty scores) of the ensemble (member None) or of one member alone.

    A member alone is an ensemble of one: its mutual information and disagreement are 0.
    """
    mp = np.asarray(member_probs, dtype=np.float64)
    if member is not None:
        mp = mp[:, member: member + 1]
    return ensemble_probs(mp).numpy(), uncertainty_scores(mp, choice_mask)


def guarantee_summary(cal_member_probs: ArrayLike, cal_targets: ArrayLike, test_member_probs: ArrayLike,
                      test_targets: ArrayLike, *, cal_mask: ArrayLike | None = None,
                      test_mask: ArrayLike | None = None, alphas: Sequence[float] = (0.1,),
                      risks: Sequence[float] = (0.1,), delta: float = 0.1, score: str = "1-max_prob",
                      member: int | None = None) -> dict[str, Any]:
    """Fit the sets and the SGR rules on a calibration split and measure them on a test split.

    `member`: None for the ensemble (the mean of the members' probabilities), k for member k
    alone. For a member alone, scores that need several members (mutual information,
    disagreement) are 0 everywhere; use "1-max_prob" or an entropy to compare with the ensemble.

    Returns ``{"sets": {method: {alpha: {"quantile", "coverage", "mean_size", "empty",
    "singleton", "n"}}}, "risk": {target: {"threshold", "bound", "calibration_coverage",
    "test_coverage", "test_risk", ...}}}`` (alphas and targets as strings, e.g. "0.1").
    """
    if score not in SCORE_NAMES:
        raise ValueError(f"unknown uncertainty score {score!r}; one of {', '.join(SCORE_NAMES)}")
    cal_mp = as_float(cal_member_probs, "cal_member_probs").numpy()
    test_mp = as_float(test_member_probs, "test_member_probs").numpy()
    cal_m = None if cal_mask is None else np.asarray(cal_mask, dtype=bool)
    test_m = None if test_mask is None else np.asarray(test_mask, dtype=bool)
    cal_p, cal_s = model_scores(cal_mp, cal_m, member)
    test_p, test_s = model_scores(test_mp, test_m, member)
    out: dict[str, Any] = {"sets": {}, "risk": {}, "score": score, "delta": delta,
                           "n_calibration": int(cal_p.shape[0]), "n_test": int(test_p.shape[0])}
    for method in SET_METHODS:
        out["sets"][method] = {}
        cal_true = true_scores(cal_p, cal_targets, cal_m, method)
        for alpha in alphas:
            q = conformal_quantile(cal_true, alpha)
            sets = evaluate_sets(prediction_sets(test_p, q, test_m, method), test_targets)
            out["sets"][method][_key(alpha)] = {"quantile": None if math.isinf(q) else q, **sets.to_dict()}
    cal_ok, test_ok = correct_answers(cal_p, cal_targets), correct_answers(test_p, test_targets)
    for r in risks:
        rule = sgr_threshold(cal_ok, cal_s[score], r, delta)
        ev = evaluate_selective(test_ok, test_s[score], rule.threshold)
        out["risk"][_key(r)] = {"threshold": rule.threshold, "bound": rule.bound,
                                "calibration_coverage": rule.coverage, "calibration_risk": rule.risk,
                                "test_coverage": ev.coverage, "test_risk": ev.risk, "test_answered": ev.answered}
    out["accuracy"] = float(test_ok.mean())
    return out


def _key(x: float) -> str:
    """0.1 -> "0.1": alphas and risk targets as JSON keys."""
    return f"{float(x):g}"


def binomial_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval of a proportion; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    tail = (1.0 - level) / 2
    low = 0.0 if successes == 0 else float(beta_dist.ppf(tail, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta_dist.ppf(1 - tail, successes + 1, n - successes))
    return low, high


MEMBER_0, MEAN_MEMBER, ENSEMBLE = "member_0", "mean_member", "ensemble"


def single_vs_ensemble(cal_member_probs: ArrayLike, cal_targets: ArrayLike, test_member_probs: ArrayLike,
                       test_targets: ArrayLike, *, cal_mask: ArrayLike | None = None,
                       test_mask: ArrayLike | None = None, alphas: Sequence[float] = (0.1,),
                       risks: Sequence[float] = (0.1,), delta: float = 0.1,
                       score: str = "1-max_prob") -> dict[str, dict[str, Any]]:
    """`guarantee_summary` for member 0 alone, for every member alone averaged ("mean_member"), and the ensemble.

    The single members use "1-max_prob" for the abstention rule (their mutual information and
    disagreement are 0); the ensemble uses `score`. The mean member averages every number over
    the members (its thresholds are left out: each member has its own).
    """
    mp = as_float(cal_member_probs, "cal_member_probs").numpy()
    kw = dict(cal_mask=cal_mask, test_mask=test_mask, alphas=alphas, risks=risks, delta=delta)
    members = [guarantee_summary(cal_member_probs, cal_targets, test_member_probs, test_targets, member=k,
                                 score="1-max_prob", **kw) for k in range(mp.shape[1])]  # type: ignore[arg-type]
    ensemble = guarantee_summary(cal_member_probs, cal_targets, test_member_probs, test_targets, score=score,
                                 **kw)  # type: ignore[arg-type]
    return {MEMBER_0: members[0], MEAN_MEMBER: _mean_of(members), ENSEMBLE: ensemble}


def _mean_of(dicts: list[Any]) -> Any:
    """Average the numbers of same-shaped nested dicts; thresholds and quantiles are dropped."""
    first = dicts[0]
    if isinstance(first, Mapping):
        return {k: _mean_of([d[k] for d in dicts]) for k in first if k not in ("threshold", "quantile")}
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return first
    return float(np.mean([float(d) for d in dicts]))

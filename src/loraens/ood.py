"""Out-of-distribution (OOD) detection from per-question uncertainty scores.

Conventions:

- A score is HIGHER for MORE uncertain questions (every score in :mod:`loraens.uncertainty` is
  oriented that way, e.g. ``1-max_prob`` rather than ``max_prob``).
- OOD questions are the POSITIVE class (label 1), in-distribution questions the negative class
  (label 0). A detector flags a question as OOD when its score is ``>=`` a threshold.

So a perfect detector ranks every OOD question above every in-distribution one (AUROC 1), and a
score that carries no information gives AUROC 0.5.

Metrics (inputs ``score_in`` float ``[N_in]``, ``score_out`` float ``[N_out]``):

- ``auroc``: area under the ROC curve (:func:`auroc`). It equals the probability that a random
  OOD question scores higher than a random in-distribution one, with ties counting 1/2, and is
  computed that way: the Mann-Whitney U statistic (from average ranks) divided by
  ``N_in * N_out``. (The rank sums are exact, so this is the area rounded once; the trapezoidal
  sum of ``sklearn.metrics.roc_auc_score`` agrees to within a few units of 1e-16.)
- ``aupr``: area under the precision-recall curve with OOD as the positive class, computed as
  average precision (``sklearn.metrics.average_precision_score``, a step-wise sum, not the
  trapezoidal area). Its chance level is the OOD share ``N_out / (N_in + N_out)``, so it depends
  on how many questions each side has; AUROC does not.
- ``fpr95``: the false positive rate at 95% true positive rate: the share of in-distribution
  questions whose score is ``>=`` the threshold that flags at least 95% of the OOD questions.
  Of all thresholds reaching TPR >= 0.95 we take the highest one, i.e. the smallest FPR; it is
  read off the full ROC curve (every distinct score a threshold), so no interpolation. With ties
  at that threshold every tied question is flagged, on both sides. Lower is better.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_curve

from .arrays import ArrayLike, as_float, check_shape
from .predictions import Predictions
from .uncertainty import uncertainty_scores

OOD_METRIC_NAMES: tuple[str, ...] = ("auroc", "aupr", "fpr95")


def _as_scores(scores: ArrayLike, name: str) -> np.ndarray:
    """Validate a float ``[N]`` score array (non-empty, finite); return float64 numpy."""
    s = as_float(scores, name)
    check_shape(s, name, "N")
    s = s.numpy()
    bad = ~np.isfinite(s)
    if bad.any():
        n_nan = int(np.isnan(s).sum())
        raise ValueError(
            f"`{name}` should hold finite scores, but got {n_nan} NaN and "
            f"{int(bad.sum()) - n_nan} infinite value(s) among {s.size}"
        )
    return s


def _labels_and_scores(score_in: ArrayLike, score_out: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``[N_in + N_out]`` (0 = in-distribution, 1 = OOD) and the concatenated scores."""
    s_in = _as_scores(score_in, "score_in")
    s_out = _as_scores(score_out, "score_out")
    labels = np.concatenate([np.zeros(s_in.size, np.int64), np.ones(s_out.size, np.int64)])
    return labels, np.concatenate([s_in, s_out])


def _mann_whitney_auroc(s_in: np.ndarray, s_out: np.ndarray) -> np.ndarray:
    """AUROC of ``s_in`` [..., N_in] vs ``s_out`` [..., N_out] along the last axis: float64 [...].

    U = (rank sum of the OOD scores) - N_out (N_out + 1) / 2, with tied scores at their average
    rank, counts the (OOD, in) pairs the OOD question wins, ties as 1/2; AUROC = U / (N_in N_out).
    Leading axes are independent sets (e.g. bootstrap resamples), ranked in one call.
    """
    n_out, n_in = s_out.shape[-1], s_in.shape[-1]
    ranks = rankdata(np.concatenate([s_out, s_in], axis=-1), axis=-1)
    return (ranks[..., :n_out].sum(-1) - n_out * (n_out + 1) / 2) / (n_out * n_in)


def auroc(score_in: ArrayLike, score_out: ArrayLike) -> float:
    """Area under the ROC curve of OOD detection (see the module docstring).

    Args:
        score_in: float ``[N_in]`` uncertainty scores of in-distribution questions.
        score_out: float ``[N_out]`` uncertainty scores of OOD questions (positives).
    """
    return float(_mann_whitney_auroc(_as_scores(score_in, "score_in"), _as_scores(score_out, "score_out")))


def auroc_interval(
    score_in: np.ndarray, score_out: np.ndarray, n_resamples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile 95% bootstrap interval of :func:`auroc`.

    The two sets are independent samples, so each is resampled on its own (the in-distribution
    indices ``[n_resamples, N_in]`` are drawn first, then the OOD ones), not paired by question.

    Args:
        score_in: float64 ``[N_in]``.  score_out: float64 ``[N_out]``.
        n_resamples: number of resamples R.  rng: the generator that draws them.
    """
    a = score_in[rng.integers(0, len(score_in), (n_resamples, len(score_in)))]
    b = score_out[rng.integers(0, len(score_out), (n_resamples, len(score_out)))]
    values = _mann_whitney_auroc(a, b)  # [R]
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def roc_points(score_in: ArrayLike, score_out: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve of OOD detection, for plotting.

    Args:
        score_in: float ``[N_in]`` uncertainty scores of in-distribution questions.
        score_out: float ``[N_out]`` uncertainty scores of OOD questions (positives).

    Returns:
        ``(fpr, tpr)``, float64 ``[K]`` each, non-decreasing, from ``(0, 0)`` to ``(1, 1)``.
        Collinear intermediate points are dropped (sklearn's default), which does not change
        the curve or its area.
    """
    labels, scores = _labels_and_scores(score_in, score_out)
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr.astype(np.float64), tpr.astype(np.float64)


def fpr_at_tpr(score_in: ArrayLike, score_out: ArrayLike, tpr: float = 0.95) -> float:
    """Share of in-distribution questions flagged by the highest threshold that flags >= ``tpr``
    of the OOD questions (the smallest FPR on the ROC curve with TPR >= ``tpr``).

    Args:
        score_in: float ``[N_in]``.  score_out: float ``[N_out]``.  tpr: target rate in (0, 1].
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"`tpr` should be in (0, 1], but got {tpr!r}")
    labels, scores = _labels_and_scores(score_in, score_out)
    # drop_intermediate=False: sklearn's default drops collinear points, and the first point that
    # reaches the target TPR can be one of them (then the next kept point has a larger FPR).
    fprs, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    # Both rates only grow as the threshold falls, so the first point reaching `tpr` has the
    # smallest FPR. The last point is (1, 1), so the selection is never empty.
    return float(fprs[tprs >= tpr].min())


def ood_metrics(score_in: ArrayLike, score_out: ArrayLike) -> dict[str, float]:
    """AUROC, AUPR and FPR at 95% TPR of separating OOD from in-distribution questions.

    Conventions in the module docstring: higher score = more uncertain, OOD is the positive
    class, AUPR is average precision, FPR95 is the smallest FPR with TPR >= 0.95.

    Args:
        score_in: float ``[N_in]`` uncertainty scores of in-distribution questions (N_in > 0).
        score_out: float ``[N_out]`` uncertainty scores of OOD questions (N_out > 0).

    Returns:
        ``{"auroc", "aupr", "fpr95"}`` (keys :data:`OOD_METRIC_NAMES`), Python floats.
    """
    labels, scores = _labels_and_scores(score_in, score_out)
    n_in = int((labels == 0).sum())
    return {
        "auroc": auroc(scores[:n_in], scores[n_in:]),
        "aupr": float(average_precision_score(labels, scores)),
        "fpr95": fpr_at_tpr(scores[:n_in], scores[n_in:], 0.95),
    }


def ood_table(in_preds: Predictions, out_preds: Predictions) -> dict[str, dict[str, float]]:
    """OOD detection of `out_preds` against `in_preds` for every uncertainty score.

    Scores come from `uncertainty_scores`; the "_norm" entropies divide by log(number of
    choices) so that a set with more choices does not look "more uncertain" by construction.

    Returns:
        ``{score name: ood_metrics(...)}`` for every name of ``uncertainty.SCORE_NAMES``.
    """
    s_in = uncertainty_scores(in_preds.member_probs, in_preds.choice_mask)
    s_out = uncertainty_scores(out_preds.member_probs, out_preds.choice_mask)
    return {name: ood_metrics(s_in[name], s_out[name]) for name in s_in}

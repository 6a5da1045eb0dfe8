"""Out-of-distribution detection from per-question uncertainty scores.

Convention: a score is HIGHER for MORE uncertain questions, and OOD questions are the positive
class, so a perfect detector ranks every OOD question above every in-distribution one.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _scores(score_in, score_out) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(score_in, dtype=np.float64).reshape(-1)
    b = np.asarray(score_out, dtype=np.float64).reshape(-1)
    for name, x in (("score_in", a), ("score_out", b)):
        if x.size == 0:
            raise ValueError(f"`{name}` is empty; OOD detection needs questions on both sides.")
        if not np.isfinite(x).all():
            raise ValueError(f"`{name}` holds {int((~np.isfinite(x)).sum())} NaN or infinite scores.")
    labels = np.r_[np.zeros(a.size), np.ones(b.size)]
    return labels, np.r_[a, b]


def roc_points(score_in, score_out) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds, for plotting."""
    labels, scores = _scores(score_in, score_out)
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def ood_metrics(score_in, score_out) -> dict[str, float]:
    """AUROC, AUPR (OOD positive, average precision) and FPR at 95% TPR.

    score_in: [N_in], score_out: [N_out]. FPR95 is the smallest false positive rate (share of
    in-distribution questions flagged) among thresholds that flag at least 95% of OOD questions.
    Ties count half in AUROC (sklearn's convention, equal to the Mann-Whitney U statistic).
    """
    labels, scores = _scores(score_in, score_out)
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr": float(average_precision_score(labels, scores)),
        "fpr95": float(fpr[tpr >= 0.95].min()),
    }

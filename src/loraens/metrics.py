"""Ensemble prediction and calibration metrics for multiple-choice QA.

Shapes used throughout (N questions, M members, C choice slots):

- ``member_probs``: float ``[N, M, C]``, each member's distribution over the choices.
- ``probs``: float ``[N, C]``, one distribution per question (a member's or the ensemble's).
- ``targets``: int ``[N]``, index of the correct choice.
- ``choice_mask``: bool ``[N, C]``, True where a choice is real. Questions with 3, 4 or 5 choices
  are padded to C; padded slots carry probability 0, so accuracy, NLL, Brier and ECE need no mask.

Inputs may be torch tensors (any device/dtype), numpy arrays or nested lists; every function
computes in float64 on the CPU so metrics do not depend on where the predictions were made
(the converters and the ECE bins are in :mod:`loraens.arrays`; terminal tables of these metrics
in :mod:`loraens.tables`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .arrays import (
    ArrayLike,
    as_choice_mask,
    as_float,
    as_member_probs,
    as_targets,
    check_n_bins,
    check_shape,
    equal_width_bins,
    prepare,
    top_label,
)

METRIC_NAMES: tuple[str, ...] = ("accuracy", "nll", "ece", "brier")
CALIBRATION_METRIC_NAMES: tuple[str, ...] = ("ece", "mce", "adaptive_ece")
# Probabilities are clamped here before the log so a confident miss gives a large, finite NLL
# (-log 1e-12 ~= 27.6) instead of inf, which would poison every mean that includes it.
NLL_EPS = 1e-12


# --------------------------------------------------------------------------- ensembling


def ensemble_probs(member_probs: ArrayLike) -> torch.Tensor:
    """The ensemble prediction: the mean of member probabilities.

    This is the one place where averaging over the member axis happens (the method of
    Wang et al. 2023 averages predictive distributions, not parameters or logits).

    Args:
        member_probs: float ``[N, M, C]``.

    Returns:
        float64 ``[N, C]``; padded choices stay exactly 0 because every member gives them 0.
    """
    return as_member_probs(member_probs).mean(dim=1)


def ensemble_probs_from_logits(
    member_logits: ArrayLike, choice_mask: ArrayLike | None = None
) -> torch.Tensor:
    """Alternative ensemble: softmax of the mean member log-probabilities (a geometric mean).

    Averaging raw logits and averaging log-softmax outputs give the same result, because each
    member's log-softmax differs from its logits by a per-question constant that the final
    softmax removes; so ``member_logits`` may be either. This is *not* the default ensemble
    (see :func:`ensemble_probs`); it is sharper, since one member's near-zero probability
    pulls the geometric mean down.

    Args:
        member_logits: float ``[N, M, C]`` logits or log-probabilities.
        choice_mask: optional bool ``[N, C]``; False slots get ``-inf`` before the softmax, so
            they come out with probability exactly 0.

    Returns:
        float64 ``[N, C]``.
    """
    z = as_float(member_logits, "member_logits")
    check_shape(z, "member_logits", "NMC")
    if choice_mask is not None:
        mask = as_choice_mask(choice_mask, z.shape[0], z.shape[2], "member_logits")
        z = z.masked_fill(~mask[:, None, :], float("-inf"))
    # log_softmax per member first, so the mean is over log-probabilities whatever the input was.
    mean_log_probs = torch.log_softmax(z, dim=-1).mean(dim=1)
    return torch.softmax(mean_log_probs, dim=-1)


# --------------------------------------------------------------------------- metrics


def accuracy(probs: ArrayLike, targets: ArrayLike) -> float:
    """Fraction of questions whose argmax choice is the target (ties go to the lower index).

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.
    """
    p, t = prepare(probs, targets)
    return float((p.argmax(dim=1) == t).double().mean())


def nll(probs: ArrayLike, targets: ArrayLike) -> float:
    """Mean negative log-likelihood ``-log p(target)``, with p clamped at ``NLL_EPS``.

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.
    """
    p, t = prepare(probs, targets)
    p_true = p.gather(1, t[:, None]).squeeze(1)
    # "+ 0.0" turns the -0.0 of a perfect prediction into 0.0 so tables do not print "-0.0000".
    return float(-torch.log(p_true.clamp_min(NLL_EPS)).mean()) + 0.0


def brier(probs: ArrayLike, targets: ArrayLike) -> float:
    """Multi-class Brier score: mean over questions of ``sum_c (p_c - onehot_c)^2``.

    Ranges over [0, 2]. Padded choices have p = 0 and a 0 one-hot entry, so they add nothing.

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.
    """
    p, t = prepare(probs, targets)
    onehot = torch.nn.functional.one_hot(t, num_classes=p.shape[1]).to(p.dtype)
    return float(((p - onehot) ** 2).sum(dim=1).mean())


def ece(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error of the top label (Guo et al. 2017).

    Confidence is the max probability, correctness is ``argmax == target``. Confidences fall
    into ``n_bins`` equal-width bins on [0, 1]; bin b is the half-open interval
    ``(b/n_bins, (b+1)/n_bins]``, except that the first bin also includes 0 exactly. So a
    confidence exactly on an edge goes to the lower bin and a confidence of 1.0 lands in the last
    bin. ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``; empty bins contribute 0.
    (torchmetrics uses ``[lo, hi)`` bins; the two agree unless a confidence sits on an edge.)

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.  n_bins: number of bins (> 0).
    """
    n_bins = check_n_bins(n_bins)
    p, t = prepare(probs, targets)
    bins = equal_width_bins(*top_label(p, t), n_bins)
    # |B|/N * |acc - conf| = |sum_acc - sum_conf| / N, which needs no division by empty counts.
    return float((bins.sum_correct - bins.sum_conf).abs().sum() / p.shape[0])


def mce(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error: the largest ``|acc(B_b) - conf(B_b)|`` over non-empty bins.

    Same top-label confidences and the same equal-width ``(lo, hi]`` bins as :func:`ece`
    (Naeini et al. 2015). ECE is a weighted mean of the same per-bin gaps, so ``mce >= ece``.
    A bin holding one question counts as much as a bin holding hundreds, so MCE is noisy on
    small N.

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.  n_bins: number of bins (> 0).
    """
    n_bins = check_n_bins(n_bins)
    p, t = prepare(probs, targets)
    bins = equal_width_bins(*top_label(p, t), n_bins)
    filled = bins.filled  # never empty: N > 0 puts every question in some bin
    gap = (bins.sum_correct[filled] - bins.sum_conf[filled]).abs() / bins.count[filled]
    return float(gap.max())


def adaptive_ece(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE with equal-mass bins (adaptive binning, as in Nixon et al. 2019's ACE).

    Questions are sorted by confidence and cut into ``n_bins`` consecutive groups of nearly
    equal size with ``np.array_split`` (sizes differ by at most one; the larger groups come
    first, i.e. hold the lower confidences). ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``, as
    in :func:`ece`. With ``n_bins > N`` the extra groups are empty and add nothing.

    Ties: the sort is stable, so questions with equal confidence keep their input order, and a
    run of equal confidences may be cut between two adjacent bins; which of those questions
    lands in which bin then follows their position in the input.

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.  n_bins: number of bins (> 0).
    """
    n_bins = check_n_bins(n_bins)
    p, t = prepare(probs, targets)
    conf, correct = top_label(p, t)
    order = torch.sort(conf, stable=True).indices.numpy()
    total = 0.0
    for group in np.array_split(order, n_bins):
        if len(group) > 0:
            g = torch.from_numpy(group)
            total += abs(float(correct[g].sum() - conf[g].sum()))
    return total / p.shape[0]


def calibration_metrics(
    probs: ArrayLike, targets: ArrayLike, n_bins: int = 15
) -> dict[str, float]:
    """ECE, MCE and adaptive ECE of ``probs`` [N, C] against ``targets`` [N], all with ``n_bins``.

    Keys are :data:`CALIBRATION_METRIC_NAMES`. Kept apart from :func:`compute_metrics` so that
    the rows of results.json and the tables keep their four columns.
    """
    p, t = prepare(probs, targets)
    return {
        "ece": ece(p, t, n_bins=n_bins),
        "mce": mce(p, t, n_bins=n_bins),
        "adaptive_ece": adaptive_ece(p, t, n_bins=n_bins),
    }


def compute_metrics(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier of ``probs`` [N, C] against ``targets`` [N]."""
    p, t = prepare(probs, targets)
    return {
        "accuracy": accuracy(p, t),
        "nll": nll(p, t),
        "ece": ece(p, t, n_bins=n_bins),
        "brier": brier(p, t),
    }


def evaluate_ensemble(
    member_probs: ArrayLike, targets: ArrayLike, n_bins: int = 15
) -> dict[str, Any]:
    """Metrics of every member, their average, and the ensemble.

    Args:
        member_probs: float ``[N, M, C]``.  targets: int ``[N]``.

    Returns:
        ``{"members": [metrics of member 0, ...], "mean_member": {metric: mean over members},
        "ensemble": metrics of ensemble_probs(member_probs), "num_questions": N,
        "num_members": M}``. "mean_member" is the average single-model baseline: the mean of
        each member's metric, not the metric of some averaged prediction.
    """
    mp = as_member_probs(member_probs)
    ens = ensemble_probs(mp)
    t = as_targets(targets, mp.shape[0], mp.shape[2], "member_probs")
    members = [compute_metrics(mp[:, m], t, n_bins=n_bins) for m in range(mp.shape[1])]
    mean_member = {k: float(np.mean([row[k] for row in members])) for k in METRIC_NAMES}
    return {
        "members": members,
        "mean_member": mean_member,
        "ensemble": compute_metrics(ens, t, n_bins=n_bins),
        "num_questions": int(mp.shape[0]),
        "num_members": int(mp.shape[1]),
    }

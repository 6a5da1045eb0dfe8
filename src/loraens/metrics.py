"""Ensemble prediction and calibration metrics for multiple-choice QA.

Shapes used throughout (N questions, M members, C choice slots):

- ``member_probs``: float ``[N, M, C]``, each member's distribution over the choices.
- ``probs``: float ``[N, C]``, one distribution per question (a member's or the ensemble's).
- ``targets``: int ``[N]``, index of the correct choice.
- ``choice_mask``: bool ``[N, C]``, True where a choice is real. Questions with 3, 4 or 5 choices
  are padded to C; padded slots carry probability 0, so accuracy, NLL, Brier and ECE need no mask.

Inputs may be torch tensors (any device/dtype), numpy arrays or nested lists; every function
computes in float64 on the CPU so metrics do not depend on where the predictions were made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | list

METRIC_NAMES: tuple[str, ...] = ("accuracy", "nll", "ece", "brier")
CALIBRATION_METRIC_NAMES: tuple[str, ...] = ("ece", "mce", "adaptive_ece")
# Probabilities are clamped here before the log so a confident miss gives a large, finite NLL
# (-log 1e-12 ~= 27.6) instead of inf, which would poison every mean that includes it.
NLL_EPS = 1e-12


# --------------------------------------------------------------------------- input handling


def _as_float(x: ArrayLike, name: str) -> torch.Tensor:
    """Convert ``x`` to a float64 CPU tensor (detached), whatever it came in as."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` should be a numeric array or tensor, but got: {err}") from err


_AXIS_WORDS = {"N": "question", "M": "member", "C": "choice"}


def _check_shape(x: torch.Tensor, name: str, dims: str) -> None:
    """Check that ``x`` has the axes named in ``dims`` (e.g. "NMC") and none of them is empty."""
    spec = "[" + ", ".join(dims) + "]"
    if x.ndim != len(dims):
        raise ValueError(
            f"`{name}` should have shape {spec} ({len(dims)} dims), but got shape {tuple(x.shape)}"
        )
    for axis, size in zip(dims, x.shape):
        if size == 0:
            raise ValueError(
                f"`{name}` should have at least one {_AXIS_WORDS[axis]} ({axis} > 0), "
                f"but got shape {tuple(x.shape)}"
            )


def _as_targets(targets: ArrayLike, n: int, num_choices: int, probs_name: str) -> torch.Tensor:
    """Validate ``targets`` [N] against N and C of ``probs_name``; return an int64 CPU tensor."""
    is_tensor = isinstance(targets, torch.Tensor)
    t = targets.detach().cpu() if is_tensor else torch.as_tensor(np.asarray(targets))
    if t.ndim != 1:
        raise ValueError(f"`targets` should have shape [N] (1 dim), but got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(
            f"`targets` should have shape [N] with N = {n} to match `{probs_name}`, "
            f"but got shape {tuple(t.shape)}"
        )
    if t.is_floating_point():
        # Targets read back from JSON may arrive as floats; accept them only if integral.
        if not torch.equal(t, t.round()):
            raise ValueError("`targets` should hold integer choice indices, but got non-integers")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"`targets` should hold integer choice indices, but got dtype {t.dtype}")
    t = t.to(torch.int64)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_choices:
        raise ValueError(
            f"`targets` should be choice indices in [0, {num_choices}) (C = {num_choices} from "
            f"`{probs_name}`), but got values in [{lo}, {hi}]"
        )
    return t


def _prepare(probs: ArrayLike, targets: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a ``probs`` [N, C] / ``targets`` [N] pair and return (float64, int64) tensors."""
    p = _as_float(probs, "probs")
    _check_shape(p, "probs", "NC")
    t = _as_targets(targets, p.shape[0], p.shape[1], "probs")
    return p, t


def _as_choice_mask(
    choice_mask: ArrayLike, n: int, num_choices: int, other_name: str
) -> torch.Tensor:
    """Validate ``choice_mask`` [N, C] against N and C of ``other_name``; return a bool tensor."""
    mask = _as_float(choice_mask, "choice_mask") != 0
    expected = (n, num_choices)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"`choice_mask` should have shape [N, C] = {list(expected)} to match "
            f"`{other_name}`, but got shape {tuple(mask.shape)}"
        )
    if not bool(mask.any(dim=1).all()):
        raise ValueError("`choice_mask` should mark at least one real choice per question")
    return mask


def _check_n_bins(n_bins: int) -> int:
    """Validate a bin count (a positive int, not a bool) and return it as a Python int."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"`n_bins` should be a positive integer, but got {n_bins!r}")
    return int(n_bins)


def _top_label(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence (max probability) [N] and correctness (argmax == target, as 0./1.) [N]."""
    conf, pred = p.max(dim=1)
    return conf, (pred == t).double()


def _equal_width_bin_sums(
    conf: torch.Tensor, correct: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin (count, sum of confidence, sum of correctness), each [n_bins], (lo, hi] bins."""
    # Upper edges k / n_bins computed by division (exactly rounded, so 0.4 == 2/5 as a literal).
    # bucketize(right=False) returns b with upper[b-1] < conf <= upper[b]: the (lo, hi] rule,
    # and conf = 0 gives b = 0.
    upper = torch.arange(1, n_bins + 1, dtype=torch.float64) / n_bins
    bins = torch.bucketize(conf, upper, right=False).clamp_max(n_bins - 1)
    zeros = torch.zeros(n_bins, dtype=torch.float64)
    count = zeros.clone().index_add_(0, bins, torch.ones_like(conf))
    sum_conf = zeros.clone().index_add_(0, bins, conf)
    sum_acc = zeros.clone().index_add_(0, bins, correct)
    return count, sum_conf, sum_acc


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
    mp = _as_float(member_probs, "member_probs")
    _check_shape(mp, "member_probs", "NMC")
    return mp.mean(dim=1)


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
    z = _as_float(member_logits, "member_logits")
    _check_shape(z, "member_logits", "NMC")
    if choice_mask is not None:
        mask = _as_choice_mask(choice_mask, z.shape[0], z.shape[2], "member_logits")
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
    p, t = _prepare(probs, targets)
    return float((p.argmax(dim=1) == t).double().mean())


def nll(probs: ArrayLike, targets: ArrayLike) -> float:
    """Mean negative log-likelihood ``-log p(target)``, with p clamped at ``NLL_EPS``.

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.
    """
    p, t = _prepare(probs, targets)
    p_true = p.gather(1, t[:, None]).squeeze(1)
    # "+ 0.0" turns the -0.0 of a perfect prediction into 0.0 so tables do not print "-0.0000".
    return float(-torch.log(p_true.clamp_min(NLL_EPS)).mean()) + 0.0


def brier(probs: ArrayLike, targets: ArrayLike) -> float:
    """Multi-class Brier score: mean over questions of ``sum_c (p_c - onehot_c)^2``.

    Ranges over [0, 2]. Padded choices have p = 0 and a 0 one-hot entry, so they add nothing.

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.
    """
    p, t = _prepare(probs, targets)
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
    n_bins = _check_n_bins(n_bins)
    p, t = _prepare(probs, targets)
    _, sum_conf, sum_acc = _equal_width_bin_sums(*_top_label(p, t), n_bins)
    # |B|/N * |acc - conf| = |sum_acc - sum_conf| / N, which needs no division by empty counts.
    return float((sum_acc - sum_conf).abs().sum() / p.shape[0])


def mce(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error: the largest ``|acc(B_b) - conf(B_b)|`` over non-empty bins.

    Same top-label confidences and the same equal-width ``(lo, hi]`` bins as :func:`ece`
    (Naeini et al. 2015). ECE is a weighted mean of the same per-bin gaps, so ``mce >= ece``.
    A bin holding one question counts as much as a bin holding hundreds, so MCE is noisy on
    small N.

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.  n_bins: number of bins (> 0).
    """
    n_bins = _check_n_bins(n_bins)
    p, t = _prepare(probs, targets)
    count, sum_conf, sum_acc = _equal_width_bin_sums(*_top_label(p, t), n_bins)
    filled = count > 0  # never empty: N > 0 puts every question in some bin
    return float(((sum_acc[filled] - sum_conf[filled]).abs() / count[filled]).max())


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
    n_bins = _check_n_bins(n_bins)
    p, t = _prepare(probs, targets)
    conf, correct = _top_label(p, t)
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
    p, t = _prepare(probs, targets)
    return {
        "ece": ece(p, t, n_bins=n_bins),
        "mce": mce(p, t, n_bins=n_bins),
        "adaptive_ece": adaptive_ece(p, t, n_bins=n_bins),
    }


def compute_metrics(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier of ``probs`` [N, C] against ``targets`` [N]."""
    p, t = _prepare(probs, targets)
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
    mp = _as_float(member_probs, "member_probs")
    ens = ensemble_probs(mp)  # validates the [N, M, C] shape
    t = _as_targets(targets, mp.shape[0], mp.shape[2], "member_probs")
    members = [compute_metrics(mp[:, m], t, n_bins=n_bins) for m in range(mp.shape[1])]
    mean_member = {k: float(np.mean([row[k] for row in members])) for k in METRIC_NAMES}
    return {
        "members": members,
        "mean_member": mean_member,
        "ensemble": compute_metrics(ens, t, n_bins=n_bins),
        "num_questions": int(mp.shape[0]),
        "num_members": int(mp.shape[1]),
    }


# --------------------------------------------------------------------------- text tables

_LABEL_WIDTH = 12
_HEADER = f"{'':<{_LABEL_WIDTH}} {'acc %':>8} {'NLL':>8} {'ECE':>8} {'Brier':>8}"


def _row(label: str, m: dict[str, float], signed: bool = False) -> str:
    s = "+" if signed else ""
    return (
        f"{label:<{_LABEL_WIDTH}} {100 * m['accuracy']:>{s}8.2f} {m['nll']:>{s}8.4f} "
        f"{m['ece']:>{s}8.4f} {m['brier']:>{s}8.4f}"
    )


def _frame(title: str | None, lines: list[str], footer: str) -> str:
    rule = "-" * len(_HEADER)
    out = ([title] if title else []) + [_HEADER, rule] + lines + [rule, footer]
    return "\n".join(out)


def format_table(results: dict[str, Any], title: str | None = None) -> str:
    """Fixed-width table of :func:`evaluate_ensemble` results (also works on them read from JSON).

    One row per member, then "mean member" and "ensemble"; accuracy in %, others to 4 decimals.
    """
    lines = [_row(f"member {k}", m) for k, m in enumerate(results["members"])]
    lines.append("-" * len(_HEADER))  # members above, summaries below
    lines.append(_row("mean member", results["mean_member"]))
    lines.append(_row("ensemble", results["ensemble"]))
    footer = (
        f"N = {results['num_questions']} questions, M = {results['num_members']} members; "
        "NLL, ECE, Brier: lower is better"
    )
    return _frame(title, lines, footer)


def format_comparison(results: dict[str, Any], title: str | None = None) -> str:
    """Mean single member vs ensemble, plus their difference (ensemble - mean member).

    Accuracy change is in percentage points; a negative change in NLL, ECE or Brier is a gain.
    """
    single, ens = results["mean_member"], results["ensemble"]
    change = {k: ens[k] - single[k] for k in METRIC_NAMES}
    lines = [
        _row("mean member", single),
        _row("ensemble", ens),
        _row("change", change, signed=True),
    ]
    footer = (
        f"M = {results['num_members']} members, N = {results['num_questions']} questions; "
        "accuracy: higher is better, NLL/ECE/Brier: lower is better"
    )
    return _frame(title, lines, footer)

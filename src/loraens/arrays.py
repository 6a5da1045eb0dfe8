"""Validating and converting the arrays of the evaluation modules, and the one ECE binning.

Shapes used throughout (N questions, M members, C choice slots):

- ``member_probs``: float ``[N, M, C]``, each member's distribution over the choices.
- ``probs``: float ``[N, C]``, one distribution per question (a member's or the ensemble's).
- ``targets``: int ``[N]``, index of the correct choice.
- ``choice_mask``: bool ``[N, C]``, True where a choice is real.

Inputs may be torch tensors (any device/dtype), numpy arrays or nested lists; the converters
return float64 / int64 / bool CPU tensors, so metrics do not depend on where the predictions were
made. Every error message names the argument, the expected shape and what it got.

The equal-width confidence bins (:func:`equal_width_bins`) are the one binning behind ECE and MCE
(:mod:`loraens.metrics`), the resampled ECE (:mod:`loraens.bootstrap`) and the reliability
diagram (:mod:`loraens.plots`), so the three can never disagree about which bin a question is in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | list

_AXIS_WORDS = {"N": "question", "M": "member", "C": "choice"}


# --------------------------------------------------------------------------- converters


def as_float(x: ArrayLike, name: str) -> torch.Tensor:
    """Convert ``x`` (any shape) to a float64 CPU tensor (detached), whatever it came in as."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` should be a numeric array or tensor, but got: {err}") from err


def check_shape(x: torch.Tensor, name: str, dims: str) -> None:
    """Check that ``x`` has the axes named in ``dims`` (e.g. "NMC" for ``[N, M, C]``), none empty."""
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


def as_member_probs(member_probs: ArrayLike) -> torch.Tensor:
    """Validate member probabilities ``[N, M, C]`` and return them as a float64 tensor."""
    mp = as_float(member_probs, "member_probs")
    check_shape(mp, "member_probs", "NMC")
    return mp


def as_targets(targets: ArrayLike, n: int, num_choices: int, probs_name: str) -> torch.Tensor:
    """Validate ``targets`` [N] against N and C of ``probs_name``; return an int64 ``[N]`` tensor."""
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


def prepare(probs: ArrayLike, targets: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a ``probs`` [N, C] / ``targets`` [N] pair; return (float64 [N, C], int64 [N])."""
    p = as_float(probs, "probs")
    check_shape(p, "probs", "NC")
    t = as_targets(targets, p.shape[0], p.shape[1], "probs")
    return p, t


def as_choice_mask(
    choice_mask: ArrayLike, n: int, num_choices: int, other_name: str
) -> torch.Tensor:
    """Validate ``choice_mask`` [N, C] against N and C of ``other_name``; return bool ``[N, C]``."""
    mask = as_float(choice_mask, "choice_mask") != 0
    expected = (n, num_choices)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"`choice_mask` should have shape [N, C] = {list(expected)} to match "
            f"`{other_name}`, but got shape {tuple(mask.shape)}"
        )
    if not bool(mask.any(dim=1).all()):
        raise ValueError("`choice_mask` should mark at least one real choice per question")
    return mask


def check_n_bins(n_bins: int) -> int:
    """Validate a bin count (a positive int, not a bool) and return it as a Python int."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"`n_bins` should be a positive integer, but got {n_bins!r}")
    return int(n_bins)


def top_label(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence (max probability) [N] and correctness (argmax == target, as 0./1.) [N].

    Args:
        p: float64 ``[N, C]``.  t: int64 ``[N]`` (as :func:`prepare` returns them).
    """
    conf, pred = p.max(dim=1)
    return conf, (pred == t).double()


# --------------------------------------------------------------------------- ECE binning


@dataclass(frozen=True)
class ConfidenceBins:
    """Questions sorted into ``n_bins`` equal-width confidence bins (see :func:`equal_width_bins`).

    Attributes:
        edges: float64 ``[n_bins + 1]``, ``0, 1/n_bins, ..., 1``.
        index: int64 ``[N]``, the bin of each question.
        count: float64 ``[n_bins]``, questions per bin.
        sum_conf: float64 ``[n_bins]``, sum of the confidences in each bin.
        sum_correct: float64 ``[n_bins]``, number of correct answers in each bin.
    """

    edges: torch.Tensor
    index: torch.Tensor
    count: torch.Tensor
    sum_conf: torch.Tensor
    sum_correct: torch.Tensor

    @property
    def filled(self) -> torch.Tensor:
        """bool ``[n_bins]``: the bins that hold at least one question."""
        return self.count > 0

    def mean_confidence(self) -> torch.Tensor:
        """float64 ``[n_filled]``: mean confidence of each non-empty bin, in bin order."""
        return self.sum_conf[self.filled] / self.count[self.filled]

    def accuracy(self) -> torch.Tensor:
        """float64 ``[n_filled]``: accuracy of each non-empty bin, in bin order."""
        return self.sum_correct[self.filled] / self.count[self.filled]


def equal_width_bins(conf: torch.Tensor, correct: torch.Tensor, n_bins: int) -> ConfidenceBins:
    """Sort questions into ``n_bins`` equal-width confidence bins on [0, 1], ``(lo, hi]`` each.

    Bin b is the half-open interval ``(b/n_bins, (b+1)/n_bins]``, except that the first bin also
    includes 0 exactly: a confidence exactly on an edge goes to the lower bin and a confidence of
    1.0 lands in the last bin. (torchmetrics uses ``[lo, hi)`` bins; the two agree unless a
    confidence sits on an edge.)

    Args:
        conf: float64 ``[N]`` confidences (top-label probabilities).
        correct: float64 ``[N]`` correctness, 0. or 1.
        n_bins: number of bins (> 0, see :func:`check_n_bins`).
    """
    # Upper edges k / n_bins computed by division (exactly rounded, so 0.4 == 2/5 as a literal).
    # bucketize(right=False) returns b with upper[b-1] < conf <= upper[b]: the (lo, hi] rule,
    # and conf = 0 gives b = 0.
    upper = torch.arange(1, n_bins + 1, dtype=torch.float64) / n_bins
    index = torch.bucketize(conf, upper, right=False).clamp_max(n_bins - 1)
    zeros = torch.zeros(n_bins, dtype=torch.float64)
    return ConfidenceBins(
        edges=torch.cat([zeros[:1], upper]),
        index=index,
        count=zeros.clone().index_add_(0, index, torch.ones_like(conf)),
        sum_conf=zeros.clone().index_add_(0, index, conf),
        sum_correct=zeros.clone().index_add_(0, index, correct),
    )


def as_correct(correct: ArrayLike) -> np.ndarray:
    """Validate ``correct`` [N] (bools or 0/1) and return float64 0./1."""
    c = as_float(correct, "correct")
    check_shape(c, "correct", "N")
    if not bool(((c == 0) | (c == 1)).all()):
        raise ValueError("`correct` should hold booleans (or 0/1), but got other values")
    return c.numpy()


def as_uncertainty(uncertainty: ArrayLike, n: int, name: str, other_name: str) -> np.ndarray:
    """Validate an uncertainty score [N] against N of ``other_name``; return float64."""
    u = as_float(uncertainty, name)
    if u.ndim != 1 or u.shape[0] != n:
        raise ValueError(
            f"`{name}` should have shape [N] with N = {n} to match `{other_name}`, "
            f"but got shape {tuple(u.shape)}"
        )
    n_nan = int(u.isnan().sum())
    if n_nan:
        raise ValueError(f"`{name}` should not contain NaN, but got {n_nan} NaN values")
    return u.numpy()

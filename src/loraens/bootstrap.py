"""Seeded bootstrap intervals over questions, and paired bootstraps for differences.

Every resample draws N question indices with replacement and applies the SAME indices to every
array along axis 0, so per-question pairings (probabilities and targets, or two methods on the
same questions) are kept. Intervals are percentile intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .metrics import METRIC_NAMES, _equal_width_bin_sums, _prepare, _top_label, compute_metrics


def _indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[R, N] question indices drawn with replacement from a seeded generator."""
    if n < 1:
        raise ValueError("The bootstrap needs at least one question, but got N = 0.")
    if n_resamples < 1:
        raise ValueError(f"`n_resamples` should be at least 1, but got {n_resamples}.")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _arrays(arrays: Sequence[Any], name: str) -> list[np.ndarray]:
    out = [np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a) for a in arrays]
    sizes = {a.shape[0] for a in out}
    if len(sizes) != 1:
        raise ValueError(f"All arrays of `{name}` must have the same number of questions on axis 0, "
                         f"but got shapes {[a.shape for a in out]}.")
    return out


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: Any, n_resamples: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, float]:
    """Point estimate and percentile interval of `metric_fn(*arrays)`.

    Returns {"value": metric on all questions, "low", "high", "std" over resamples}.
    """
    data = _arrays(arrays, "arrays")
    idx = _indices(data[0].shape[0], n_resamples, seed)
    values = np.array([metric_fn(*(a[i] for a in data)) for i in idx])
    low, high = _interval(values, alpha)
    return {"value": float(metric_fn(*data)), "low": low, "high": high, "std": float(values.std())}


def paired_bootstrap(metric_fn: Callable[..., float], arrays_a: Sequence[Any], arrays_b: Sequence[Any],
                     n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict[str, float]:
    """Difference metric(a) - metric(b) on the same resampled questions.

    Returns {"diff", "low", "high", "p_value"}; p_value = 2 * min(P(d <= 0), P(d >= 0)) over
    the resampled differences d, capped at 1 (two-sided).
    """
    a, b = _arrays(arrays_a, "arrays_a"), _arrays(arrays_b, "arrays_b")
    if a[0].shape[0] != b[0].shape[0]:
        raise ValueError(f"A paired bootstrap needs the same questions on both sides, but got "
                         f"N = {a[0].shape[0]} and N = {b[0].shape[0]}.")
    idx = _indices(a[0].shape[0], n_resamples, seed)
    d = np.array([metric_fn(*(x[i] for x in a)) - metric_fn(*(x[i] for x in b)) for i in idx])
    low, high = _interval(d, alpha)
    p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))
    return {"diff": float(metric_fn(*a) - metric_fn(*b)), "low": low, "high": high, "p_value": float(p)}


def metric_cis(probs: Any, targets: Any, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0,
               n_bins: int = 15) -> dict[str, dict[str, float]]:
    """Intervals for accuracy, NLL, ECE and Brier of `probs` [N, C], vectorised over resamples.

    Accuracy, NLL and Brier are means of per-question terms. ECE is
    sum_b |sum_{i in b} (correct_i - conf_i)| / N, so it too only needs per-question terms and
    each question's bin, which a resample does not change.
    """
    p, t = _prepare(probs, targets)
    n = p.shape[0]
    conf, correct = _top_label(p, t)
    terms = {
        "accuracy": correct.numpy(),
        "nll": -np.log(np.clip(p[torch.arange(n), t].numpy(), 1e-12, None)),
        "brier": ((p - torch.nn.functional.one_hot(t, p.shape[1]).double()) ** 2).sum(1).numpy(),
    }
    upper = torch.arange(1, n_bins + 1, dtype=torch.float64) / n_bins  # same bins as metrics.ece
    bins = torch.bucketize(conf, upper, right=False).clamp_max(n_bins - 1).numpy()
    gap = (correct - conf).numpy()
    idx = _indices(n, n_resamples, seed)
    values = {k: v[idx].mean(1) for k, v in terms.items()}
    sums = np.zeros((n_resamples, n_bins))
    np.add.at(sums, (np.repeat(np.arange(n_resamples), n), bins[idx].ravel()), gap[idx].ravel())
    values["ece"] = np.abs(sums).sum(1) / n
    point = compute_metrics(p, t, n_bins)
    out = {}
    for k in METRIC_NAMES:
        low, high = _interval(values[k], alpha)
        out[k] = {"value": point[k], "low": low, "high": high, "std": float(values[k].std())}
    return out


def format_ci(ci: dict[str, float], digits: int = 3) -> str:
    """'0.712 [0.675, 0.748]'."""
    return f"{ci['value']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"

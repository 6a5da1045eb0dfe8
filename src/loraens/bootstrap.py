"""Seeded bootstrap over questions: intervals for a metric, and paired differences of two methods.

The unit of resampling is the QUESTION. Resample r draws N question indices with replacement,
``resample_indices(N, R, seed)[r]``, and applies the SAME indices to every array along axis 0,
so what belongs to one question (its probabilities and its target, or two methods' answers to
it) stays together. For a given (N, n_resamples, seed) every function here draws the same
indices, so e.g. :func:`metric_cis` and :func:`bootstrap_ci` on the same data agree.

Intervals are percentile intervals: the ``alpha/2`` and ``1 - alpha/2`` quantiles of the
resampled values (``np.quantile``, linear interpolation). ``std`` is the standard deviation of
the resampled values (``ddof=0``), the bootstrap standard error.

:func:`bootstrap_ci` and :func:`paired_bootstrap` take any metric and loop over resamples;
:func:`metric_cis` and :func:`paired_metric_diffs` do accuracy, NLL, ECE and Brier for all
resamples at once from per-question terms (1000 resamples of N = 1000 in a fraction of a second).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .arrays import ArrayLike, check_n_bins, equal_width_bins, prepare, top_label
from .metrics import METRIC_NAMES, NLL_EPS, compute_metrics, evaluate_ensemble

# Index matrices are drawn and used in row blocks of about this many entries, so memory stays
# bounded (~32 MB of int64 per block) whatever N * n_resamples is.
_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- resampling


def _check_resampling(n_resamples: int, alpha: float) -> None:
    is_int = isinstance(n_resamples, int | np.integer) and not isinstance(n_resamples, bool)
    if not is_int or n_resamples < 1:
        raise ValueError(f"`n_resamples` should be a positive integer, but got {n_resamples!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(
            f"`alpha` should be in (0, 1), e.g. 0.05 for a 95% interval, but got {alpha!r}"
        )


def _index_blocks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Row blocks of the ``[n_resamples, n]`` index matrix, in order, from one seeded generator.

    Drawing ``Generator.integers`` in consecutive blocks gives the same numbers as one draw of
    the whole matrix (each index consumes the generator's stream in order), so the blocks
    concatenate to :func:`resample_indices`.
    """
    if n < 1:
        raise ValueError(f"The bootstrap needs at least one question, but got N = {n}")
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n, size=(min(rows, n_resamples - start), n))


def resample_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """The question indices of every resample: int64 ``[n_resamples, n]``, drawn with replacement.

    Row r is what resample r of every function in this module uses for the same (n, seed).
    """
    _check_resampling(n_resamples, 0.05)
    return np.concatenate(list(_index_blocks(n, n_resamples, seed)))


def _as_arrays(arrays: Sequence[Any] | np.ndarray | torch.Tensor, name: str) -> list[Any]:
    """Arrays sharing axis 0 (N questions): torch tensors stay tensors, the rest become numpy."""
    if isinstance(arrays, np.ndarray | torch.Tensor):
        arrays = (arrays,)
    out = [a if isinstance(a, torch.Tensor) else np.asarray(a) for a in arrays]
    if not out:
        raise ValueError(f"`{name}` should hold at least one array, but got none")
    shapes = [tuple(a.shape) for a in out]
    if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(
            f"Every array of `{name}` should have the same number of questions N on axis 0, "
            f"but got shapes {shapes}"
        )
    if shapes[0][0] == 0:
        raise ValueError(f"The bootstrap needs at least one question, but `{name}` has N = 0")
    return out


def _take(a: Any, idx: np.ndarray) -> Any:
    """``a[idx]`` along axis 0, for a numpy array or a torch tensor (on its own device)."""
    if isinstance(a, torch.Tensor):
        return a[torch.from_numpy(idx).to(a.device)]
    return a[idx]


def _resampled(
    fn: Callable[[np.ndarray], float], n: int, n_resamples: int, seed: int
) -> np.ndarray:
    """``[fn(idx_r) for every resample r]`` as float64 ``[n_resamples]``."""
    return np.array(
        [float(fn(idx)) for block in _index_blocks(n, n_resamples, seed) for idx in block],
        dtype=np.float64,
    )


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def percentile_ci(point: float, values: np.ndarray, alpha: float) -> dict[str, float]:
    """``{"value", "low", "high", "std"}`` of a point estimate and its resampled values ``[R]``."""
    low, high = _interval(values, alpha)
    return {"value": float(point), "low": low, "high": high, "std": float(values.std())}


def paired_summary(diff: float, d: np.ndarray, alpha: float) -> dict[str, float]:
    """``{"diff", "low", "high", "p_value"}`` of a difference and its resampled differences ``[R]``."""
    low, high = _interval(d, alpha)
    # Two-sided: twice the smaller tail at 0, capped at 1. Both tails include d == 0, so a method
    # compared with itself (every d = 0) gets p = 1. The resolution is 1 / n_resamples: p = 0
    # means no resample crossed 0, i.e. p < 1 / n_resamples.
    p = min(1.0, 2.0 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return {"diff": float(diff), "low": low, "high": high, "p_value": p}


# --------------------------------------------------------------------------- any metric


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: ArrayLike,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Percentile bootstrap interval of ``metric_fn(*arrays)`` over questions.

    Args:
        metric_fn: called as ``metric_fn(*arrays)`` with arrays of the same kind as given
            (torch tensors stay tensors; lists become numpy); returns a float.
        *arrays: each with the N questions on axis 0, e.g. ``probs [N, C], targets [N]``.
        n_resamples: number of resamples R.  alpha: 0.05 for a 95% interval.  seed: of the draw.

    Returns:
        ``{"value": metric on all N questions, "low", "high": percentile interval,
        "std": std of the R resampled values}``.
    """
    _check_resampling(n_resamples, alpha)
    data = _as_arrays(arrays, "arrays")
    values = _resampled(
        lambda idx: metric_fn(*(_take(a, idx) for a in data)), len(data[0]), n_resamples, seed
    )
    return percentile_ci(float(metric_fn(*data)), values, alpha)


def paired_bootstrap(
    metric_fn: Callable[..., float],
    arrays_a: Sequence[ArrayLike],
    arrays_b: Sequence[ArrayLike],
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of ``metric_fn(*arrays_a) - metric_fn(*arrays_b)`` on the same questions.

    Each resample applies the SAME question indices to both sides, so a and b must hold the same
    N questions in the same order (e.g. the ensemble and a single member on one split).

    Args:
        metric_fn: as in :func:`bootstrap_ci`, e.g. :func:`loraens.metrics.nll`.
        arrays_a, arrays_b: tuples of arrays, each with the N questions on axis 0,
            e.g. ``(probs_a [N, C], targets [N])``; a single array may be passed bare.
        n_resamples, alpha, seed: as in :func:`bootstrap_ci`.

    Returns:
        ``{"diff": metric(a) - metric(b) on all questions, "low", "high": percentile interval of
        the resampled differences d, "p_value": 2 * min(P(d <= 0), P(d >= 0)), capped at 1}``,
        a two-sided p-value for "no difference".
    """
    _check_resampling(n_resamples, alpha)
    a, b = _as_arrays(arrays_a, "arrays_a"), _as_arrays(arrays_b, "arrays_b")
    if len(a[0]) != len(b[0]):
        raise ValueError(
            "`arrays_a` and `arrays_b` should hold the same questions, but got "
            f"N = {len(a[0])} and N = {len(b[0])} (shapes {[tuple(x.shape) for x in a]} and "
            f"{[tuple(x.shape) for x in b]})"
        )

    def diff(idx: np.ndarray) -> float:
        return metric_fn(*(_take(x, idx) for x in a)) - metric_fn(*(_take(x, idx) for x in b))

    d = _resampled(diff, len(a[0]), n_resamples, seed)
    return paired_summary(float(metric_fn(*a)) - float(metric_fn(*b)), d, alpha)


# --------------------------------------------------------------------------- vectorised metrics


def _per_question(
    probs: ArrayLike, targets: ArrayLike, n_bins: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, float]]:
    """Per-question terms of the four metrics, float64 ``[N]`` each, plus ECE bin and gap ``[N]``.

    Accuracy, NLL and Brier are means of per-question terms. ECE is
    ``sum_b |sum_{i in b} (correct_i - conf_i)| / N`` (see :func:`loraens.metrics.ece`), so a
    resample only needs each question's gap ``correct - conf`` and its bin, which resampling
    does not change. Also returns :func:`compute_metrics` on all questions.
    """
    n_bins = check_n_bins(n_bins)
    p, t = prepare(probs, targets)
    conf, correct = top_label(p, t)
    p_true = p.gather(1, t[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(t, num_classes=p.shape[1]).to(p.dtype)
    terms = {
        "accuracy": correct.numpy(),
        "nll": (-torch.log(p_true.clamp_min(NLL_EPS))).numpy(),
        "brier": ((p - onehot) ** 2).sum(dim=1).numpy(),
    }
    # The bins of metrics.ece (arrays.equal_width_bins); a question keeps its bin in every
    # resample. The tests check that resampled ECE equals metrics.ece on the same questions.
    bins = equal_width_bins(conf, correct, n_bins).index.numpy()
    return terms, bins, (correct - conf).numpy(), compute_metrics(p, t, n_bins=n_bins)


def _resampled_metrics(
    terms: dict[str, np.ndarray], bins: np.ndarray, gap: np.ndarray, n_bins: int,
    n_resamples: int, seed: int,
) -> dict[str, np.ndarray]:
    """Every metric on every resample: ``{metric: float64 [n_resamples]}``."""
    n = len(gap)
    out: dict[str, list[np.ndarray]] = {k: [] for k in METRIC_NAMES}
    for idx in _index_blocks(n, n_resamples, seed):  # idx: [R_block, N]
        for k, v in terms.items():
            out[k].append(v[idx].mean(axis=1))
        # Bin sums of the gap for every (resample, bin) in one bincount: cell r * n_bins + b.
        cell = (np.arange(len(idx))[:, None] * n_bins + bins[idx]).ravel()
        sums = np.bincount(cell, weights=gap[idx].ravel(), minlength=len(idx) * n_bins)
        out["ece"].append(np.abs(sums.reshape(len(idx), n_bins)).sum(axis=1) / n)
    return {k: np.concatenate(v) for k, v in out.items()}


def metric_resamples(
    probs: ArrayLike, targets: ArrayLike, n_resamples: int = 1000, seed: int = 0, n_bins: int = 15
) -> dict[str, np.ndarray]:
    """Accuracy, NLL, ECE and Brier of every bootstrap resample, computed all at once.

    Args:
        probs: float ``[N, C]``.  targets: int ``[N]``.  n_bins: ECE bins, as in ``ece``.

    Returns:
        ``{metric: float64 [n_resamples]}`` (keys ``METRIC_NAMES``); entry r equals the plain
        metric on ``probs[idx_r], targets[idx_r]`` with ``idx_r = resample_indices(N, R, seed)[r]``.
    """
    _check_resampling(n_resamples, 0.05)
    terms, bins, gap, _ = _per_question(probs, targets, n_bins)
    return _resampled_metrics(terms, bins, gap, int(n_bins), n_resamples, seed)


def metric_cis(
    probs: ArrayLike,
    targets: ArrayLike,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, dict[str, float]]:
    """Bootstrap intervals of accuracy, NLL, ECE and Brier of ``probs`` [N, C] vs ``targets`` [N].

    Vectorised over resamples (see :func:`metric_resamples`); the same numbers as
    ``bootstrap_ci(metric, probs, targets, ...)`` for each metric, up to float rounding.
    ECE is biased upward on small samples, and more so on resamples (duplicated questions make
    bins emptier), so its interval may sit above the point estimate.

    Returns:
        ``{metric: {"value": compute_metrics on all questions, "low", "high", "std"}}``.
    """
    _check_resampling(n_resamples, alpha)
    terms, bins, gap, point = _per_question(probs, targets, n_bins)
    values = _resampled_metrics(terms, bins, gap, int(n_bins), n_resamples, seed)
    return {k: percentile_ci(point[k], values[k], alpha) for k in METRIC_NAMES}


def paired_metric_diffs(
    probs_a: ArrayLike,
    probs_b: ArrayLike,
    targets: ArrayLike,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, dict[str, float]]:
    """Paired bootstrap of metric(a) - metric(b) for accuracy, NLL, ECE and Brier, vectorised.

    The same numbers as ``paired_bootstrap(metric, (probs_a, targets), (probs_b, targets))``
    for each metric, up to float rounding, in one pass.

    Args:
        probs_a, probs_b: float ``[N, C]``, two methods on the same questions.
        targets: int ``[N]``.

    Returns:
        ``{metric: {"diff", "low", "high", "p_value"}}`` as in :func:`paired_bootstrap`.
    """
    _check_resampling(n_resamples, alpha)
    terms_a, bins_a, gap_a, point_a = _per_question(probs_a, targets, n_bins)
    terms_b, bins_b, gap_b, point_b = _per_question(probs_b, targets, n_bins)
    # _per_question checked each side against targets, so both have the same N.
    va = _resampled_metrics(terms_a, bins_a, gap_a, int(n_bins), n_resamples, seed)
    vb = _resampled_metrics(terms_b, bins_b, gap_b, int(n_bins), n_resamples, seed)
    return {k: paired_summary(point_a[k] - point_b[k], va[k] - vb[k], alpha) for k in METRIC_NAMES}


def member_metric_resamples(
    member_probs: ArrayLike, targets: ArrayLike, n_resamples: int = 1000, seed: int = 0, n_bins: int = 15
) -> dict[str, np.ndarray]:
    """:func:`metric_resamples` of each member ``[N, M, C]``, averaged over the members: the mean
    member's metric on every resample (the same question indices for every member)."""
    mp = torch.as_tensor(np.asarray(member_probs) if not isinstance(member_probs, torch.Tensor) else member_probs)
    if mp.ndim != 3:
        raise ValueError(f"member_probs should be [N, M, C], but got shape {tuple(mp.shape)}")
    rows = [metric_resamples(mp[:, k], targets, n_resamples, seed, n_bins) for k in range(mp.shape[1])]
    return {k: np.mean([r[k] for r in rows], axis=0) for k in METRIC_NAMES}


def ensemble_gain(
    member_probs: ArrayLike, targets: ArrayLike, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0,
    n_bins: int = 15,
) -> dict[str, dict[str, float]]:
    """Paired bootstrap of the ensemble minus the mean member, for accuracy, NLL, ECE and Brier.

    Args:
        member_probs: float ``[N, M, C]``.  targets: int ``[N]``.

    The ensemble (averaged probabilities) and every member are scored on the SAME resampled
    questions; the mean member is the mean of the members' metrics on each resample.

    Returns:
        ``{metric: {"diff", "low", "high", "p_value"}}`` as in :func:`paired_bootstrap`; a negative
        NLL / ECE / Brier difference is a gain.
    """
    _check_resampling(n_resamples, alpha)
    mp = torch.as_tensor(np.asarray(member_probs) if not isinstance(member_probs, torch.Tensor) else member_probs)
    ens = mp.mean(dim=1)
    ens_r = metric_resamples(ens, targets, n_resamples, seed, n_bins)
    mean_r = member_metric_resamples(mp, targets, n_resamples, seed, n_bins)
    point = evaluate_ensemble(mp, targets, n_bins=n_bins)
    ens_p, mean_p = point["ensemble"], point["mean_member"]
    return {k: paired_summary(ens_p[k] - mean_p[k], ens_r[k] - mean_r[k], alpha) for k in METRIC_NAMES}


def seeds_and_questions_interval(
    per_seed: Sequence[ArrayLike], alpha: float = 0.05, n_draws: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of a metric's mean over S training seeds, resampling seeds AND questions.

    Args:
        per_seed: S arrays ``[R]``: seed s's metric on R bootstrap resamples of its test questions,
            where row r of every seed is drawn with the same indices into the questions sorted by
            id (`loraens.sweep.method_resamples`). Seeds that scored the same questions therefore
            have the same resample in row r.

    A draw picks S seeds with replacement (the spread between independent training runs) and one
    row r for all of them (the spread from which questions were asked), and averages the picked
    seeds' values in row r. Sharing the row keeps seeds that answered the same questions paired,
    so their common question noise is not divided by S as if it were independent; seeds with
    disjoint question samples get unrelated resamples in the same row, as they should. With one
    seed it is that seed's question bootstrap; with two seeds the seed part of the spread is coarse
    (a draw holds one seed twice half of the time). Returns the ``alpha/2`` and ``1 - alpha/2``
    quantiles of the draws.
    """
    _check_resampling(n_draws, alpha)
    arrays = [np.asarray(a, dtype=float).ravel() for a in per_seed]
    if not arrays or any(len(a) == 0 for a in arrays):
        raise ValueError("seeds_and_questions_interval needs at least one seed with at least one resample.")
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"Every seed needs the same number of resamples, but got {[len(a) for a in arrays]}.")
    table = np.stack(arrays)  # [S, R]
    rng = np.random.default_rng(seed)
    s, r = table.shape
    picks = rng.integers(0, s, size=(n_draws, s))  # [D, S] seed picks
    rows = rng.integers(0, r, size=n_draws)  # [D] one question resample per draw
    draws = table[picks, rows[:, None]].mean(axis=1)
    return _interval(draws, alpha)


def format_ci(ci: dict[str, float], digits: int = 3) -> str:
    """``"0.712 [0.675, 0.748]"``: the point value (``"value"``, or ``"diff"`` for a paired
    result) and its interval, each to ``digits`` decimals."""
    value = ci["value"] if "value" in ci else ci["diff"]
    return f"{value:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"

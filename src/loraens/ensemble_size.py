"""How many members are worth it: metrics of m-member ensembles for m = 1..M.

Two views per m:

- "first": the ensemble of members ``0..m-1``, i.e. what you would have had by training only m
  members (members are exchangeable, so this is one sample of an m-member ensemble).
- "random_mean" / "random_std": mean and std (``ddof=0``) over m-subsets of the members, which
  averages out which members happened to come first. When there are at most ``n_subsets``
  subsets of size m, every one of them is used (so the std is the exact spread over all of
  them); otherwise ``n_subsets`` distinct subsets are drawn at random (seeded). m = M has a
  single subset, so its std is 0.

Every ensemble is formed by :func:`loraens.metrics.ensemble_probs` (mean of member
probabilities) and scored by :func:`loraens.metrics.compute_metrics`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from .arrays import ArrayLike, as_member_probs, as_targets
from .metrics import METRIC_NAMES, compute_metrics, ensemble_probs


def _subsets(
    num_members: int, m: int, n_subsets: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """All m-subsets of the members if there are at most ``n_subsets``, else that many distinct
    random ones (each sorted), in a seeded order."""
    if math.comb(num_members, m) <= n_subsets:
        return list(itertools.combinations(range(num_members), m))
    chosen: dict[tuple[int, ...], None] = {}  # insertion-ordered set
    while len(chosen) < n_subsets:  # terminates: more than n_subsets subsets exist
        chosen[tuple(sorted(rng.choice(num_members, size=m, replace=False).tolist()))] = None
    return list(chosen)


def ensemble_size_curve(
    member_probs: ArrayLike,
    targets: ArrayLike,
    n_subsets: int = 20,
    seed: int = 0,
    n_bins: int = 15,
) -> list[dict[str, Any]]:
    """Metrics of m-member ensembles, for m = 1..M.

    Args:
        member_probs: float ``[N, M, C]``.  targets: int ``[N]``.
        n_subsets: the most m-subsets to average over per m (> 0).
        seed: of the random subsets.  n_bins: ECE bins.

    Returns:
        M rows, in order of m; row m is ``{"m": m, "num_subsets": number of subsets used,
        "first": metrics of members 0..m-1, "random_mean": {metric: mean over subsets},
        "random_std": {metric: std over subsets}}``; metrics are those of ``compute_metrics``.
        Row 1's "first" is member 0 alone; row M's "first" is the full ensemble.
    """
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int | np.integer) or n_subsets < 1:
        raise ValueError(f"`n_subsets` should be a positive integer, but got {n_subsets!r}")
    mp = as_member_probs(member_probs)
    t = as_targets(targets, mp.shape[0], mp.shape[2], "member_probs")
    num_members = mp.shape[1]
    rng = np.random.default_rng(seed)
    cache: dict[tuple[int, ...], dict[str, float]] = {}

    def score(subset: tuple[int, ...]) -> dict[str, float]:
        if subset not in cache:  # e.g. "first" is often also one of the subsets
            ens = ensemble_probs(mp[:, torch.tensor(subset)])
            cache[subset] = compute_metrics(ens, t, n_bins=n_bins)
        return cache[subset]

    rows = []
    for m in range(1, num_members + 1):
        scores = [score(s) for s in _subsets(num_members, m, int(n_subsets), rng)]
        rows.append({
            "m": m,
            "num_subsets": len(scores),
            "first": dict(score(tuple(range(m)))),
            "random_mean": {k: float(np.mean([s[k] for s in scores])) for k in METRIC_NAMES},
            "random_std": {k: float(np.std([s[k] for s in scores])) for k in METRIC_NAMES},
        })
    return rows

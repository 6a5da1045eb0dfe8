"""How many members are worth it: metrics of the ensemble of m members, for m = 1..M."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from .metrics import METRIC_NAMES, _as_float, _check_shape, compute_metrics


def ensemble_size_curve(member_probs: Any, targets: Any, n_subsets: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """One row per m = 1..M with the metrics of m-member ensembles.

    member_probs: [N, M, C]; targets: [N]. Each row holds "m"; "first": metrics of the first m
    members; "random_mean" / "random_std": mean and std over `n_subsets` random m-subsets (every
    subset when there are fewer; m = M has one, with std 0).
    """
    mp = _as_float(member_probs, "member_probs")
    _check_shape(mp, "member_probs", "NMC")
    m_total = mp.shape[1]
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(1, m_total + 1):
        if math.comb(m_total, m) <= n_subsets:
            subsets = [list(s) for s in itertools.combinations(range(m_total), m)]
        else:
            subsets = [sorted(rng.choice(m_total, size=m, replace=False).tolist()) for _ in range(n_subsets)]
        scores = [compute_metrics(mp[:, s].mean(1), targets) for s in subsets]
        rows.append({
            "m": m,
            "first": compute_metrics(mp[:, :m].mean(1), targets),
            "random_mean": {k: float(np.mean([s[k] for s in scores])) for k in METRIC_NAMES},
            "random_std": {k: float(np.std([s[k] for s in scores])) for k in METRIC_NAMES},
        })
    return rows

"""The paper's baselines, built from a trained run's predictions: temperature scaling,
checkpoint (snapshot) ensembles, and early stopping on validation NLL.

The methods that need the model itself (weight-averaged LoRA, MC dropout) are context managers
in `loraens.ensemble` (`weight_averaged`, `mc_dropout`); `sweep.derive_methods` runs them.

All functions take probabilities with a trailing choice axis: `[N, C]` for one model or
`[N, M, C]` for M members, with padded choices at probability 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from .metrics import ensemble_probs
from .predictions import Predictions

#: log-temperature search interval: T in [exp(-4), exp(4)] = [0.018, 54.6]
LOG_T_BOUNDS = (-4.0, 4.0)


def _log(probs: torch.Tensor, choice_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p, with padded choices at -inf and real choices never below log(1e-30).

    Padded choices are those outside `choice_mask` [..., C]; without a mask, those with p == 0
    (a real choice whose probability underflowed to 0 then counts as padding: pass the mask).
    """
    real = probs > 0 if choice_mask is None else torch.as_tensor(choice_mask, dtype=torch.bool).expand_as(probs)
    return torch.where(real, probs.clamp_min(1e-30).log(), torch.tensor(float("-inf")))


def apply_temperature(probs: torch.Tensor, temperature: float, choice_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(log p / T) over the last axis; T > 1 softens, T < 1 sharpens; argmax unchanged.

    probs: [..., C]; choice_mask: optional bool [..., C] of the real choices. Returns probs' shape.
    """
    if not temperature > 0:
        raise ValueError(f"A temperature must be positive, but got {temperature}.")
    return torch.softmax(_log(torch.as_tensor(probs, dtype=torch.float32), choice_mask) / temperature, dim=-1)


def _nll_at(log_p: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    lp = torch.log_softmax(log_p / temperature, dim=-1)
    return float(-lp.gather(1, targets[:, None]).mean())


def fit_temperature(probs: torch.Tensor, targets: torch.Tensor, choice_mask: torch.Tensor | None = None) -> float:
    """The temperature T minimising the NLL of softmax(log p / T) on (probs [N, C], targets [N]).

    A bounded 1-D search over log T (`LOG_T_BOUNDS`); T = 1 is kept when no T does better, so
    the fitted NLL is never above the unscaled one.
    """
    probs = torch.as_tensor(probs, dtype=torch.float32)
    targets = torch.as_tensor(targets, dtype=torch.long)
    if probs.ndim != 2 or probs.shape[0] != targets.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"fit_temperature needs probs [N, C] and targets [N] with N > 0, "
                         f"but got {tuple(probs.shape)} and {tuple(targets.shape)}.")
    log_p = _log(probs, choice_mask)
    res = minimize_scalar(lambda u: _nll_at(log_p, targets, math.exp(u)), bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-4})
    t = math.exp(float(res.x))
    return t if _nll_at(log_p, targets, t) <= _nll_at(log_p, targets, 1.0) else 1.0


def temperature_scaled(val: Predictions, test: Predictions) -> tuple[Predictions, Predictions, list[float]]:
    """Temperature-scale every member AND the ensemble, each with its own T fitted on `val`.

    Returns (scaled val, scaled test, temperatures) where the scaled Predictions hold the M
    scaled members in member_probs [N, M, C] and temperatures = [T_member_0, ..., T_ensemble].
    Use `ensemble_temperature_scaled` for the scaled ensemble itself.
    """
    temps = [fit_temperature(val.member_probs[:, k], val.targets) for k in range(val.member_probs.shape[1])]
    scale = lambda p: torch.stack([apply_temperature(p.member_probs[:, k], t) for k, t in enumerate(temps)], 1)
    t_ens = fit_temperature(ensemble_probs(val.member_probs), val.targets)
    return (_with_probs(val, scale(val)), _with_probs(test, scale(test)), [*temps, t_ens])


def ensemble_temperature_scaled(val: Predictions, test: Predictions) -> tuple[torch.Tensor, float]:
    """The ensemble's averaged probabilities on `test`, temperature-scaled with T fitted on `val`.

    Returns (probs [N, C], T). The temperature acts on the averaged distribution (the ensemble is
    treated as one model), which is what a user deploying the ensemble would calibrate.
    """
    t = fit_temperature(ensemble_probs(val.member_probs), val.targets, val.choice_mask)
    return apply_temperature(ensemble_probs(test.member_probs), t, test.choice_mask), t


def checkpoint_ensemble(epochs: Sequence[Predictions], member: int = 0) -> Predictions:
    """A snapshot ensemble: member `member` after each epoch, as the members of one ensemble.

    epochs: per-epoch Predictions of the same questions (in epoch order). Returns Predictions
    whose member_probs [N, E, C] hold that member after epoch 1..E.
    """
    if not epochs:
        raise ValueError("checkpoint_ensemble needs the predictions of at least one epoch.")
    first = epochs[0]
    for p in epochs[1:]:
        if p.ids != first.ids:
            raise ValueError("checkpoint_ensemble: the epochs' predictions cover different questions.")
    return _with_probs(first, torch.stack([p.member_probs[:, member] for p in epochs], 1))


def best_epoch(val_nll_by_epoch: Sequence[float]) -> int:
    """Early stopping on validation NLL: the 1-based epoch with the lowest NLL (first one on ties)."""
    values = np.asarray(val_nll_by_epoch, dtype=float)
    if not len(values):
        raise ValueError("best_epoch needs at least one epoch's validation NLL.")
    values = np.where(np.isnan(values), np.inf, values)  # a diverged epoch is never the best
    return int(np.argmin(values)) + 1


def _with_probs(p: Predictions, member_probs: torch.Tensor) -> Predictions:
    return Predictions(member_probs.float(), p.targets, p.choice_mask, list(p.ids))

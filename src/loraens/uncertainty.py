"""Per-question uncertainty scores from ensemble member probabilities.

Shapes as in :mod:`loraens.arrays`: ``member_probs`` float ``[N, M, C]``, ``probs`` float
``[N, C]``, ``choice_mask`` bool ``[N, C]`` (padded choices carry probability 0). A single model
is an ensemble of one, ``[N, 1, C]``: its mutual information and disagreement are 0.

Entropies are in nats, with ``0 * log 0 = 0`` so padded choices add nothing. The decomposition
(Depeweg et al. 2018; Malinin & Gales 2018) is

    predictive entropy  H(mean_m p_m)      total uncertainty
    expected entropy    mean_m H(p_m)      aleatoric: what each member is unsure about
    mutual information  predictive - expected   epistemic: how much the members disagree

Why normalise by the number of choices: a question with k choices has entropies in
``[0, log k]``. When a benchmark mixes 3-, 4- and 5-choice questions (or in-distribution and
out-of-distribution sets have different choice counts), raw entropy partly measures *how many
choices there are*; an OOD detector could then score well just by counting answers. Dividing
by ``log k`` (k from ``choice_mask``, else C) maps every question to ``[0, 1]``. ``1-max_prob``
has the same leak (its ceiling is ``1 - 1/k``) and is not normalised here.

Every function computes in float64 on the CPU and returns numpy float64 ``[N]`` arrays, ready
for sklearn (OOD AUROC), plots and JSON.
"""

from __future__ import annotations

import numpy as np
import torch

from .arrays import ArrayLike, as_choice_mask, as_float, as_member_probs, check_shape
from .metrics import ensemble_probs

# Every score is oriented so that HIGHER = MORE UNCERTAIN ("1-max_prob" rather than max_prob).
# "_norm" scores are divided by log(number of real choices) per question.
SCORE_NAMES: tuple[str, ...] = (
    "1-max_prob",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "member_disagreement",
    "predictive_entropy_norm",
    "expected_entropy_norm",
    "mutual_information_norm",
)

# The scores shown in OOD tables and plots: one confidence score, one total-uncertainty score
# normalised for the number of choices, the epistemic score (mutual information) both raw in nats
# and normalised, and member disagreement.
DETECTION_SCORES: tuple[str, ...] = (
    "1-max_prob", "predictive_entropy_norm", "mutual_information", "mutual_information_norm", "member_disagreement",
)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last axis; ``xlogy`` gives ``0 * log 0 = 0``."""
    # clamp: probabilities a hair above 1 from float error would give a tiny negative entropy;
    # "+ 0.0" turns -0.0 into 0.0.
    return (-torch.special.xlogy(p, p).sum(dim=-1)).clamp_min(0.0) + 0.0


def _entropies(mp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictive entropy, expected entropy), each float64 ``[N]``, from ``mp`` [N, M, C]."""
    return _entropy(ensemble_probs(mp)), _entropy(mp).mean(dim=1)


def _log_num_choices(mp: torch.Tensor, choice_mask: ArrayLike | None) -> torch.Tensor:
    """``log k`` per question [N]: k real choices from ``choice_mask``, or C for all."""
    n, c = mp.shape[0], mp.shape[2]
    if choice_mask is None:
        k = torch.full((n,), float(c), dtype=torch.float64)
    else:
        k = as_choice_mask(choice_mask, n, c, "member_probs").sum(dim=1).double()
    # A one-choice question has entropy 0 and log 1 = 0; divide it by 1 so it scores 0, not nan.
    return torch.where(k > 1, k.log(), torch.ones_like(k))


def _finish(
    h: torch.Tensor, mp: torch.Tensor, choice_mask: ArrayLike | None, normalize: bool
) -> np.ndarray:
    if normalize:
        h = h / _log_num_choices(mp, choice_mask)
    elif choice_mask is not None:
        as_choice_mask(choice_mask, mp.shape[0], mp.shape[2], "member_probs")  # still validate
    return h.numpy()


def max_prob(probs: ArrayLike) -> np.ndarray:
    """Confidence: the largest probability per question (HIGHER = MORE certain).

    Args:
        probs: float ``[N, C]`` (e.g. :func:`loraens.metrics.ensemble_probs`).

    Returns:
        float64 ``[N]``.
    """
    p = as_float(probs, "probs")
    check_shape(p, "probs", "NC")
    return p.max(dim=1).values.numpy()


def predictive_entropy(
    member_probs: ArrayLike,
    choice_mask: ArrayLike | None = None,
    *,
    normalize_by_choices: bool = False,
) -> np.ndarray:
    """Total uncertainty ``H(mean_m p_m)``: entropy of the ensemble prediction, in nats.

    Args:
        member_probs: float ``[N, M, C]``.
        choice_mask: optional bool ``[N, C]``; gives the number of real choices k per question
            for ``normalize_by_choices`` (without a mask, k = C).
        normalize_by_choices: divide by ``log k`` so every question lies in [0, 1].

    Returns:
        float64 ``[N]``, in ``[0, log k]`` (or [0, 1] normalised).
    """
    mp = as_member_probs(member_probs)
    return _finish(_entropies(mp)[0], mp, choice_mask, normalize_by_choices)


def expected_entropy(
    member_probs: ArrayLike,
    choice_mask: ArrayLike | None = None,
    *,
    normalize_by_choices: bool = False,
) -> np.ndarray:
    """Aleatoric uncertainty ``mean_m H(p_m)``: the members' average entropy, in nats.

    Args: as :func:`predictive_entropy`.

    Returns:
        float64 ``[N]``.
    """
    mp = as_member_probs(member_probs)
    return _finish(_entropies(mp)[1], mp, choice_mask, normalize_by_choices)


def mutual_information(
    member_probs: ArrayLike,
    choice_mask: ArrayLike | None = None,
    *,
    normalize_by_choices: bool = False,
) -> np.ndarray:
    """Epistemic uncertainty: predictive entropy minus expected entropy, in nats.

    Non-negative by Jensen's inequality; float rounding can make it a tiny negative number
    (e.g. identical members), which is clamped to 0.

    Args: as :func:`predictive_entropy`.

    Returns:
        float64 ``[N]``, in ``[0, min(log k, log M)]``.
    """
    mp = as_member_probs(member_probs)
    pred, exp = _entropies(mp)
    return _finish((pred - exp).clamp_min(0.0) + 0.0, mp, choice_mask, normalize_by_choices)


def member_disagreement(member_probs: ArrayLike) -> np.ndarray:
    """Share of members whose argmax differs from the ensemble's argmax.

    Ties in an argmax (a member's or the ensemble's) go to the lower choice index, as in
    :func:`loraens.metrics.accuracy`: members [1, 0] and [0, 1] average to [0.5, 0.5], whose
    argmax is choice 0, so one of the two members disagrees and the score is 0.5.

    Args:
        member_probs: float ``[N, M, C]``.

    Returns:
        float64 ``[N]``, multiples of 1/M.
    """
    mp = as_member_probs(member_probs)
    ens_pred = ensemble_probs(mp).argmax(dim=1)  # [N]
    member_pred = mp.argmax(dim=2)  # [N, M]
    return (member_pred != ens_pred[:, None]).double().mean(dim=1).numpy()


def uncertainty_scores(
    member_probs: ArrayLike, choice_mask: ArrayLike | None = None
) -> dict[str, np.ndarray]:
    """All scores of :data:`SCORE_NAMES`, each float64 ``[N]``, HIGHER = MORE UNCERTAIN.

    "1-max_prob" is one minus the ensemble's confidence; the "_norm" entropies divide by the log
    of the number of real choices (from ``choice_mask``, else C), see the module docstring.

    Args:
        member_probs: float ``[N, M, C]``.  choice_mask: optional bool ``[N, C]``.
    """
    mp = as_member_probs(member_probs)
    log_k = _log_num_choices(mp, choice_mask)  # validates the mask
    pred, exp = _entropies(mp)
    mi = (pred - exp).clamp_min(0.0) + 0.0
    scores = {
        "1-max_prob": 1.0 - max_prob(ensemble_probs(mp)),
        "predictive_entropy": pred.numpy(),
        "expected_entropy": exp.numpy(),
        "mutual_information": mi.numpy(),
        "member_disagreement": member_disagreement(mp),
        "predictive_entropy_norm": (pred / log_k).numpy(),
        "expected_entropy_norm": (exp / log_k).numpy(),
        "mutual_information_norm": (mi / log_k).numpy(),
    }
    assert tuple(scores) == SCORE_NAMES
    return scores

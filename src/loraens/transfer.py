"""The transfer / OOD block of a sweep cell: its trained members on datasets they never saw.

For every OOD set named by the cell's dataset (`ood:` in the sweep file, e.g. OpenBookQA ->
ARC-Challenge, MMLU STEM), the cell's members answer a seeded sample of that set. The block
reports, per method (mean member, ensemble, and with a Laplace fit Laplace and ensemble + Laplace):

- **transfer**: accuracy, NLL, ECE and Brier on the OOD set;
- **detection**: AUROC of every uncertainty score at telling the OOD questions from the
  in-distribution test questions (OOD = positive class; 0.5 = chance). A single model has no
  member spread, so its scores are 1 - max p and the normalised predictive entropy, averaged
  over the members as single models; the ensembles add mutual information (raw, in nats, and
  normalised by log C) and member disagreement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import DataConfig
from .data import load_examples
from .metrics import evaluate_ensemble
from .ood import auroc
from .predictions import Predictions
from .uncertainty import uncertainty_scores

if TYPE_CHECKING:
    from .run import LoadedEnsemble

# Scores a single model has (no member axis) and those of an ensemble.
SINGLE_SCORES = ("1-max_prob", "predictive_entropy_norm")
ENSEMBLE_SCORES = ("1-max_prob", "predictive_entropy_norm", "mutual_information", "mutual_information_norm",
                   "member_disagreement")

LaplacePredict = Callable[[list, bool, str], Predictions]


@dataclasses.dataclass
class OodSet:
    """One OOD set of a sweep dataset: a dataset name (as --data.dataset takes it) and its split."""

    name: str
    split: str = "test"
    label: str = ""
    limit: int | None = None  # a seeded sample of this many questions (default: the run's --data.eval_limit)

    @classmethod
    def parse(cls, raw: Any, where: str) -> OodSet:
        """From a sweep file: "name" (split test) or {name, split, label, limit}."""
        if isinstance(raw, str) and raw:
            return cls(raw)
        keys = {"name", "split", "label", "limit"}
        if (isinstance(raw, dict) and isinstance(raw.get("name"), str) and set(raw) <= keys
                and (raw.get("limit") is None or (isinstance(raw["limit"], int) and not isinstance(raw["limit"], bool)
                                                  and raw["limit"] > 0))):
            return cls(**raw)
        raise ValueError(f"{where}: an OOD set is a dataset name or a mapping with name (and split, label, a "
                         f"positive limit), but got {raw!r}.")


def ood_examples(data: DataConfig, ood: OodSet) -> list:
    """A seeded sample of `ood` (its limit, else the run's --data.eval_limit; the run's data seed, mirror
    and source)."""
    cfg = dataclasses.replace(data, dataset=ood.name, eval_splits=[ood.split], holdout=0, val_split=None,
                              train_limit=None)
    return load_examples(cfg, ood.split, ood.limit or data.eval_limit)


def _single_aurocs(in_probs: np.ndarray, in_mask: np.ndarray, out_probs: np.ndarray,
                   out_mask: np.ndarray) -> dict[str, float]:
    """Mean over members of each member's AUROC as a single model. probs: [N, M, C]."""
    rows = []
    for k in range(in_probs.shape[1]):
        s_in = uncertainty_scores(in_probs[:, k:k + 1], in_mask)
        s_out = uncertainty_scores(out_probs[:, k:k + 1], out_mask)
        rows.append({name: auroc(s_in[name], s_out[name]) for name in SINGLE_SCORES})
    return {name: float(np.mean([r[name] for r in rows])) for name in SINGLE_SCORES}


def _ensemble_aurocs(in_probs: np.ndarray, in_mask: np.ndarray, out_probs: np.ndarray,
                     out_mask: np.ndarray) -> dict[str, float]:
    s_in, s_out = uncertainty_scores(in_probs, in_mask), uncertainty_scores(out_probs, out_mask)
    return {name: auroc(s_in[name], s_out[name]) for name in ENSEMBLE_SCORES}


def detection_and_transfer(test: Predictions, out: Predictions, prefix: str = "") -> dict[str, Any]:
    """{"metrics": {method: metrics on `out`}, "auroc": {method: {score: AUROC of out vs test}}} for the
    mean member ("single") and the ensemble, method names prefixed by `prefix` ("" or "laplace")."""
    single, ens = ("laplace", "ensemble+laplace") if prefix == "laplace" else ("single", "ensemble")
    mp_in, mp_out = test.member_probs.double().numpy(), out.member_probs.double().numpy()
    m_in, m_out = test.choice_mask.numpy(), out.choice_mask.numpy()
    ev = evaluate_ensemble(out.member_probs, out.targets)
    return {
        "metrics": {single: ev["mean_member"], ens: ev["ensemble"]},
        "auroc": {single: _single_aurocs(mp_in, m_in, mp_out, m_out),
                  ens: _ensemble_aurocs(mp_in, m_in, mp_out, m_out)},
    }


def ood_block(ens: LoadedEnsemble, ood_sets: list[OodSet], test: Predictions,
              laplace: tuple[LaplacePredict, Predictions] | None, progress: bool = True) -> dict[str, Any]:
    """The cell's transfer / OOD entries: {ood name: {"label", "split", "num_questions", "metrics",
    "auroc"}} with the methods single and ensemble, and laplace and ensemble+laplace when `laplace`
    (the fitted predictive and its test predictions) is given."""
    out: dict[str, Any] = {}
    for ood in ood_sets:
        examples = ood_examples(ens.config.data, ood)
        preds = ens.predict(examples, progress=progress, desc=f"OOD {ood.name}")
        entry = detection_and_transfer(test, preds)
        if laplace is not None:
            fn, lap_test = laplace
            lap = detection_and_transfer(lap_test, fn(examples, progress, f"OOD {ood.name} (Laplace)"), "laplace")
            entry["metrics"].update(lap["metrics"])
            entry["auroc"].update(lap["auroc"])
        out[ood.name] = {"label": ood.label or ood.name, "split": ood.split, "num_questions": len(examples), **entry}
    return out


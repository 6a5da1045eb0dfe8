"""`calibration.json`: everything a decision needs, fitted on a labelled split, and the decisions themselves.

`loraens calibrate` fits a `Calibration` on a calibration split's predictions and writes it into
the run folder; `loraens predict`, `loraens serve` and the Python API (`loraens.answer`) read it
back and turn member probabilities into answers with `answer_records`. Nothing here loads a
model: it works on member probabilities ``[N, M, C]`` alone (the evaluation floor).

What is stored (see :mod:`loraens.conformal` for the methods and their guarantees):

- the ensemble temperature T (fitted by NLL on the calibration split), which gives the
  `calibrated_probs` of each answer: the ensemble's probabilities made honest as numbers;
- for every miscoverage alpha, the split-conformal thresholds of LAC and APS sets;
- for every target risk r, the SGR threshold on one uncertainty score (answer when the score is
  at most the threshold): the error rate among answered questions is at most r with probability
  at least 1 - delta; and the plain thresholds that answer the most certain 80% / 90%.

The sets and the answer/abstain rule are built on the ensemble's own probabilities (the mean of
the members'), not the temperature-scaled ones: the temperature is fitted on the same
calibration questions, and a score fitted on them would void the finite-sample guarantees.
Temperature scaling keeps the argmax, so the chosen answer is the same either way.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arrays import ArrayLike, as_member_probs
from .conformal import (
    SET_METHODS,
    SGR_METHOD,
    CoverageThreshold,
    RiskThreshold,
    _key,
    conformal_quantile,
    correct_answers,
    coverage_threshold,
    evaluate_sets,
    prediction_sets,
    sgr_threshold,
    true_scores,
)
from .methods import apply_temperature, fit_temperature
from .metrics import ensemble_probs, nll
from .predictions import Predictions
from .uncertainty import SCORE_NAMES, uncertainty_scores

CALIBRATION_FILE = "calibration.json"
FORMAT = 1
DEFAULT_ALPHAS = (0.05, 0.1, 0.2)
DEFAULT_RISKS = (0.05, 0.1, 0.2, 0.3)
DEFAULT_COVERAGES = (0.8, 0.9)
DEFAULT_DELTA = 0.1
DEFAULT_SCORE = "1-max_prob"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NO_CALIBRATION = ("this run has no calibration.json, so there are probabilities but no decisions or conformal sets: "
                  "run `loraens calibrate RUN --dataset D --split validation` on labelled questions first")


class CalibrationError(ValueError):
    """A calibration file is missing, malformed, stale, or lacks the asked-for alpha or risk."""


@dataclass
class Calibration:
    """The fitted decision rules of one run (the content of calibration.json)."""

    dataset: str
    split: str
    n: int
    num_members: int
    temperature: float
    quantiles: dict[str, dict[str, float | None]]  # method -> alpha key -> conformal threshold (None: every choice)
    risk: list[RiskThreshold]
    coverage: list[CoverageThreshold]
    score: str = DEFAULT_SCORE
    delta: float = DEFAULT_DELTA
    default_alpha: float = 0.1
    default_risk: float = 0.1
    default_set: str = "lac"
    created: str = ""
    members_sha256: str = ""  # fingerprint of the members the calibration was fitted with
    summary: dict[str, Any] = field(default_factory=dict)  # accuracy, NLL before/after T, set sizes on calibration

    @property
    def alphas(self) -> list[float]:
        return sorted(float(a) for a in self.quantiles[self.default_set])

    @property
    def risks(self) -> list[float]:
        return [r.target for r in self.risk]

    def quantile(self, alpha: float, method: str) -> float:
        """The conformal threshold for (alpha, method); +inf stands for "every choice"."""
        table = self.quantiles.get(method)
        if table is None:
            raise CalibrationError(f"no {method!r} sets in calibration.json; methods: {', '.join(self.quantiles)}")
        if _key(alpha) not in table:
            raise CalibrationError(f"alpha {alpha:g} was not calibrated; calibrated: "
                                   f"{', '.join(sorted(table, key=float))} (rerun `loraens calibrate ... --alpha`)")
        q = table[_key(alpha)]
        return math.inf if q is None else float(q)

    def risk_rule(self, target: float) -> RiskThreshold:
        for r in self.risk:
            if math.isclose(r.target, target):
                return r
        raise CalibrationError(f"risk {target:g} was not calibrated; calibrated: "
                               f"{', '.join(f'{r:g}' for r in self.risks)} (rerun `loraens calibrate ... --risk`)")

    def coverage_rule(self, target: float) -> CoverageThreshold:
        for c in self.coverage:
            if math.isclose(c.target, target):
                return c
        raise CalibrationError(f"coverage {target:g} was not calibrated; calibrated: "
                               f"{', '.join(f'{c.target:g}' for c in self.coverage)}")

    # ---- the file

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "created": self.created, "dataset": self.dataset, "split": self.split, "n": self.n,
            "num_members": self.num_members, "members_sha256": self.members_sha256,
            "temperature": self.temperature,
            "conformal": {"methods": {"lac": "LAC (Sadinle et al. 2019): score 1 - p_y",
                                      "aps": "APS (Romano et al. 2020), not randomised: total probability of the "
                                             "choices ranked at or above y"},
                          "quantiles": self.quantiles,
                          "rule": "a choice is in the set when its score <= the quantile of its alpha "
                                  "(null: every choice); APS sets always hold the top choice too"},
            "selective": {"method": SGR_METHOD, "score": self.score, "delta": self.delta,
                          "rule": "answer when the score <= threshold (null: abstain on every question)",
                          "risk": [r.to_dict() for r in self.risk],
                          "coverage": [c.to_dict() for c in self.coverage]},
            "defaults": {"alpha": self.default_alpha, "risk": self.default_risk, "set": self.default_set},
            "summary": self.summary,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        try:
            if d.get("format") != FORMAT:
                raise CalibrationError(f"calibration.json has format {d.get('format')!r}; this loraens reads format "
                                       f"{FORMAT}. Rerun `loraens calibrate`.")
            sel, conf, defaults = d["selective"], d["conformal"], d["defaults"]
            return cls(
                dataset=str(d["dataset"]), split=str(d["split"]), n=int(d["n"]), num_members=int(d["num_members"]),
                temperature=float(d["temperature"]),
                quantiles={m: {str(a): (None if q is None else float(q)) for a, q in t.items()}
                           for m, t in conf["quantiles"].items()},
                risk=[RiskThreshold.from_dict(r) for r in sel["risk"]],
                coverage=[CoverageThreshold.from_dict(c) for c in sel["coverage"]],
                score=str(sel["score"]), delta=float(sel["delta"]), default_alpha=float(defaults["alpha"]),
                default_risk=float(defaults["risk"]), default_set=str(defaults["set"]),
                created=str(d.get("created", "")), members_sha256=str(d.get("members_sha256", "")),
                summary=dict(d.get("summary") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, CalibrationError):
                raise
            raise CalibrationError(f"calibration.json is malformed ({type(err).__name__}: {err}); rerun "
                                   "`loraens calibrate`.") from None

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / CALIBRATION_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path


def members_fingerprint(run_dir: str | Path) -> str:
    """sha256 over the members' adapter files (members/member_<k>/adapter_model.safetensors), in order.

    A run trained again into the same folder gets new members; its old calibration then no longer
    fits them, and `load_calibration` says so. "" when the folder has no members.
    """
    files = sorted(Path(run_dir).glob("members/member_*/adapter_model.safetensors"),
                   key=lambda p: int(p.parent.name.rsplit("_", 1)[1]))
    if not files:
        return ""
    h = hashlib.sha256()
    for f in files:
        h.update(f.parent.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_calibration(run_dir: str | Path, check_members: bool = True) -> Calibration | None:
    """The run's calibration.json, or None when it has none.

    Raises CalibrationError when the file is malformed or was fitted with other members (the run
    was trained again after `loraens calibrate`).
    """
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CalibrationError(f"{path} is not valid JSON ({err}); rerun `loraens calibrate`.") from None
    cal = Calibration.from_dict(raw)
    if check_members and cal.members_sha256 and cal.members_sha256 != members_fingerprint(run_dir):
        raise CalibrationError(f"{path} was fitted with other members than the ones now in {run_dir}/members (the "
                               "run was trained again); rerun `loraens calibrate` on it.")
    return cal


def _float_list(values: Sequence[float], name: str, lo: float, hi: float, closed_hi: bool = False) -> list[float]:
    out = []
    for v in values:
        ok = lo < v <= hi if closed_hi else lo < v < hi
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok:
            raise ValueError(f"every {name} must be in ({lo:g}, {hi:g}{']' if closed_hi else ')'}, but got {v!r}")
        out.append(float(v))
    if not out:
        raise ValueError(f"give at least one {name}")
    return sorted(set(out))


def fit_calibration(preds: Predictions, dataset: str, split: str, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
                    risks: Sequence[float] = DEFAULT_RISKS, coverages: Sequence[float] = DEFAULT_COVERAGES,
                    delta: float = DEFAULT_DELTA, score: str = DEFAULT_SCORE, default_alpha: float | None = None,
                    default_risk: float | None = None, default_set: str = "lac",
                    members_sha256: str = "") -> Calibration:
    """Fit the temperature, the conformal thresholds and the selective thresholds on labelled predictions."""
    alphas = _float_list(alphas, "alpha", 0.0, 1.0)
    risks = _float_list(risks, "risk", 0.0, 1.0)
    coverages = _float_list(coverages, "coverage", 0.0, 1.0, closed_hi=True)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), but got {delta!r}")
    if score not in SCORE_NAMES:
        raise ValueError(f"unknown uncertainty score {score!r}; one of {', '.join(SCORE_NAMES)}")
    if default_set not in SET_METHODS:
        raise ValueError(f"the set method must be one of {', '.join(SET_METHODS)}, but got {default_set!r}")
    if default_alpha is None:
        default_alpha = 0.1 if 0.1 in alphas else alphas[0]
    if default_risk is None:
        default_risk = 0.1 if 0.1 in risks else risks[0]
    if default_alpha not in alphas or default_risk not in risks:
        raise ValueError("the default alpha and risk must be among the calibrated ones")
    mp = preds.member_probs.double()
    mask = preds.choice_mask.numpy()
    targets = preds.targets.numpy()
    probs = ensemble_probs(mp).numpy()
    temperature = fit_temperature(torch.as_tensor(probs), preds.targets, preds.choice_mask)
    quantiles: dict[str, dict[str, float | None]] = {}
    sizes: dict[str, dict[str, float]] = {}
    for method in SET_METHODS:
        s = true_scores(probs, targets, mask, method)
        quantiles[method], sizes[method] = {}, {}
        for a in alphas:
            q = conformal_quantile(s, a)
            quantiles[method][_key(a)] = None if math.isinf(q) else q
            sizes[method][_key(a)] = evaluate_sets(prediction_sets(probs, q, mask, method), targets).mean_size
    correct = correct_answers(probs, targets)
    u = uncertainty_scores(mp, mask)[score]
    scaled = apply_temperature(torch.as_tensor(probs), temperature, preds.choice_mask).double()
    summary = {
        "accuracy": float(correct.mean()),
        "nll": nll(probs, targets),  # the same NLL as every other table (metrics.nll)
        "nll_at_temperature": nll(scaled, targets),
        "mean_set_size_on_calibration": sizes,
    }
    return Calibration(
        dataset=dataset, split=split, n=len(targets), num_members=int(mp.shape[1]), temperature=float(temperature),
        quantiles=quantiles, risk=[sgr_threshold(correct, u, r, delta) for r in risks],
        coverage=[coverage_threshold(correct, u, c) for c in coverages], score=score, delta=float(delta),
        default_alpha=float(default_alpha), default_risk=float(default_risk), default_set=default_set,
        created=_dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        members_sha256=members_sha256, summary=summary,
    )


# ---------------------------------------------------------------- decisions on new questions


@dataclass(frozen=True)
class DecisionSettings:
    """Which stored rule decides: a risk target (SGR, guaranteed) or a plain coverage; which sets."""

    risk: float | None = None  # default: the calibration's default risk (when coverage is None)
    coverage: float | None = None  # answer the most certain share instead (no guarantee)
    alpha: float | None = None  # default: the calibration's default alpha
    set_method: str | None = None  # "lac" or "aps"; default: the calibration's

    def resolve(self, cal: Calibration) -> tuple[dict[str, Any], float | None, float, str]:
        """(the rule's description, its threshold, alpha, set method) for `cal`; CalibrationError if not stored."""
        if self.risk is not None and self.coverage is not None:
            raise CalibrationError("give a risk target or a coverage, not both")
        method = self.set_method or cal.default_set
        if method not in SET_METHODS:
            raise CalibrationError(f"the set method must be one of {', '.join(SET_METHODS)}, but got {method!r}")
        alpha = cal.default_alpha if self.alpha is None else float(self.alpha)
        cal.quantile(alpha, method)  # raises when not calibrated
        if self.coverage is not None:
            c = cal.coverage_rule(float(self.coverage))
            rule = {"kind": "coverage", "target": c.target, "score": cal.score, "threshold": c.threshold,
                    "guarantee": None}
            return rule, c.threshold, alpha, method
        r = cal.risk_rule(cal.default_risk if self.risk is None else float(self.risk))
        rule = {"kind": "risk", "target": r.target, "delta": r.delta, "score": cal.score, "threshold": r.threshold,
                "guarantee": f"error rate among answered questions <= {r.target:g} with probability >= "
                             f"{1 - r.delta:g} (SGR)"}
        return rule, r.threshold, alpha, method


def answer_records(member_probs: ArrayLike, choice_mask: ArrayLike, choices: Sequence[Sequence[str]],
                   ids: Sequence[str], calibration: Calibration | None,
                   settings: DecisionSettings | None = None) -> list[dict[str, Any]]:
    """One answer per question: the chosen choice, the probabilities, uncertainty, decision and set.

    Args:
        member_probs: float [N, M, C].  choice_mask: bool [N, C].  choices: each question's choice texts.
        ids: question ids.  calibration: None gives probabilities and scores only (decision and
            conformal_set are null, with a `note` saying that decisions need `loraens calibrate`).
    """
    mp = as_member_probs(member_probs)
    mask = np.asarray(choice_mask, dtype=bool)
    n = mp.shape[0]
    if len(choices) != n or len(ids) != n:
        raise ValueError(f"answer_records got {n} questions but {len(choices)} choice lists and {len(ids)} ids")
    probs = ensemble_probs(mp).numpy()
    scores = uncertainty_scores(mp, mask)
    rule: dict[str, Any] | None = None
    decide: np.ndarray | None = None
    sets: np.ndarray | None = None
    calibrated: np.ndarray | None = None
    alpha: float = 0.0
    method: str | None = None
    if calibration is not None:
        if calibration.num_members != mp.shape[1]:
            raise CalibrationError(f"calibration.json was fitted for {calibration.num_members} members, but the "
                                   f"predictions have {mp.shape[1]}; rerun `loraens calibrate`.")
        rule, threshold, alpha_, method = (settings or DecisionSettings()).resolve(calibration)
        alpha = alpha_
        decide = np.zeros(n, dtype=bool) if threshold is None else scores[calibration.score] <= threshold
        sets = prediction_sets(probs, calibration.quantile(alpha, method), mask, method)
        calibrated = apply_temperature(torch.as_tensor(probs), calibration.temperature,
                                       torch.as_tensor(mask)).double().numpy()
    out = []
    for i in range(n):
        k = int(mask[i].sum())
        if len(choices[i]) != k:
            raise ValueError(f"question {ids[i]!r} has {len(choices[i])} choice texts but {k} real choices")
        best = int(probs[i, :k].argmax())
        rec: dict[str, Any] = {
            "id": ids[i],
            "answer_index": best,
            "answer_label": LETTERS[best] if best < len(LETTERS) else str(best),
            "answer_text": choices[i][best],
            "probs": _round(probs[i, :k]),
            "calibrated_probs": None if calibrated is None else _round(calibrated[i, :k]),
            "member_probs": [_round(mp[i, m, :k].numpy()) for m in range(mp.shape[1])],
            "uncertainty": {name: round(float(v[i]), 6) for name, v in scores.items()},
            "decision": None if decide is None else ("answer" if decide[i] else "abstain"),
            "conformal_set": None if sets is None else [int(j) for j in np.flatnonzero(sets[i, :k])],
        }
        if rule is not None:
            rec["rule"] = rule
            rec["conformal"] = {"method": method, "alpha": alpha, "coverage": f">= {1 - alpha:g}"}
        else:
            rec["note"] = NO_CALIBRATION
        out.append(rec)
    return out


def _round(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]

"""Answer new, unlabelled questions with a trained run: `loraens predict` and the Python API.

    from loraens.answer import load_answerer
    answerer = load_answerer("runs/demo")                 # loads the members and calibration.json once
    records = answerer.answer([{"question": "Which gas do plants take in?",
                                "choices": ["oxygen", "carbon dioxide", "helium"]}])
    records[0]["answer_text"], records[0]["decision"], records[0]["conformal_set"]

Each record holds the chosen answer (index, letter, text), the ensemble's probabilities, every
member's probabilities, the uncertainty scores, and, when the run has a calibration.json
(`loraens calibrate`), the temperature-scaled probabilities, the decision (answer or abstain at the
stored risk target) and the conformal answer set (`loraens.calibration.answer_records`).

Questions come as `MCQAExample`s, dicts with "question" and "choices" (and optionally "id"), or
a user file: JSONL rows or CSV rows in the formats `loraens train` reads (`loraens.data`), with no
answer field needed (one that is there is ignored).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from .calibration import Calibration, DecisionSettings, answer_records, load_calibration
from .data import DataError, MCQAExample, parse_records, parse_row, read_records, unique_ids
from .member_prompts import Questions
from .predictions import Predictions
from .run import LoadedEnsemble, load_run

CHUNK = 256  # questions scored per call when answering a file (the output is written as it goes)


# ---------------------------------------------------------------- questions without answers


def _unlabelled(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row with a placeholder answer, so `data.parse_row` validates everything else as usual."""
    row = {k: v for k, v in row.items() if k not in ("answer", "answerKey", "answer_idx")}
    choices = row.get("choices")
    if isinstance(choices, Mapping):
        labels = choices.get("label")
        if isinstance(labels, (list, tuple)) and labels:
            row["answerKey"] = labels[0]
    elif "correct_answer" not in row:
        row["answer"] = 0
    return row


def question_from(item: Any, index: int = 0, origin: str = "questions") -> MCQAExample:
    """An `MCQAExample` from an MCQAExample or a dict row (answer optional; id defaults to q<index>)."""
    if isinstance(item, MCQAExample):
        return item
    if not isinstance(item, Mapping):
        raise DataError(f"{origin}, question {index}: expected an object with `question` and `choices`, "
                        f"but got {type(item).__name__}")
    try:
        ex = parse_row("", _unlabelled(item), index=index)
    except DataError as err:
        raise DataError(f"{origin}, question {index}: {err}") from None
    if item.get("id") is None or str(item.get("id")).strip() == "":
        ex = dataclasses.replace(ex, id=f"q{index}")
    return ex


def read_questions(path: str | Path, limit: int | None = None) -> list[MCQAExample]:
    """The questions of a user file (.jsonl or .csv), in file order; the first `limit` only if given.

    Rows need `question` and `choices` (any shape `loraens.data` reads); `answer` is optional and
    ignored; ids default to the row's position ("<file stem>/<index>"), and repeated ids get "#2".
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be a positive number of questions, but got {limit}.")
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise DataError(f"{path}: questions must be in a .jsonl or .csv file.")
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    records = read_records(path, labelled=False)  # the loader's checks, without an answer column
    if limit is not None:
        records = records[:limit]
    records = [dataclasses.replace(rec, row=_unlabelled(rec.row))
               if rec.problem is None and isinstance(rec.row, Mapping) else rec for rec in records]
    questions = parse_records(records, path.stem, "", str(path), skip_invalid=False, hint="Fix or remove that row.")
    return unique_ids(questions, str(path))


# ---------------------------------------------------------------- the answerer


class Answerer:
    """A loaded ensemble plus its calibration: turns questions into answer records."""

    def __init__(self, ensemble: LoadedEnsemble, calibration: Calibration | None, run_dir: str | Path | None = None):
        self.ensemble = ensemble
        self.calibration = calibration
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.forwards = 0  # forward passes run (batches of questions, all members at once)
        self.questions = 0  # questions answered

    @property
    def num_members(self) -> int:
        return self.ensemble.config.ensemble.num_members

    @property
    def batch_size(self) -> int:
        return self.ensemble.config.train.eval_batch_size

    def score(self, examples: Sequence[MCQAExample], progress: bool = False,
              encoded: Questions | None = None) -> Predictions:
        """Every member's probabilities for `examples`: one forward per `batch_size` questions, all members at once.

        `encoded`: the examples already encoded with this run's encoder (the server encodes while it
        checks a request), so they are not tokenized twice."""
        if encoded is None:
            encoded = self.ensemble.encoder.encode_all(list(examples))
        preds = self.ensemble.predict_encoded(encoded, [e.id for e in examples], progress, "answer")
        self.forwards += math.ceil(len(examples) / self.batch_size)
        self.questions += len(examples)
        return preds

    def records(self, preds: Predictions, examples: Sequence[MCQAExample],
                settings: DecisionSettings | None = None) -> list[dict[str, Any]]:
        """Answer records from scored questions (`score`), with the decision rule of `settings`."""
        return answer_records(preds.member_probs, preds.choice_mask, [e.choices for e in examples],
                              [e.id for e in examples], self.calibration, settings or DecisionSettings())

    def answer(self, questions: Sequence[Any], settings: DecisionSettings | None = None,
               progress: bool = False) -> list[dict[str, Any]]:
        """Answer records for `questions` (MCQAExamples or dicts), in order (see the module docstring)."""
        examples = [question_from(q, i) for i, q in enumerate(questions)]
        if not examples:
            return []
        settings = settings or DecisionSettings()
        if self.calibration is not None:
            settings.resolve(self.calibration)  # an unknown risk or alpha fails before the forward
        return self.records(self.score(examples, progress), examples, settings)

    def answer_all(self, questions: Sequence[MCQAExample], settings: DecisionSettings | None = None,
                   progress: bool = True) -> Iterator[dict[str, Any]]:
        """Answer records, `CHUNK` questions at a time (a progress bar over the questions)."""
        with tqdm(total=len(questions), desc="predict", unit="question", disable=not progress) as bar:
            for start in range(0, len(questions), CHUNK):
                chunk = questions[start: start + CHUNK]
                yield from self.answer(chunk, settings)
                bar.update(len(chunk))


def load_answerer(run_dir: str | Path, device: str = "auto", batch_size: int | None = None,
                  use_calibration: bool = True) -> Answerer:
    """Load a run's members (once) and its calibration.json (if any)."""
    calibration = load_calibration(run_dir) if use_calibration else None
    ens = load_run(run_dir, device)
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, but got {batch_size}")
        ens.config.train = dataclasses.replace(ens.config.train, eval_batch_size=batch_size)
    if calibration is not None and calibration.num_members != ens.config.ensemble.num_members:
        raise ValueError(f"{run_dir}/calibration.json was fitted for {calibration.num_members} members, but the run "
                         f"has {ens.config.ensemble.num_members}; rerun `loraens calibrate`.")
    return Answerer(ens, calibration, run_dir)


def answer(run_dir: str | Path, questions: Sequence[Any], settings: DecisionSettings | None = None,
           device: str = "auto") -> list[dict[str, Any]]:
    """One call: load the run and answer `questions` (for many calls, keep a `load_answerer`)."""
    return load_answerer(run_dir, device).answer(questions, settings)


# ---------------------------------------------------------------- writing answers

CSV_COLUMNS = ("id", "answer_index", "answer_label", "answer_text", "decision", "conformal_set", "probs",
               "calibrated_probs", "member_probs")


def write_answers(records: Iterable[dict[str, Any]], output: str | Path, fmt: str = "jsonl") -> int:
    """Write records as JSONL (one object per line) or CSV (lists as JSON cells, one column per score);
    `output` "-" writes to standard output. Returns the number written."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"--format must be jsonl or csv, but got {fmt!r}")
    if str(output) == "-":
        return _write(records, sys.stdout, fmt)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        count = _write(records, f, fmt)
    tmp.replace(path)
    return count


def _write(records: Iterable[dict[str, Any]], f: IO[str], fmt: str) -> int:
    count = 0
    writer = None
    for rec in records:
        if fmt == "jsonl":
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            row = {k: (json.dumps(rec[k]) if isinstance(rec[k], (list, dict)) else rec[k]) for k in CSV_COLUMNS}
            row.update({f"uncertainty.{k}": v for k, v in rec["uncertainty"].items()})
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
        count += 1
    return count


# ---------------------------------------------------------------- `loraens calibrate`


def calibrate_run(run_dir: str | Path, dataset: str | None = None, split: str = "validation",
                  limit: int | None = None, *, alphas: Sequence[float] | None = None,
                  risks: Sequence[float] | None = None, coverages: Sequence[float] | None = None,
                  delta: float | None = None, score: str | None = None, set_method: str = "lac",
                  device: str = "auto", progress: bool = True, rescore: bool = False) -> tuple[Calibration, bool]:
    """Fit calibration.json on a labelled split of `dataset` and write it into the run folder.

    The split's member probabilities are written to predictions/<key>.safetensors (as `loraens
    evaluate` does); when that file already holds exactly these questions, it is reused without
    loading the model, unless `rescore`. Returns (the calibration, whether saved predictions were reused).
    """
    from .calibration import (
        DEFAULT_ALPHAS,
        DEFAULT_COVERAGES,
        DEFAULT_DELTA,
        DEFAULT_RISKS,
        DEFAULT_SCORE,
        fit_calibration,
        members_fingerprint,
    )
    from .config import RunConfig
    from .data import load_examples
    from .predictions import predictions_path, save_predictions, split_key

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a loraens run folder: config.yaml is missing.")
    config = RunConfig.load_saved(run_dir / "config.yaml")
    dataset = dataset or config.data.dataset
    if dataset == config.data.dataset and split == config.data.train_split:
        raise ValueError(f"--split {split} is the run's training split: the members have seen those questions, so "
                         "their answers there are no guide to new ones and the guarantees would not hold. Calibrate "
                         "on held-out labelled questions (validation, or --data.holdout's 'holdout').")
    examples = load_examples(config.data, split, limit, dataset)
    key = split_key(dataset, split)
    path = predictions_path(run_dir, key)
    preds: Predictions | None = None
    if not rescore and path.is_file():
        saved = Predictions.load(path)
        if saved.ids == [e.id for e in examples] and saved.member_probs.shape[1] == config.ensemble.num_members \
                and saved.targets.tolist() == [e.answer for e in examples]:
            preds = saved
    reused = preds is not None
    if preds is None:
        ens = load_run(run_dir, device)
        preds = ens.predict(examples, progress=progress, desc=f"calibrate {key}")
        save_predictions(preds, run_dir, key)
    cal = fit_calibration(
        preds, dataset, split, alphas=alphas or DEFAULT_ALPHAS, risks=risks or DEFAULT_RISKS,
        coverages=coverages or DEFAULT_COVERAGES, delta=DEFAULT_DELTA if delta is None else delta,
        score=score or DEFAULT_SCORE, default_set=set_method, members_sha256=members_fingerprint(run_dir))
    cal.save(run_dir)
    return cal, reused


def describe_calibration(cal: Calibration) -> str:
    """A few lines for the terminal: what calibrate fitted and how it did on the calibration split."""
    s = cal.summary
    lines = [f"calibration.json: {cal.dataset} {cal.split}, N = {cal.n} questions, {cal.num_members} members, "
             f"accuracy {100 * s.get('accuracy', float('nan')):.1f}%",
             f"temperature T = {cal.temperature:.3f} (ensemble NLL {s.get('nll', float('nan')):.4f} -> "
             f"{s.get('nll_at_temperature', float('nan')):.4f})",
             "conformal sets (coverage >= 1 - alpha on new questions), mean set size on the calibration split:"]
    sizes = s.get("mean_set_size_on_calibration", {})
    for a in cal.alphas:
        k = f"{a:g}"
        lines.append(f"  alpha {k:<5} " + "   ".join(
            f"{m.upper()} threshold {_fmt_q(cal.quantiles[m].get(k))}, "
            f"size {sizes.get(m, {}).get(k, float('nan')):.2f}"
            for m in cal.quantiles))
    lines.append(f"answer or abstain on {cal.score} (SGR, error rate among answered <= target with probability "
                 f">= {1 - cal.delta:g}):")
    for r in cal.risk:
        if r.threshold is None:
            lines.append(f"  risk {r.target:<5g} no threshold qualifies on {cal.n} questions: "
                         "abstain on every question")
        else:
            lines.append(f"  risk {r.target:<5g} answer when {cal.score} <= {r.threshold:.4f}: answers "
                         f"{100 * r.coverage:.1f}% of the calibration questions, error there {100 * r.risk:.1f}% "
                         f"(bound {100 * r.bound:.1f}%)")
    default = cal.risk_rule(cal.default_risk)
    if default.threshold is None:
        answering = [f"{r.target:g} ({100 * r.coverage:.0f}%)" for r in cal.risk if r.threshold is not None]
        lines.append(f"  note: at the default risk {cal.default_risk:g} this run abstains on every question; "
                     + (f"rules that answer (share of calibration questions): {', '.join(answering)}, e.g. "
                        f"`loraens predict ... --risk {answering[0].split()[0]}`" if answering else
                        "no calibrated risk answers any question: calibrate on more questions or with larger --risk"))
    for c in cal.coverage:
        lines.append(f"  coverage {c.target:<4g} answer when {cal.score} <= {c.threshold:.4f} (no guarantee): error "
                     f"{100 * c.risk:.1f}% on calibration")
    return "\n".join(lines)


def _fmt_q(q: float | None) -> str:
    return "inf (every choice)" if q is None else f"{q:.4f}"

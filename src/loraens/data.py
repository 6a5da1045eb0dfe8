"""Multiple-choice questions from the Hugging Face Hub, a local mirror or a user file.

Every source goes the same way: raw rows in the hub schema (or the generic user format), each
with its position -> optional MMLU subject filter -> `parse_row`, which validates the row and
builds an `MCQAExample` -> ids made unique -> optional seeded subsample, kept in file order.
`parse_row` recognises a row by the fields it has, not by the dataset name, so one function
reads ARC, OpenBookQA, CommonsenseQA, SciQ (both shapes), MMLU and user files alike.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .mmlu_subjects import MMLU_SUBJECT_GROUP, MMLU_SUBJECTS, MMLUGroup, subjects_in_group

if TYPE_CHECKING:  # only annotations name it: loading questions needs no run configuration
    from .config import DataConfig

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "LORAENS_DATA_DIR"
USER_FILE_SUFFIXES = (".jsonl", ".csv")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SKIP_HINT = "Fix or remove that row, or pass skip_invalid=True (--data.skip_invalid) to skip invalid rows."


class DataError(ValueError):
    """A dataset cannot be read; the message names the file or hub id, the row, the problem and a fix."""


class DataWarning(UserWarning):
    """Questions were skipped or changed on loading (e.g. invalid rows, repeated ids)."""


@dataclass(frozen=True)
class MCQAExample:
    """One multiple-choice question; `answer` indexes `choices`."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"`answer` must index `choices` (0..{len(self.choices) - 1}), but got {self.answer}.")


class DataSource(str, Enum):
    """Where built-in datasets are read from: AUTO = the local mirror if it has the split, else the hub."""

    AUTO = "auto"
    HUB = "hub"
    LOCAL = "local"


@dataclass(frozen=True)
class HubSpec:
    hub_id: str
    config: str | None


BUILTIN_HUB: dict[str, HubSpec] = {
    "arc_easy": HubSpec("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": HubSpec("allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": HubSpec("allenai/openbookqa", "main"),
    "commonsense_qa": HubSpec("tau/commonsense_qa", None),
    "sciq": HubSpec("allenai/sciq", None),
    "mmlu": HubSpec("cais/mmlu", "all"),
}
BUILTIN_DATASETS: tuple[str, ...] = tuple(BUILTIN_HUB)


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from.

    `index` is the 0-based position in the split (it names rows without an id); `where` is how an
    error message points at it ("line 7" in a JSONL file, "row 3 (line 4)" in a CSV file, "row 3"
    on the hub); `problem`, when set, is a defect found while reading (e.g. a bad JSON cell).
    """

    index: int
    where: str
    row: Mapping[str, Any]
    problem: str | None = None


# ---------------------------------------------------------------- one row -> one example


def parse_row(dataset: str, row: Mapping[str, Any], *, split: str = "", index: int = 0) -> MCQAExample:
    """Validate one row in the hub schema (or the generic user format) and build an `MCQAExample`.

    Recognised shapes: `choices: {text, label}` + `answerKey` (ARC, OpenBookQA, CommonsenseQA);
    `choices: [..]` + `answer` (index or letter; MMLU, user files) or `answer_idx` (SciQ
    test_no_support); `correct_answer` + `distractor1..3` (SciQ on the hub). The question is in
    `question`, or `question_stem` (OpenBookQA). A row without an id gets `"{dataset}/{split}/{index}"`.

    Raises:
        DataError: the problem and the offending value (without the location; the loader adds it).
    """
    question = row["question_stem"] if "question_stem" in row else row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"the question is empty or missing: {question!r}")
    if "correct_answer" in row:
        choices, answer = _sciq_choices(row, question)
    elif isinstance(raw := row.get("choices"), Mapping):
        choices, answer = _labelled_choices(raw, row.get("answerKey"))
    elif isinstance(raw, (list, tuple)):
        choices = _choice_texts(raw)
        key = "answer" if "answer" in row else "answer_idx"
        answer = _answer_index(row.get(key), len(choices), key)
    else:
        raise DataError(f"`choices` must be a list of strings or a {{text, label}} object, but got {raw!r}")
    raw_id, subject = row.get("id"), row.get("subject")
    if raw_id is None or str(raw_id).strip() == "":
        # ARC-Challenge train and CommonsenseQA train have null ids, MMLU and SciQ none at all:
        # the position in the split is stable, so it makes a stable id.
        raw_id = "/".join(p for p in (dataset, split, str(index)) if p)
    subject = subject.strip() if isinstance(subject, str) and subject.strip() else None
    return MCQAExample(str(raw_id), question, tuple(choices), answer, subject)


def _choice_texts(raw: Sequence[Any]) -> list[str]:
    texts: list[str] = []
    for i, c in enumerate(raw):
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            c = str(c)  # numeric answers written as JSON numbers ("choices": [1, 2, 4, 8])
        if not isinstance(c, str) or not c.strip():
            label = LETTERS[i] if i < len(LETTERS) else str(i)
            raise DataError(f"choice {label} is empty or not text: {c!r}")
        texts.append(c)
    if len(texts) < 2:
        raise DataError(f"a question needs at least two choices, but got {len(texts)}: {texts!r}")
    return texts


def _labelled_choices(raw: Mapping[str, Any], key: Any) -> tuple[list[str], int]:
    texts, labels = raw.get("text"), raw.get("label")
    if not isinstance(texts, (list, tuple)) or not isinstance(labels, (list, tuple)) or len(texts) != len(labels):
        raise DataError(f"`choices.text` and `choices.label` must be lists of the same length, but got {dict(raw)!r}")
    labels = [str(lab).strip() for lab in labels]
    if len(set(labels)) != len(labels):
        raise DataError(f"`choices.label` has duplicate labels: {labels!r}")
    choices = _choice_texts(texts)
    # ARC mixes letter labels ("A".."E") and digit labels ("1".."4"); answerKey uses the same kind.
    key = str(key).strip() if isinstance(key, (str, int)) and not isinstance(key, bool) else key
    if key not in labels:
        raise DataError(f"`answerKey` {key!r} is not one of `choices.label` {labels!r}")
    return choices, labels.index(key)


def _answer_index(value: Any, n: int, field: str) -> int:
    """An answer given as a 0-based index (int or digit string) or a letter "A".. (any case)."""
    index: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)  # JSON written from pandas turns ints into floats
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())  # CSV cells are strings
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    if index is None:
        raise DataError(f"`{field}` must be a 0-based index or a letter A.., but got {value!r}")
    if not 0 <= index < n:
        raise DataError(f"`{field}` {value!r} is not among the {n} choices "
                        f"(index 0..{n - 1}, letter A..{LETTERS[n - 1]})")
    return index


def _sciq_choices(row: Mapping[str, Any], question: str) -> tuple[list[str], int]:
    """SciQ on the hub stores the answer first: shuffle, or the answer would always be choice 0.

    The shuffle is seeded by a hash of the question text (hashlib, since Python's `hash()` of a
    str changes between processes), so every run and every machine sees the same order.
    """
    choices = _choice_texts([row.get(k) for k in ("correct_answer", "distractor1", "distractor2", "distractor3")])
    order = list(range(len(choices)))
    random.Random(int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")).shuffle(order)
    return [choices[i] for i in order], order.index(0)


# ---------------------------------------------------------------- reading raw rows


def read_records(path: str | Path) -> list[Record]:
    """Raw rows of a JSONL or CSV file (see `load_mcqa` for the CSV columns).

    Raises:
        DataError: the file is missing, not UTF-8, has a malformed JSON line or lacks CSV columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file. Give a path to an existing .jsonl or .csv file.")
    try:
        return _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}). Save the file as UTF-8.") from None


def _read_jsonl(path: Path) -> list[Record]:
    records: list[Record] = []
    # Iterate the file, never str.splitlines(): MMLU questions hold a raw U+0085 (NEL) that
    # splitlines() treats as a line break; a file object breaks only at \n, \r\n and \r.
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: malformed JSON ({e.msg}, column {e.colno}): "
                                f"{_clip(line)!r}. Each line must hold one JSON object.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, but got {_clip(line)!r}.")
            records.append(Record(len(records), f"line {lineno}", row))
    return records


def _read_csv(path: Path) -> list[Record]:
    # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = fields
        letter_cols = []
        for letter in LETTERS:  # choice columns A, B, C, ... in order, stopping at the first gap
            if letter not in fields:
                break
            letter_cols.append(letter)
        if "question" not in fields or "answer" not in fields or ("choices" not in fields and len(letter_cols) < 2):
            raise DataError(f"{path}: a CSV file needs columns `question`, `answer` and either `choices` (a JSON "
                            f"list) or choice columns A, B, ...; found columns {fields!r}.")
        records: list[Record] = []
        for i, raw in enumerate(reader):
            where = f"row {i + 1} (line {reader.line_num})"
            row: dict[str, Any] = {"question": raw.get("question"), "answer": raw.get("answer"),
                                   "id": raw.get("id") or None, "subject": raw.get("subject") or None}
            problem = f"more cells than header columns: {raw[None]!r}" if None in raw else None
            if "choices" in fields:
                try:
                    row["choices"] = json.loads(raw.get("choices") or "")
                except json.JSONDecodeError:
                    problem = f"the `choices` cell is not a JSON list: {raw.get('choices')!r}"
            else:
                cells = [raw.get(c) or "" for c in letter_cols]
                while cells and not cells[-1].strip():
                    cells.pop()  # empty trailing cells mean this question has fewer choices
                row["choices"] = cells
            records.append(Record(i, where, row, problem))
    return records


def _clip(text: str, n: int = 80) -> str:
    text = text.rstrip("\n")
    return text if len(text) <= n else text[:n] + "..."


def _read_builtin(dataset: str, split: str, source: DataSource,
                  data_dir: str | Path | None) -> tuple[list[Record], str]:
    """Rows of a built-in dataset and a name for them in messages (the file, or the hub id)."""
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    root = Path(data_dir) if data_dir is not None else (Path(env) if env else None)
    local = root / dataset / f"{split}.jsonl" if root is not None else None
    if source is DataSource.LOCAL:
        if root is None:
            raise DataError(f"source='local' needs a local mirror: pass data_dir=... (--data.data_dir) "
                            f"or set ${DATA_DIR_ENV}.")
        if not local.is_file():
            raise DataError(_missing_split(root, dataset, split))
    if local is not None and local.is_file() and source is not DataSource.HUB:
        return read_records(local), str(local)
    if local is not None and source is DataSource.AUTO:
        logger.info("%s is not in the local mirror (%s); reading it from the hub.", f"{dataset}/{split}", local)
    return _hub_records(dataset, split)


def _missing_split(root: Path, dataset: str, split: str) -> str:
    folder = root / dataset
    if folder.is_dir():
        splits = sorted(p.stem for p in folder.glob("*.jsonl"))
        return (f"{folder / (split + '.jsonl')} does not exist: no split {split!r} of {dataset} in the local "
                f"mirror. Splits there: {', '.join(splits) or 'none'}. Pick one, or use source='hub'.")
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return (f"{folder} does not exist: no {dataset} in the local mirror {root}. Datasets there: "
            f"{', '.join(found) or 'none'}. Check data_dir / ${DATA_DIR_ENV}, or use source='hub'.")


def _hub_records(dataset: str, split: str) -> tuple[list[Record], str]:
    spec = BUILTIN_HUB[dataset]
    origin = f"hub {spec.hub_id}" + (f" ({spec.config})" if spec.config else "") + f" split {split!r}"
    try:
        import datasets  # lazily: importing it is slow, and local files do not need it
    except ImportError as e:
        raise DataError(f"reading {origin} needs `datasets` (pip install datasets), or point data_dir / "
                        f"${DATA_DIR_ENV} at a local mirror.") from e
    args = (spec.hub_id, spec.config) if spec.config else (spec.hub_id,)
    try:
        rows = datasets.load_dataset(*args, split=split)
    except Exception as e:  # offline, unknown split, gated repo...: all mean "cannot read this one"
        raise DataError(f"could not load {origin}: {type(e).__name__}: {e}. Check the split name and the "
                        f"network, or point data_dir / ${DATA_DIR_ENV} at a local mirror.") from e
    return [Record(i, f"row {i + 1}", row) for i, row in enumerate(rows)], origin


# ---------------------------------------------------------------- MMLU subjects


def select_mmlu_subjects(spec: str | Sequence[str] | None) -> list[str]:
    """MMLU subjects named by `spec`: subject names and/or groups, a list or a comma-separated string.

    Groups: "stem", "humanities", "social_sciences", "other"; "all" (or None) means all 57.
    Returns the subjects in alphabetical order, each once.

    Raises:
        DataError: an unknown name; the message lists the valid groups and subjects.
    """
    if spec is None:
        return list(MMLU_SUBJECTS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted: set[str] = set()
    for item in items:
        key = str(item).strip().lower().replace("-", "_").replace(" ", "_")
        if key == "all":
            wanted.update(MMLU_SUBJECTS)
        elif key in {g.value for g in MMLUGroup}:
            wanted.update(subjects_in_group(key))
        elif key in MMLU_SUBJECT_GROUP:
            wanted.add(key)
        else:
            raise DataError(f"unknown MMLU subject or group {item!r}. Groups: all, "
                            f"{', '.join(g.value for g in MMLUGroup)}. Subjects: {', '.join(MMLU_SUBJECTS)}.")
    if not wanted:
        raise DataError(f"no MMLU subjects selected by {spec!r}; name at least one subject or group.")
    return [s for s in MMLU_SUBJECTS if s in wanted]


# ---------------------------------------------------------------- the loader


def load_mcqa(
    name: str,
    split: str = "validation",
    *,
    source: DataSource | str = DataSource.AUTO,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    subjects: Sequence[str] | None = None,
    skip_invalid: bool = False,
) -> list[MCQAExample]:
    """Load and validate the questions of one split.

    Args:
        name: a built-in dataset (`BUILTIN_DATASETS`), "mmlu:<subjects or groups, comma-separated>",
            or a path to a user file ending in .jsonl or .csv (then `split`, `source` and `data_dir`
            are ignored). JSONL rows: {"question", "choices": [..], "answer": 0-based index or
            letter, optional "id", "subject"}. CSV: columns `question`, `answer` and either `choices`
            (a JSON list) or A, B, C, ... (empty trailing cells mean fewer choices).
        split: e.g. "train", "validation", "test" (MMLU: "dev", "validation", "test").
        source: "auto" reads `<data_dir>/<name>/<split>.jsonl` if it exists, else the hub; "local"
            and "hub" read only there.
        data_dir: root of the local mirror; defaults to $LORAENS_DATA_DIR.
        limit: keep a seeded random subset of this many questions, in file order.
        seed: seed of that subset.
        subjects: MMLU only: subject names and/or groups (stem, humanities, social_sciences, other).
        skip_invalid: skip invalid rows with a `DataWarning` (count and first reasons) instead of failing.

    Raises:
        DataError: unknown name, missing split or file, or an invalid row (file or hub id, row, problem).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise DataError(f"`limit` must be a positive integer or None, but got {limit!r}.")
    try:
        source = DataSource(source)
    except ValueError:
        raise DataError(f"`source` must be one of auto, hub, local, but got {source!r}.") from None

    name = os.fspath(name)
    if name.lower().endswith(USER_FILE_SUFFIXES):
        if subjects is not None:
            raise DataError(f"`subjects` selects MMLU subjects only, but the dataset is the file {name!r}.")
        records, origin = read_records(name), name
        dataset, id_split = Path(name).stem, ""
    else:
        dataset, _, spec = name.strip().partition(":")
        dataset = dataset.lower()
        if dataset not in BUILTIN_HUB:
            raise DataError(f"unknown dataset {name!r}. Built-in: {', '.join(BUILTIN_DATASETS)} (and "
                            f"'mmlu:<subjects or groups>'), or a path to your own .jsonl or .csv file.")
        wanted = _wanted_subjects(dataset, spec if ":" in name else None, subjects)
        records, origin = _read_builtin(dataset, split, source, data_dir)
        if wanted is not None:
            # Filter before parsing: rows of other subjects are not part of this load at all.
            records = [r for r in records if r.row.get("subject") in wanted]
        id_split = split

    examples = _parse_all(records, dataset, id_split, origin, skip_invalid)
    examples = _unique_ids(examples, origin)
    if limit is not None and limit < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    return examples


def _wanted_subjects(dataset: str, spec: str | None, subjects: Sequence[str] | None) -> set[str] | None:
    if dataset != "mmlu":
        if spec is not None or subjects is not None:
            raise DataError(f"subjects select MMLU questions only, but the dataset is {dataset!r}.")
        return None
    if spec is not None and subjects is not None:
        raise DataError(f"MMLU subjects given twice, in the name ('mmlu:{spec}') and in `subjects` "
                        f"({list(subjects)!r}); give them in one place.")
    if spec is None and subjects is None:
        return None
    return set(select_mmlu_subjects(spec if spec is not None else subjects))


def _parse_all(records: list[Record], dataset: str, split: str, origin: str,
               skip_invalid: bool) -> list[MCQAExample]:
    examples: list[MCQAExample] = []
    skipped: list[str] = []
    for rec in records:
        try:
            if rec.problem is not None:
                raise DataError(rec.problem)
            examples.append(parse_row(dataset, rec.row, split=split, index=rec.index))
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{origin}, {rec.where}: {e}. {_SKIP_HINT}") from None
            skipped.append(f"{rec.where}: {e}")
    if skipped:
        # Never drop rows silently: say how many, and why for the first few.
        warnings.warn(f"{origin}: skipped {len(skipped)} invalid row(s) of {len(records)}; first: "
                      + "; ".join(skipped[:3]), DataWarning, stacklevel=3)
    if not examples:
        raise DataError(f"{origin}: no valid questions (read {len(records)} row(s), skipped {len(skipped)}). "
                        "Check the file, the split and the subjects.")
    return examples


def _unique_ids(examples: list[MCQAExample], origin: str) -> list[MCQAExample]:
    """Predictions are keyed by id, so a repeated id (ARC-Challenge train repeats one) gets a suffix."""
    seen: set[str] = set()
    renamed: list[str] = []
    out = []
    for ex in examples:
        new_id, k = ex.id, 1
        while new_id in seen:
            k += 1
            new_id = f"{ex.id}#{k}"
        if new_id != ex.id:
            renamed.append(f"{ex.id!r} -> {new_id!r}")
            ex = replace(ex, id=new_id)
        seen.add(new_id)
        out.append(ex)
    if renamed:
        warnings.warn(f"{origin}: {len(renamed)} repeated id(s) made unique: {', '.join(renamed[:3])}",
                      DataWarning, stacklevel=3)
    return out


# ---------------------------------------------------------------- a run's splits


def load_examples(data: DataConfig, split: str, limit: int | None, dataset: str | None = None) -> list[MCQAExample]:
    """Questions of `split` as the run's data settings read them.

    `dataset` defaults to `data.dataset`; a user file path may hold "{split}" (e.g.
    data/mine_{split}.jsonl). With `data.holdout = H` > 0, a seeded set of H training questions
    becomes the split "holdout" and is removed from the training split (before its `train_limit`
    subsample), so the two never share a question.
    """
    name = dataset or data.dataset
    own_training_data = dataset is None or dataset == data.dataset
    if data.holdout and own_training_data and split in ("holdout", data.train_split):
        return _holdout_split(data, split, limit, name)
    if "{split}" in name:
        name = name.replace("{split}", split)
    return load_mcqa(name, split, source=data.source, data_dir=data.data_dir, limit=limit,
                     seed=data.seed, skip_invalid=data.skip_invalid)


def _holdout_split(data: DataConfig, split: str, limit: int | None, name: str) -> list[MCQAExample]:
    file_name = name.replace("{split}", data.train_split)
    every = load_mcqa(file_name, data.train_split, source=data.source, data_dir=data.data_dir, seed=data.seed,
                      skip_invalid=data.skip_invalid)
    if data.holdout >= len(every):
        raise ValueError(f"--data.holdout {data.holdout} leaves no training questions: the {data.train_split!r} "
                         f"split of {name!r} has {len(every)}. Use a smaller --data.holdout.")
    order = list(range(len(every)))
    random.Random(f"holdout-{data.seed}").shuffle(order)
    picked = order[: data.holdout] if split == "holdout" else order[data.holdout:]
    if limit is not None and limit < len(picked):
        picked = random.Random(data.seed).sample(picked, limit)
    return [every[i] for i in sorted(picked)]  # file order, as load_mcqa keeps it


def warn_if_evaluating_on_training_file(data: DataConfig) -> None:
    """Warn when one user file (no "{split}" in its name) serves as training and evaluation data."""
    name = data.dataset
    if name.endswith(USER_FILE_SUFFIXES) and "{split}" not in name:
        warnings.warn(
            f"--data.dataset {name!r} is one file, so training and evaluation read the same questions and the "
            "'validation' metrics are training metrics. Put the splits in files named like "
            "mine_train.jsonl / mine_validation.jsonl and pass --data.dataset 'mine_{split}.jsonl'.",
            stacklevel=2,
        )

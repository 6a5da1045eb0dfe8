"""Multiple-choice questions from the Hugging Face Hub, a local mirror or a user file.

Every source goes the same way: raw rows in the hub schema (or the generic user format), each
with its position -> optional MMLU subject filter -> `parse_row`, which validates the row and
builds an `MCQAExample` -> ids made unique -> optional seeded subsample, kept in file order.
`parse_row` recognises a row by the fields it has, not by the dataset name, so one function
reads ARC, OpenBookQA, CommonsenseQA, SciQ (both shapes), MMLU and user files alike.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import random
import reprlib
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
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
# csv's default field limit is 128 KiB; a long passage in one cell is still a valid question.
# 2**31 - 1 is the largest value every platform's C long holds.
_CSV_FIELD_LIMIT = 2**31 - 1
_MAX_DIGITS = 18  # an answer index with more digits is out of range anyway (and int() of 4301+ digits fails)


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

    Every text (question, choices, id, subject) must be encodable: a lone surrogate (half of a
    UTF-16 pair, e.g. from a broken "\\ud83d" escape) is refused here, not by the tokenizer later.
    A choice may be a number (written as text), but never NaN or infinity, nor the text "nan" that
    pandas writes for a missing value.

    Raises:
        DataError: the problem and the offending value (without the location; the loader adds it).
    """
    if not isinstance(row, Mapping):
        raise DataError(f"a row must be an object with named fields, but got {_show(row)}")
    question = row["question_stem"] if "question_stem" in row else row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"the question is empty or missing: {_show(question)}")
    _check_text(question, "the question")
    if "correct_answer" in row:
        choices, answer = _sciq_choices(row, question)
    elif isinstance(raw := row.get("choices"), Mapping):
        choices, answer = _labelled_choices(raw, row.get("answerKey"))
    elif isinstance(raw, (list, tuple)):
        choices = _choice_texts(raw)
        key = "answer" if "answer" in row else "answer_idx"
        answer = _answer_index(row.get(key), len(choices), key)
    else:
        raise DataError(f"`choices` must be a list of strings or a {{text, label}} object, but got {_show(raw)}")
    raw_id, subject = row.get("id"), row.get("subject")
    if isinstance(raw_id, float) and math.isnan(raw_id):
        raw_id = None  # pandas writes a missing id as NaN
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        # ARC-Challenge train and CommonsenseQA train have null ids, MMLU and SciQ none at all:
        # the position in the split is stable, so it makes a stable id.
        raw_id = "/".join(p for p in (dataset, split, str(index)) if p)
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float)):
        raise DataError(f"`id` must be text or a number, but got {_show(raw_id)}; give each question a text id, "
                        "or leave `id` out for a positional one")
    elif not isinstance(raw_id, str):
        raw_id = _number_text(raw_id, "`id`")
    _check_text(raw_id, "the id")
    subject = subject.strip() if isinstance(subject, str) and subject.strip() else None
    if subject is not None:
        _check_text(subject, "the subject")
    return MCQAExample(raw_id, question, tuple(choices), answer, subject)


def _choice_texts(raw: Sequence[Any]) -> list[str]:
    texts: list[str] = []
    for i, c in enumerate(raw):
        label = _label(i)
        if isinstance(c, float) and not math.isfinite(c):
            raise DataError(f"choice {label} is the number {c!r}, not text (NaN is how JSON and pandas write a missing "
                            "value); write the choice's text, or drop the choice")
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            c = _number_text(c, f"choice {label}")  # numeric answers written as JSON numbers ("choices": [1, 2, 4, 8])
        if not isinstance(c, str) or not c.strip():
            raise DataError(f"choice {label} is empty or not text: {_show(c)}")
        if c.strip().lower() == "nan":
            raise DataError(f"choice {label} is {c!r}, the text pandas writes for a missing value; write the choice's "
                            "text, drop the choice, or (if the answer really is NaN) say so in words, e.g. 'NaN (not "
                            "a number)'")
        _check_text(c, f"choice {label}")
        texts.append(c)
    if len(texts) < 2:
        raise DataError(f"a question needs at least two choices, but got {len(texts)}: {_show(texts)}")
    return texts


def _labelled_choices(raw: Mapping[str, Any], key: Any) -> tuple[list[str], int]:
    texts, labels = raw.get("text"), raw.get("label")
    if not isinstance(texts, (list, tuple)) or not isinstance(labels, (list, tuple)) or len(texts) != len(labels):
        raise DataError(f"`choices.text` and `choices.label` must be lists of the same length, but got {_show(raw)}")
    for lab in labels:
        if isinstance(lab, bool) or not isinstance(lab, (str, int)):
            raise DataError(f"`choices.label` must hold letters or numbers, but holds {_show(lab)}")
    labels = [(lab if isinstance(lab, str) else _number_text(lab, "a label")).strip() for lab in labels]
    if len(set(labels)) != len(labels):
        raise DataError(f"`choices.label` has duplicate labels: {_show(labels)}")
    choices = _choice_texts(texts)
    # ARC mixes letter labels ("A".."E") and digit labels ("1".."4"); answerKey uses the same kind.
    if isinstance(key, str):
        key = key.strip()
    elif isinstance(key, int) and not isinstance(key, bool):
        key = _number_text(key, "`answerKey`").strip()
    if key not in labels:
        raise DataError(f"`answerKey` {_show(key)} is not one of `choices.label` {_show(labels)}")
    return choices, labels.index(key)


def _answer_index(value: Any, n: int, field: str) -> int:
    """An answer given as a 0-based index (int or digit string) or a letter "A".. (any case)."""
    index: int | None = None
    text = value.strip() if isinstance(value, str) else ""
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, float) and value.is_integer():  # False for NaN and infinity
        index = int(value)  # JSON written from pandas turns ints into floats
    elif text.isascii() and text.isdigit():
        # CSV cells are strings. ASCII digits only: "²" and "٣" are digits to str.isdigit(), not to int().
        digits = text.lstrip("0") or "0"  # int() refuses 4301+ digits, even leading zeros
        index = int(digits) if len(digits) <= _MAX_DIGITS else n
    elif text.isascii() and len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
    if index is None:
        raise DataError(f"`{field}` must be a 0-based index or a letter A.., but got {_show(value)}")
    if not 0 <= index < n:
        letters = f", letter A..{LETTERS[n - 1]}" if n <= len(LETTERS) else ""
        raise DataError(f"`{field}` {_show(value)} is not among the {n} choices (index 0..{n - 1}{letters})")
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


def _label(i: int) -> str:
    return LETTERS[i] if i < len(LETTERS) else str(i)


def _number_text(value: int | float, what: str) -> str:
    """`str(value)`, or a DataError for an int too long to print (Python refuses over 4300 digits)."""
    try:
        return str(value)
    except ValueError:
        raise DataError(f"{what} is a number with more than {sys.get_int_max_str_digits()} digits, more than "
                        "Python prints; write it as text") from None


def _check_text(text: str, what: str) -> None:
    """A DataError if `text` holds a lone surrogate, which UTF-8 (so every tokenizer) cannot encode."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{what} holds a lone surrogate {text[e.start]!r} at character {e.start + 1} (half of a "
                        f"UTF-16 pair, e.g. from a broken \\u escape), which no tokenizer can encode: {_show(text)}; "
                        "fix the text (a JSON escape needs both halves, e.g. \\ud83d\\ude00)") from None


def _not_utf8(text: str, what: str) -> str | None:
    """Why `text`, read with errors="surrogateescape", was not UTF-8 in the file (None if it was)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00  # surrogateescape maps an undecodable byte b to U+DC00 + b
        return (f"not UTF-8 text: byte 0x{byte:02x} at character {e.start + 1} of {what}; save the file as UTF-8 "
                "(in a spreadsheet: CSV UTF-8)")
    return None


class _ClippedRepr(reprlib.Repr):
    """reprlib's bounded repr (never recursion, never a megabyte), also for ints too long to print."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 80, 80, 40
        self.maxlist = self.maxtuple = self.maxdict = 6

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            return f"<an integer of about {int(x.bit_length() * math.log10(2))} digits>"


_REPR = _ClippedRepr()


def _show(value: Any) -> str:
    """A short repr of `value` for messages: strings and lists clipped, nesting cut at 3 levels."""
    try:
        return _REPR.repr(value)
    except Exception:  # a repr that fails must not hide the real problem
        return f"<a {type(value).__name__}>"


# ---------------------------------------------------------------- reading raw rows


def read_records(path: str | Path, labelled: bool = True) -> list[Record]:
    """Raw rows of a JSONL or CSV file (see `load_mcqa` for the CSV columns).

    `labelled=False`: questions to answer (`loraens predict`), so a CSV file needs no `answer`
    column (its rows get none).

    A defect of one row (malformed JSON, bytes that are not UTF-8, a bad `choices` cell, too many
    cells) is kept in that row's `Record.problem`, so `skip_invalid` can skip it. A defect that
    leaves no row boundaries to trust (a CSV quote never closed, a missing header) is an error.

    Raises:
        DataError: the file is missing or unreadable, is UTF-16, lacks CSV columns or has broken CSV quoting.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file. Give a path to an existing .jsonl or .csv file.")
    try:
        with path.open("rb") as f:
            head = f.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(f"{path}: the file is UTF-16 text (it starts with a UTF-16 byte-order mark). "
                            "Save it as UTF-8.")
        return _read_csv(path, labelled) if path.suffix.lower() == ".csv" else _read_jsonl(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}).") from None


def _read_jsonl(path: Path) -> list[Record]:
    records: list[Record] = []
    # Iterate the file, never str.splitlines(): MMLU questions hold a raw U+0085 (NEL) that
    # splitlines() treats as a line break; a file object breaks only at \n, \r\n and \r.
    # utf-8-sig: a byte-order mark at the start is not part of the first row. surrogateescape:
    # bytes that are not UTF-8 spoil their own line only, which `_not_utf8` then names.
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) are not rows
            row, problem = _json_object(line)
            records.append(Record(len(records), f"line {lineno}", row, problem))
    return records


def _json_object(line: str) -> tuple[dict[str, Any], str | None]:
    """One JSONL line as an object, or ({}, what is wrong with it)."""
    if (problem := _not_utf8(line, "the line")) is not None:
        return {}, problem
    line = line.rstrip("\r\n")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return {}, (f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno}): {_show(line)}; each line "
                    "must hold one JSON object")
    except RecursionError:
        return {}, f"JSON nested too deeply to read: {_show(line)}; a question needs only a few levels"
    except ValueError:  # Python refuses to read an int of over 4300 digits (sys.get_int_max_str_digits)
        return {}, (f"a number with more than {sys.get_int_max_str_digits()} digits, more than Python reads: "
                    f"{_show(line)}; no question needs one, so check the line")
    if not isinstance(row, dict):
        return {}, f"expected a JSON object, but got {_show(line)}"
    return row, None


@contextlib.contextmanager
def _csv_field_limit() -> Iterator[None]:
    old = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_csv(path: Path, labelled: bool = True) -> list[Record]:
    """Rows of a CSV file, with RFC 4180 quoting enforced.

    An unclosed quote is the one defect that changes where rows end: the quoted cell runs on over
    the following lines, swallowing their rows. Three rules catch it, in this order:
    1. strict quoting (csv `strict=True`): inside a quoted cell a quote is written twice (""), and
       a closing quote is followed by the separator or the end of the line. A stray quote that
       opens a cell is almost always closed, if at all, by a later quote that breaks this rule.
    2. a quoted cell still open at the end of the file is an error (it swallowed every later row).
    3. a cell that spans lines, one of whose later lines parses, on its own, into exactly the
       header's number of cells with an answer-like value (a letter or a small index) in the
       `answer` column: that line is a swallowed row, not text. Multi-line questions stay valid
       unless one of their lines looks exactly like a row of the file.
    1 and 2 leave no row boundary to trust after the quote, so they stop the load (skip_invalid
    cannot skip them); 3 is a problem of that one row.
    """
    # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
    with _csv_field_limit(), path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, strict=True)
        header = _next_csv_row(reader, path, "line 1 (the header)")
        if header is None:
            header = []
        fields = [c.strip() for c in header]
        if (problem := _not_utf8(",".join(header), "the header")) is not None:
            raise DataError(f"{path}, line 1: {problem}.")
        letter_cols = _letter_cols(fields)
        needs = "`question`, `answer`" if labelled else "`question`"
        if ("question" not in fields or (labelled and "answer" not in fields)
                or ("choices" not in fields and len(letter_cols) < 2)):
            raise DataError(f"{path}: a CSV file needs columns {needs} and either `choices` (a JSON "
                            f"list) or choice columns A, B, ...; found columns {_show(fields)}.")
        used = ["question", "answer", "choices", "id", "subject", *letter_cols]
        repeated = sorted({c for c in fields if c in used and fields.count(c) > 1})
        if repeated:
            raise DataError(f"{path}, line 1: the header repeats column(s) {', '.join(repeated)}; each column "
                            "must appear once.")
        records: list[Record] = []
        while True:
            start = reader.line_num + 1
            cells = _next_csv_row(reader, path, f"row {len(records) + 1} (line {start})")
            if cells is None:
                break
            if not cells:
                continue  # a blank line
            lines = f"line {start}" if reader.line_num == start else f"lines {start}-{reader.line_num}"
            records.append(_csv_record(len(records), f"row {len(records) + 1} ({lines})", fields, cells))
    return records


def _next_csv_row(reader: Any, path: Path, where: str) -> list[str] | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            why = ("a quote opened in this row is never closed, so its cell swallows every later row up to the end "
                   "of the file")
        elif "expected after" in str(e):
            why = (f"a quoted cell is not closed properly ({e} at line {reader.line_num}): a closing quote must be "
                   "followed by a comma or the end of the line, so either a quote was left open and swallowed the "
                   "rows after it, or a quote inside a quoted cell was not doubled")
        else:
            why = f"the CSV cannot be read ({e}, at line {reader.line_num})"
        raise DataError(f"{path}, {where}: {why}. Write a quote that is part of the text as two quotes (\"\") inside a "
                        "quoted cell, and close every quoted cell; skip_invalid cannot skip this, since the rows after "
                        "it have no reliable boundaries.") from None


def _csv_record(index: int, where: str, fields: list[str], cells: list[str]) -> Record:
    raw = dict(zip(fields, cells))
    row: dict[str, Any] = {"question": raw.get("question"), "answer": raw.get("answer"),
                           "id": raw.get("id") or None, "subject": raw.get("subject") or None}
    problem = f"more cells than header columns: {_show(cells[len(fields):])}" if len(cells) > len(fields) else None
    names = fields + [f"extra cell {i + 1}" for i in range(len(cells) - len(fields))]
    for name, cell in zip(names, cells):
        if (bad := _not_utf8(cell, f"the `{name}` cell")) is not None:
            return Record(index, where, row, bad)
    for name, cell in zip(names, cells):
        if "\n" in cell or "\r" in cell:
            swallowed = _rows_inside(cell, fields)
            if swallowed:
                return Record(index, where, row, (
                    f"the `{name}` cell spans {len(cell.splitlines())} lines, and {len(swallowed)} of them look like "
                    f"rows of this file (first: {_show(swallowed[0])}): a quote opened in this cell was probably "
                    "never closed and swallowed the rows after it; close the quote, or write a quote that is part "
                    "of the text as two quotes (\"\")"))
    if "choices" in fields:
        cell = raw.get("choices") or ""
        try:
            row["choices"] = json.loads(cell)
        except RecursionError:
            problem = f"the `choices` cell is JSON nested too deeply to read: {_show(cell)}"
        except ValueError:  # malformed JSON, or an int of over 4300 digits
            problem = f"the `choices` cell is not a JSON list: {_show(cell)}"
    else:
        texts = [raw.get(c) or "" for c in _letter_cols(fields)]
        while texts and not texts[-1].strip():
            texts.pop()  # empty trailing cells mean this question has fewer choices
        row["choices"] = texts
    return Record(index, where, row, problem)


def _letter_cols(fields: list[str]) -> list[str]:
    """Choice columns A, B, C, ... in order, up to the first missing letter."""
    cols = []
    for letter in LETTERS:
        if letter not in fields:
            break
        cols.append(letter)
    return cols


def _rows_inside(cell: str, fields: list[str]) -> list[str]:
    """Lines after the first of a multi-line cell that parse as a whole row of the file (rule 3).

    Without an `answer` column (questions to answer, `read_records(labelled=False)`) nothing tells
    a swallowed row from a line of text, so rule 3 finds none; rules 1 and 2 still hold.
    """
    if "answer" not in fields:
        return []
    answer_col = fields.index("answer")
    found = []
    for line in cell.splitlines()[1:]:
        try:
            parsed = next(csv.reader([line], strict=True), [])
        except csv.Error:
            continue
        if len(parsed) == len(fields) and _looks_like_answer(parsed[answer_col]):
            found.append(line)
    return found


def _looks_like_answer(cell: str) -> bool:
    text = cell.strip()
    return text.isascii() and ((text.isdigit() and len(text) <= 2) or (len(text) == 1 and text.upper() in LETTERS))


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
    return [Record(i, f"row {i + 1}", row) if isinstance(row, Mapping) else
            Record(i, f"row {i + 1}", {}, f"a row must be an object with named fields, but got {_show(row)}")
            for i, row in enumerate(rows)], origin


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
            # Filter before parsing: rows of other subjects are not part of this load at all (a row
            # that could not be read has no subject to filter by: it stays, to be reported).
            records = [r for r in records if r.problem is not None
                       or (isinstance(s := r.row.get("subject"), str) and s in wanted)]
        id_split = split

    examples = parse_records(records, dataset, id_split, origin, skip_invalid)
    examples = unique_ids(examples, origin)
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


def parse_records(records: list[Record], dataset: str, split: str, origin: str, skip_invalid: bool,
                  hint: str = _SKIP_HINT) -> list[MCQAExample]:
    """`parse_row` over `records`: a bad row is a DataError naming `origin` and the row (with `hint`
    on what to do), or with `skip_invalid` a warning that counts the skipped rows; repeated
    choices warn. Raises DataError when no question is left."""
    examples: list[MCQAExample] = []
    skipped: list[str] = []
    repeated: list[str] = []
    for rec in records:
        try:
            if rec.problem is not None:
                raise DataError(rec.problem)
            example = parse_row(dataset, rec.row, split=split, index=rec.index)
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{origin}, {rec.where}: {e}. {hint}".rstrip()) from None
            skipped.append(f"{rec.where}: {e}")
            continue
        examples.append(example)
        texts = [c.strip() for c in example.choices]
        if len(set(texts)) < len(texts):
            twice = next(t for t in texts if texts.count(t) > 1)
            repeated.append(f"{rec.where}: {_show(twice)}")
    if skipped:
        # Never drop rows silently: say how many, and why for the first few.
        warnings.warn(f"{origin}: skipped {len(skipped)} invalid row(s) of {len(records)}; first: "
                      + "; ".join(skipped[:3]), DataWarning, stacklevel=3)
    if repeated:
        warnings.warn(f"{origin}: {len(repeated)} question(s) list a choice twice (first: {'; '.join(repeated[:3])}). "
                      "Each copy is scored as its own choice, so the copies split their probability; remove the "
                      "repeats from the data if that is not intended.", DataWarning, stacklevel=3)
    if not examples:
        raise DataError(f"{origin}: no valid questions (read {len(records)} row(s), skipped {len(skipped)}). "
                        "Check the file, the split and the subjects.")
    return examples


def unique_ids(examples: list[MCQAExample], origin: str) -> list[MCQAExample]:
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

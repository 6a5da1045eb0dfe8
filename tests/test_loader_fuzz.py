"""Fuzzing the loader and the prompt encoder with malformed data (issue 19: nothing lost, nothing silent).

A seeded generator (no hypothesis: the same cases on every run, so a failure names a case that
reproduces) writes FILES (JSONL and CSV, each of a few rows) and builds hub RECORDS (Python rows,
as `datasets` returns them), each malformed in one or more ways:

    jsonl-fields   a field set to a hostile value (wrong type, NaN, lone surrogate, "²", ...), dropped or added
    jsonl-raw      raw JSON text: numbers of 4301+ digits, deep nesting, NaN/Infinity, non-objects, cut lines
    jsonl-bytes    byte damage: cut, inserted or flipped bytes, invalid UTF-8, NUL, stray CR/LF, BOMs
    csv-cells      hostile cell values through a correct CSV writer; odd headers
    csv-quotes     quotes added or removed (unclosed quotes), separators and line breaks in unquoted cells
    csv-bytes      byte damage of a CSV file
    garbage        random bytes, UTF-16, empty and whitespace-only files, as .jsonl and .csv
    hub-records    Python rows from a stand-in `datasets`: also ints past 4300 digits, tuples, bytes

Each case goes through `load_mcqa` (skip_invalid on or off at random) and, when questions load,
through `PromptEncoder.encode_all` (letter or choice-likelihood, a random max_length) with the
tiny tokenizer. The contract: no exception but a `DataError` that names the file (or hub split)
and, for a row's problem, the row; messages stay short (values clipped); loaded questions encode
(letter scoring may refuse a question of more than 10 choices, naming it) into rows of at most
max_length tokens. `python -m tests.test_loader_fuzz` prints the outcome table.
"""

from __future__ import annotations

import codecs
import collections
import csv
import io
import json
import random
import re
import sys
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

from loraens.config import PromptConfig, Scoring
from loraens.data import DataError, DataWarning, load_mcqa
from loraens.prompts import PromptEncoder, PromptError

SEED = 19
CASES_PER_KIND = {"jsonl-fields": 260, "jsonl-raw": 160, "jsonl-bytes": 160, "csv-cells": 160, "csv-quotes": 160,
                  "csv-bytes": 100, "garbage": 60, "hub-records": 160}
MAX_MESSAGE = 2500  # characters: a message shows values clipped, never a whole row
FILE_LEVEL = ("no such file", "UTF-16", "needs columns", "no valid questions", "cannot read the file")
ROW = re.compile(r", (line|row) \d+")

# Hostile values: every JSON type, numbers that are not numbers, text that is not text.
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 3, 7, 26, 10**30, 1e300, -0.0, 2.5, float("nan"), float("inf"), float("-inf"),
    "", " ", "\t\n", "²", "٣", "①", "+1", "01", " 2 ", "A", "b", "Z", "ı", "AB", "nan", "NaN", " nan ", "None", "null",
    "\ud800", "x\udfffy", "\ud83d\ude00", "\x00", "a\x00b", "\u202eRTL", "e\u0301", "\ufeff", "\u2028", "\x85", "\r",
    "{question}", "{}", "}{", "%s", "x" * 300, "é" * 50, "🙂" * 20,
    [], {}, [1], ["a"], ["a", "b"], ["a", "a"], [None, None], ["a", ["b"]], ["", "b"], ["nan", "b"],
    ["a", float("nan")], ["\ud800", "b"], [True, False], [1, 2.5, 10**20],
    list("abcdefghijklmnopqrstuvwxyz0123"), [[[[[]]]]],
    {"text": ["a", "b"], "label": ["A", "B"]}, {"text": "ab", "label": "AB"}, {"text": ["a"], "label": ["A", "B"]},
    {"text": ["a", "b"], "label": [1, 1]}, {"text": ["a", "b"], "label": [None, "B"]}, {"a": {"b": {"c": {}}}},
]
FIELDS = ("question", "question_stem", "choices", "answer", "answer_idx", "answerKey", "id", "subject",
          "correct_answer", "distractor1", "distractor2", "distractor3")
WORDS = "red blue green sky sea tree stone water fire cat dog bird fish sun moon what which is the".split()


# ---------------------------------------------------------------- generators


def _text(rng: random.Random, lo: int = 1, hi: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def valid_row(rng: random.Random) -> dict[str, Any]:
    """A row of one of the recognised shapes (generic, ARC-style labels, SciQ, OpenBookQA)."""
    n = rng.randint(2, 6)
    choices = [_text(rng, 1, 3) + f" {i}" for i in range(n)]
    shape = rng.randrange(4)
    if shape == 0:
        answer: Any = rng.randrange(n) if rng.random() < 0.5 else "ABCDEF"[rng.randrange(n)]
        row = {"question": _text(rng) + "?", "choices": choices, "answer": answer}
    elif shape == 1:
        labels = list("ABCDEF"[:n]) if rng.random() < 0.7 else [str(i + 1) for i in range(n)]
        row = {"question": _text(rng) + "?", "choices": {"text": choices, "label": labels},
               "answerKey": rng.choice(labels)}
    elif shape == 2:
        row = {"question": _text(rng) + "?", "correct_answer": choices[0], "distractor1": choices[1],
               "distractor2": _text(rng, 1, 2), "distractor3": _text(rng, 1, 2)}
    else:
        row = {"question_stem": _text(rng) + "?", "choices": {"text": choices, "label": list("ABCDEF"[:n])},
               "answerKey": "A"}
    if rng.random() < 0.5:
        row["id"] = f"q{rng.randrange(1000)}"
    if rng.random() < 0.3:
        row["subject"] = rng.choice(["college_physics", "philosophy", "anatomy"])
    return row


def hostile_value(rng: random.Random) -> Any:
    value = rng.choice(HOSTILE)
    if rng.random() < 0.05:
        value = "long " * rng.randint(1_000, 40_000)  # up to 200 KB
    return value


def mutate_row(rng: random.Random, row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        key = rng.choice(FIELDS)
        if op <= 2:
            row[key] = hostile_value(rng)
        elif op == 3:
            row.pop(rng.choice(list(row) or ["question"]), None)
        elif isinstance(row.get("choices"), list) and row["choices"]:
            row["choices"] = list(row["choices"])
            row["choices"][rng.randrange(len(row["choices"]))] = hostile_value(rng)
        elif isinstance(row.get("choices"), dict):
            inner = dict(row["choices"])
            inner[rng.choice(["text", "label"])] = hostile_value(rng)
            row["choices"] = inner
    return row


def dumps(rng: random.Random, row: Any) -> str:
    """JSON text of `row`; a lone surrogate is written as an escape (ensure_ascii) or as raw text."""
    return json.dumps(row, ensure_ascii=rng.random() < 0.5)


def encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")  # a raw lone surrogate becomes invalid UTF-8 bytes


def jsonl_fields(rng: random.Random) -> bytes:
    rows = [valid_row(rng) for _ in range(rng.randint(1, 4))]
    for i in rng.sample(range(len(rows)), rng.randint(1, len(rows))):
        rows[i] = mutate_row(rng, rows[i])
    return encode("".join(dumps(rng, r) + "\n" for r in rows))


RAW_JSON = [
    lambda rng: '{"question": "Q?", "choices": ["a", "b"], "answer": ' + "7" * rng.randint(4_301, 6_000) + "}",
    lambda rng: '{"question": "Q?", "choices": ["a", ' + "9" * 5_000 + '], "answer": 0}',
    lambda rng: '{"question": "Q?", "id": ' + "1" * 4_400 + ', "choices": ["a", "b"], "answer": 0}',
    lambda rng: '{"question": "Q?", "choices": ' + "[" * rng.choice([50, 900, 5_000, 100_000])
    + "]" * rng.choice([0, 50, 900, 5_000, 100_000]) + ', "answer": 0}',
    lambda rng: "[" * rng.choice([900, 100_000]),
    lambda rng: '{"a": ' * rng.choice([500, 20_000]) + "1" + "}" * rng.choice([500, 20_000]),
    lambda rng: '{"question": "Q?", "choices": ["a", NaN, Infinity], "answer": 0}',
    lambda rng: '{"question": NaN, "choices": ["a", "b"], "answer": -Infinity}',
    lambda rng: '{"question": "Q?", "choices": ["a", "b"], "answer": 1e999}',
    lambda rng: rng.choice(["[1, 2]", "null", "true", "3", '"text"', "{}", "{,}", "{'a': 1}", "{\"a\" 1}", "]"]),
    lambda rng: '{"question": "Q?", "question": 5, "choices": ["a", "b"], "answer": 0}',
    lambda rng: '{"question": "\\ud800\\udc00\\udc00", "choices": ["\\ud800", "b"], "answer": 0}',
    lambda rng: '{"question": "Q?", "choices": ["a", "b"], "answer": "\\u00b2"}',
]


def jsonl_raw(rng: random.Random) -> bytes:
    lines = [dumps(rng, valid_row(rng)) for _ in range(rng.randint(0, 3))]
    for _ in range(rng.randint(1, 2)):
        line = rng.choice(RAW_JSON)(rng)
        if rng.random() < 0.3:
            line = line[: rng.randrange(len(line) + 1)]  # a cut line
        lines.insert(rng.randint(0, len(lines)), line)
    return encode("\n".join(lines) + rng.choice(["\n", "", "\r\n"]))


def damage(rng: random.Random, data: bytes) -> bytes:
    """Byte-level damage: cut, insert, flip, invalid UTF-8, NUL, CR/LF, BOMs, quotes, separators."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(data))
        op = rng.randrange(9)
        if op == 0:
            del data[at:]
        elif op == 1:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 3:
            data[at:at] = rng.choice([b"\xff", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80\x80"])
        elif op == 4:
            data[at:at] = rng.choice([b"\x00", b"\r", b"\n", b"\r\n", b"\x0b", b"\x0c", b"\xc2\x85", b"\xe2\x80\xa8"])
        elif op == 5:
            data[at:at] = b"\xef\xbb\xbf"
        elif op == 6:
            data[at:at] = rng.choice([b'"', b'""', b"'", b"\\", b"{", b"}", b"[", b"]"])
        elif op == 7:
            data[at:at] = rng.choice([b",", b",,", b";", b"\t"])
        else:
            del data[at:at + rng.randint(1, 20)]
    return bytes(data)


def jsonl_bytes(rng: random.Random) -> bytes:
    data = encode("".join(dumps(rng, valid_row(rng)) + "\n" for _ in range(rng.randint(1, 4))))
    if rng.random() < 0.2:
        data = b"\xef\xbb\xbf" + data
    return damage(rng, data)


def csv_table(rng: random.Random, hostile: bool) -> list[list[str]]:
    """A CSV table (header first) in one of the two layouts, maybe with hostile cells and header."""
    layout_letters = rng.random() < 0.6
    n_letters = rng.randint(2, 6)
    header = (["id", "question", *"ABCDEF"[:n_letters], "answer"] if layout_letters
              else ["id", "question", "choices", "answer"])
    if rng.random() < 0.3:
        header.append("subject")
    rng.shuffle(header)
    table = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(2, n_letters) if layout_letters else rng.randint(2, 5)
        choices = [_text(rng, 1, 2) for _ in range(n)]
        cells = {"id": f"q{rng.randrange(100)}", "question": _text(rng) + "?", "answer": str(rng.randrange(n)),
                 "choices": json.dumps(choices), "subject": "anatomy",
                 **{letter: (choices[i] if i < n else "") for i, letter in enumerate("ABCDEF")}}
        if hostile:
            for _ in range(rng.randint(1, 3)):
                value = hostile_value(rng)
                cells[rng.choice(header)] = (value if isinstance(value, str)
                                             else json.dumps(value) if rng.random() < 0.5 else str(value)[:500])
        table.append([cells.get(h, "") for h in header])
    if hostile and rng.random() < 0.3:  # odd headers: missing, repeated or padded columns
        op = rng.randrange(4)
        if op == 0:
            header.remove(rng.choice(header))
        elif op == 1:
            header.append(rng.choice(header))
        elif op == 2:
            header = [f" {h} " for h in header]
        else:
            header = header + ["", "extra"]
    if hostile and rng.random() < 0.3:  # rows of the wrong width
        row = rng.choice(table)
        if rng.random() < 0.5:
            row.append("surplus")
        elif row:
            row.pop()
    return [header, *table]


def write_csv(rng: random.Random, table: list[list[str]], quoting: int = csv.QUOTE_MINIMAL) -> str:
    out = io.StringIO()
    csv.writer(out, quoting=quoting, lineterminator=rng.choice(["\n", "\r\n"])).writerows(table)
    return out.getvalue()


def csv_cells(rng: random.Random) -> bytes:
    text = write_csv(rng, csv_table(rng, hostile=True), rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    return encode(("\ufeff" if rng.random() < 0.2 else "") + text)


def csv_quotes(rng: random.Random) -> bytes:
    table = csv_table(rng, hostile=rng.random() < 0.3)
    if rng.random() < 0.4:  # cells with separators, quotes and line breaks, written unquoted
        row = rng.choice(table[1:])
        row[rng.randrange(len(row))] += rng.choice([", b", '"x', 'say "hi"', "\nnext line", "a,\"b\nc", '"'])
        text = "\n".join(",".join(r) for r in table) + "\n"
    else:
        text = write_csv(rng, table, rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(len(text.split("\n", 1)[0]) + 1, len(text))
        op = rng.randrange(4)
        if op == 0:
            text = text[:at] + '"' + text[at:]  # a quote opened (or closed) in the wrong place
        elif op == 1 and '"' in text:
            i = rng.choice([m.start() for m in re.finditer('"', text)])
            text = text[:i] + text[i + 1:]  # a quote lost
        elif op == 2:
            text = text[:at] + rng.choice([",", "\n", "\r\n", '""', '",']) + text[at:]
        else:
            text = text[:at] + '"' + text[at:].replace("\n", "\n" if rng.random() < 0.5 else "\n,", 1)
    return encode(text)


def csv_bytes(rng: random.Random) -> bytes:
    return damage(rng, encode(write_csv(rng, csv_table(rng, hostile=False))))


def garbage(rng: random.Random) -> bytes:
    op = rng.randrange(6)
    if op == 0:
        return bytes(rng.randrange(256) for _ in range(rng.choice([1, 10, 1_000, 50_000])))
    if op == 1:
        return rng.choice(["", " ", "\n\n\n", "\ufeff", "\r\n \t\r\n"]).encode("utf-8")
    if op == 2:
        return json.dumps(valid_row(rng)).encode(rng.choice(["utf-16", "utf-16-le", "utf-32"]))
    if op == 3:
        return codecs.BOM_UTF16_LE + b"q\x00,\x00"
    if op == 4:
        return ("\n".join(_text(rng, 3, 12) for _ in range(rng.randint(1, 20)))).encode()
    return bytes(rng.choice(b"{}[]\",:0123456789naeu \n\\") for _ in range(rng.choice([10, 500, 5_000])))


def hub_rows(rng: random.Random) -> list[Any]:
    rows: list[Any] = [valid_row(rng) for _ in range(rng.randint(1, 4))]
    for i in rng.sample(range(len(rows)), rng.randint(1, len(rows))):
        row = mutate_row(rng, rows[i])
        if rng.random() < 0.3:  # values only Python objects can hold
            row[rng.choice(FIELDS)] = rng.choice([10**5000, -(10**4400), (1, 2), b"bytes", ("a", "b"), {1, 2},
                                                  [10**5000, "b"], {"text": [1, 10**5000], "label": ["A", 10**5000]}])
        rows[i] = row if rng.random() > 0.05 else rng.choice([None, [1, 2], "row", 5])
    return rows


FILE_GENERATORS = {"jsonl-fields": (jsonl_fields, ".jsonl"), "jsonl-raw": (jsonl_raw, ".jsonl"),
                   "jsonl-bytes": (jsonl_bytes, ".jsonl"), "csv-cells": (csv_cells, ".csv"),
                   "csv-quotes": (csv_quotes, ".csv"), "csv-bytes": (csv_bytes, ".csv")}


# ---------------------------------------------------------------- the contract


def run_case(kind: str, index: int, folder: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Load and encode one case; returns its outcome, or raises AssertionError on a broken contract."""
    rng = random.Random(f"{SEED}-{kind}-{index}")
    skip = rng.random() < 0.5
    if kind == "hub-records":
        rows = hub_rows(rng)
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, split: rows))
        subjects = ["stem", "humanities"] if rng.random() < 0.3 else None
        origin, load = "hub cais/mmlu (all) split 'test'", lambda: load_mcqa(
            "mmlu", "test", source="hub", subjects=subjects, skip_invalid=skip)
    else:
        if kind == "garbage":
            data, suffix = garbage(rng), rng.choice([".jsonl", ".csv"])
        else:
            make, suffix = FILE_GENERATORS[kind]
            data = make(rng)
        path = folder / f"{kind}-{index}{suffix}"
        path.write_bytes(data)
        origin, load = str(path), lambda: load_mcqa(str(path), skip_invalid=skip)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            examples = load()
        except DataError as e:
            message = str(e)
            assert message.startswith(origin), f"does not name {origin}: {message[:300]}"
            assert len(message) < MAX_MESSAGE, f"message of {len(message)} characters: {message[:300]}"
            if any(p in message for p in FILE_LEVEL):
                return "DataError (file)"
            assert ROW.search(message[len(origin):len(origin) + 40]), f"names no row: {message[:300]}"
            return "DataError (row)"
    skipped = [w for w in caught if issubclass(w.category, DataWarning) and "skipped" in str(w.message)]
    assert skip or not skipped, "rows skipped without skip_invalid"
    assert all(len(str(w.message)) < MAX_MESSAGE for w in caught)
    scoring = rng.choice(list(Scoring))
    max_length = rng.choice([8, 16, 64, 512])
    enc = PromptEncoder(tokenizer, PromptConfig(scoring=scoring, max_length=max_length))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            encoded = enc.encode_all(examples)
        except PromptError as e:  # letter scoring names the question it cannot list
            assert scoring is Scoring.LETTER and "supports at most 10 choices" in str(e), str(e)
            assert re.match(r"Question '.+': Letter scoring", str(e)), str(e)
            return "loaded; letter scoring refused (>10 choices)"
    for ex, q in zip(examples, encoded):
        assert q.num_tokens <= max_length or len(ex.choices) >= max_length, (q.num_tokens, max_length)
    return "loaded, rows skipped" if skipped else "loaded"


def fuzz(folder: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[str]]:
    """{kind: Counter(outcome)} and the broken contracts ("kind #i: ..."), over every case."""
    table: dict[str, collections.Counter] = {}
    broken: list[str] = []
    for kind, n in CASES_PER_KIND.items():
        table[kind] = collections.Counter()
        for i in range(n):
            try:
                outcome = run_case(kind, i, folder, tokenizer, monkeypatch)
            except AssertionError as e:
                outcome = "contract broken"
                broken.append(f"{kind} #{i}: {e}")
            except Exception as e:  # noqa: BLE001 - the point: any other exception is a finding
                outcome = "uncaught exception"
                broken.append(f"{kind} #{i}: {type(e).__name__}: {str(e)[:200]}\n{traceback.format_exc()[-1500:]}")
            table[kind][outcome] += 1
    return table, broken


def format_table(table: dict[str, collections.Counter]) -> str:
    outcomes = ["loaded", "loaded, rows skipped", "loaded; letter scoring refused (>10 choices)", "DataError (row)",
                "DataError (file)", "contract broken", "uncaught exception"]
    head = ["case kind", "cases", *outcomes]
    rows = [[kind, str(sum(c.values())), *(str(c[o]) for o in outcomes)] for kind, c in table.items()]
    total = collections.Counter()
    for c in table.values():
        total.update(c)
    rows.append(["total", str(sum(total.values())), *(str(total[o]) for o in outcomes)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def test_fuzzed_files_and_records_never_raise_anything_but_located_data_errors(tmp_path, tokenizer, monkeypatch):
    table, broken = fuzz(tmp_path, tokenizer, monkeypatch)
    print("\n" + format_table(table))
    total = sum(sum(c.values()) for c in table.values())
    assert total >= 1_000
    assert not broken, f"{len(broken)} of {total} cases broke the contract; first:\n" + "\n".join(broken[:5])
    # The generator must really exercise every path, not only one kind of failure.
    every = collections.Counter()
    for c in table.values():
        every.update(c)
    assert every["loaded"] > 50 and every["loaded, rows skipped"] > 50
    assert every["DataError (row)"] > 200 and every["DataError (file)"] > 20


if __name__ == "__main__":  # python -m tests.test_loader_fuzz: the outcome table, for notes
    import tempfile

    from tests.conftest import _train_tokenizer

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        result, problems = fuzz(Path(tmp), _train_tokenizer(), mp)
    print(format_table(result))
    print(f"{len(problems)} broken contracts", *problems[:10], sep="\n")

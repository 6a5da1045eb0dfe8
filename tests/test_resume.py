"""Resumable runs: a run interrupted anywhere and resumed ends with the uninterrupted run's members."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import loraens.train as train_mod
from loraens.cli import main


def _args(run, model_dir, mirror, *extra: str) -> list[str]:
    return ["train", "--output_dir", str(run), "--model.name", str(model_dir), "--model.dtype", "float32",
            "--model.device", "cpu", "--data.dataset", "arc_easy", "--data.data_dir", str(mirror),
            "--ensemble.num_members", "2", "--ensemble.rank", "2", "--ensemble.dropout", "0.1",
            "--train.epochs", "3", "--train.batch_size", "2", "--train.lr", "0.02", "--train.compile", "false",
            "--quiet", *extra]


def members(run) -> dict[str, torch.Tensor]:
    out = {}
    for k in range(2):
        for key, t in load_file(str(run / "members" / f"member_{k}" / "adapter_model.safetensors")).items():
            out[f"{k}/{key}"] = t
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("kill_at, resumed_from", [(8, "step 6 (the end of epoch 1)"),
                                                   (11, "step 9 (epoch 2, 3 batches in)")])
def test_interrupted_in_process_and_resumed_equals_uninterrupted(tmp_path, tiny_setup, monkeypatch, capsys, kill_at,
                                                                 resumed_from):
    model_dir, mirror = tiny_setup
    ref = tmp_path / "ref"
    assert main(_args(ref, model_dir, mirror)) == 0
    run = tmp_path / "run"
    real = train_mod.train_step
    calls = []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) == kill_at:  # 6 steps per epoch, 18 in all
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "train_step", dying)
    assert main(_args(run, model_dir, mirror, "--train.checkpoint_every", "3")) == 130
    monkeypatch.setattr(train_mod, "train_step", real)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["reason"] == "KeyboardInterrupt"
    capsys.readouterr()
    assert main(_args(run, model_dir, mirror, "--train.checkpoint_every", "3")) == 0
    out = capsys.readouterr().out
    assert f"resuming it from its last checkpoint, {resumed_from} of 18" in out, out
    assert max_diff(members(run), members(ref)) == 0.0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for a, b in zip(lines, ref_lines):
        assert a["train_loss"] == b["train_loss"] and a["ensemble"] == b["ensemble"]

"""Members sharded over torchrun processes: the shares by hand, and a 2-process CPU run (gloo)
that gives the one-process run's members and predictions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraens.distributed import member_shard
from loraens.predictions import load_predictions


def test_member_shares_by_hand():
    assert [(s.first, s.count) for s in (member_shard(5, r, 2) for r in range(2))] == [(0, 3), (3, 2)]
    assert [list(member_shard(4, r, 4).members) for r in range(4)] == [[0], [1], [2], [3]]
    assert [list(member_shard(7, r, 3).members) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert member_shard(3).members == range(0, 3) and member_shard(3).is_main
    with pytest.raises(ValueError, match="3 processes cannot share an ensemble of 2 members"):
        member_shard(2, 0, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tmp_path: Path, model_dir: Path, mirror: Path, name: str, processes: int) -> Path:
    out = tmp_path / name
    flags = ["train", "--model.name", str(model_dir), "--model.dtype", "float32", "--model.device", "cpu",
             "--data.data_dir", str(mirror), "--data.eval_splits", "validation,test",
             "--ensemble.num_members", "3", "--ensemble.rank", "2", "--train.epochs", "2", "--train.batch_size", "4",
             "--train.lr", "0.01", "--train.compile", "false", "--output_dir", str(out), "--quiet"]
    if processes == 1:
        cmd = [sys.executable, "-m", "loraens", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "loraens", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_two_processes_train_the_members_of_one(tiny_setup, tmp_path):
    model_dir, mirror = tiny_setup
    one = _train(tmp_path, model_dir, mirror, "one", 1)
    two = _train(tmp_path, model_dir, mirror, "two", 2)
    for k in range(3):  # rank 0 trained members 0 and 1, rank 1 member 2
        a = load_file(str(one / "members" / f"member_{k}" / "adapter_model.safetensors"))
        b = load_file(str(two / "members" / f"member_{k}" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
        assert any(a[key].abs().max() > 0 for key in a if "lora_B" in key)  # trained, not the zero init
    for key in ("arc_easy_validation", "arc_easy_test"):
        p1, p2 = load_predictions(one, key), load_predictions(two, key)
        assert p2.member_probs.shape == p1.member_probs.shape == (len(p1.ids), 3, 5)
        torch.testing.assert_close(p2.member_probs, p1.member_probs, atol=1e-5, rtol=1e-4)
        assert p2.ids == p1.ids
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert r2["splits"]["arc_easy_test"]["ensemble"]["nll"] == pytest.approx(
        r1["splits"]["arc_easy_test"]["ensemble"]["nll"], abs=1e-5)
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(lines[0]["train_loss"]) == 3  # every member's loss, gathered on rank 0


def test_a_two_process_run_killed_mid_epoch_resumes_in_one_process(tiny_setup, tmp_path, capsys):
    """Checkpoints gather every member's weights and AdamW state from every rank: a 2-process run
    whose rank 0 is killed (SIGKILL) after a mid-epoch checkpoint resumes in ONE process and ends
    with the members of an uninterrupted one-process run."""
    import signal
    import time

    from loraens.cli import main

    model_dir, mirror = tiny_setup
    out = tmp_path / "killed"
    flags = ["train", "--model.name", str(model_dir), "--model.dtype", "float32", "--model.device", "cpu",
             "--data.data_dir", str(mirror), "--ensemble.num_members", "3", "--ensemble.rank", "2",
             "--train.epochs", "2", "--train.batch_size", "2", "--train.lr", "0.01", "--train.compile", "false",
             "--train.checkpoint_every", "1", "--output_dir", str(out), "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "loraens", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            path = out / "manifest.json"
            record = json.loads(path.read_text()).get("checkpoint") if path.is_file() else None
            if record and record["step"] >= 8 and record["position"] > 0:  # epoch 2, mid-way
                break
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.01)
        # SIGKILL rank 0 (the pid in the folder's lock); torchrun then stops rank 1 and exits.
        os.kill(int((out / ".lock").read_text().split()[0]), signal.SIGKILL)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    capsys.readouterr()
    assert main(flags) == 0  # the same command, in one process: resumes
    assert "resuming it from its last checkpoint, step " in capsys.readouterr().out
    ref = tmp_path / "ref"
    assert main([*flags[:-3], "--output_dir", str(ref), "--quiet"]) == 0
    for k in range(3):
        a = load_file(str(ref / "members" / f"member_{k}" / "adapter_model.safetensors"))
        b = load_file(str(out / "members" / f"member_{k}" / "adapter_model.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)

"""Resumable runs: a run interrupted anywhere and resumed ends with the uninterrupted run's members."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

import loraens.train as train_mod
from loraens import runfolder
from loraens.cli import main

from .conftest import DEVICE

# The in-process tests run where LORAENS_TEST_DEVICE says (bit-equal on the CPU; on a GPU some kernels
# reduce in a nondeterministic order, so even two uninterrupted runs differ by float rounding). The
# SIGKILL trials fork the test process, which is only safe before CUDA is touched: they run on the CPU.
TOLERANCE = 0.0 if DEVICE.type == "cpu" else 1e-5


def _args(run, model_dir, mirror, *extra: str, device: str = str(DEVICE)) -> list[str]:
    return ["train", "--output_dir", str(run), "--model.name", str(model_dir), "--model.dtype", "float32",
            "--model.device", device, "--data.dataset", "arc_easy", "--data.data_dir", str(mirror),
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


def dying_at(call: int):
    """`train_mod.train_step` that raises KeyboardInterrupt on its `call`-th call (Ctrl-C mid-run)."""
    real, calls = train_mod.train_step, []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*a, **kw)
    return dying


@pytest.mark.parametrize("kill_at, resumed_from", [(8, "step 6 (the end of epoch 1)"),
                                                   (11, "step 9 (epoch 2, 3 batches in)")])
def test_interrupted_in_process_and_resumed_equals_uninterrupted(tmp_path, tiny_setup, monkeypatch, capsys, kill_at,
                                                                 resumed_from):
    model_dir, mirror = tiny_setup
    ref = tmp_path / "ref"
    assert main(_args(ref, model_dir, mirror)) == 0
    run = tmp_path / "run"
    real = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", dying_at(kill_at))  # 6 steps per epoch, 18 in all
    assert main(_args(run, model_dir, mirror, "--train.checkpoint_every", "3")) == 130
    monkeypatch.setattr(train_mod, "train_step", real)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["reason"] == "KeyboardInterrupt"
    capsys.readouterr()
    assert main(_args(run, model_dir, mirror, "--train.checkpoint_every", "3")) == 0
    out = capsys.readouterr().out
    assert f"resuming it from its last checkpoint, {resumed_from} of 18" in out, out
    assert max_diff(members(run), members(ref)) <= TOLERANCE
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for a, b in zip(lines, ref_lines):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOLERANCE)
        assert a["ensemble"] == pytest.approx(b["ensemble"], abs=TOLERANCE)



def test_a_run_saved_before_a_setting_existed_resumes_twice(tmp_path, tiny_setup, monkeypatch, capsys):
    """A run interrupted under an older loraens (its config.yaml, manifest and checkpoint predate
    --ensemble.member_prompts) resumes with --resume as it was trained (one prompt), and after a
    second interruption resumes again from its newest checkpoint instead of starting over."""
    from safetensors.torch import safe_open, save_file

    from loraens import checkpoint as ckpt_mod
    from loraens.runfolder import config_sha256

    model_dir, mirror = tiny_setup
    ref, run = tmp_path / "ref", tmp_path / "run"
    one_prompt = ("--ensemble.member_prompts", "default", "--train.checkpoint_every", "2")
    assert main(_args(ref, model_dir, mirror, "--ensemble.member_prompts", "default")) == 0
    real = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", dying_at(5))
    assert main(_args(run, model_dir, mirror, *one_prompt)) == 130
    # Make the folder look written before member_prompts existed: no key, and hashes without it.
    import yaml
    raw = yaml.safe_load((run / "config.yaml").read_text())
    del raw["ensemble"]["member_prompts"]
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    from loraens.run import RESUMABLE_CHANGES
    old_hash = config_sha256(raw, RESUMABLE_CHANGES)
    manifest = json.loads((run / "manifest.json").read_text())
    runfolder.write_manifest(run, {**manifest, "config_sha256": old_hash})
    path = run / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta[ckpt_mod._META])
    state["run"]["config_sha256"] = old_hash
    save_file(tensors, str(path), metadata={**meta, ckpt_mod._META: json.dumps(state)})
    # Interrupted again after the first resume, then resumed again: it continues, and ends as the
    # uninterrupted one-prompt run.
    monkeypatch.setattr(train_mod, "train_step", dying_at(4))
    assert main(["train", "--resume", str(run), "--quiet"]) == 130
    monkeypatch.setattr(train_mod, "train_step", real)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "resuming it from its last checkpoint" in out and "starting it over" not in out, out
    assert max_diff(members(run), members(ref)) <= max(TOLERANCE, 1e-6)


def test_interrupted_twice_with_other_checkpoint_intervals(tmp_path, tiny_setup, monkeypatch, capsys):
    """A resume may change --train.checkpoint_every: killed at step 5 (checkpoint every 2), resumed
    with every 3 and killed again at step 11, resumed with no interval: the uninterrupted members."""
    model_dir, mirror = tiny_setup
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(ref, model_dir, mirror)) == 0
    real = train_mod.train_step
    for every, calls_before_kill, resumed_from in (("2", 5, None), ("3", 11 - 4, "step 4 (epoch 1, 4 batches in)")):
        monkeypatch.setattr(train_mod, "train_step", dying_at(calls_before_kill))
        capsys.readouterr()
        assert main(_args(run, model_dir, mirror, "--train.checkpoint_every", every)) == 130
        if resumed_from:
            assert f"resuming it from its last checkpoint, {resumed_from}" in capsys.readouterr().out
    monkeypatch.setattr(train_mod, "train_step", real)
    capsys.readouterr()
    assert main(_args(run, model_dir, mirror)) == 0
    assert "resuming it from its last checkpoint, step 9 (epoch 2, 3 batches in)" in capsys.readouterr().out
    assert json.loads((run / "manifest.json").read_text())["resumed"] == 2
    assert max_diff(members(run), members(ref)) <= TOLERANCE

@pytest.mark.parametrize("extra, kill_at", [
    # early stopping: the best epoch's members and metrics come back from the checkpoint
    (("--train.epochs", "6", "--train.lr", "0.3", "--train.warmup_ratio", "0", "--train.early_stopping_patience",
      "1"), 9),
    # regularisers, micro-batches, member groups, and max_steps ending inside epoch 2
    (("--train.kl_coef", "0.5", "--train.delta_l2", "0.1", "--train.grad_accum", "2", "--train.member_chunk", "1",
      "--train.max_steps", "10"), 8),
    # the frozen-prefix cache (its hidden states are recomputed after the resume)
    (("--ensemble.top_layers", "1"), 10),
    # the diversity levers: bags, per-member lr and weight decay, targets and prompts, all together
    (("--ensemble.bagging", "true", "--ensemble.lr_range", "0.005,0.04", "--ensemble.weight_decay_range", "0,0.5",
      "--ensemble.target_modules", "q_proj,v_proj,k_proj", "--ensemble.member_targets", "q_proj+v_proj,k_proj",
      "--ensemble.member_prompts", "default,quiz"), 11),
])
def test_resume_keeps_every_training_feature(tmp_path, tiny_setup, monkeypatch, extra, kill_at):
    model_dir, mirror = tiny_setup
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(ref, model_dir, mirror, *extra)) == 0
    real = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", dying_at(kill_at))
    assert main(_args(run, model_dir, mirror, *extra, "--train.checkpoint_every", "2")) == 130
    monkeypatch.setattr(train_mod, "train_step", real)
    assert json.loads((run / "manifest.json").read_text())["checkpoint"]["step"] == kill_at - 1 - (kill_at - 1) % 2
    assert main(_args(run, model_dir, mirror, *extra, "--train.checkpoint_every", "2")) == 0
    assert max_diff(members(run), members(ref)) <= max(TOLERANCE, 1e-6)
    got, want = (json.loads((d / "results.json").read_text()) for d in (run, ref))
    assert got.get("best_epoch") == want.get("best_epoch") and got["epochs_trained"] == want["epochs_trained"]
    assert got["splits"]["arc_easy_validation"]["ensemble"] == pytest.approx(
        want["splits"]["arc_easy_validation"]["ensemble"], abs=1e-6)

def test_a_run_killed_before_its_config_is_started_over_by_any_command(tmp_path, tiny_setup, capsys):
    """A kill between the manifest (status running) and config.yaml leaves a run that trained
    nothing: the same command, or another configuration's, starts it over instead of refusing it."""
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    assert main(_args(run, model_dir, mirror, "--train.epochs", "1")) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    for name in ("config.yaml", "checkpoint.safetensors", "results.json"):
        (run / name).unlink(missing_ok=True)
    runfolder.write_manifest(run, {**manifest, "status": runfolder.RUNNING})
    capsys.readouterr()
    assert main(_args(run, model_dir, mirror, "--train.epochs", "2")) == 0
    assert "stopped before it wrote its config.yaml (nothing was trained); starting it over" in capsys.readouterr().out
    assert json.loads((run / "manifest.json").read_text())["status"] == runfolder.COMPLETE
    assert json.loads((run / "results.json").read_text())["epochs_trained"] == 2


# ---------------------------------------------------------------- SIGKILL at random points

TRIALS = 20
WRITE_DELAY = 0.01  # seconds every atomic write waits between its temporary file and os.replace


def _fork_train(args: list[str], write_delay: float) -> int:
    """Start `loraens train ARGS` in a forked child (no interpreter start-up, so the 20 trials fit in
    seconds); return its pid. The child slows every atomic write down by `write_delay` between the
    temporary file and its replace, so random kills often land inside a write."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            real_commit = runfolder._commit

            def slow_commit(tmp, path):
                time.sleep(write_delay)
                real_commit(tmp, path)

            runfolder._commit = slow_commit
            code = main(args)
        finally:
            os._exit(code)
    return pid


def _run_to_end(args: list[str], write_delay: float) -> float:
    started = time.perf_counter()
    pid = _fork_train(args, write_delay)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return time.perf_counter() - started


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_members(tmp_path, tiny_setup, capsys):
    """20 runs killed with SIGKILL at seeded random times (inside atomic writes too), each resumed
    by the same command (or --resume): every folder a kill leaves is refused by `evaluate`, and every
    resumed run ends with the uninterrupted run's members, metrics and results."""
    model_dir, mirror = tiny_setup
    started = time.perf_counter()
    ref = tmp_path / "ref"
    assert main(_args(ref, model_dir, mirror, device="cpu")) == 0  # uninterrupted, no checkpoints between epoch ends
    ref_members = members(ref)
    ref_results = json.loads((ref / "results.json").read_text())["splits"]
    # How long a run takes in a forked child (the shorter of two settings): kill times are spread over it.
    durations = []
    for every in ("1", "3"):
        timed = tmp_path / f"timed_{every}"
        args = _args(timed, model_dir, mirror, "--train.checkpoint_every", every, device="cpu")
        durations.append(_run_to_end(args, WRITE_DELAY))
        assert max_diff(members(timed), ref_members) == 0.0  # checkpoints and slow writes change nothing
    duration = min(durations)
    rng = random.Random(19)
    rows: list[dict] = []
    for trial in range(TRIALS + 10):  # until TRIALS runs were killed before they finished
        if sum(r["killed"] for r in rows) == TRIALS:
            break
        run = tmp_path / f"trial_{trial}"
        args = _args(run, model_dir, mirror, "--train.checkpoint_every", str(rng.choice([1, 2, 3])), device="cpu")
        kill_after = rng.uniform(0.02, 0.95) * duration
        pid = _fork_train(args, WRITE_DELAY)
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else None
        finished = manifest is not None and manifest["status"] == "complete"
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and not finished
        temp_files = [p.name for p in run.rglob(".*.tmp-*")] if run.is_dir() else []
        # What a kill leaves is never scored as a complete run.
        capsys.readouterr()
        scored = main(["evaluate", str(run), "--quiet"]) == 0
        evaluate_says = capsys.readouterr().err.strip()
        if killed:
            assert not scored and ("needs a complete run" in evaluate_says or "is not a folder" in evaluate_says
                                   or "not a loraens run folder" in evaluate_says), evaluate_says
        # Resume: the same command again, or --resume RUN once config.yaml exists.
        how = "--resume" if trial % 2 and (run / "config.yaml").is_file() else "same command"
        resume_args = ["train", "--resume", str(run), "--quiet"] if how == "--resume" else args
        assert main(resume_args) == (2 if finished else 0)  # a complete run is not redone
        out = capsys.readouterr()
        if finished:
            assert "already holds a complete run" in out.err or "that run is complete" in out.err
        diff = max_diff(members(run), ref_members)
        assert diff <= 1e-6, (trial, diff)
        assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
        assert not (run / "checkpoint.safetensors").exists() and not list(run.rglob(".*.tmp-*"))
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in lines] == [1, 2, 3]
        results = json.loads((run / "results.json").read_text())["splits"]["arc_easy_validation"]
        assert results["ensemble"] == pytest.approx(ref_results["arc_easy_validation"]["ensemble"])
        rows.append({"trial": trial, "kill_s": round(kill_after, 3), "killed": killed,
                     "status": (manifest or {}).get("status", "-"), "checkpoint": (manifest or {}).get("checkpoint"),
                     "in_write": temp_files, "evaluate_scored": scored, "evaluate_says": evaluate_says[:160],
                     "resumed_by": how, "max_abs_diff": diff,
                     "resume_says": next((x for x in out.out.splitlines() if "interrupted" in x), "")[-120:]})
    seconds = time.perf_counter() - started
    killed_rows = [r for r in rows if r["killed"]]
    with capsys.disabled():
        print(f"\nkill trials: {len(killed_rows)} killed ({len(rows) - len(killed_rows)} more found the run "
              f"finished), a run takes {duration:.2f} s, the test {seconds:.1f} s")
        for r in rows:
            print(json.dumps(r))
    assert len(killed_rows) == TRIALS
    assert not any(r["evaluate_scored"] for r in killed_rows)
    assert sum(bool(r["in_write"]) for r in killed_rows) >= 2  # kills between a temporary file and its replace
    assert sum(bool(r["checkpoint"] and r["checkpoint"]["position"]) for r in killed_rows) >= 2  # mid-epoch resumes

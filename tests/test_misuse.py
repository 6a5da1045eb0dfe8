"""A hostile but fair user: each misuse of a run folder is caught with a message that names the problem.

Two trains into one folder, a member from another base, a bit-flipped or truncated member, a
member count that leaves a folder out, non-finite settings and losses, a file as --output_dir, and
evaluate/report on unfinished runs. Every test asserts the message a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import loraens.run as run_mod
import loraens.train as train_mod
from loraens.cli import main

from .test_resume import max_diff, members


def _args(run, model_dir, mirror, *extra: str) -> list[str]:
    return ["train", "--output_dir", str(run), "--model.name", str(model_dir), "--model.dtype", "float32",
            "--model.device", "cpu", "--data.dataset", "arc_easy", "--data.data_dir", str(mirror),
            "--ensemble.num_members", "2", "--ensemble.rank", "2", "--train.epochs", "2", "--train.batch_size", "4",
            "--train.lr", "0.02", "--train.compile", "false", "--quiet", *extra]


@pytest.fixture
def trained(tmp_path, tiny_setup):
    """A complete 2-member, 2-epoch run of the tiny model: (run folder, model folder, mirror)."""
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    assert main(_args(run, model_dir, mirror)) == 0
    return run, model_dir, mirror


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return " ".join(capsys.readouterr().err.split())


def _other_base(tmp_path: Path, tiny_setup, _tiny_llama, tokenizer) -> Path:
    """The tiny Llama's architecture with other (seeded) weights, saved as a model folder."""
    config, _ = _tiny_llama
    torch.manual_seed(1)
    other = tmp_path / "other-model"
    LlamaForCausalLM(config).float().save_pretrained(other)
    tokenizer.save_pretrained(other)
    return other


# ---------------------------------------------------------------- two processes, one folder


def test_two_concurrent_trains_into_one_folder(tmp_path, tiny_setup, capsys):
    """A `python -m loraens train` holds the folder (stopped with SIGSTOP right after a mid-epoch
    checkpoint): a second train and an evaluate are refused with its pid. Killed with SIGKILL, it is
    resumed by the same command, and the members equal an uninterrupted run's."""
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    args = _args(run, model_dir, mirror, "--train.epochs", "3", "--train.batch_size", "2",
                 "--train.checkpoint_every", "1", "--ensemble.dropout", "0.1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(run_mod.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-m", "loraens", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until the first process has a checkpoint inside epoch 1
            manifest = run / "manifest.json"
            if manifest.is_file():
                record = json.loads(manifest.read_text()).get("checkpoint")
                if record and record["position"] > 0:
                    break
            assert first.poll() is None, first.communicate()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # frozen mid-training, still holding the folder's lock
        second = _error(capsys, args)
        evaluate = _error(capsys, ["evaluate", str(run), "--quiet"])
        alive = first.poll() is None
        first.send_signal(signal.SIGKILL)
        first.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
    assert alive  # both refusals happened while the first process was training
    assert f"{run} is being written by another loraens process (pid {first.pid}, loraens train)" in second, second
    assert "two processes must not write one run folder" in second
    assert f"{run} is being written by another loraens process (pid {first.pid}, loraens train)" in evaluate
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    capsys.readouterr()
    assert main(args) == 0  # the same command again: resumes the killed run
    assert "holds an interrupted run of this configuration (the same command again); resuming it" in \
        capsys.readouterr().out
    ref = tmp_path / "ref"
    assert main(_args(ref, model_dir, mirror, "--train.epochs", "3", "--train.batch_size", "2",
                      "--ensemble.dropout", "0.1")) == 0
    assert max_diff(members(run), members(ref)) == 0.0


def test_lock_is_released_when_its_process_dies(tmp_path):
    from loraens.runfolder import RunFolderError, RunLock, is_locked

    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from loraens.runfolder import RunLock; "
        "RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)"),
        str(Path(run_mod.__file__).parents[1]), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        assert is_locked(run)
        with pytest.raises(RunFolderError, match=f"pid {child.pid}, loraens train"):
            RunLock(run).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert not is_locked(run)
    with RunLock(run) as lock:  # the kernel dropped the dead process's lock
        assert lock.held and (run / ".lock").read_text().split()[0] == str(os.getpid())


# ---------------------------------------------------------------- members that are not the run's


def test_member_swapped_for_one_from_another_base(tmp_path, trained, tiny_setup, _tiny_llama, tokenizer, capsys):
    run, model_dir, mirror = trained
    other = _other_base(tmp_path, tiny_setup, _tiny_llama, tokenizer)
    foreign = tmp_path / "foreign"
    assert main(_args(foreign, other, mirror)) == 0
    shutil.rmtree(run / "members" / "member_1")
    shutil.copytree(foreign / "members" / "member_1", run / "members" / "member_1")
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert (f"{run}/members/member_1/adapter_config.json names the base model '{other.resolve()}', but this run's "
            f"members were trained on '{model_dir.resolve()}' ({run}/manifest.json): this member comes from another "
            "run.") in err, err


def test_config_pointed_at_another_model_of_the_same_architecture(tmp_path, trained, tiny_setup, _tiny_llama,
                                                                  tokenizer, capsys):
    run, model_dir, _ = trained
    other = _other_base(tmp_path, tiny_setup, _tiny_llama, tokenizer)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert f"{run}'s members were trained on the base model '{model_dir}' (config " in err, err
    assert f"weights {manifest['base_model']['weights_sha256'][:12]})" in err
    assert f"but config.yaml's model loads '{other}' (config " in err and "another model" in err


def test_bit_flipped_member(trained, capsys):
    run, _, _ = trained
    path = run / "members" / "member_0" / "adapter_model.safetensors"
    recorded = json.loads((run / "manifest.json").read_text())["members"]["member_0"]["sha256"][path.name]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one bit of one weight
    path.write_bytes(bytes(data))
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert f"{path} has sha256 " in err and f"but {run}/manifest.json records {recorded[:16]}... (written at epoch 2)" \
        in err and "changed or damaged after the run wrote it" in err, err


def test_truncated_member_and_bad_json_name_the_file(trained, capsys):
    run, _, _ = trained
    weights = run / "members" / "member_1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert f"{weights} has sha256" in err  # the manifest catches it first
    # Without the manifest (a folder from an older loraens), the file is still named, never a traceback.
    (run / "manifest.json").unlink()
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert "WARNING" in err and "no manifest.json" in err
    assert f"{weights} cannot be read as a safetensors file (SafetensorError:" in err and "truncated or damaged" in err
    config = run / "members" / "member_0" / "adapter_config.json"
    config.write_text('{"r": 2, "lora_alpha": ')
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert f"{config} is not valid JSON (" in err, err


def test_non_finite_adapter_weights_are_refused(tmp_path, trained, capsys):
    from loraens.ensemble import read_member

    run, _, _ = trained
    path = run / "members" / "member_0" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{path} holds non-finite weights \(\d+ of \d+ values of {key}"):
        read_member(path.parent)
    (run / "manifest.json").unlink()
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert f"{path} holds non-finite weights" in err and "cannot be used" in err


def test_member_count_must_match_the_member_folders(trained, capsys):
    run, _, _ = trained
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["ensemble"]["num_members"] = 1
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert (f"{run}/members holds member_0, member_1, but config.yaml has num_members 1 (member_0): member_1 would be "
            "silently left out.") in err, err


def test_members_from_different_epochs_are_refused(tmp_path, trained, capsys):
    """A folder an older loraens left after a crash between two members' exports: member 0 of epoch
    2, member 1 of epoch 1 (the epoch is in each weights file's metadata)."""
    run, model_dir, mirror = trained
    early = tmp_path / "early"
    assert main(_args(early, model_dir, mirror, "--train.epochs", "1")) == 0
    shutil.rmtree(run / "members" / "member_1")
    shutil.copytree(early / "members" / "member_1", run / "members" / "member_1")
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert "member_1/adapter_model.safetensors has sha256" in err  # with the manifest: the hash
    (run / "manifest.json").unlink()
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert f"{run}'s members are from different epochs (member_0: epoch 2, member_1: epoch 1)" in err, err


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("flag, value", [
    ("--train.lr", "inf"), ("--train.lr", "nan"), ("--train.lr", "-inf"), ("--ensemble.init_scale", "inf"),
    ("--ensemble.alpha", "nan"), ("--ensemble.dropout", "nan"), ("--train.max_grad_norm", "inf"),
    ("--train.weight_decay", "inf"), ("--train.warmup_ratio", "nan"), ("--train.kl_coef", "1e400"),
    ("--train.delta_l2", "nan"),
])
def test_non_finite_settings_are_config_errors(tmp_path, tiny_setup, capsys, flag, value):
    model_dir, mirror = tiny_setup
    err = _error(capsys, _args(tmp_path / "run", model_dir, mirror, f"{flag}={value}"))
    shown = {"1e400": "inf"}.get(value, value)
    assert f"loraens train: error: `{flag}` must be a finite number, but got {shown}." in err, err
    assert not (tmp_path / "run").exists()


def test_non_finite_settings_in_yaml_are_config_errors(tmp_path, capsys):
    path = tmp_path / "my.yaml"
    path.write_text("train:\n  lr: .inf\n")
    assert "`--train.lr` must be a finite number, but got inf." in _error(capsys, ["train", "--config", str(path)])


def test_non_finite_gradient_stops_the_run_and_keeps_json_standard(tmp_path, tiny_setup, capsys):
    """--ensemble.init_scale 1e30 is finite, but the first gradient norm overflows: the run stops with
    exit 2, the folder is marked failed with the reason, and a rerun refuses to repeat it."""
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    err = _error(capsys, _args(run, model_dir, mirror, "--ensemble.init_scale", "1e30"))
    assert "training stopped at epoch 1, step 1: a non-finite loss or gradient norm (member 0: loss " in err, err
    assert "gradient norm inf" in err and f"{run} is marked failed; it has no checkpoint yet" in err
    assert "The step was not applied. Lower --train.lr (now 0.02) or --ensemble.init_scale (now 1e+30)" in err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "gradient norm inf" in manifest["reason"]
    err = _error(capsys, _args(run, model_dir, mirror, "--ensemble.init_scale", "1e30"))
    assert f"{run} holds a failed run: training stopped at epoch 1, step 1" in err and "--overwrite" in err


def test_nan_loss_mid_run_keeps_the_last_good_checkpoint(tmp_path, tiny_setup, monkeypatch, capsys):
    """A NaN loss at step 5 (epoch 2): the step is not applied, the checkpoint of step 4 and the
    epoch-1 members stay, and metrics.jsonl / results.json hold standard JSON only."""
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    real = train_mod.train_step
    calls = []

    def nan_at_5(*a, **kw):
        calls.append(1)
        out = real(*a, **kw)
        if len(calls) == 5:
            out[1] = float("nan")
        return out

    monkeypatch.setattr(train_mod, "train_step", nan_at_5)
    err = _error(capsys, _args(run, model_dir, mirror, "--train.checkpoint_every", "1"))
    assert "training stopped at epoch 2, step 5: a non-finite loss or gradient norm (member 1: loss nan, " in err
    assert "its last good checkpoint (step 4 (epoch 2, 1 batches in)) is kept, and the members of epoch 1 are kept" \
        in err, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["checkpoint"]["step"] == 4
    assert (run / "checkpoint.safetensors").is_file()
    assert {m["epoch"] for m in manifest["members"].values()} == {1}

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict(line)
    strict((run / "manifest.json").read_text())
    err = _error(capsys, ["evaluate", str(run), "--quiet"])
    assert "evaluate needs a complete run, but this one's status is failed: " in err and "holds a failed run" in err


def test_results_never_hold_nan(tmp_path, trained):
    from loraens.runfolder import dumps, write_json

    path = tmp_path / "r.json"
    write_json(path, {"splits": {"x": {"nll": float("nan"), "ece": [float("inf"), 0.5]}}})
    assert json.loads(path.read_text()) == {"splits": {"x": {"nll": None, "ece": [None, 0.5]}}}
    assert dumps(float("-inf")) == "null"


# ---------------------------------------------------------------- the folder itself


def test_output_dir_that_is_a_file_fails_before_any_data_or_model_loads(tmp_path, tiny_setup, monkeypatch, capsys):
    model_dir, mirror = tiny_setup
    loaded = []
    monkeypatch.setattr(run_mod, "load_base_model", lambda *a, **kw: loaded.append("model"))
    monkeypatch.setattr(run_mod, "load_examples", lambda *a, **kw: loaded.append("data"))
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    err = _error(capsys, _args(target, model_dir, mirror))
    assert f"--output_dir '{target}' is a file, not a folder; give a folder for the run" in err, err
    err = _error(capsys, _args(target / "run", model_dir, mirror))
    assert f"--output_dir '{target / 'run'}' cannot be created: '{target}' is a file." in err, err
    assert loaded == [] and target.read_text() == "not a folder"


def test_data_errors_come_before_the_model_loads_and_leave_no_folder(tmp_path, tiny_setup, monkeypatch, capsys):
    model_dir, mirror = tiny_setup
    monkeypatch.setattr(run_mod, "load_base_model", lambda *a, **kw: pytest.fail("the model loaded"))
    run = tmp_path / "run"
    err = _error(capsys, _args(run, model_dir, mirror, "--data.dataset", str(tmp_path / "missing_{split}.jsonl")))
    assert "missing_train.jsonl" in err
    assert not run.exists()  # nothing was written: no empty folder is left behind


def test_a_complete_run_is_never_replaced_without_overwrite(trained, capsys):
    run, model_dir, mirror = trained
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    err = _error(capsys, _args(run, model_dir, mirror, "--train.lr", "0.05"))
    assert f"{run} already holds a complete run (finished " in err and "Pass --overwrite to replace it" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    err = _error(capsys, ["train", "--resume", str(run)])
    assert f"--resume {run}: that run is complete; there is nothing to resume." in err
    capsys.readouterr()
    assert main(_args(run, model_dir, mirror, "--train.lr", "0.05", "--overwrite")) == 0
    assert f"replacing the complete run in {run} (--overwrite)" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.05


def test_an_interrupted_run_of_another_configuration_is_not_resumed(tmp_path, tiny_setup, monkeypatch, capsys):
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(_args(run, model_dir, mirror)) == 130
    monkeypatch.undo()
    err = _error(capsys, _args(run, model_dir, mirror, "--train.lr", "0.05"))
    assert (f"{run} holds an interrupted run of another configuration (--train.lr: 0.02 there, 0.05 here). Resume it "
            f"as it was with `loraens train --resume {run}`") in err, err


def test_evaluate_and_report_refuse_an_unfinished_or_mixed_run(trained, capsys):
    run, _, _ = trained
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    for verb in (["evaluate", str(run), "--quiet"], ["report", str(run)]):
        err = _error(capsys, verb)
        assert (f"loraens {verb[0]}: error: {verb[0]} needs a complete run, but this one's status is running: {run} "
                "holds an interrupted run (its process was killed or crashed): it has no checkpoint yet. Resume it "
                f"with `loraens train --resume {run}`.") in err, err
    mixed = {**manifest, "members": {**manifest["members"], "member_1": {**manifest["members"]["member_1"],
                                                                          "epoch": 1}}}
    (run / "manifest.json").write_text(json.dumps(mixed))
    err = _error(capsys, ["report", str(run)])
    assert f"{run}'s members are from different epochs (member_0: epoch 2, member_1: epoch 1)" in err, err


def test_evaluate_limit_records_under_its_own_key(trained, capsys):
    run, _, _ = trained
    preds = run / "predictions" / "arc_easy_validation.safetensors"
    before, results = preds.read_bytes(), json.loads((run / "results.json").read_text())
    assert main(["evaluate", str(run), "--limit", "3", "--quiet"]) == 0
    after = json.loads((run / "results.json").read_text())
    assert after["splits"]["arc_easy_validation"] == results["splits"]["arc_easy_validation"]
    assert after["splits"]["arc_easy_validation_limit3"]["num_questions"] == 3
    assert preds.read_bytes() == before
    assert (run / "predictions" / "arc_easy_validation_limit3.safetensors").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--quiet"]) == 0  # the very set training scored: its figures are kept
    assert "its recorded figures for arc_easy_validation are kept" in capsys.readouterr().out
    assert preds.read_bytes() == before


def test_exported_members_load_with_plain_peft(trained):
    from peft import AutoPeftModelForCausalLM, PeftModel

    from loraens.config import ModelConfig
    from loraens.model import peft_base_name

    run, model_dir, _ = trained
    folder = run / "members" / "member_1"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        model_dir.resolve())
    auto = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    base = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    by_hand = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, by_hand(ids).logits)
    assert peft_base_name(ModelConfig()) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_base_name(ModelConfig(name="org/some-model")) == "org/some-model"


def test_a_base_whose_config_reads_differently_but_has_the_weights_is_a_warning(trained, capsys):
    run, _, _ = trained
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["base_model"]["config_sha256"] = "0" * 64  # as if written by another transformers version
    (run / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--limit", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (f"loraens evaluate: warning: the base model has the weights {run}'s members were trained on, but its "
            "config reads differently now") in err, err


def test_a_damaged_checkpoint_is_refused_with_what_to_do(tmp_path, tiny_setup, monkeypatch, capsys):
    """The checkpoint's tensors (not its header) are damaged: the resume stops with the file named
    and the way out, instead of training on from broken state."""
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    real_step, calls = train_mod.train_step, []

    def interrupt_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(train_mod, "train_step", interrupt_third)
    assert main(_args(run, model_dir, mirror, "--train.checkpoint_every", "1")) == 130
    monkeypatch.undo()
    ckpt = run / "checkpoint.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0xFF  # the last tensor byte: the header still parses
    ckpt.write_bytes(bytes(data))
    err = _error(capsys, _args(run, model_dir, mirror, "--train.checkpoint_every", "1"))
    assert "checkpoint.safetensors" in err and "cannot be resumed from it; pass --overwrite" in err, err

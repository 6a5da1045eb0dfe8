"""The run folder's parts by hand: atomic writes, the lock, the manifest, the base identity, the
divergence warning, evaluate's keys and the settings a resume may change."""

from __future__ import annotations

import json
import os

import pytest
import torch

import loraens.train as train_mod
from loraens import runfolder
from loraens.cli import main
from loraens.config import ModelConfig, RunConfig
from loraens.model import base_identity, same_base
from loraens.run import _config_changes, evaluation_key
from loraens.runfolder import (
    IntegrityError,
    RunFolderError,
    RunLock,
    atomic_path,
    check_output_dir,
    read_manifest,
    remove_temp_files,
    write_text,
)
from loraens.train import DivergenceWatch

from .test_misuse import _args


def test_atomic_write_keeps_the_old_file_until_the_new_one_is_whole(tmp_path):
    path = tmp_path / "a" / "results.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the n")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    seen = []
    real = runfolder._commit

    def watching(tmp, target):
        seen.append((tmp.name, target.read_text(), tmp.read_text()))  # just before the replace
        real(tmp, target)

    runfolder._commit = watching
    try:
        write_text(path, "new")
    finally:
        runfolder._commit = real
    assert seen == [(f".results.json.tmp-{os.getpid()}", "old", "new")] and path.read_text() == "new"


def test_temp_files_a_killed_writer_left_are_removed(tmp_path):
    (tmp_path / "members" / "member_0").mkdir(parents=True)
    stray = [tmp_path / ".manifest.json.tmp-123", tmp_path / "members" / "member_0" / ".adapter_config.json.tmp-9"]
    for p in stray:
        p.write_text("x")
    (tmp_path / "keep.json").write_text("{}")
    assert sorted(remove_temp_files(tmp_path)) == sorted(stray)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["keep.json"]


def test_one_lock_per_folder_and_the_message_names_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, "evaluate"):
        with pytest.raises(RunFolderError) as err:
            RunLock(run).acquire()  # flock is per open file: a second open in this process conflicts too
        assert str(err.value) == (f"{run} is being written by another loraens process (pid {os.getpid()}, loraens "
                                  "evaluate); two processes must not write one run folder. Wait for it to finish, or "
                                  "use another --output_dir.")
        assert runfolder.is_locked(run)
    assert not runfolder.is_locked(run) and (run / ".lock").read_text() == ""


def test_output_dir_checks(tmp_path):
    check_output_dir(tmp_path / "new" / "run")  # missing folders are fine
    (tmp_path / "f").write_text("")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(RunFolderError, match="cannot be created: '.*/f' is a file"):
        check_output_dir(tmp_path / "f" / "run")


def test_a_manifest_that_is_not_one_names_the_file(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text('{"status": "comple')
    with pytest.raises(IntegrityError, match=rf"{tmp_path}/manifest.json is not valid JSON \("):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"status": "done"}')
    with pytest.raises(IntegrityError, match="is not a loraens manifest"):
        read_manifest(tmp_path)


def test_base_identity_tells_models_apart_but_not_where_they_live(tmp_path, tiny_setup, _tiny_llama, tokenizer):
    from transformers import LlamaForCausalLM

    model_dir, _ = tiny_setup
    config, _ = _tiny_llama
    load = lambda name, **kw: LlamaForCausalLM.from_pretrained(str(name), **kw)  # noqa: E731
    cfg = ModelConfig(name=str(model_dir), dtype="float32")
    a = base_identity(cfg, load(model_dir))
    again = base_identity(cfg, load(model_dir, attn_implementation="eager"))
    moved = tmp_path / "moved"
    load(model_dir).save_pretrained(moved)
    b = base_identity(ModelConfig(name=str(moved), dtype="float32"), load(moved))
    torch.manual_seed(7)
    other = base_identity(ModelConfig(name=str(model_dir), dtype="float32"), LlamaForCausalLM(config).float())
    assert a == again and same_base(a, b) and a["peft_base"] == str(model_dir.resolve())
    assert b["name"] == str(moved) and not same_base(a, other)
    assert a["config_sha256"] == other["config_sha256"]  # the same architecture; only the weights differ
    changed = load(model_dir)
    changed.config.rope_theta = 1234.0
    c = base_identity(cfg, changed)
    assert same_base(a, c) and c["config_sha256"] != a["config_sha256"]  # a warning on load, not an error
    one = load(model_dir)
    with torch.no_grad():
        one.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # the first sampled value of that tensor
    assert not same_base(a, base_identity(ModelConfig(name=str(model_dir), dtype="float32"), one))


def test_divergence_watch_by_hand():
    watch = DivergenceWatch(patience=3, window=2)
    # window means: 1.0 (the start), 1.2 (above: 1), 0.9 (reset), 1.1, 1.3, 1.5 (above: 1, 2, 3 -> warn)
    losses = [1.0, 1.0, 1.2, 1.2, 0.9, 0.9, 1.1, 1.1, 1.3, 1.3, 1.4, 1.6, 9.0, 9.0, 9.0, 9.0]
    out = [watch.update(x, lr=1000.0) for x in losses]
    assert [i for i, w in enumerate(out) if w] == [11]
    assert out[11] == ("the members' mean training loss has stayed above its starting value (1) for 3 windows of 2 "
                       "step(s) in a row (now 1.5): the run may be diverging. A smaller --train.lr (now 1000) "
                       "usually helps.")
    assert DivergenceWatch(None, 1).update(5.0, 1.0) is None  # off


def test_divergence_warning_reaches_stderr_and_the_manifest(tmp_path, tiny_setup, monkeypatch, capsys):
    model_dir, mirror = tiny_setup
    real = train_mod.train_step
    calls = []

    def rising(*a, **kw):  # the real step, with a reported loss that grows by 1 per step
        calls.append(1)
        return real(*a, **kw) + len(calls)

    monkeypatch.setattr(train_mod, "train_step", rising)
    run = tmp_path / "run"
    assert main(_args(run, model_dir, mirror, "--train.epochs", "2", "--train.batch_size", "2")) == 0
    err = capsys.readouterr().err
    # 6 steps per epoch: windows of 1 step; the start is step 1's loss, steps 2-4 stay above it.
    assert "loraens: warning: epoch 1, step 4: the members' mean training loss has stayed above its starting value" \
        in err, err
    warnings = json.loads((run / "manifest.json").read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("epoch 1, step 4: ")


def test_evaluate_keys_never_collide_with_the_training_runs():
    cfg = RunConfig.from_dict({"data": {"dataset": "arc_easy", "eval_splits": ["validation", "test"]}})
    assert evaluation_key(cfg, "arc_easy", "validation", None) == ("arc_easy_validation", True)
    assert evaluation_key(cfg, "arc_easy", "validation", 8) == ("arc_easy_validation_limit8", False)
    assert evaluation_key(cfg, "arc_easy", "train", None) == ("arc_easy_train", False)
    assert evaluation_key(cfg, "openbookqa", "test", 50) == ("openbookqa_test_limit50", False)
    limited = RunConfig.from_dict({"data": {"dataset": "arc_easy", "eval_limit": 300}})
    assert evaluation_key(limited, "arc_easy", "validation", 300) == ("arc_easy_validation", True)
    assert evaluation_key(limited, "arc_easy", "validation", None) == ("arc_easy_validation_all", False)


def test_a_resume_may_change_only_where_and_how_often(tmp_path):
    stored = RunConfig.from_dict({"output_dir": str(tmp_path), "train": {"lr": 0.01}})
    stored.save(tmp_path / "config.yaml")
    same = RunConfig.from_dict({"output_dir": "elsewhere", "model": {"device": "cpu"},
                                "train": {"lr": 0.01, "checkpoint_every": 5, "eval_batch_size": 4}})
    assert _config_changes(tmp_path, same) == []
    other = RunConfig.from_dict({"train": {"lr": 0.02, "epochs": 3}, "ensemble": {"num_members": 2}})
    assert _config_changes(tmp_path, other) == ["--ensemble.num_members: 4 there, 2 here",
                                                "--train.epochs: 2 there, 3 here", "--train.lr: 0.01 there, 0.02 here"]


def test_a_folder_that_cannot_be_created_is_named():
    # /proc takes no new folders, not even from root.
    with pytest.raises(RunFolderError, match="/proc/loraens-run cannot be used as a run folder: No such file or "
                                             "directory"):
        RunLock("/proc/loraens-run").acquire()

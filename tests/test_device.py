"""Where tensors live: the test device (`LORAENS_TEST_DEVICE`, tests/conftest.py), the placement
contract of scoring, training and prediction on it, and a CUDA device asked for where there is none.

The contract: the members live where the base model does; member log-probabilities, losses'
gradients and the activations stay on the model's device; `predict()` returns CPU predictions, a
training step CPU losses, and an exported member CPU tensors, whatever the device. On the CPU
(the default) the placement checks are trivially true; `LORAENS_TEST_DEVICE=cuda` makes them
check the contract on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loraens.batching import collate
from loraens.cli import main
from loraens.config import DType, EnsembleConfig, ModelConfig, RunConfig, Scoring, TrainConfig
from loraens.ensemble import attach_members, lora_parameters, member_tensors
from loraens.fast.support import SDPA_PACKED, attention_implementation
from loraens.model import load_base_model
from loraens.predict import predict
from loraens.train import base_log_probs, train_step
from tests.conftest import DEVICE, DEVICE_ENV, model_device, scorer

ROOT = Path(__file__).resolve().parents[1]
# The same bound as tests/test_scoring.py: packed or padded batches of other shapes differ by
# float32 summation order only.
ATOL = 3e-5

without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
with_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# A library bug, left to the engineer who owns src/: `ModelError` subclasses RuntimeError, and


# ---------------------------------------------------------------- the placement contract


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_member_log_probs_stay_on_the_model_device_and_predictions_come_back_on_the_cpu(
        make_base, device, letter_encoder, cloze_encoder, questions, randomize_B, scoring):
    enc = letter_encoder if scoring is Scoring.LETTER else cloze_encoder
    encoded = enc.encode_all(questions[:5])
    model = make_base()
    assert model_device(model) == device
    layers = attach_members(model, EnsembleConfig(num_members=2, rank=4, alpha=8.0, seed=0))
    randomize_B(layers, std=0.2)
    assert {p.device for p in lora_parameters(model)} == {device}  # the members live where the base does
    s = scorer(scoring, enc.letter_ids)
    batch = collate(encoded, num_choices=5).repeat_members(2)
    assert batch.input_ids.device.type == "cpu"  # collate builds on the CPU; the scorer moves the batch
    with torch.no_grad():
        lp = s.log_probs(model, batch, 2)  # [M, B, C]
    assert lp.device == device and lp.shape == (2, 5, 5)

    preds = predict(model, encoded, [q.id for q in questions[:5]], 2, s, batch_size=2, progress=False)
    assert {t.device.type for t in (preds.member_probs, preds.targets, preds.choice_mask)} == {"cpu"}
    # Other batches (length-sorted, of 2), the same probabilities: [N, M, C] on the CPU.
    torch.testing.assert_close(preds.member_probs, lp.exp().transpose(0, 1).cpu(), atol=ATOL, rtol=0)
    assert base_log_probs(model, encoded, s, progress=False).device.type == "cpu"

    model.train()
    loss = train_step(model, encoded, np.array([[0, 1], [2, 3]]), s, TrainConfig(), 5)
    assert loss.device.type == "cpu" and loss.shape == (2,)
    assert all(p.grad is not None and p.grad.device == device for p in lora_parameters(model))
    # A run folder is the same from every device: exported members are CPU tensors.
    assert {t.device.type for t in member_tensors(model, 1).values()} == {"cpu"}


@with_cuda
def test_a_gpu_scores_as_the_cpu_does(make_base, letter_encoder, questions, randomize_B):
    """The same members on the CPU and on a GPU (float32, TF32 off): the same predictions."""
    gpu = DEVICE if DEVICE.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    encoded = letter_encoder.encode_all(questions)
    ids = [q.id for q in questions]
    probs = []
    for where in (torch.device("cpu"), gpu):
        model = make_base().to(where)
        randomize_B(attach_members(model, EnsembleConfig(num_members=2, rank=4, alpha=8.0, seed=0)), std=0.2)
        assert model_device(model) == where
        s = scorer(Scoring.LETTER, letter_encoder.letter_ids)
        probs.append(predict(model, encoded, ids, 2, s, batch_size=4, progress=False).member_probs)
    torch.testing.assert_close(probs[1], probs[0], atol=ATOL, rtol=0)


@with_cuda
def test_auto_loads_the_base_on_the_gpu_with_the_cuda_attention(tiny_setup):
    model_dir, _ = tiny_setup
    model, _ = load_base_model(ModelConfig(name=str(model_dir), dtype=DType.FLOAT32))
    assert model_device(model).type == "cuda"
    assert attention_implementation(model) == SDPA_PACKED


# ---------------------------------------------------------------- a device that is not there


def _train_args(run: Path, model_dir: Path, mirror: Path, *extra: str) -> list[str]:
    return ["train", "--output_dir", str(run), "--model.name", str(model_dir), "--model.dtype", "float32",
            "--data.dataset", "arc_easy", "--data.data_dir", str(mirror), "--ensemble.num_members", "2",
            "--train.epochs", "1", "--train.batch_size", "4", "--quiet", *extra]


@without_cuda
@pytest.mark.parametrize("value", ["cuda", "cuda:1"])
def test_train_on_cuda_without_a_gpu_says_what_to_pass(tiny_setup, tmp_path, capsys, value):
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    assert main(_train_args(run, model_dir, mirror, "--model.device", value)) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraens train: error:")
    assert f"--model.device {value}" in err and "torch.cuda.is_available() is False" in err
    assert "--model.device cpu" in err and "auto" in err  # what to pass instead
    assert "Traceback" not in err
    assert not run.exists()  # it stopped before loading or writing anything


def test_train_rejects_an_unknown_device_naming_the_flag(tiny_setup, tmp_path, capsys):
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"
    assert main(_train_args(run, model_dir, mirror, "--model.device", "gpu")) == 2
    err = capsys.readouterr().err
    assert "--model.device" in err and "'gpu'" in err and "auto, cpu, cuda or cuda:N" in err
    assert "Traceback" not in err
    assert not run.exists()


@without_cuda
def test_evaluate_on_cuda_without_a_gpu_says_what_to_pass(tiny_setup, tmp_path, capsys):
    model_dir, mirror = tiny_setup
    run = tmp_path / "run"  # a run folder as far as the device check goes: its config.yaml
    run.mkdir()
    RunConfig.from_dict({"model": {"name": str(model_dir), "dtype": "float32"}, "data": {"data_dir": str(mirror)},
                         "ensemble": {"num_members": 2}}).save(run / "config.yaml")
    assert main(["evaluate", str(run), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraens evaluate: error:")
    assert "--device cuda" in err and "torch.cuda.is_available() is False" in err
    assert "--device cpu" in err and "auto" in err  # what to pass instead, with evaluate's own flag
    assert "Traceback" not in err
    assert [p.name for p in run.iterdir()] == ["config.yaml"]  # nothing loaded or written


def test_evaluate_rejects_an_unknown_device_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["evaluate", str(tmp_path), "--device", "gpu"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and "'gpu'" in err and "cuda:N" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("value", "message"), [
    pytest.param("cuda", "torch.cuda.is_available() is False", marks=without_cuda),
    ("gpu", "give cpu (the default), cuda or cuda:N"),
])
def test_a_test_device_that_is_not_there_stops_pytest_at_start(value, message):
    """LORAENS_TEST_DEVICE=cuda on a machine without CUDA (or a value that names no device) is a
    usage error before any test is collected, not a device error inside every test."""
    env = {**os.environ, DEVICE_ENV: value, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           "tests/test_device.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 4, out  # pytest's usage error
    assert f"{DEVICE_ENV}=" in out and message in out
    assert "Traceback" not in out and "collected" not in out

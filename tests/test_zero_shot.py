"""`--train.epochs 0`: the "no fine-tuning" row of a study from the CLI, a complete run whose
members are the base model itself."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraens.cli import main
from loraens.config import DEFAULT_MEMBER_PROMPTS, ConfigError, Normalization, PromptConfig, Scoring, TrainConfig
from loraens.data import load_mcqa
from loraens.predictions import load_predictions
from loraens.prompts import PromptEncoder
from tests.conftest import choice_reference


def test_zero_epochs_scores_the_base_model(tiny_setup, tmp_path, tokenizer):
    model_dir, mirror = tiny_setup
    run = tmp_path / "zero"
    assert main(["train", "--model.name", str(model_dir), "--model.dtype", "float32", "--data.data_dir", str(mirror),
                 "--train.epochs", "0", "--ensemble.num_members", "2", "--output_dir", str(run), "--quiet"]) == 0
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    results = json.loads((run / "results.json").read_text())
    assert results["epochs_trained"] == 0
    for k in range(2):  # B = 0: every member's update is zero, so each member is the base model
        weights = load_file(str(run / "members" / f"member_{k}" / "adapter_model.safetensors"))
        assert all(not w.any() for key, w in weights.items() if "lora_B" in key)
    preds = load_predictions(run, "arc_easy_validation")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Member k reads prompt k of the default member prompts: the base model under that prompt.
    styles = PromptConfig(scoring=Scoring.CHOICE_LIKELIHOOD)
    encs = [PromptEncoder(tokenizer, styles.for_member(DEFAULT_MEMBER_PROMPTS[k])) for k in range(2)]
    questions = load_mcqa("arc_easy", "validation", data_dir=str(mirror))
    assert preds.ids == [q.id for q in questions]
    for i, q in enumerate(questions):
        for k in range(2):
            want = choice_reference(base, encs[k].encode(q), Normalization.MEAN).exp()  # [C], plain HF forwards
            torch.testing.assert_close(preds.member_probs[i, k, : len(q.choices)], want, atol=1e-5, rtol=1e-5)


def test_negative_epochs_are_refused():
    try:
        TrainConfig(epochs=-1)
    except ConfigError as err:
        assert "`--train.epochs` must be at least 0" in str(err)
    else:
        raise AssertionError("epochs -1 was accepted")

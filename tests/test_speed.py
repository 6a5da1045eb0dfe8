"""`--speed.*`: every lever switched off gives the same scores and gradients; the run builder owns
the frozen-prefix cache; the old `prompt.cloze_template` key still reads."""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

import loraens.ensemble as ensemble_mod
import loraens.fast.head as head_mod
from loraens.config import ConfigError, EnsembleConfig, RunConfig, Scoring, SpeedConfig, TrainConfig
from loraens.ensemble import attach_members, lora_parameters, member_layers
from loraens.fast import attention, last_layer
from loraens.run import build_ensemble
from loraens.train import train_step
from tests.conftest import scorer
from tests.test_packing import randomize_B, tiny_model

LEVERS = [f.name for f in dataclasses.fields(SpeedConfig)]
# The code each lever switches on: (module, function); its call count must change with the lever.
PATHS = {
    "fused_update": (ensemble_mod._MemberLoraAdd, "apply"),
    "pack_tokens": (attention, "_packed_attention"),
    "shared_head_positions": (head_mod._TokenLogProb, "apply"),  # with arguments: rows of the head (below)
    "last_layer_trim": (last_layer, "_LastLayerAt"),
    "bf16_train_head": (head_mod, "exact_logits"),  # off: the exact logits in training too
}


def _step(model, encoded, speed: dict, scoring: Scoring, letter_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's per-member losses [M] (on the CPU) and the flattened LoRA gradients (on the
    model's device), fp32."""
    for p in lora_parameters(model):
        p.grad = None
    for layer in member_layers(model).values():
        layer.fused_update = speed.get("fused_update", True)
    chunk = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])  # every member its own questions
    loss = train_step(model, encoded, chunk, scorer(scoring, letter_ids, **speed), TrainConfig(), 5)
    return loss, torch.cat([p.grad.flatten() for p in lora_parameters(model)])


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_each_lever_off_gives_the_same_step(tokenizer, letter_encoder, cloze_encoder, questions, scoring):
    """fp32, so `bf16_train_head` changes nothing either: every lever off equals all on."""
    model = tiny_model(tokenizer)
    layers = attach_members(model, EnsembleConfig(num_members=3, rank=4, alpha=8.0, seed=0,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_B(layers, std=0.2, seed=1)  # non-zero B (drawn on the CPU): members differ, and A gets gradients
    model.train()
    enc = letter_encoder if scoring is Scoring.LETTER else cloze_encoder
    encoded = enc.encode_all(questions[:9])
    want_loss, want_grad = _step(model, encoded, {}, scoring, enc.letter_ids)
    assert want_grad.abs().max() > 1e-3
    for lever in [*LEVERS, "all"]:
        off = {name: False for name in LEVERS} if lever == "all" else {lever: False}
        loss, grad = _step(model, encoded, off, scoring, enc.letter_ids)
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5, msg=f"--speed.{lever} false")
        torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-4, msg=f"--speed.{lever} false")
    # ... and each lever really switches its code path (where it has one in this scoring mode).
    for lever, (owner, name) in PATHS.items():
        if scoring is Scoring.LETTER and lever in ("shared_head_positions", "bf16_train_head"):
            continue  # choice-likelihood's full-vocabulary head only
        calls = []
        for speed in ({}, {lever: False}):
            with mock.patch.object(owner, name, wraps=getattr(owner, name)) as spy:
                _step(model, encoded, speed, scoring, enc.letter_ids)
            calls.append(_head_rows(spy) if lever == "shared_head_positions" else spy.call_count)
        assert calls[0] != calls[1], f"--speed.{lever} false ran the same code as true ({calls})"


def _head_rows(spy) -> int:
    """Rows of the full-vocabulary head over the spied `_TokenLogProb.apply` calls (hidden [U, H])."""
    return sum(call.args[0].shape[0] for call in spy.call_args_list)


def test_levers_default_on_and_reach_the_cli_config():
    config = RunConfig.from_dict({"speed": {"pack_tokens": False}})
    assert config.speed.pack_tokens is False
    assert all(getattr(SpeedConfig(), name) is True for name in LEVERS)
    assert RunConfig.from_dict(config.to_dict()).speed == config.speed  # YAML round trip


def test_the_run_builder_owns_the_prefix_cache(tiny_setup):
    model_dir, _ = tiny_setup
    base = {"model": {"name": str(model_dir), "dtype": "float32"}, "ensemble": {"num_members": 2, "rank": 2}}
    plain = build_ensemble(RunConfig.from_dict(base))
    assert plain.scorer.prefix_cache is None  # LoRA in every layer: nothing below to cache
    top = build_ensemble(RunConfig.from_dict({**base, "ensemble": {"num_members": 2, "rank": 2, "top_layers": 1}}))
    assert top.scorer.prefix_cache is not None and top.scorer.prefix_cache.first_lora_layer == 1
    assert not hasattr(top.model, "loraens_prefix_cache")  # nothing hangs on the HF model
    off = build_ensemble(RunConfig.from_dict({**base, "ensemble": {"num_members": 2, "rank": 2, "top_layers": 1,
                                                                   "prefix_cache": False}}))
    assert off.scorer.prefix_cache is None
    fused = {layer.fused_update for layer in member_layers(off.model).values()}
    assert fused == {True}
    unfused = build_ensemble(RunConfig.from_dict({**base, "speed": {"fused_update": False}}))
    assert {layer.fused_update for layer in member_layers(unfused.model).values()} == {False}


def test_the_old_cloze_template_key_reads_with_a_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"prompt": {"cloze_template": "Q: {question}\nA:"}}))
    with pytest.warns(FutureWarning, match="prompt.cloze_template.*prompt.likelihood_template"):
        config = RunConfig.load(path)
    assert config.prompt.likelihood_template == "Q: {question}\nA:"
    with pytest.raises(ConfigError, match="both"):
        RunConfig.from_dict({"prompt": {"cloze_template": "{question}", "likelihood_template": "{question}"}})

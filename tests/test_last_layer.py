"""loraens.fast.last_layer: the last decoder layer's MLP only where the head reads, against the full layer."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from loraens.config import EnsembleConfig, Scoring
from loraens.ensemble import attach_members
from loraens.fast.last_layer import _LastLayerAt, member_slots, supports_last_layer_at
from loraens.fast.prefix import PrefixCache
from loraens.fast.support import GROUPED_EAGER
from loraens.model import enable_gradient_checkpointing
from tests.conftest import DEVICE, randomize_lora_B
from tests.test_packing import (
    ARCHITECTURES,
    member_batch,
    scores_and_grads,
    tiny_model,
    with_members,
)

MEMBERS = 3


def model_of(tokenizer, arch: str) -> torch.nn.Module:
    if arch != "qwen3":
        return with_members(tiny_model(tokenizer, arch), MEMBERS)
    # Qwen3 normalises q and k per head inside its attention module, which runs unchanged.
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         initializer_range=0.2, attn_implementation=GROUPED_EAGER)
    torch.manual_seed(0)
    return with_members(Qwen3ForCausalLM(config).float().eval().to(DEVICE), MEMBERS)


def full_last_layer():
    """Run the reference: every position through the whole last layer, then pick the head's."""
    return mock.patch("loraens.scoring.supports_last_layer_at", return_value=False)


def test_member_slots_by_hand():
    # Member 0 keeps flat positions 3, 7, 8; member 1 keeps 20, 21; member 2 keeps 22.
    slots = torch.tensor([3, 7, 8, 20, 21, 22])
    member = torch.tensor([0, 0, 0, 1, 1, 2])
    keep, where = member_slots(slots, member, 3)
    # S = 3; a member with fewer positions repeats its first one.
    assert keep.tolist() == [[3, 7, 8], [20, 21, 20], [22, 22, 22]]
    assert where.tolist() == [0, 1, 2, 3, 4, 6]
    assert torch.equal(keep.flatten()[where], slots)


def test_supported_model_types(tokenizer):
    assert supports_last_layer_at(tiny_model(tokenizer, "llama"))
    assert not supports_last_layer_at(torch.nn.Linear(2, 2))  # no config: the full layer


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "qwen3"])
@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
@pytest.mark.parametrize("pack_tokens", [True, False])
def test_scores_and_gradients_equal_the_full_last_layer(tokenizer, letter_encoder, cloze_encoder, questions, arch,
                                                        scoring, pack_tokens):
    """fp32, members holding different questions: the same log-probs and LoRA gradients (the
    LoRA targets include the last layer's down_proj, inside the pruned MLP)."""
    model = model_of(tokenizer, arch)
    encoder = letter_encoder if scoring is Scoring.LETTER else cloze_encoder
    batch = member_batch(encoder.encode_all(questions[:9]), MEMBERS)
    lp, grads = scores_and_grads(model, batch, MEMBERS, scoring, encoder.letter_ids, pack_tokens)
    with full_last_layer():
        ref_lp, ref_grads = scores_and_grads(model, batch, MEMBERS, scoring, encoder.letter_ids, pack_tokens)
    finite = torch.isfinite(ref_lp)
    assert torch.equal(finite, torch.isfinite(lp))
    torch.testing.assert_close(lp[finite], ref_lp[finite], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads, ref_grads, atol=1e-5, rtol=1e-4)
    assert ref_grads.abs().max() > 1e-3  # the gradients are not trivially zero


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_last_mlp_sees_only_the_head_positions(tokenizer, letter_encoder, cloze_encoder, questions, scoring):
    """The last layer's MLP runs on [M, S, H]: S = B answer positions (letter), or the most
    distinct predicting positions any member has (1 + sum of (choice length - 1) per question);
    the layer below runs on the packed rows [M, P, H]."""
    model = model_of(tokenizer, "llama")
    encoder = letter_encoder if scoring is Scoring.LETTER else cloze_encoder
    encoded = encoder.encode_all(questions[:9])
    batch = member_batch(encoded, MEMBERS)
    shapes = {}

    def record(i):
        def hook(module, args, out):
            shapes.setdefault(i, tuple(args[0].shape))
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(record(i))
    scores_and_grads(model, batch, MEMBERS, scoring, encoder.letter_ids, pack_tokens=True)
    per_member = [encoded[3 * k: 3 * k + 3] for k in range(MEMBERS)]
    if scoring is Scoring.LETTER:
        s = 3
    else:
        s = max(sum(1 + sum(len(c) - 1 for c in q.continuations) for q in qs) for qs in per_member)
    p = max(sum(q.num_tokens for q in qs) for qs in per_member)
    assert shapes == {0: (MEMBERS, p, 32), 1: (MEMBERS, s, 32)}
    assert s < p


def test_over_the_prefix_cache_and_with_checkpointing(tokenizer, cloze_encoder, questions):
    """LoRA in the top layer only (the frozen bottom from the prefix cache), and with gradient
    checkpointing, which recomputes the pruned layer in the backward: the full layer's results."""
    encoded = cloze_encoder.encode_all(questions[:9])
    batch = member_batch(encoded, MEMBERS)
    results = {}
    for name in ("cache", "checkpointing"):
        cache = None
        if name == "cache":
            model = tiny_model(tokenizer)
            layers = attach_members(model, EnsembleConfig(num_members=MEMBERS, rank=4, alpha=8.0, seed=0, top_layers=1,
                                                          target_modules=("q_proj", "v_proj", "down_proj")))
            randomize_lora_B(layers)
            cache = PrefixCache(first_lora_layer=1)
        else:
            model = model_of(tokenizer, "llama")
            enable_gradient_checkpointing(model)
        model.train()
        with mock.patch.object(_LastLayerAt, "_run", autospec=True, side_effect=_LastLayerAt._run) as spy:
            got = scores_and_grads(model, batch, MEMBERS, Scoring.CHOICE_LIKELIHOOD, (), True, cache)
        if name == "checkpointing":
            assert spy.call_count == 2  # the pruned layer's forward, and its recomputation in the backward
        else:
            assert spy.call_count == 1
            assert cache.misses == len(encoded)  # each question's bottom ran once, then cached
        with full_last_layer():
            want = scores_and_grads(model, batch, MEMBERS, Scoring.CHOICE_LIKELIHOOD, (), True, cache)
        results[name] = (got, want)
    for (lp, grads), (ref_lp, ref_grads) in results.values():
        finite = torch.isfinite(ref_lp)
        torch.testing.assert_close(lp[finite], ref_lp[finite], atol=1e-5, rtol=0)
        torch.testing.assert_close(grads, ref_grads, atol=1e-5, rtol=1e-4)

"""loraens.fast.packing: the decoder on each member's real tokens end to end, against the padded rows."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from loraens.batching import Batch, collate
from loraens.config import EnsembleConfig, Normalization, Scoring
from loraens.ensemble import attach_members, first_lora_layer, lora_parameters
from loraens.fast import attention
from loraens.fast.compiling import compile_decoder_layers
from loraens.fast.packing import pack, padding_mask, to_packed, to_rows
from loraens.fast.prefix import PrefixCache, prefix_cache_for
from loraens.fast.support import FLEX, GROUPED_EAGER, SDPA_PACKED, can_pack
from tests.conftest import DEVICE, scorer

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(tokenizer, arch: str = "llama", attn: str = GROUPED_EAGER,
               head_dim: int | None = None) -> torch.nn.Module:
    """A 2-layer, 32-wide model of `arch` with seeded weights (drawn on the CPU), on `DEVICE`, in eval mode.

    `head_dim`: None for hidden / heads = 8; FlexAttention's CUDA kernel needs at least 16.
    """
    config_cls, model_cls = ARCHITECTURES[arch]
    extra = {} if head_dim is None else {"head_dim": head_dim}
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        initializer_range=0.2, attn_implementation=attn, **extra)
    torch.manual_seed(0)
    return model_cls(config).float().eval().to(DEVICE)


def randomize_B(layers, std: float = 0.2, seed: int = 1) -> None:
    """Non-zero B (drawn on the CPU, copied to each layer's device): members differ, and A gets gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_((torch.randn(layer.lora_B.shape, generator=gen) * std).to(layer.lora_B.device))


def with_members(model, members: int = 3):
    layers = attach_members(model, EnsembleConfig(num_members=members, rank=4, alpha=8.0, seed=0,
                                                  target_modules=("q_proj", "v_proj", "o_proj", "down_proj")))
    randomize_B(layers)
    return model


def scores_and_grads(model, batch: Batch, members: int, scoring: Scoring, letter_ids, pack_tokens: bool,
                     cache: PrefixCache | None = None):
    """Member log-probs [M, B, C] and the gradient of their sum w.r.t. every LoRA parameter, flattened."""
    lp = scorer(scoring, letter_ids, Normalization.SUM, cache, pack_tokens=pack_tokens).log_probs(model, batch, members)
    grads = torch.autograd.grad(lp[torch.isfinite(lp)].sum(), lora_parameters(model))
    return lp.detach(), torch.cat([g.flatten() for g in grads])


def member_batch(encoded, members: int) -> Batch:
    """Each member its own questions (as with per-member data order): members' totals differ."""
    per = len(encoded) // members
    return collate(encoded[: per * members], num_choices=5)


# ---------------------------------------------------------------- the layout, by hand


def _batch(lengths: list[int], t: int) -> Batch:
    r = len(lengths)
    ids = torch.zeros(r, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 10 * i  # row i: 10i+1, 10i+2, ...
    pos = torch.arange(t).repeat(r, 1)
    zeros = torch.zeros(r, dtype=torch.long)
    return Batch(ids, pos, None, zeros, None, None, None, torch.ones(r, 2, dtype=torch.bool), zeros,
                 torch.tensor(lengths))


def test_pack_layout_by_hand():
    # M = 2 members, B = 2 rows each, T = 3: member 0 has rows of 2 and 3 tokens (5), member 1 of 1 and 1 (2).
    batch = _batch([2, 3, 1, 1], 3)
    ids, pos, packing = pack(batch, 2)
    assert ids.tolist() == [[1, 2, 11, 12, 13], [21, 31, 0, 0, 0]]  # P = 5, the longer member
    assert pos.tolist() == [[0, 1, 0, 1, 2], [0, 0, 0, 0, 0]]
    # Padded slot r*3 + t -> packed slot k*5 + j; padding -> 10 (the zero row).
    assert packing.row_src.tolist() == [0, 1, 10, 2, 3, 4, 5, 10, 10, 6, 10, 10]
    # Packed slot -> padded slot; the three packed padding slots of member 1 -> 12 (the zero row).
    assert packing.packed_src.tolist() == [0, 1, 3, 4, 5, 6, 9, 12, 12, 12]


def test_relayout_moves_real_tokens_and_zeroes_padding():
    batch = _batch([2, 3, 1, 1], 3)
    _, _, packing = pack(batch, 2)
    padded = torch.arange(12.0)[:, None] * torch.tensor([[1.0, -1.0]])  # [R*T, 2]
    packed = to_packed(padded, packing)
    assert packed[:, 0].tolist() == [0, 1, 3, 4, 5, 6, 9, 0, 0, 0]
    back = to_rows(packed, packing)
    real = batch.input_ids.flatten() != 0
    assert torch.equal(back[real], padded[real])
    assert not back[~real].any()


def test_relayout_gradients_are_the_opposite_gather():
    _, _, packing = pack(_batch([2, 3, 1, 1], 3), 2)
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: to_rows(v, packing), (x,))
    y = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: to_packed(v, packing), (y,))


def test_letter_padding_mask_by_hand():
    mask = padding_mask(_batch([2, 3], 3))[:, 0].int()
    assert mask[0].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # the padding query: the real keys and itself
    assert mask[1].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


# ---------------------------------------------------------------- the model, packed against padded


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_packed_forward_and_gradients_equal_padded(tokenizer, letter_encoder, cloze_encoder, questions, arch,
                                                   scoring):
    model = with_members(tiny_model(tokenizer, arch)).train()
    assert can_pack(model)
    enc = (letter_encoder if scoring is Scoring.LETTER else cloze_encoder).encode_all(questions)
    letter_ids = letter_encoder.letter_ids
    batch = member_batch(enc, 3)
    with mock.patch.object(attention, "_packed_attention", wraps=attention._packed_attention) as spy:
        lp_packed, g_packed = scores_and_grads(model, batch, 3, scoring, letter_ids, pack_tokens=True)
    assert spy.call_count == model.config.num_hidden_layers  # the packed path ran, once per layer
    lp_padded, g_padded = scores_and_grads(model, batch, 3, scoring, letter_ids, pack_tokens=False)
    finite = torch.isfinite(lp_padded)
    assert torch.equal(finite, torch.isfinite(lp_packed))
    torch.testing.assert_close(lp_packed[finite], lp_padded[finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_packed, g_padded, atol=1e-5, rtol=1e-4)
    assert g_packed.abs().max() > 0.1  # informative gradients


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_packed_scores_equal_a_plain_forward_per_question(tokenizer, letter_encoder, cloze_encoder, questions,
                                                          reference, scoring):
    model = tiny_model(tokenizer)
    with_members(model, 1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.zero_()  # the base model alone, so the plain HF forward is the reference
    enc = (letter_encoder if scoring is Scoring.LETTER else cloze_encoder).encode_all(questions)
    lp = scorer(scoring, letter_encoder.letter_ids, Normalization.MEAN).log_probs(model, collate(enc), 1)[0]
    for i, q in enumerate(enc):
        want = reference(model, q, scoring, letter_encoder.letter_ids, Normalization.MEAN)
        torch.testing.assert_close(lp[i, : q.num_choices], want, atol=1e-5, rtol=1e-5)


def test_bf16_packed_matches_padded_within_rounding(tokenizer, cloze_encoder, questions):
    model = with_members(tiny_model(tokenizer)).to(torch.bfloat16)
    for p in lora_parameters(model):
        p.data = p.data.float()  # LoRA weights stay float32, as load_base_model + attach_members keep them
    batch = member_batch(cloze_encoder.encode_all(questions), 3)
    with torch.no_grad():
        packed = scorer(Scoring.CHOICE_LIKELIHOOD, pack_tokens=True).log_probs(model, batch, 3)
        padded = scorer(Scoring.CHOICE_LIKELIHOOD, pack_tokens=False).log_probs(model, batch, 3)
    finite = torch.isfinite(padded)
    torch.testing.assert_close(packed[finite], padded[finite], atol=0.05, rtol=0.0)


def test_other_attention_implementations_run_padded(tokenizer, letter_encoder, questions):
    model = tiny_model(tokenizer, attn="sdpa")
    attach_members(model, EnsembleConfig(num_members=2, rank=4, seed=0))
    assert not can_pack(model)
    batch = collate(letter_encoder.encode_all(questions[:4]))
    with mock.patch.object(attention, "_packed_attention", side_effect=AssertionError("packed")):
        scorer(Scoring.LETTER, letter_encoder.letter_ids).log_probs(model, batch, 2)


@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_packed_top_layers_over_the_prefix_cache_equal_padded(tokenizer, letter_encoder, cloze_encoder, questions,
                                                              scoring):
    model = tiny_model(tokenizer)
    layers = attach_members(model, EnsembleConfig(num_members=3, rank=4, alpha=8.0, seed=0, top_layers=1))
    assert all(".1." in name for name in layers)  # LoRA in the top layer only: the cache holds layer 0's output
    randomize_B(layers)
    model.train()
    cache = prefix_cache_for(model, first_lora_layer(model))
    enc = (letter_encoder if scoring is Scoring.LETTER else cloze_encoder).encode_all(questions)
    batch = member_batch(enc, 3)
    with mock.patch.object(attention, "_packed_attention", wraps=attention._packed_attention) as spy:
        runs = [(pack_tokens, scores_and_grads(model, batch, 3, scoring, letter_encoder.letter_ids, pack_tokens,
                                               cache))
                for pack_tokens in (True, False, True)]  # packed from a cold cache, padded, packed from a warm one
    assert spy.call_count == 2  # the top layer of each packed run (the bottom fills the cache padded)
    assert cache.hits > 0
    lp_padded, g_padded = runs[1][1]
    finite = torch.isfinite(lp_padded)
    for _, (lp, g) in runs[::2]:
        torch.testing.assert_close(lp[finite], lp_padded[finite], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, g_padded, atol=1e-5, rtol=1e-4)


def test_compiled_packed_layers_match_eager(tokenizer, cloze_encoder, questions):
    eager = with_members(tiny_model(tokenizer)).train()
    compiled = with_members(tiny_model(tokenizer)).train()
    compile_decoder_layers(compiled)
    enc = cloze_encoder.encode_all(questions)
    for qs in (enc[:6], enc[3:12]):  # two packed lengths: the dynamic graph serves both
        batch = collate(qs, num_choices=5)
        lp_e, g_e = scores_and_grads(eager, batch, 3, Scoring.CHOICE_LIKELIHOOD, (), pack_tokens=True)
        lp_c, g_c = scores_and_grads(compiled, batch, 3, Scoring.CHOICE_LIKELIHOOD, (), pack_tokens=True)
        finite = torch.isfinite(lp_e)
        torch.testing.assert_close(lp_c[finite], lp_e[finite], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g_c, g_e, atol=1e-4, rtol=1e-3)


def test_packed_gradients_with_checkpointing_and_member_chunks_equal_padded(tokenizer, letter_encoder, questions):
    """The packing travels through checkpointed layers (recomputed in the backward) and member chunks."""
    from loraens.ensemble import active_members
    from loraens.model import enable_gradient_checkpointing

    enc = letter_encoder.encode_all(questions)
    batch = member_batch(enc, 3)
    plain = with_members(tiny_model(tokenizer)).train()
    _, want = scores_and_grads(plain, batch, 3, Scoring.LETTER, letter_encoder.letter_ids, pack_tokens=False)
    lean = with_members(tiny_model(tokenizer)).train()
    enable_gradient_checkpointing(lean)
    rows = batch.num_rows // 3
    grads = []
    for k in range(3):  # one member at a time, as --train.member_chunk 1 does
        sub = collate(enc[k * rows:(k + 1) * rows], num_choices=5)
        with active_members(lean, k, k + 1), \
                mock.patch.object(attention, "_packed_attention", wraps=attention._packed_attention) as spy:
            grads.append(scores_and_grads(lean, sub, 1, Scoring.LETTER, letter_encoder.letter_ids, pack_tokens=True)[1])
        assert spy.call_count >= lean.config.num_hidden_layers  # packed, and recomputed in the backward
    # Each chunk's gradient is zero outside its member's slice, so their sum is the whole gradient.
    torch.testing.assert_close(sum(grads), want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the GPU attention implementations


@pytest.mark.parametrize("attn", [SDPA_PACKED, FLEX])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scoring", [Scoring.LETTER, Scoring.CHOICE_LIKELIHOOD])
def test_sdpa_and_flex_packed_equal_grouped_eager_padded(tokenizer, letter_encoder, cloze_encoder, questions, attn,
                                                         arch, scoring):
    """The CUDA implementations (on the CPU: SDPA's math kernel, FlexAttention eagerly; on CUDA
    (LORAENS_TEST_DEVICE=cuda): SDPA's fused kernels, FlexAttention compiled by Inductor) give the
    scores and LoRA gradients of the padded grouped-eager forward. FlexAttention has no backward
    on the CPU: there only its scores are compared (its gradients in the CUDA run). Its CUDA
    kernel needs heads of at least 16 dimensions (Triton's tl.dot), so the FlexAttention case
    uses head_dim 16 for both models, on every device."""
    enc = (letter_encoder if scoring is Scoring.LETTER else cloze_encoder).encode_all(questions)
    batch = member_batch(enc, 3)
    head_dim = 16 if attn == FLEX else None
    ref = with_members(tiny_model(tokenizer, arch, head_dim=head_dim)).train()
    lp_ref, g_ref = scores_and_grads(ref, batch, 3, scoring, letter_encoder.letter_ids, pack_tokens=False)
    model = with_members(tiny_model(tokenizer, arch, attn=attn, head_dim=head_dim)).train()
    assert can_pack(model)
    assert model.model.layers[0].self_attn.head_dim == (head_dim or 8)  # the config's head_dim took effect
    spied = "_flex" if attn == FLEX else "sdpa_attention"
    backward = attn != FLEX or next(model.parameters()).device.type == "cuda"
    with mock.patch.object(attention, spied, wraps=getattr(attention, spied)) as spy:
        if backward:
            lp, g = scores_and_grads(model, batch, 3, scoring, letter_encoder.letter_ids, pack_tokens=True)
        else:
            with torch.no_grad():
                lp = scorer(scoring, letter_encoder.letter_ids, Normalization.SUM).log_probs(model, batch, 3)
    assert spy.call_count >= model.config.num_hidden_layers  # that implementation ran in every layer
    finite = torch.isfinite(lp_ref)
    assert torch.equal(finite, torch.isfinite(lp))
    torch.testing.assert_close(lp[finite], lp_ref[finite], atol=1e-5, rtol=1e-5)
    if backward:  # another kernel (blockwise online softmax): float32 rounding of ~1e-4 of the largest gradient
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3)


def test_flex_block_mask_is_the_batch_mask(tokenizer, cloze_encoder, letter_encoder, questions):
    """Dense view of the block mask, moved to the padded rows, equals `padding_mask` on real tokens."""
    for enc in (cloze_encoder, letter_encoder):
        batch = member_batch(enc.encode_all(questions[:6]), 2)
        _, _, packing = pack(batch, 2)
        block = attention.flex_block_mask(batch, packing, 2)
        m, p = 2, packing.packed_src.numel() // 2
        dense = block.to_dense() if hasattr(block, "to_dense") else None
        assert dense is not None
        # Token-level mask from the mask_mod itself, [M, P, P].
        q = torch.arange(p)[:, None].expand(p, p)
        kv = torch.arange(p)[None].expand(p, p)
        token = torch.stack([block.mask_mod(torch.tensor(b), torch.tensor(0), q, kv) for b in range(m)])
        r, t = batch.input_ids.shape
        want = padding_mask(batch)[:, 0]  # [R, T, T]
        src = packing.packed_src.view(m, p)
        for b in range(m):
            real = src[b] < r * t
            rows, cols = src[b][real] // t, src[b][real] % t
            sub = token[b][real][:, real]  # [n, n] between this packed row's real tokens
            same = rows[:, None] == rows[None, :]
            assert torch.equal(sub & same, want[rows[:, None], cols[:, None], cols[None, :]] & same)
            assert not (sub & ~same).any()  # never across questions

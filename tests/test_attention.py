"""loraens.fast.attention: grouped-query eager attention against transformers' eager attention."""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from loraens.fast.attention import GROUPED_EAGER, grouped_eager_attention
from tests.conftest import DEVICE


def _tiny_llama(attn: str, kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).float().to(DEVICE)


def _tiny_gemma3(attn: str) -> Gemma3ForCausalLM:
    """Another architecture: q/k norms, a sliding-window layer and a full-attention layer."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
                              attn_implementation=attn)
    return Gemma3ForCausalLM(config).float().to(DEVICE)


def _padded_block_mask(rows: int, length: int) -> torch.Tensor:
    """An additive float mask [rows, 1, T, T]: causal, left padding of a different width per row,
    and in the last row two blocks that do not see each other (as packed choices)."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril().repeat(rows, 1, 1)
    for r in range(rows):
        allowed[r, :, :r] = False  # r padding tokens on the left
        allowed[r, torch.arange(r), torch.arange(r)] = True  # padding rows attend to themselves
    allowed[-1, length - 2:, length - 4:length - 2] = False
    return torch.zeros(rows, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # multi-query, grouped, and plain multi-head attention
def test_model_outputs_and_gradients_match_eager(kv_heads):
    ref_model, model = _tiny_llama("eager", kv_heads), _tiny_llama(GROUPED_EAGER, kv_heads)
    model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = _padded_block_mask(3, 9).to(DEVICE)
    outs = []
    for m in (ref_model, model):
        logits = m(input_ids=ids, attention_mask=mask).logits
        logits.pow(2).mean().backward()
        outs.append((logits.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for got, want in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [lambda attn: _tiny_llama(attn, 2), _tiny_gemma3], ids=["llama", "gemma3"])
def test_model_without_mask_matches_eager(make):
    """With no mask given, transformers builds eager's masks for this implementation too (causal,
    and sliding-window for Gemma 3's local layer), so the logits are eager's."""
    ref_model, model = make("eager"), make(GROUPED_EAGER)
    model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_by_hand_one_group_and_per_head_boolean_mask():
    """Two query heads on one key/value head, checked against softmax(q k^T / sqrt(d)) v written
    out per head, with a per-head boolean mask (head 1 may not see position 0)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    allowed = torch.ones(1, 2, 3, 3, dtype=torch.bool).tril()
    allowed[0, 1, 1:, 0] = False
    out, probs = grouped_eager_attention(torch.nn.Module(), q, k, v, allowed, scaling=0.5)
    for h in range(2):
        scores = (q[0, h] @ k[0, 0].T * 0.5).masked_fill(~allowed[0, h], float("-inf"))
        torch.testing.assert_close(probs[0, h], scores.softmax(-1))
        torch.testing.assert_close(out[0, :, h], scores.softmax(-1) @ v[0, 0])
    assert probs[0, 1, 2, 0] == 0 and probs[0, 0, 2, 0] > 0


def test_softcapping_is_refused_with_advice():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="attn_implementation eager"):
        grouped_eager_attention(torch.nn.Module(), q, q[:, :1], q[:, :1], None, softcap=30.0)

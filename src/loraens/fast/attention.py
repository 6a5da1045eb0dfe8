"""loraens' attention implementations: grouped eager (CPU), fused SDPA and FlexAttention (CUDA).

All three attend over the member rows of a batch, padded [R, T] or packed [M, P]
(`loraens.fast.packing`), with the batch's own mask: causal for letter rows, the choice-likelihood
block mask otherwise. Which one `--model.attn_implementation auto` picks per device, and why:
docs/design.md.

Grouped eager: transformers' "eager" attention copies each key/value head once per query head of its group
(`repeat_kv`) before two batched matmuls, and its backward sums those copies back. SmolLM2-135M
has 9 query heads on 3 key/value heads, so that is three copies of K and V per layer in the
forward pass and a reduction over them in the backward. Here the g query heads of a group are
stacked along the query axis instead: the scores of a group are one [g*T, d] x [d, T] product
against its own K, with no copies. The arithmetic per score is the same as "eager" (softmax in
float32, as there); only the GEMM blocking differs.

Registered with transformers under `GROUPED_EAGER` (the CPU default of
`--model.attn_implementation`) with eager's additive float masks. K and V are kept for the
backward once per key/value head instead of once per query head. A small lever; measured:
BENCHMARKS.md section (i) (`bench/bench_levers.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from ..batching import Batch
from .packing import KWARG, Packing, to_packed, to_rows
from .support import FLEX, GROUPED_EAGER, SDPA_PACKED


def grouped_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query [B, H, T, d] over key/value [B, Hkv, S, d], H a multiple of Hkv.

    attention_mask: additive float [B, 1 or H, T, >= S] (or boolean, True = attend), or None.
    Returns (output [B, T, H, d], attention probabilities [B, H, T, S]), like transformers' eager.
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"attn_implementation {GROUPED_EAGER!r} supports neither logit soft-capping nor "
                         "attention sinks, which this model uses; load it with --model.attn_implementation eager.")
    packing = kwargs.get(KWARG)
    if packing is not None:  # packed rows [M, H, P, d]: attend in the padded rows of the mask
        return _packed_attention(module, query, key, value, attention_mask, packing, scaling, dropout)
    b, h, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads cannot be grouped on {hkv} key/value heads.")
    g = h // hkv
    if scaling is None:
        scaling = d ** -0.5
    # Query head j of group k is head k*g + j, as in repeat_kv: its rows follow the group's.
    scores = torch.matmul(query.reshape(b, hkv, g * t, d), key.transpose(2, 3))  # [B, Hkv, g*T, S]
    # In place: the matmul's backward does not need its output, so this saves a full pass each.
    scores.mul_(scaling)
    if attention_mask is not None:
        mask = attention_mask[..., :s]
        # [B or 1, H, T, S] -> [B or 1, Hkv, g, T, S]; [B or 1, 1, T, S] -> [B or 1, 1, 1, T, S].
        grouped = mask.unflatten(1, (hkv, g)) if mask.shape[1] == h else mask[:, :, None]
        if mask.dtype == torch.bool:
            scores.view(b, hkv, g, t, s).masked_fill_(~grouped, torch.finfo(scores.dtype).min)
        else:
            scores.view(b, hkv, g, t, s).add_(grouped)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0 and module.training:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value)  # [B, Hkv, g*T, d]
    return out.view(b, h, t, d).transpose(1, 2).contiguous(), probs.view(b, h, t, s)


def _packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor, packing: Packing, scaling: float | None,
                      dropout: float, core=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of packed rows (`loraens.fast.packing`): query [M, H, P, d], key/value [M, Hkv, P, d].

    attention_mask: the padded rows' [R, 1, T, T] mask. q, k and v move to the padded layout
    [R, H, T, d], attend there with `core` (default: grouped eager), and the output moves back.
    Returns ([M, P, H, d], the core's attention probabilities or None).
    """
    m, h, p, d = query.shape
    r, t = attention_mask.shape[0], attention_mask.shape[-1]

    def rows(x: torch.Tensor) -> torch.Tensor:  # [M, heads, P, d] -> [R, heads, T, d]
        heads = x.shape[1]
        flat = x.transpose(1, 2).reshape(m * p, heads * d)
        return to_rows(flat, packing).view(r, t, heads, d).transpose(1, 2)

    core = core or grouped_eager_attention
    out, probs = core(module, rows(query), rows(key), rows(value), attention_mask, scaling, dropout)  # [R, T, H, d]
    return to_packed(out.reshape(r * t, h * d), packing).view(m, p, h, d), probs


def sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """torch's fused `scaled_dot_product_attention` with the batch's mask, padded or packed rows.

    query [B, H, T, d], key/value [B, Hkv, S, d]; attention_mask additive float or boolean
    [B, 1, T, >= S], or None (causal). Packed rows move to the padded layout and back, as in
    grouped eager. Key/value heads are repeated for grouped-query models: the memory-efficient
    kernel, the one that takes an arbitrary mask, has no grouped-query mode. Returns
    (output [B, T, H, d], None).
    """
    packing = kwargs.get(KWARG)
    if packing is not None:
        return _packed_attention(module, query, key, value, attention_mask, packing, scaling, dropout,
                                 core=sdpa_attention)
    h, hkv, s = query.shape[1], key.shape[1], key.shape[2]
    if h != hkv:
        if h % hkv:
            raise ValueError(f"{h} query heads cannot be grouped on {hkv} key/value heads.")
        key, value = key.repeat_interleave(h // hkv, dim=1), value.repeat_interleave(h // hkv, dim=1)
    mask = None if attention_mask is None else attention_mask[..., :s]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
        is_causal=mask is None and query.shape[2] == s)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------- FlexAttention


def flex_block_mask(batch: Batch, packing: Packing, num_members: int):
    """FlexAttention's `BlockMask` over the packed rows [M, P] of `batch` (`loraens.fast.packing`).

    Each packed token carries its question (`doc`, its padded row) and its segment (-1 prompt, k
    choice k, -2 padding; `Batch.segments`). A query sees a key of the same question at or
    before it in the row, in its own segment or the prompt: exactly the batch's own mask, with
    no relayout of q, k and v and no work on blocks that mask out. Padding sees padding (never
    read, but a query needs a key).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    assert batch.segments is not None, "FlexAttention needs the batch's segments"
    t = batch.input_ids.shape[1]
    m = num_members
    p = packing.packed_src.numel() // m
    src = packing.packed_src.to(batch.segments.device)
    doc = (src // t).view(m, p)  # padding: R, a question of its own
    seg = torch.cat([batch.segments.flatten(), batch.segments.new_full((1,), -2)])[src].view(m, p)

    def mask_mod(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (kv <= q) & ((seg[b, kv] == seg[b, q]) | (seg[b, kv] == -1))

    return create_block_mask(mask_mod, m, None, p, p, device=doc.device)


_compiled_flex = None


def _flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask, scale: float | None,
          enable_gqa: bool) -> torch.Tensor:
    """FlexAttention, compiled on CUDA (its fast kernel is generated by Inductor); eager elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if query.device.type != "cuda":
        if torch.is_grad_enabled() and query.requires_grad:
            raise ValueError(f"attn_implementation {FLEX!r} trains on CUDA only (FlexAttention has no backward on "
                             f"{query.device.type}); use {GROUPED_EAGER!r} or {SDPA_PACKED!r} there.")
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        # dynamic: packed lengths vary from batch to batch; one kernel serves them.
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def flex_packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """FlexAttention over packed rows: query [M, H, P, d], key/value [M, Hkv, P, d] -> ([M, P, H, d], None).

    The packing carries the block mask (`flex_block_mask`). Padded rows (a model that cannot
    pack, or the prefix cache's bottom layers) attend with SDPA and the dense mask instead.
    """
    packing = kwargs.get(KWARG)
    if packing is None or packing.block_mask is None:
        return sdpa_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if dropout > 0.0 and module.training:
        raise ValueError(f"attn_implementation {FLEX!r} has no attention dropout; load the model with "
                         "--model.attn_implementation loraens_sdpa.")
    out = _flex(query, key, value, packing.block_mask, scaling, query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make loraens' attention implementations valid `attn_implementation`s for every transformers model."""
    for name, function, mask in ((GROUPED_EAGER, grouped_eager_attention, eager_mask),
                                 (SDPA_PACKED, sdpa_attention, sdpa_mask),
                                 (FLEX, flex_packed_attention, sdpa_mask)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, mask)


register_attention()

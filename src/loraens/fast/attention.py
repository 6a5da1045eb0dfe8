"""Eager attention for grouped-query models without repeating the keys and values.

transformers' "eager" attention copies each key/value head once per query head of its group
(`repeat_kv`) before two batched matmuls, and its backward sums those copies back. SmolLM2-135M
has 9 query heads on 3 key/value heads, so that is three copies of K and V per layer in the
forward pass and a reduction over them in the backward. Here the g query heads of a group are
stacked along the query axis instead: the scores of a group are one [g*T, d] x [d, T] product
against its own K, with no copies. The arithmetic per score is the same as "eager" (softmax in
float32, as there); only the GEMM blocking differs.

Registered with transformers under `GROUPED_EAGER` (the CPU default of
`--model.attn_implementation`) with eager's additive float masks. K and V are kept for the
backward once per key/value head instead of once per query head. A small lever; measured:
BENCHMARKS.md, the levers section (`bench/bench_levers.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .packing import KWARG, Packing, to_packed, to_rows
from .support import GROUPED_EAGER


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
                      dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed rows (`loraens.packing`): query [M, H, P, d], key/value [M, Hkv, P, d].

    attention_mask: the padded rows' [R, 1, T, T] mask. q, k and v move to the padded layout
    [R, H, T, d], attend there, and the output moves back. Returns ([M, P, H, d], [R, H, T, T]).
    """
    m, h, p, d = query.shape
    r, t = attention_mask.shape[0], attention_mask.shape[-1]

    def rows(x: torch.Tensor) -> torch.Tensor:  # [M, heads, P, d] -> [R, heads, T, d]
        heads = x.shape[1]
        flat = x.transpose(1, 2).reshape(m * p, heads * d)
        return to_rows(flat, packing).view(r, t, heads, d).transpose(1, 2)

    out, probs = grouped_eager_attention(module, rows(query), rows(key), rows(value), attention_mask,
                                         scaling, dropout)  # [R, T, H, d]
    return to_packed(out.view(r * t, h * d), packing).view(m, p, h, d), probs


def register_grouped_eager() -> None:
    """Make `GROUPED_EAGER` a valid `attn_implementation` for every transformers model."""
    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    AttentionMaskInterface.register(GROUPED_EAGER, eager_mask)


register_grouped_eager()

"""The last decoder layer's MLP runs only at the positions the output head reads.

The head reads few positions: one per question for letter scoring (the answer position), and
for choice-likelihood the positions that predict a choice token (about a third of an ARC-Easy
question's tokens; docs/design.md). In every layer but the last, each position feeds later positions
through attention, so all of them are needed. The last layer's output feeds only the head: at
any other position, its residual add, norm and MLP are thrown away. `last_layer_at` runs them
only at the kept positions.

The attention half of the layer still runs on every position, through the model's own attention
module: the keys and values of all positions are needed, and leaving the module as it is keeps
its rotary embeddings, q/k norms (Qwen3) and attention implementation (packed or padded)
unchanged. The MLP holds most of a layer's weights, so most of the last layer's linear work is
skipped: a small share of a full-depth step, a larger one of a step with LoRA only in the top K
layers (the frozen-prefix cache), where the last layer is one of K. Measured: BENCHMARKS.md
section (i) (`bench/bench_levers.py --top-layers 8`).

The result at a kept position is the full layer's: the same operations on the same values
(up to bf16 GEMM blocking, as everywhere). Supported: decoder layers with Llama's residual
layout (`loraens.fast.support.has_llama_layout`); others run the full layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .support import has_llama_layout


class _LastLayerAt(nn.Module):
    """A Llama-style decoder layer whose output is kept at `keep` [M, S] only: [M, S, H].

    `keep` holds flat indices into the layer input's first two axes (`hidden.flatten(0, 1)`),
    row k of `keep` for member k, so the MLP's `MemberLoraLinear` layers see member k's kept
    positions in row k.
    """

    def __init__(self, layer: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.keep = keep

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        layer = self.layer
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            # As the layer itself would (`GradientCheckpointingLayer`): recompute it in the backward.
            return layer._gradient_checkpointing_func(partial(self._run, **kwargs), hidden_states)
        return self._run(hidden_states, **kwargs)

    def _run(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        layer = self.layer
        # The layer's own attention block, on every position: [N, T, H] (or packed [M, P, H]).
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        width = hidden_states.shape[-1]
        # The residual add, then norm and MLP, at the kept positions only: [M, S, H].
        hidden = hidden_states.reshape(-1, width)[self.keep] + attn.reshape(-1, width)[self.keep]
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def supports_last_layer_at(model: nn.Module) -> bool:
    """Whether `model`'s decoder layers have the layout `last_layer_at` relies on."""
    return has_llama_layout(model)


@contextmanager
def last_layer_at(decoder: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Inside the block, `decoder`'s last layer keeps only the positions `keep` [M, S].

    The decoder's output (after its final norm) is then [M, S, H]: row k holds member k's kept
    positions, in `keep`'s order. The decoder's own `.layers` are put back on exit.
    """
    layers = decoder.layers
    decoder.layers = nn.ModuleList([*list(layers)[:-1], _LastLayerAt(layers[-1], keep)])
    try:
        yield
    finally:
        decoder.layers = layers


def member_slots(slots: torch.Tensor, member: torch.Tensor, num_members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out kept positions by member: (`keep` [M, S], `where` [N]).

    slots [N]: flat positions (into the decoder input's first two axes) the head reads, grouped
    by member (member k's before member k + 1's), at least one per member; member [N]: whose
    each one is. S is the most any member keeps; a member with fewer repeats its first position
    (computed twice, read once). `where[i]` is slot i's row in the [M*S, H] output.
    """
    counts = torch.bincount(member, minlength=num_members)  # [M]
    assert len(counts) == num_members and bool((counts > 0).all()), "every member keeps a position"
    start = counts.cumsum(0) - counts  # [M]: index of each member's first slot
    j = torch.arange(len(slots), device=slots.device) - start[member]  # [N]: rank within its member
    s = int(counts.max())
    keep = slots[start][:, None].expand(num_members, s).clone()  # [M, S]
    keep[member, j] = slots
    return keep, member * s + j

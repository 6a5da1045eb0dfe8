"""Frozen-prefix cache: run the frozen layers below the lowest LoRA layer once per question.

With LoRA only in the top K layers (`--ensemble.top_layers K`), the hidden states that leave the
frozen bottom layers do not depend on the members, on the epoch, or on dropout: they depend on
the question's tokens only. `PrefixCache` keeps them per question (keyed by the row's tokens), so

- in evaluation the bottom runs once per question instead of once per member (M x fewer), and
- in training it runs once per question for the whole run instead of every epoch for every
  member; only the top K layers run forward and backward.

Padding never reaches a question's real tokens (causal or block mask), so a cached value does not
depend on which batch first needed it; in bfloat16 the result can still differ from a full-depth
pass by rounding (matmul blocking depends on the batch shape), which `tests/test_prefix.py` bounds.

Supported: decoder bodies whose forward takes `inputs_embeds` and loops over `.layers` then
`.norm` without rescaling the embeddings (`loraens.fast.support`: Llama, Mistral, Qwen2/3).
Other architectures fall back to the full-depth forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .packing import KWARG as PACKING_KWARG
from .packing import Packing, to_packed
from .support import SUPPORTED_MODEL_TYPES, has_llama_layout, model_type

DEFAULT_MAX_BYTES = 2 * 1024**3  # stop adding entries beyond this (7B models on big eval sets)


class PrefixCache:
    """Hidden states entering layer `first_lora_layer`, per question row: row tokens -> [n_tokens, H].

    Built by the run builder (`loraens.run.build_ensemble`, through `prefix_cache_for`) and held by
    the `Scorer` that runs the member forward; nothing is attached to the model.
    """

    def __init__(self, first_lora_layer: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.first_lora_layer = first_lora_layer  # index of the lowest decoder layer with LoRA members
        self.max_bytes = max_bytes
        self.store: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.store.clear()
        self.bytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.store)


def prefix_cache_for(model: nn.Module, first_lora_layer: int,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> PrefixCache | None:
    """A `PrefixCache` for `model` if its architecture supports it and layers lie below the LoRA ones.

    None when `first_lora_layer` is 0 (no frozen layers below) or the model lacks the Llama
    layout (with a warning: the full-depth forward runs instead, same results, slower).
    """
    if first_lora_layer <= 0:
        return None
    if not has_llama_layout(model):
        warnings.warn(f"The frozen-prefix cache supports {SUPPORTED_MODEL_TYPES}, not {model_type(model)!r}; "
                      "training and evaluation run the full depth instead (same results, slower).", stacklevel=2)
        return None
    return PrefixCache(first_lora_layer, max_bytes)


@contextmanager
def _layers(decoder: nn.Module, lo: int, hi: int | None, final_norm: bool) -> Iterator[None]:
    """Inside the block `decoder` runs only layers[lo:hi], with or without its final norm."""
    full, norm = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(list(full)[lo:hi])
    if not final_norm:
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = full, norm


def cached_hidden(decoder: nn.Module, cache: PrefixCache, input_ids: torch.Tensor, mask: torch.Tensor | None,
                  position_ids: torch.Tensor, lengths: torch.Tensor,
                  packed: tuple[torch.Tensor, Packing] | None = None) -> torch.Tensor:
    """Last hidden state [R, T, H] of the decoder, with the frozen bottom read from `cache`.

    input_ids / position_ids [R, T]; mask: additive float [R, 1, T, T] or None (causal);
    lengths [R]: real tokens per row. Rows missing from the cache are computed (without
    gradient) in one batch of the distinct questions, and stored.

    packed: (packed position ids [M, P], `Packing`) from `loraens.packing.pack`: the top layers
    then run on the members' packed rows, and the result is [M, P, H].
    """
    r, t = input_ids.shape
    n = lengths.tolist()
    # The key is the row's tokens AND positions: the positions fix how the choices are packed, and
    # so (with the tokens) the attention mask too.
    ids, pos = input_ids.cpu().numpy(), position_ids.cpu().numpy()
    keys = [ids[i, : n[i]].tobytes() + pos[i, : n[i]].tobytes() for i in range(r)]
    first: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        if key not in cache.store and key not in first:
            first[key] = i
    cache.hits += r - len(first)
    cache.misses += len(first)
    fresh: dict[bytes, torch.Tensor] = {}
    if first:
        rows = torch.tensor(list(first.values()), device=input_ids.device)
        width = int(lengths[rows].max())
        sub_mask = None if mask is None else mask[rows][..., :width, :width]
        with torch.no_grad(), _layers(decoder, 0, cache.first_lora_layer, final_norm=False):
            bottom = decoder(input_ids=input_ids[rows, :width], attention_mask=sub_mask,
                             position_ids=position_ids[rows, :width], use_cache=False).last_hidden_state
        for j, (key, i) in enumerate(first.items()):
            h = bottom[j, : n[i]].clone()
            fresh[key] = h
            if cache.bytes + h.numel() * h.element_size() <= cache.max_bytes:
                cache.store[key] = h
                cache.bytes += h.numel() * h.element_size()
    rows = [fresh[key] if key in fresh else cache.store[key] for key in keys]  # [n_i, H] each
    embeds = torch.zeros(r, t, rows[0].shape[-1], dtype=rows[0].dtype, device=rows[0].device)
    for i, h in enumerate(rows):
        embeds[i, : n[i]] = h
    positions, extra = position_ids, {}
    if packed is not None:  # each member's rows end to end, laid out by `pack`
        positions, packing = packed
        embeds = to_packed(embeds.view(r * t, -1), packing).view(*positions.shape, -1)  # [M, P, H]
        extra = {PACKING_KWARG: packing}
    with _layers(decoder, cache.first_lora_layer, None, final_norm=True):
        return decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                       **extra).last_hidden_state  # [R, T, H], or [M, P, H] packed

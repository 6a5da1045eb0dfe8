"""Which models the speed levers of `loraens.fast` support, decided in one place.

Token packing, the frozen-prefix cache and the last-layer trim rely on the decoder layout of
Llama: a body with `.layers` and a final `.norm`, layers with `input_layernorm`, `self_attn`,
`post_attention_layernorm` and `mlp` around two residual adds, and attention modules that pass
the forward's keyword arguments on to the attention function. Llama, Mistral and Qwen2/3 have
it in transformers 5; other models run the plain (padded, full-depth) forward with the same
results.
"""

from __future__ import annotations

from torch import nn

# Decoders with Llama's layer layout (see the module docstring).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# `--model.attn_implementation` names registered by `loraens.fast.attention`; each runs on packed
# token rows (`loraens.fast.packing`) as well as on padded ones.
GROUPED_EAGER = "loraens_grouped_eager"  # eager attention without repeating K/V (CPU)
SDPA_PACKED = "loraens_sdpa"  # torch's fused scaled_dot_product_attention with the batch's mask (CUDA)
FLEX = "loraens_flex"  # FlexAttention with a block mask built from each packed token's question and segment
PACKED_ATTENTION = (GROUPED_EAGER, SDPA_PACKED, FLEX)


def model_type(model: nn.Module) -> str | None:
    """The HF `model_type` of `model` ("llama", "qwen2", ...), or None."""
    return getattr(getattr(model, "config", None), "model_type", None)


def has_llama_layout(model: nn.Module) -> bool:
    """Whether `model`'s decoder has the layer layout the levers rely on (module docstring)."""
    return model_type(model) in SUPPORTED_MODEL_TYPES


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of an HF causal LM (without its output head)."""
    return getattr(model, model.base_model_prefix)


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation `model`'s attention modules use at the next forward."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def can_pack(model: nn.Module) -> bool:
    """Whether `model`'s decoder can run on packed token rows (`loraens.fast.packing`).

    The packed layout needs the Llama layout and an attention function that knows it: one of
    loraens' own (`PACKED_ATTENTION`).
    """
    return has_llama_layout(model) and attention_implementation(model) in PACKED_ATTENTION

"""`torch.compile` of the decoder layers (`--train.compile`).

A bf16 training step on CPU spends about half its time outside the GEMMs: RMSNorm's float32
round trip, rotary embeddings, SwiGLU, softmax and the casts around the member-axis LoRA update
are each a separate pass over memory (`bench/bench.py`, section (d)). Inductor fuses those
elementwise chains into a few C++ loops. Every decoder layer runs the same code, so one compiled
graph serves all of them (the layers' weights are graph inputs), and `dynamic=True` keeps one
graph for every sequence length, so length-bucketed batches do not recompile.

The first training step pays for compilation (about a minute on 2 CPU cores for SmolLM2-135M;
evaluation under `no_grad` compiles a second graph), so it pays back only on runs of a few
hundred steps or more: measured in `BENCHMARKS.md`, section (g).
"""

from __future__ import annotations

from torch import nn

from .scoring import decoder_of


def compile_decoder_layers(model: nn.Module, dynamic: bool = True) -> int:
    """Compile every decoder layer of `model` in place; returns how many were compiled.

    `nn.Module.compile` wraps each layer's forward and keeps the module (its parameters, LoRA
    members and state dict) as it is, so saving, exporting and the prefix cache work unchanged.
    """
    layers = getattr(decoder_of(model), "layers", None) if hasattr(model, "base_model_prefix") else None
    if layers is None:
        raise ValueError(f"--train.compile: {type(model).__name__} has no decoder `.layers` to compile; "
                         "run without --train.compile.")
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)

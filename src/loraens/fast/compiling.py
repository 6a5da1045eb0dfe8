"""`torch.compile` of the decoder layers (`--train.compile`).

A bf16 training step spends a large share of its time outside the GEMMs: RMSNorm's float32
round trip, rotary embeddings, SwiGLU, softmax and the casts around the member-axis LoRA update
are each a separate pass over memory. Inductor fuses those elementwise chains into a few loops.
Every decoder layer runs the same code, so one compiled graph serves all of them (the layers'
weights are graph inputs), and `dynamic=True` keeps one graph for every sequence length, so
length-bucketed batches do not recompile.

The first training step pays for compilation, so it pays back only on longer runs. Evaluation
runs the same layers eagerly (`predict`): a `no_grad` pass would compile a second graph and was
slower than eager even after that. The saving per step grows with the step's work (M x B), the
compilation does not, so `--train.compile auto` (the default) compiles runs of at least
`AUTO_MIN_MEMBER_QUESTIONS` = steps x M x B, a threshold set from the measured payback.
Measured (speed-up, payback in member-questions, compiled vs eager evaluation): BENCHMARKS.md
section (f); the figures: docs/design.md, "Choices we measured".
"""

from __future__ import annotations

import os
import shutil

from torch import nn

from ..config import CompileMode, TrainConfig
from .prefix import PrefixCache
from .support import decoder_of

AUTO_MIN_MEMBER_QUESTIONS = 5000  # optimizer steps x members x questions per member


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use on CPU ($CXX, else g++, c++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def compile_decision(train: TrainConfig, total_steps: int, num_members: int,
                     compiled_layers: tuple[int, int] | None = None, device_type: str = "cpu") -> tuple[bool, str]:
    """Whether to compile the decoder layers for a run of `total_steps` optimizer steps.

    Returns (compile, note); the note is for the user ("" when there is nothing to say).
    `--train.compile true/false` is obeyed as given; `auto` compiles only runs that train at
    least `AUTO_MIN_MEMBER_QUESTIONS` member-questions, without member chunking or checkpointing
    (not combined with compilation in our tests), and only when a C++ compiler is there for
    Inductor. `compiled_layers` = (K, L) when only K of the L layers would compile (a frozen-prefix
    cache): the compilation costs the same, the saving per step is about K / L of it, so the
    member-questions count K / L of their number. On a GPU (`device_type` "cuda") `auto` does not
    compile: its payback was measured on CPUs only, and Inductor's GPU kernels are another matter.
    """
    if train.compile is CompileMode.TRUE:
        return True, ("compiling the decoder layers (--train.compile true); the first training step takes longer "
                      "while it compiles")
    k, n_layers = compiled_layers or (1, 1)
    work = total_steps * num_members * train.batch_size * k // n_layers
    if train.compile is CompileMode.FALSE or work < AUTO_MIN_MEMBER_QUESTIONS:
        return False, ""
    if train.member_chunk is not None or train.gradient_checkpointing:
        return False, ""
    share = f" x {k}/{n_layers} compiled layers" if compiled_layers else ""
    size = (f"{total_steps} steps x {num_members} members x {train.batch_size} questions{share} = {work:,} "
            f"member-questions >= {AUTO_MIN_MEMBER_QUESTIONS:,}")
    if device_type != "cpu":
        return False, (f"--train.compile auto compiles on CPUs, where its payback is measured; on {device_type} the "
                       "layers run eagerly. Pass --train.compile true to compile them there.")
    if cpp_compiler() is None:
        return False, (f"--train.compile auto: this run is long enough for compiling to pay ({size}), but no C++ "
                       "compiler was found ($CXX, g++, c++, clang++), so the layers run eagerly. Install g++ for "
                       "faster steps, or pass --train.compile false to silence this.")
    return True, (f"compiling the decoder layers (--train.compile auto: {size}); the first training step takes "
                  "longer while it compiles, later steps less")


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(decoder_of(model), "layers", None) if hasattr(model, "base_model_prefix") else None
    if layers is None:
        raise ValueError(f"--train.compile: {type(model).__name__} has no decoder `.layers` to compile; "
                         "run without --train.compile.")
    return list(layers)


def layers_to_compile(model: nn.Module, cache: PrefixCache | None) -> tuple[int, int] | None:
    """(K, L) when `compile_decoder_layers` would compile only K of the L decoder layers (with a
    frozen-prefix cache, the K layers from its first LoRA layer up); None when it compiles them all."""
    if cache is None:
        return None
    n_layers = len(_decoder_layers(model))
    return n_layers - cache.first_lora_layer, n_layers


def compile_decoder_layers(model: nn.Module, cache: PrefixCache | None = None, dynamic: bool = True) -> int:
    """Compile the decoder layers of `model` in place; returns how many were compiled.

    All layers, or with a frozen-prefix cache (`--ensemble.top_layers`) only those from its
    first LoRA layer up: the frozen layers below run only without gradients, once per question, and like
    evaluation (`predict`), a `no_grad` pass would need a compilation of its own and is not faster
    compiled. `nn.Module.compile` wraps each layer's forward and keeps the module (its parameters,
    LoRA members and state dict) as it is, so saving, exporting and the prefix cache work unchanged.
    """
    trained = _decoder_layers(model)[cache.first_lora_layer if cache is not None else 0:]
    for layer in trained:
        layer.compile(dynamic=dynamic)
    return len(trained)

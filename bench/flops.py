"""The FLOP model of a loraens training step, the matmul peak, and the step's required kernels.

Model FLOPs of a step (`loraens_step_flops`, from a `FlopModel` read off the model), the tokens
the forward passes hold (`padded_tokens`), the best square matmul of the machine
(`matmul_peak`), the kernels a step cannot do without, timed bare at the step's shapes
(`step_bound`, on `ceiling.required_kernel_seconds`), and where a step's time goes by op class
(`step_time_shares`). Section (e) of the report is built from these.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from loraens.config import Scoring
from loraens.ensemble import member_layers
from loraens.fast.last_layer import supports_last_layer_at
from loraens.fast.support import decoder_of
from loraens.prompts import EncodedQuestion

from .ceiling import best_seconds, required_kernel_seconds
from .common import RANK, Task

PEAK_SIZES = (1024, 2048, 3072)  # n of the n^3 matmuls whose best is the peak
# Linear layers of a Llama-style decoder layer that read the same input (stacked in one GEMM by the bound).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GEMM_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}
CAST_OPS = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"}


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = PEAK_SIZES, reps: int = 5) -> tuple[float, int]:
    """Best FLOP/s of an n x n x n matmul in `dtype` over n in `sizes` (torch's default threads): (FLOP/s, n)."""
    best = (0.0, 0)
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = max(best, (2 * n ** 3 / best_seconds(partial(torch.mm, a, b), reps), n))
    return best


def matmul_peaks() -> dict:
    """fp32 and bf16 `matmul_peak`s: {"fp32": FLOP/s, "fp32_n": n, "bf16": ..., "bf16_n": ...}."""
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[name], peaks[f"{name}_n"] = matmul_peak(dtype)
    return peaks


def bf16_peak(peaks: dict, results: list) -> float:
    """The bf16 peak MFU is against: the best square matmul (`matmul_peaks`), or the model's bare
    GEMMs where they were faster (the "linear_gflops" of the `ModeResult.mfu` rows of `results`)."""
    return max([peaks["bf16"]] + [x["linear_gflops"] * 1e9 for r in results for x in r.mfu])


def linear_params(model) -> int:
    """Weights of the decoder's linear layers (embedding excluded), the N of 2*N FLOPs per token."""
    return sum(p.numel() for n, p in decoder_of(model).named_parameters() if p.dim() == 2 and "embed" not in n)


def head_positions(q: EncodedQuestion, scoring: Scoring) -> int:
    """Positions of `q` whose final hidden state the head reads (`scoring._head_positions`).

    Letter: the answer position. Choice-likelihood: the prompt's last token (it predicts every
    choice's first token) and every choice token but the choice's last.
    """
    return 1 if scoring is Scoring.LETTER else 1 + sum(len(c) - 1 for c in q.continuations)


# ---------------------------------------------------------------- model FLOPs


@dataclass(frozen=True)
class FlopModel:
    """What a loraens step's model FLOPs depend on (`loraens_step_flops`), read off a loraens model."""

    n_lin: int  # weights of the decoder's linear layers (embedding excluded)
    lora: int  # LoRA FLOPs per token over all adapted layers: 6 r (in + out) each
    last_mlp: int  # weights of the last layer's MLP, which runs at the head's positions only
    last_mlp_lora: int  # LoRA FLOPs per token of the adapted layers in that MLP
    hidden: int
    vocab: int

    def top(self, k: int, n_layers: int) -> FlopModel:
        """The same for the top k of the n_layers layers (the last layer is one of them)."""
        return dataclasses.replace(self, n_lin=round(self.n_lin * k / n_layers), lora=round(self.lora * k / n_layers))


def flop_model(model) -> FlopModel:
    """`FlopModel` of a loraens model (its adapted layers give the LoRA shapes)."""
    last = decoder_of(model).layers[-1].mlp
    lora_tok = {name: 6 * layer.lora_A.shape[1] * (layer.lora_A.shape[-1] + layer.lora_B.shape[1])  # A: [M, r, in]
                for name, layer in member_layers(model).items()}
    last_prefix = f"layers.{len(decoder_of(model).layers) - 1}.mlp."
    trimmed = supports_last_layer_at(model)  # the last layer's MLP runs at the head's positions only
    return FlopModel(n_lin=linear_params(model),
                     lora=sum(lora_tok.values()),
                     last_mlp=sum(p.numel() for p in last.parameters() if p.dim() == 2) if trimmed else 0,
                     last_mlp_lora=sum(v for n, v in lora_tok.items() if last_prefix in n) if trimmed else 0,
                     hidden=model.config.hidden_size, vocab=model.config.vocab_size)


def loraens_step_flops(task: Task, chunk: np.ndarray, fm: FlopModel) -> float:
    """Model FLOPs of one loraens training step on real (unpadded) tokens.

    Frozen base: forward 2N + gradient w.r.t. activations 2N per token (no weight gradients);
    LoRA: 6 r (in + out) per token per adapted layer; the last layer's MLP (and its LoRA) only at
    the positions the head reads (`loraens.last_layer`); head: 4 H V per distinct position that
    predicts a choice token (choice-likelihood; the letter head over C rows is negligible).
    Attention scores are left out (about 2% at these lengths).
    """
    qs = [task.train_q[i] for i in chunk.reshape(-1)]
    tokens = sum(q.num_tokens for q in qs)
    kept = sum(head_positions(q, task.scoring) for q in qs)
    flops = (4 * fm.n_lin + fm.lora) * tokens - (4 * fm.last_mlp + fm.last_mlp_lora) * (tokens - kept)
    if task.scoring is Scoring.CHOICE_LIKELIHOOD:
        flops += 4 * fm.hidden * fm.vocab * kept
    return float(flops)


def padded_tokens(task: Task, chunk: np.ndarray) -> tuple[int, int]:
    """Tokens the forward passes hold (padding included): (loraens, PEFT-sequential) for this step.

    loraens packs each member's questions end to end (`loraens.packing`), padded only to the
    longest member's total: M x max_k (tokens of member k's questions).
    """
    qs = [[task.train_q[i] for i in row] for row in chunk]
    ours = len(qs) * max(sum(q.num_tokens for q in row) for row in qs)
    theirs = 0
    for row in qs:
        if task.scoring is Scoring.LETTER:
            theirs += len(row) * max(len(q.prompt_ids) for q in row)
        else:
            seqs = [len(q.prompt_ids) + len(c) for q in row for c in q.continuations]
            theirs += len(seqs) * max(seqs)
    return ours, theirs


# ---------------------------------------------------------------- the required kernels, bare


def input_groups(layer: torch.nn.Module) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The shapes (out, in) of one decoder layer's base linear weights, grouped by shared input."""
    # A LoRA-wrapped layer holds its base linear as `.base`: name it after the wrapper.
    weights = {name.removesuffix(".base").rsplit(".", 1)[-1]: tuple(mod.weight.shape)
               for name, mod in layer.named_modules()
               if isinstance(mod, torch.nn.Linear)}
    groups = [tuple(weights.pop(n) for n in names) for names in SHARED_INPUT if all(n in weights for n in names)]
    return tuple(groups + [(shape,) for _, shape in sorted(weights.items())])


def step_bound(model, task: Task, chunk: np.ndarray) -> dict:
    """The kernels a loraens training step on `chunk` [M, B] cannot do without, timed bare (`ceiling`).

    `model` is a loraens model (its adapted layers give the LoRA shapes). The last layer's MLP
    runs at the head's positions only, as in the step (`loraens.last_layer`). Returns the seconds
    by part, plus "linear_flops" (4 N per real token, less that MLP's other positions, for the
    bare GEMMs' own FLOP/s).
    """
    cfg = model.config
    qs = [task.train_q[i] for i in chunk.reshape(-1)]
    layers = decoder_of(model).layers
    pruned = supports_last_layer_at(model)
    below = layers[:-1] if pruned else layers
    groups = Counter(group for layer in below for group in input_groups(layer))
    tail = Counter()
    if pruned:
        groups.update(input_groups(layers[-1].self_attn))
        tail.update(input_groups(layers[-1].mlp))
    lora = Counter((layer.lora_A.shape[-1], layer.lora_B.shape[1]) for layer in member_layers(model).values())
    heads = cfg.num_attention_heads
    lengths = [q.num_tokens for q in qs]
    tokens = sum(lengths)
    kept = sum(head_positions(q, task.scoring) for q in qs)
    out = required_kernel_seconds(
        linear_groups=groups, lora_layers=lora, members=chunk.shape[0], lengths=lengths, heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, layers=cfg.num_hidden_layers,
        rank=RANK, scored_tokens=kept if task.scoring is Scoring.CHOICE_LIKELIHOOD else 0,
        hidden=cfg.hidden_size, vocab=cfg.vocab_size, tail_groups=tail, tail_tokens=kept)
    tail_weights = sum(o * i for group, n in tail.items() for o, i in group for _ in range(n))
    out["linear_flops"] = 4.0 * tokens * linear_params(model) - 4.0 * tail_weights * (tokens - kept)
    return out


def step_time_shares(step: Callable[[], None]) -> dict[str, float]:
    """Where one training step's time goes: shares of the profiler's self CPU time by op class.

    GEMMs (mm/bmm/addmm), dtype casts and copies, and everything else the ops do (elementwise
    work, norms, rotary, softmax, reductions, the optimizer's foreach kernels); `seconds` is the
    total self time. Python overhead between ops is not an op and is not counted.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    totals = {"gemm": 0.0, "casts": 0.0, "other ops": 0.0}
    for evt in prof.key_averages():
        kind = "gemm" if evt.key in GEMM_OPS else "casts" if evt.key in CAST_OPS else "other ops"
        totals[kind] += evt.self_cpu_time_total / 1e6
    total = sum(totals.values())
    return {**{k: v / total for k, v in totals.items()}, "seconds": total}

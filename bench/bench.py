"""loraens vs the PEFT-sequential way, side by side in one process (issue 4).

    python bench/bench.py [--quick] [--out BENCHMARKS.md]

Measures, interleaved (every timed step of every side runs at the same step index, the order of
the sides alternating from one step to the next), medians over the timed steps:

(a) training throughput in member-examples/s (M members x B questions per member per optimizer
    step / seconds per step): loraens (`attach_members` + `loraens.train.train_step` + per-member
    clipping + one AdamW step, bf16 base and fp32 base) vs the PEFT-sequential baseline (one `peft`
    model holding M LoRA adapters, fp32, trained one after another through `set_adapter`, a plain
    HF forward with full-vocabulary logits at every position, clipping and one AdamW per adapter);
(b) evaluation throughput in questions/s: `loraens.predict.predict` with M members vs the PEFT
    `set_adapter` loop and PEFT's mixed-batch `adapter_names=` forward (same adapter weights on
    all sides, so their predictions are also compared);
(c) peak RSS of one training step for M = 1, 5 (and 16) at the same rows (tokens) per step, one
    subprocess per configuration;
plus an estimate of model-FLOP utilisation against a matmul peak measured in the same run.

Both sides use the same questions at every step (member k's batch is the same for every M), the
same LoRA targets (q_proj, v_proj), rank 8, alpha 16, no dropout, AdamW lr 5e-4, clip norm 1.0.
The PEFT-sequential time for M members at a step is the sum of the M adapters' step times, each
timed on its own: that is exactly what training them one after another costs.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loraens.batching import length_sorted_batches
from loraens.bootstrap import format_ci, metric_cis, paired_metric_diffs
from loraens.fast.compiling import AUTO_MIN_MEMBER_QUESTIONS, compile_decoder_layers
from loraens.config import (
    DType,
    EnsembleConfig,
    ModelConfig,
    Normalization,
    PromptConfig,
    Scoring,
    TrainConfig,
)
from loraens.data import load_mcqa
from loraens.ensemble import (
    attach_members,
    clip_grad_norm_per_member,
    lora_parameters,
    member_layers,
)
from loraens.fast.last_layer import supports_last_layer_at
from loraens.metrics import ensemble_probs
from loraens.model import enable_gradient_checkpointing, load_base_model
from loraens.predict import predict
from loraens.prompts import EncodedQuestion, PromptEncoder
from loraens.scoring import decoder_of
from loraens.train import (
    linear_schedule,
    member_batches,
    member_orders,
    train_members,
    train_step,
)

try:  # `python bench/bench.py` puts bench/ itself on sys.path
    from ceiling import best_seconds, required_kernel_seconds
except ImportError:  # imported as the package module bench.bench
    from .ceiling import best_seconds, required_kernel_seconds

RANK, ALPHA, TARGETS = 8, 16.0, ["q_proj", "v_proj"]
LR, MAX_GRAD_NORM = 5e-4, 1.0
NORM = Normalization.MEAN  # loraens' default for choice-likelihood; the baseline uses the same
SEED = 0
REPO = Path(__file__).resolve().parent.parent
PEAK_SIZES = (1024, 2048, 3072)  # n of the n^3 matmuls whose best is the peak
MODE_NAMES = {Scoring.LETTER: "letter", Scoring.CHOICE_LIKELIHOOD: "choice-likelihood"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- data


@dataclass
class Task:
    scoring: Scoring
    train_q: list[EncodedQuestion]
    eval_q: list[EncodedQuestion]
    eval_ids: list[str]
    letter_ids: tuple[int, ...]
    num_choices: int  # C over the training questions (as train_members uses)
    eval_choices: int


def make_task(tokenizer, scoring: Scoring, train_ex, eval_ex) -> Task:
    enc = PromptEncoder(tokenizer, PromptConfig(scoring=scoring, normalization=NORM))
    train_q = enc.encode_all(train_ex)
    eval_q = enc.encode_all(eval_ex)
    return Task(scoring, train_q, eval_q, [e.id for e in eval_ex], enc.letter_ids,
                max(q.num_choices for q in train_q), max(q.num_choices for q in eval_q))


# ---------------------------------------------------------------- the PEFT baseline


def pad_right(seqs: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def peft_scores(pm, qs: list[EncodedQuestion], task: Task, c: int, adapter_names: list[str] | None = None,
                ) -> torch.Tensor:
    """Choice scores [len(qs), c] (-inf for missing choices) from the standard HF forward.

    `pm(input_ids, attention_mask).logits` forms full-vocabulary fp32 logits at every position.
    Letter: the last real position's logits restricted to the letter tokens. Choice-likelihood:
    one sequence per (question, choice), the mean log-probability of the choice's tokens from a
    full-vocabulary log-softmax. `adapter_names` (one per question) selects PEFT's mixed batch.
    """
    n = len(qs)
    if task.scoring is Scoring.LETTER:
        ids, mask = pad_right([q.prompt_ids for q in qs])
        kw = {} if adapter_names is None else {"adapter_names": adapter_names}
        logits = pm(input_ids=ids, attention_mask=mask, **kw).logits  # [B, T, V]
        last = mask.sum(1) - 1
        scores = logits[torch.arange(n), last][:, list(task.letter_ids[:c])]
        exists = torch.tensor([[j < q.num_choices for j in range(c)] for q in qs])
        return scores.masked_fill(~exists, float("-inf"))
    seqs, rows, cols, spans, names = [], [], [], [], []
    for i, q in enumerate(qs):
        for j, cont in enumerate(q.continuations):
            seqs.append(q.prompt_ids + cont)
            rows.append(i)
            cols.append(j)
            spans.append((len(q.prompt_ids), len(cont)))
            if adapter_names is not None:
                names.append(adapter_names[i])
    ids, mask = pad_right(seqs)
    kw = {} if adapter_names is None else {"adapter_names": names}
    logits = pm(input_ids=ids, attention_mask=mask, **kw).logits  # [S, T, V]
    logp = logits[:, :-1].log_softmax(-1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [S, T-1]: log p(token t+1 | tokens <= t)
    sel = torch.zeros_like(tok, dtype=torch.bool)
    for s, (p, length) in enumerate(spans):
        sel[s, p - 1: p - 1 + length] = True
    per_seq = torch.where(sel, tok, torch.zeros_like(tok)).sum(1) / sel.sum(1)  # mean over choice tokens
    scores = torch.full((n, c), float("-inf"))
    return scores.index_put((torch.tensor(rows), torch.tensor(cols)), per_seq)


def build_peft(base, num_adapters: int, lr: float = LR, weight_decay: float = 0.01):
    """One PeftModel with adapters m0..m{n-1}; one AdamW per adapter over its own parameters.

    The defaults are those of the throughput sides (`build_loraens`: torch's AdamW defaults at
    `LR`); the quality run passes its own, the same as its loraens sides'.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(base, cfg, adapter_name="m0")
    for k in range(1, num_adapters):
        pm.add_adapter(f"m{k}", cfg)
    params, opts = [], []
    for k in range(num_adapters):
        ps = [p for n, p in pm.named_parameters() if "lora_" in n and f".m{k}." in n]
        assert ps, f"no parameters for adapter m{k}"
        params.append(ps)
        opts.append(torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay))
    pm.train()
    return pm, params, opts


def peft_member_step(pm, params, opts, k: int, qs: list[EncodedQuestion], task: Task) -> None:
    pm.set_adapter(f"m{k}")
    scores = peft_scores(pm, qs, task, task.num_choices)
    targets = torch.tensor([q.answer for q in qs])
    F.cross_entropy(scores, targets).backward()
    torch.nn.utils.clip_grad_norm_(params[k], MAX_GRAD_NORM)
    opts[k].step()
    opts[k].zero_grad(set_to_none=True)


@torch.no_grad()
def peft_eval_loop(pm, task: Task, m: int, batch_size: int) -> torch.Tensor:
    """[N, M, C] member probabilities: for each adapter, set_adapter then all question batches."""
    pm.eval()
    qs = task.eval_q
    out = torch.zeros(len(qs), m, task.eval_choices)
    batches = length_sorted_batches(qs, batch_size)
    for k in range(m):
        pm.set_adapter(f"m{k}")
        for idx in batches:
            out[idx, k] = peft_scores(pm, [qs[i] for i in idx], task, task.eval_choices).softmax(-1)
    return out


@torch.no_grad()
def peft_eval_mixed(pm, task: Task, m: int, batch_size: int) -> torch.Tensor:
    """[N, M, C] via PEFT's mixed-batch forward: every forward holds batch_size // M questions x M adapters."""
    pm.eval()
    qs = task.eval_q
    out = torch.zeros(len(qs), m, task.eval_choices)
    for idx in length_sorted_batches(qs, max(1, batch_size // m)):
        sub = [qs[i] for i in idx]
        names = [f"m{k}" for k in range(m) for _ in sub]
        probs = peft_scores(pm, sub * m, task, task.eval_choices, adapter_names=names).softmax(-1)
        out[idx] = probs.view(m, len(idx), -1).transpose(0, 1)
    return out


@torch.no_grad()
def copy_members_into_peft(model, pm, m: int) -> None:
    """Give PEFT adapters m0..m{M-1} the weights of loraens members 0..M-1 (same scaling alpha/r)."""
    inner = pm.base_model.model
    for name, layer in member_layers(model).items():
        target = inner.get_submodule(name)
        for k in range(m):
            target.lora_A[f"m{k}"].weight.copy_(layer.lora_A[k].float())
            target.lora_B[f"m{k}"].weight.copy_(layer.lora_B[k].float())


# ---------------------------------------------------------------- loraens


@dataclass
class LoraensSide:
    model: torch.nn.Module
    params: list
    opt: torch.optim.Optimizer
    m: int


def build_loraens(base, m: int, in_place: bool = False, top_layers: int | None = None) -> LoraensSide:
    model = base if in_place else copy.deepcopy(base)
    attach_members(model, EnsembleConfig(num_members=m, rank=RANK, alpha=ALPHA, dropout=0.0,
                                         target_modules=TARGETS, seed=SEED, top_layers=top_layers))
    params = lora_parameters(model)
    model.train()
    return LoraensSide(model, params, torch.optim.AdamW(params, lr=LR), m)


def loraens_step(side: LoraensSide, task: Task, chunk: np.ndarray, member_chunk: int | None = None) -> None:
    """What one iteration of `train_members` does (without the LR scheduler and the progress bar)."""
    train_step(side.model, task.train_q, chunk, 1, side.m, task.num_choices, task.scoring, task.letter_ids, NORM,
               member_chunk=member_chunk)
    clip_grad_norm_per_member(side.params, MAX_GRAD_NORM)
    side.opt.step()
    side.opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- FLOPs and the matmul peak


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = PEAK_SIZES, reps: int = 5) -> tuple[float, int]:
    """Best FLOP/s of an n x n x n matmul in `dtype` over n in `sizes` (torch's default threads): (FLOP/s, n)."""
    best = (0.0, 0)
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = max(best, (2 * n ** 3 / best_seconds(partial(torch.mm, a, b), reps), n))
    return best


# Linear layers of a Llama-style decoder layer that read the same input (stacked in one GEMM by the bound).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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


GEMM_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}
CAST_OPS = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"}


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


def linear_params(model) -> int:
    """Weights of the decoder's linear layers (embedding excluded), the N of 2*N FLOPs per token."""
    return sum(p.numel() for n, p in decoder_of(model).named_parameters() if p.dim() == 2 and "embed" not in n)


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
    return FlopModel(n_lin=linear_params(model),
                     lora=sum(lora_tok.values()),
                     last_mlp=sum(p.numel() for p in last.parameters() if p.dim() == 2) if supports_last_layer_at(model) else 0,
                     last_mlp_lora=sum(v for n, v in lora_tok.items() if last_prefix in n) if supports_last_layer_at(model) else 0,
                     hidden=model.config.hidden_size, vocab=model.config.vocab_size)


def head_positions(q: EncodedQuestion, scoring: Scoring) -> int:
    """Positions of `q` whose final hidden state the head reads (`scoring._head_positions`).

    Letter: the answer position. Choice-likelihood: the prompt's last token (it predicts every
    choice's first token) and every choice token but the choice's last.
    """
    return 1 if scoring is Scoring.LETTER else 1 + sum(len(c) - 1 for c in q.continuations)


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


# ---------------------------------------------------------------- memory (one subprocess per configuration)


def _vm(key: str) -> int:
    """VmRSS / VmHWM of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def memory_child(spec: dict) -> None:
    """One training step of one configuration; prints its RSS figures as a JSON line."""
    import resource

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    scoring = Scoring(spec["scoring"])
    m, b = spec["m"], spec["b"]
    peft_side = spec["side"] == "peft"
    dtype = DType.FLOAT32 if peft_side or spec["dtype"] == "float32" else DType.BFLOAT16
    base, tok = load_base_model(ModelConfig(dtype=dtype, attn_implementation=spec["baseline_attn"])
                                if peft_side else ModelConfig(dtype=dtype))
    ex = load_mcqa(spec["dataset"], "train", data_dir=spec["data_dir"], limit=spec["pool"], seed=SEED)
    task = make_task(tok, scoring, ex[: m * b], ex[:1])
    chunk = np.arange(m * b).reshape(m, b)
    if peft_side:
        pm, params, opts = build_peft(base, m)

        def step() -> None:
            for k in range(m):
                peft_member_step(pm, params, opts, k, [task.train_q[i] for i in chunk[k]], task)
    else:
        side = build_loraens(base, m, in_place=True)
        if spec.get("gc"):
            enable_gradient_checkpointing(side.model)

        def step() -> None:
            loraens_step(side, task, chunk, spec.get("chunk"))
    gc.collect()
    rss_before = _vm("VmRSS")
    reset = True
    try:  # reset the peak (VmHWM) so that the model load's transient peak does not count
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    step_times = []
    for _ in range(spec.get("steps", 3)):
        t0 = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t0)
    # The first step is cold (first-touch page faults of every activation buffer, oneDNN kernel
    # creation): the time quoted is the median of the later ones.
    seconds = statistics.median(step_times[1:]) if len(step_times) > 1 else step_times[0]
    out = dict(spec, rss_before_mb=rss_before / 1024, step_peak_mb=_vm("VmHWM") / 1024, hwm_reset=reset,
               process_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds=seconds,
               tokens=sum(task.train_q[i].num_tokens for i in chunk.reshape(-1)))
    print("MEMJSON " + json.dumps(out), flush=True)


def run_memory(args, configs: list[tuple]) -> list[dict]:
    """One subprocess per (side, scoring, M, B[, member_chunk, gradient checkpointing])."""
    results = []
    for side, scoring, m, b, *lean in configs:
        chunk, gc_on = lean if lean else (None, False)
        spec = {"side": side, "scoring": scoring, "m": m, "b": b, "chunk": chunk, "gc": gc_on, "lean": bool(lean),
                "dtype": "bfloat16", "dataset": args.dataset,
                "data_dir": args.data_dir, "pool": args.train_pool, "threads": args.threads,
                "baseline_attn": args.baseline_attn, "steps": 3}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)],
                              capture_output=True, text=True, cwd=REPO, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMJSON ")]
        if proc.returncode or not lines:
            log(f"memory {side} M={m} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
            results.append(dict(spec, error=f"rc {proc.returncode}"))
            continue
        res = json.loads(lines[-1][len("MEMJSON "):])
        results.append(res)
        # (process_peak_mb, the child's ru_maxrss, is not used: Linux carries the parent's peak
        # over fork/exec, so it shows this process's peak, not the child's.)
        log(f"memory {side:8s} {scoring:17s} M={m:2d} B={b:2d} chunk={chunk} gc={gc_on}: step peak {res['step_peak_mb']:.0f} MB "
            f"(RSS loaded {res['rss_before_mb']:.0f} MB), "
            f"subprocess {time.perf_counter() - t0:.1f} s")
    return results


def render_lean_memory(rows: list[dict]) -> str:
    """Section (c2): the same M x B step all at once, in member chunks, with gradient checkpointing."""
    ref = next((r for r in rows if not r.get("chunk") and not r.get("gc") and "error" not in r), None)
    out = ["### (c2) Bounding activation memory: member-axis chunking and gradient checkpointing\n",
           ("| M | B | members per pass (`--train.member_chunk`) | gradient checkpointing | peak in training (MB) | "
           "increment (MB) | increment vs all at once | s/step | time vs all at once |"),
           "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_pass = r.get("chunk") or r["m"]
        gc_on = "yes" if r.get("gc") else "no"
        if "error" in r:
            out.append(f"| {r['m']} | {r['b']} | {per_pass} | {gc_on} | failed: {r['error']} | | | | |")
            continue
        inc = r["step_peak_mb"] - r["rss_before_mb"]
        rel = rel_t = "n/a"
        if ref is not None:
            rel = fmt(inc / max(1e-9, ref["step_peak_mb"] - ref["rss_before_mb"])) + "x"
            rel_t = fmt(r["seconds"] / ref["seconds"]) + "x"
        out.append(f"| {r['m']} | {r['b']} | {per_pass} | {gc_on} | {r['step_peak_mb']:.0f} | {inc:.0f} | {rel} | "
                   f"{r['seconds']:.1f} | {rel_t} |")
    out.append("")
    out.append(f"loraens bf16, {rows[0]['scoring']} scoring, the same {rows[0]['m'] * rows[0]['b']} questions per "
               "step in every row, measured like (c) (peak over three steps; s/step the median of the warm second and third). A member chunk of c runs c x B rows per forward/backward "
               "and accumulates the members' gradients (the same gradients, `tests/test_train.py`); "
               "checkpointing keeps only each decoder layer's input and recomputes the layer in the backward pass.\n")
    return "\n".join(out)


# ---------------------------------------------------------------- the measurements


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class ModeResult:
    mode: str
    batch_size: int
    members: int
    sweep: list[int]
    reps: int
    # member-examples/s (median step time)
    peft: dict[int, float] = field(default_factory=dict)
    bf16: dict[int, float] = field(default_factory=dict)
    fp32: dict[int, float] = field(default_factory=dict)
    step_s: dict[str, float] = field(default_factory=dict)
    padded: dict[str, float] = field(default_factory=dict)  # padded tokens per member-example
    gflops: dict[str, float] = field(default_factory=dict)  # achieved model GFLOP/s (loraens)
    eval_qps: dict[str, float] = field(default_factory=dict)
    eval_check: dict[str, float] = field(default_factory=dict)
    prefix: dict[str, float] = field(default_factory=dict)  # frozen-prefix mode vs full depth (member-examples/s)
    shares: dict[str, float] = field(default_factory=dict)  # a bf16 step's self time by op class (profiler)
    compiled: dict[str, float] = field(default_factory=dict)  # torch.compile vs eager (s/step, first step)
    mfu: list[dict] = field(default_factory=list)  # per batch size: measured step vs required kernels (d)
    seconds: float = 0.0


def full_batches(task: Task, m: int, b: int, count: int) -> list[np.ndarray]:
    """The first `count` full steps [m, b] of epoch 1 (length-bucketed, as loraens trains); [] if fewer."""
    lengths = np.array([q.num_tokens for q in task.train_q])
    orders = member_orders(len(task.train_q), m, 1, SEED, True)
    steps = [c for c in member_batches(orders, lengths, b, 8, SEED, 1) if c.shape[1] == b][:count]
    return steps if len(steps) == count else []


def mfu_rows(args, task: Task, base, side: LoraensSide, timed: list[np.ndarray], timed_s: list[float],
             fm: FlopModel) -> list[dict]:
    """Section (d): per batch size B, a bf16 step's model GFLOP/s and the bound from its required kernels.

    B = --batch-size reuses the throughput section's timed steps (`timed`, `timed_s`); every other
    B of --mfu-batches trains a fresh M-member side for --warmup + --reps steps of B questions per
    member. Each timed step's required kernels are then timed bare (`step_bound`).
    """
    m = side.m
    rows = []
    for b in [args.batch_size] + [x for x in args.mfu_batches if x != args.batch_size]:
        if b == args.batch_size:
            steps, secs = [c[:m] for c in timed], list(timed_s)
        else:
            steps = full_batches(task, m, b, args.warmup + args.reps)
            if not steps:
                log(f"[{MODE_NAMES[task.scoring]}] MFU at B = {b}: too few questions for {args.warmup + args.reps} steps; skipped")
                continue
            fresh = build_loraens(base, m)
            secs = []
            for i, chunk in enumerate(steps):
                t0 = time.perf_counter()
                loraens_step(fresh, task, chunk)
                if i >= args.warmup:
                    secs.append(time.perf_counter() - t0)
            steps = steps[args.warmup:]
            del fresh
            gc.collect()
        flops = [loraens_step_flops(task, c, fm) for c in steps]
        bounds = [step_bound(side.model, task, c) for c in steps]
        row = {"b": b, "step_s": med(secs), "gflops": sum(flops) / sum(secs) / 1e9,
               "tokens": sum(sum(task.train_q[i].num_tokens for i in c.reshape(-1)) for c in steps) / len(steps)}
        for part in ("linear", "attention", "lora", "head", "total"):
            row[part] = sum(x[part] for x in bounds) / len(bounds)
        row["bound_gflops"] = sum(flops) / sum(x["total"] for x in bounds) / 1e9
        row["linear_gflops"] = sum(x["linear_flops"] for x in bounds) / sum(x["linear"] for x in bounds) / 1e9
        rows.append(row)
        log(f"[{MODE_NAMES[task.scoring]}] MFU at B = {b}: step {row['step_s']:.2f} s, {row['gflops']:.0f} GFLOP/s; "
            f"required kernels bare {row['total']:.3f} s -> at most {row['bound_gflops']:.0f} GFLOP/s")
    return rows


def bench_mode(args, scoring: Scoring, tok, base_bf16, base_fp32, peft_base, train_ex, eval_ex) -> ModeResult:
    t_mode = time.perf_counter()
    task = make_task(tok, scoring, train_ex, eval_ex)
    m_main = args.members
    sweep = sorted(set(args.sweep) | {m_main})
    m_max = max(sweep)
    res = ModeResult(MODE_NAMES[scoring], args.batch_size, m_main, sweep, args.reps)

    # Every member's batches at the first steps of epoch 1; member k's batches do not depend on M.
    n = len(task.train_q)
    lengths = np.array([q.num_tokens for q in task.train_q])
    chunks = member_batches(member_orders(n, m_max, 1, SEED, True), lengths, args.batch_size, 8, SEED, 1)
    n_steps = args.warmup + args.reps
    if len(chunks) < n_steps:
        raise SystemExit(f"--train-pool {n} gives {len(chunks)} steps per epoch; need {n_steps}.")
    chunks = [c for c in chunks if c.shape[1] == args.batch_size][:n_steps]

    log(f"[{res.mode}] building models: PEFT fp32 with {m_max} adapters, loraens bf16 M={sweep}, loraens fp32 M={m_main}")
    pm, p_params, p_opts = build_peft(peft_base, m_max)
    ours = {m: build_loraens(base_bf16, m) for m in sweep}
    ours32 = build_loraens(base_fp32, m_main)

    times: dict[tuple[str, int], list[float]] = {}
    for s, chunk in enumerate(chunks):
        jobs = [(("peft", k), lambda k=k, chunk=chunk: peft_member_step(
            pm, p_params, p_opts, k, [task.train_q[i] for i in chunk[k]], task)) for k in range(m_max)]
        jobs += [(("bf16", m), lambda m=m, chunk=chunk: loraens_step(ours[m], task, chunk[:m])) for m in sweep]
        jobs += [(("fp32", m_main), lambda chunk=chunk: loraens_step(ours32, task, chunk[:m_main]))]
        if s % 2:
            jobs.reverse()
        t_step = time.perf_counter()
        for key, fn in jobs:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if s >= args.warmup:
                times.setdefault(key, []).append(dt)
        tag = "warm-up" if s < args.warmup else "timed"
        log(f"[{res.mode}] step {s + 1}/{n_steps} ({tag}) took {time.perf_counter() - t_step:.1f} s")
        if s >= args.warmup:
            log("    " + "  ".join(f"{a}:{b}={times[(a, b)][-1]:.2f}s" for a, b in sorted(times)))

    b = args.batch_size
    for m in sweep:
        peft_steps = [sum(times[("peft", k)][i] for k in range(m)) for i in range(args.reps)]
        res.peft[m] = m * b / med(peft_steps)
        res.bf16[m] = m * b / med(times[("bf16", m)])
        res.step_s[f"peft M={m}"] = med(peft_steps)
        res.step_s[f"bf16 M={m}"] = med(times[("bf16", m)])
    res.fp32[m_main] = m_main * b / med(times[("fp32", m_main)])
    res.step_s[f"fp32 M={m_main}"] = med(times[("fp32", m_main)])

    # Padding and FLOP accounting over the timed steps at M = m_main.
    timed = chunks[args.warmup:]
    pads = [padded_tokens(task, c[:m_main]) for c in timed]
    res.padded["loraens"] = sum(p[0] for p in pads) / (len(timed) * m_main * b)
    res.padded["peft"] = sum(p[1] for p in pads) / (len(timed) * m_main * b)
    res.padded["real"] = sum(task.train_q[i].num_tokens for c in timed for i in c[:m_main].reshape(-1)) / (
        len(timed) * m_main * b)
    fm = flop_model(ours[m_main].model)
    flops = sum(loraens_step_flops(task, c[:m_main], fm) for c in timed)
    res.gflops["bf16"] = flops / sum(times[("bf16", m_main)]) / 1e9
    res.gflops["fp32"] = flops / sum(times[("fp32", m_main)]) / 1e9
    # (d) The same steps' required kernels, bare, and the MFU at larger batches.
    res.mfu = mfu_rows(args, task, base_bf16, ours[m_main], timed, times[("bf16", m_main)], fm)
    # One more step of the same batches under the profiler: what the time that is not GEMMs is.
    res.shares = step_time_shares(lambda: loraens_step(ours[m_main], task, timed[0][:m_main]))

    # (e) frozen-prefix mode: LoRA in the top K layers with the prefix cache vs full-depth LoRA, bf16,
    # M = m_main, the same batches. Pass 1 meets every timed question for the first time (cache
    # misses: what epoch 1 costs); pass 2 repeats the same steps (cache hits: every later epoch).
    if args.prefix_fraction > 0:
        del ours32
        gc.collect()
        n_layers = base_bf16.config.num_hidden_layers
        k = max(1, round(args.prefix_fraction * n_layers))
        full_side = build_loraens(base_bf16, m_main)
        pre_side = build_loraens(base_bf16, m_main, top_layers=k)
        ptimes: dict[str, list[float]] = {}
        for phase in ("cold", "warm"):
            for s_i, chunk in enumerate(chunks):
                jobs = [("full", lambda chunk=chunk: loraens_step(full_side, task, chunk[:m_main])),
                        (phase, lambda chunk=chunk: loraens_step(pre_side, task, chunk[:m_main]))]
                if s_i % 2:
                    jobs.reverse()
                for name, fn in jobs:
                    t0 = time.perf_counter()
                    fn()
                    if s_i >= args.warmup:
                        ptimes.setdefault(name, []).append(time.perf_counter() - t0)
            log(f"[{res.mode}] prefix {phase} pass: " + ", ".join(f"{a} {med(v):.2f}s" for a, v in ptimes.items()))
        b_ = args.batch_size
        res.prefix = {"k": k, "layers": n_layers, **{name: m_main * b_ / med(v) for name, v in ptimes.items()}}
        # The most the top-K mode can gain in model FLOPs: the top K of the layers (and of the
        # LoRA work) against all of them; the choice-likelihood head runs in both.
        f_full = sum(loraens_step_flops(task, c[:m_main], fm) for c in timed)
        f_top = sum(loraens_step_flops(task, c[:m_main], fm.top(k, n_layers)) for c in timed)
        res.prefix["flop_bound"] = f_full / f_top
        del full_side, pre_side
        gc.collect()
        ours32 = None

    # (g) torch.compile of the decoder layers (--train.compile) vs eager, bf16, M = m_main, the
    # same batches: the first compiled step pays for compilation; then interleaved timed steps.
    if args.compile_steps:
        eager_side = build_loraens(base_bf16, m_main)
        comp_side = build_loraens(base_bf16, m_main)
        # Each mode compiles anew: dynamo's traced graphs are dropped and Inductor gets an empty
        # on-disk cache (kernels compiled earlier in this process can still be found in memory).
        torch._dynamo.reset()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="loraens-bench-inductor-")
        compile_decoder_layers(comp_side.model)
        t0 = time.perf_counter()
        loraens_step(comp_side, task, chunks[0][:m_main])
        first = time.perf_counter() - t0
        loraens_step(eager_side, task, chunks[0][:m_main])
        ctimes: dict[str, list[float]] = {"eager": [], "compiled": []}
        cflops = 0.0
        for i in range(args.compile_steps):
            chunk = chunks[(1 + i) % len(chunks)]
            cflops += loraens_step_flops(task, chunk[:m_main], fm)
            jobs = [("eager", eager_side), ("compiled", comp_side)]
            for name, side in (jobs if i % 2 == 0 else jobs[::-1]):
                t0 = time.perf_counter()
                loraens_step(side, task, chunk[:m_main])
                ctimes[name].append(time.perf_counter() - t0)
        res.compiled = {"first_step_s": first, "eager_s": med(ctimes["eager"]), "compiled_s": med(ctimes["compiled"]),
                        "gflops_eager": cflops / sum(ctimes["eager"]) / 1e9,
                        "gflops_compiled": cflops / sum(ctimes["compiled"]) / 1e9}
        log(f"[{res.mode}] compile: first step {first:.1f} s; eager {res.compiled['eager_s']:.2f} s/step, "
            f"compiled {res.compiled['compiled_s']:.2f} s/step")
        # The same two sides at the larger B of (d): does compilation lift the MFU there too?
        res.compiled["by_b"] = {args.batch_size: {k: res.compiled[k] for k in
                                                  ("eager_s", "compiled_s", "gflops_eager", "gflops_compiled")}}
        for b_c in [x for x in args.mfu_batches if x != args.batch_size]:
            steps = full_batches(task, m_main, b_c, 1 + args.compile_steps)
            if not steps:
                log(f"[{res.mode}] compile at B = {b_c}: too few questions for {1 + args.compile_steps} steps; skipped")
                continue
            for side in (comp_side, eager_side):  # untimed: a recompilation, if the new shape needs one
                loraens_step(side, task, steps[0])
            bt: dict[str, list[float]] = {"eager": [], "compiled": []}
            pair = [("eager", eager_side), ("compiled", comp_side)]
            for i, chunk in enumerate(steps[1:]):
                for name, side in (pair if i % 2 == 0 else pair[::-1]):
                    t0 = time.perf_counter()
                    loraens_step(side, task, chunk)
                    bt[name].append(time.perf_counter() - t0)
            fl = sum(loraens_step_flops(task, c, fm) for c in steps[1:])
            res.compiled["by_b"][b_c] = {"eager_s": med(bt["eager"]), "compiled_s": med(bt["compiled"]),
                                         "gflops_eager": fl / sum(bt["eager"]) / 1e9,
                                         "gflops_compiled": fl / sum(bt["compiled"]) / 1e9}
            log(f"[{res.mode}] compile at B = {b_c}: eager {med(bt['eager']):.2f} s/step, "
                f"compiled {med(bt['compiled']):.2f} s/step")
        if args.eval_questions:
            # Evaluation on the compiled side: with its compiled layers (predict(compiled=True): the
            # first pass compiles the no_grad graph) against the same layers run eagerly, which is
            # what loraens' evaluation does. Then interleaved passes over the same questions.
            def evaluate(compiled: bool) -> float:
                t0 = time.perf_counter()
                predict(comp_side.model, task.eval_q, task.eval_ids, m_main, scoring, task.letter_ids, NORM,
                        batch_size=args.eval_batch_size, progress=False, compiled=compiled)
                return time.perf_counter() - t0

            res.compiled["eval_questions"] = len(task.eval_q)
            res.compiled["first_eval_s"] = evaluate(True)
            etimes_c: dict[bool, list[float]] = {True: [], False: []}
            for r in range(args.eval_reps):
                for compiled in ((True, False) if r % 2 else (False, True)):
                    etimes_c[compiled].append(evaluate(compiled))
            res.compiled["eval_compiled_s"] = med(etimes_c[True])
            res.compiled["eval_eager_s"] = med(etimes_c[False])
            log(f"[{res.mode}] compile: evaluation of {len(task.eval_q)} questions: first compiled pass "
                f"{res.compiled['first_eval_s']:.1f} s, then compiled {res.compiled['eval_compiled_s']:.2f} s, "
                f"eager {res.compiled['eval_eager_s']:.2f} s")
        del eager_side, comp_side
        gc.collect()

    # (b) evaluation, M = m_main, the same adapter weights on every side.
    if args.eval_questions:
        model = ours[m_main].model
        copy_members_into_peft(model, pm, m_main)
        del ours32
        for m in sweep:
            if m != m_main:
                del ours[m].model
        gc.collect()
        bs = args.eval_batch_size

        def run_ours(t: Task) -> torch.Tensor:
            return predict(model, t.eval_q, t.eval_ids, m_main, scoring, t.letter_ids, NORM,
                           batch_size=bs, progress=False).member_probs

        eval_jobs = [("loraens", run_ours), ("peft_loop", lambda t: peft_eval_loop(pm, t, m_main, bs)),
                     ("peft_mixed", lambda t: peft_eval_mixed(pm, t, m_main, bs))]
        # Warm-up on 2 questions (every side once), then the timed passes over all of them.
        tiny = dataclasses.replace(task, eval_q=task.eval_q[:2], eval_ids=task.eval_ids[:2])
        for _, fn in eval_jobs:
            fn(tiny)
        etimes: dict[str, list[float]] = {}
        probs: dict[str, torch.Tensor] = {}
        for r in range(args.eval_reps):
            order = eval_jobs if r % 2 == 0 else eval_jobs[::-1]
            for name, fn in order:
                t0 = time.perf_counter()
                probs[name] = fn(task)
                etimes.setdefault(name, []).append(time.perf_counter() - t0)
            log(f"[{res.mode}] eval pass {r + 1}/{args.eval_reps} done: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in etimes.items()))
        nq = len(task.eval_q)
        res.eval_qps = {k: nq / med(v) for k, v in etimes.items()}
        ens = {k: v.mean(1).argmax(-1) for k, v in probs.items()}
        res.eval_check = {
            "max_abs_dp_loraens_vs_peft": float((probs["loraens"] - probs["peft_loop"]).abs().max()),
            "max_abs_dp_mixed_vs_loop": float((probs["peft_mixed"] - probs["peft_loop"]).abs().max()),
            "ensemble_argmax_agreement": float((ens["loraens"] == ens["peft_loop"]).float().mean()),
            "questions": nq,
        }
    res.seconds = time.perf_counter() - t_mode
    return res


# ---------------------------------------------------------------- (f) quality on a real run


def quality_check(args, tok, train_ex, eval_ex) -> dict:
    """Train the same M members for a few epochs three ways and compare their ensembles' metrics.

    Sides: loraens bf16 full depth (the reference), loraens bf16 with LoRA in the top K layers and
    the frozen-prefix cache, and (with --quality-peft) the PEFT-sequential fp32 baseline started
    from the SAME initial member weights, the same batches per member and the same LR schedule.
    Returns metrics with bootstrap intervals and paired differences against the reference.
    """
    scoring = Scoring(args.quality_mode)
    task = make_task(tok, scoring, train_ex, eval_ex)
    m, b = args.quality_members, args.batch_size
    n_layers = None
    train = TrainConfig(epochs=args.quality_epochs, lr=args.quality_lr, batch_size=b, max_grad_norm=MAX_GRAD_NORM,
                        eval_batch_size=args.eval_batch_size)
    out: dict = {"mode": MODE_NAMES[scoring], "members": m, "epochs": args.quality_epochs, "lr": args.quality_lr,
                 "train": len(task.train_q), "eval": len(task.eval_q), "sides": {}}
    probs: dict[str, torch.Tensor] = {}
    init_state = None
    names = (["full depth"] + (["top-K + prefix cache"] if args.prefix_fraction > 0 else [])
             + (["loraens fp32 full depth"] if args.quality_peft else []))
    for name in names:
        fp32 = name.startswith("loraens fp32")
        base, _ = load_base_model(ModelConfig(dtype=DType.FLOAT32) if fp32 else ModelConfig())
        n_layers = base.config.num_hidden_layers
        k = max(1, round(args.prefix_fraction * n_layers)) if name.startswith("top-K") else None
        cfg = EnsembleConfig(num_members=m, rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS, seed=SEED,
                             top_layers=k)
        attach_members(base, cfg)
        if init_state is None:
            init_state = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone())
                          for n, l in member_layers(base).items()}
        t0 = time.perf_counter()
        train_members(base, task.train_q, train, cfg, scoring, task.letter_ids, NORM, progress=False)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        probs[name] = predict(base, task.eval_q, task.eval_ids, m, scoring, task.letter_ids, NORM,
                              batch_size=args.eval_batch_size, progress=False).member_probs
        out["sides"][name] = {"train_s": t_train, "eval_s": time.perf_counter() - t0, "k": k}
        log(f"[quality] {name}: trained in {t_train:.0f} s")
        del base
        gc.collect()
    if args.quality_peft:
        peft_base, _ = load_base_model(ModelConfig(dtype=DType.FLOAT32, attn_implementation=args.baseline_attn))
        pm, p_params, p_opts = build_peft(peft_base, m, lr=train.lr, weight_decay=train.weight_decay)
        with torch.no_grad():  # the same initial weights as the loraens members
            for n_, (a, bb) in init_state.items():
                for kk in range(m):
                    mod = pm.get_submodule(f"base_model.model.{n_}")
                    mod.lora_A[f"m{kk}"].weight.copy_(a[kk])
                    mod.lora_B[f"m{kk}"].weight.copy_(bb[kk])
        n = len(task.train_q)
        lengths = np.array([q.num_tokens for q in task.train_q])
        steps = math.ceil(n / b) * args.quality_epochs
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, linear_schedule(steps, round(train.warmup_ratio * steps)))
                  for o in p_opts]
        t0 = time.perf_counter()
        for epoch in range(1, args.quality_epochs + 1):
            for chunk in member_batches(member_orders(n, m, epoch, SEED, True), lengths, b, train.bucket_window,
                                        SEED, epoch):
                for kk in range(m):  # one adapter after another, as bayesian-peft and BayesAdapt do
                    peft_member_step(pm, p_params, p_opts, kk, [task.train_q[i] for i in chunk[kk]], task)
                    scheds[kk].step()
        t_train = time.perf_counter() - t0
        log(f"[quality] PEFT-sequential: trained in {t_train:.0f} s")
        t0 = time.perf_counter()
        probs["PEFT-sequential fp32"] = peft_eval_loop(pm, task, m, args.eval_batch_size)
        out["sides"]["PEFT-sequential fp32"] = {"train_s": t_train, "eval_s": time.perf_counter() - t0, "k": None}
        del pm, peft_base
        gc.collect()
    targets = torch.tensor([q.answer for q in task.eval_q])
    ref = ensemble_probs(probs["full depth"])
    for name, p in probs.items():
        ens = ensemble_probs(p)
        side = out["sides"][name]
        side["cis"] = metric_cis(ens, targets, n_resamples=1000, seed=SEED)
        if name != "full depth":
            side["diff"] = paired_metric_diffs(ens, ref, targets, n_resamples=1000, seed=SEED)
            side["argmax_agreement"] = float((ens.argmax(-1) == ref.argmax(-1)).float().mean())
    if "PEFT-sequential fp32" in probs and "loraens fp32 full depth" in probs:
        # The same arithmetic on both sides: what remains is the vectorised member axis itself.
        ours32, peft32 = ensemble_probs(probs["loraens fp32 full depth"]), ensemble_probs(probs["PEFT-sequential fp32"])
        out["fp32_pair"] = {"diff": paired_metric_diffs(peft32, ours32, targets, n_resamples=1000, seed=SEED),
                            "argmax_agreement": float((peft32.argmax(-1) == ours32.argmax(-1)).float().mean()),
                            "max_prob_diff": float((probs["PEFT-sequential fp32"] - probs["loraens fp32 full depth"])
                                                   .abs().max())}
    out["layers"] = n_layers
    return out


def render_quality(q: dict) -> str:
    out = [(f"## (f) Quality on a real run: {q['mode']}, M = {q['members']}, {q['train']} training questions, "
            f"{q['epochs']} epochs at lr {q['lr']:g}, {q['eval']} evaluation questions\n")]
    out.append("| side | training (s) | ensemble accuracy | NLL | ECE | minus full depth: accuracy | NLL | ECE | "
               "same answer as full depth |")
    out.append("|---|---:|---|---|---|---|---|---|---:|")
    for name, side in q["sides"].items():
        label = name if side["k"] is None else f"top {side['k']} of {q['layers']} layers + prefix cache"
        cis = side["cis"]
        row = [label, f"{side['train_s']:.0f}", format_ci(cis["accuracy"]), format_ci(cis["nll"]), format_ci(cis["ece"])]
        if "diff" in side:
            d = side["diff"]
            row += [f"{format_ci(d[k])} p={d[k]['p_value']:.2f}" for k in ("accuracy", "nll", "ece")]
            row.append(f"{100 * side['argmax_agreement']:.0f}%")
        else:
            row += ["(reference)", "", "", ""]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append("95% percentile bootstrap intervals over the evaluation questions (1000 resamples); differences are "
               "paired over the same questions, with a two-sided p-value. The PEFT-sequential side (if shown) starts "
               "from the same initial member weights and sees the same batches with the same LR schedule, so "
               "differences come from bf16 vs fp32 arithmetic only; the top-K side trains fewer weights (LoRA only "
               "in the top K layers), which is its quality cost.\n")
    if "fp32_pair" in q:
        pair = q["fp32_pair"]
        d = pair["diff"]
        out.append("PEFT-sequential fp32 minus loraens fp32 (the same float32 arithmetic, the same initial weights and "
                   "batches; what differs is the vectorised member axis and the fused head): "
                   + ", ".join(f"{k} {format_ci(d[k])} p={d[k]['p_value']:.2f}" for k in ("accuracy", "nll", "ece"))
                   + f"; the same ensemble answer on {100 * pair['argmax_agreement']:.0f}% of the questions; largest "
                   f"member-probability difference {pair['max_prob_diff']:.4f}.\n")
    return "\n".join(out)


# ---------------------------------------------------------------- report


def machine_info(args) -> dict:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "?"

    import peft
    import transformers

    return {
        "date": sh("date"),
        "nproc": sh("nproc"),
        "cpu": sh("lscpu | grep 'Model name'").split(":", 1)[-1].strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load": sh("cat /proc/loadavg"),
        "matrix": matrix_units(),
    }


def matrix_units(cpuinfo: str | None = None) -> str:
    """The CPU's bf16 matrix instructions, from /proc/cpuinfo (or the text `cpuinfo`): what sets
    the bf16 peak of (d).

    With AMX tiles the bf16 peak is several times the AVX-512 BF16 one, so the same step has a far
    lower MFU there: the two kinds of machine are not comparable on that figure.
    """
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    if "amx_bf16" in flags:
        return "AMX bf16 tiles"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16, no AMX"
    return "no bf16 matrix instructions"


def fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def bf16_peak(peaks: dict, results: list[ModeResult]) -> float:
    """The bf16 peak MFU is against: the best square matmul, or the model's bare GEMMs where they were faster."""
    return max([peaks["bf16"]] + [x["linear_gflops"] * 1e9 for r in results for x in r.mfu])


def m16_target_row(results: list[ModeResult], mem: list[dict]) -> str:
    """The targets table's "M = 16 fits and runs" row: what ran at M = 16 in the memory
    subprocesses of (c)/(c2) and in (a)'s sweep."""
    m16 = [r for r in mem if r["side"] == "loraens" and r["m"] == 16]
    swept16 = [r for r in results if 16 in r.sweep and 16 in r.bf16]
    if not (m16 or swept16):
        return "| M = 16 fits and runs | not run | not measured |"
    ok = all("error" not in r for r in m16)
    ran = []
    if m16:
        n_ok = sum("error" not in r for r in m16)
        ran.append(f"{n_ok} of {len(m16)} memory subprocesses of three M = 16 steps each ran ((c), (c2))")
    if swept16:
        ran.append("trained in the sweep of (a) at " + ", ".join(
            f"{r.bf16[16]:.2f} member-examples/s ({r.mode})" for r in swept16))
    return f"| M = 16 fits and runs | {'; '.join(ran)} | {verdict(ok)} |"


def mfu_target_rows(results: list[ModeResult], peak: float, batch_size: int) -> list[str]:
    """The MFU rows of the targets table: eager at `batch_size`, compiled at each B of (g), the best
    configuration per mode, and the bound of (d) at each B. `peak` in FLOP/s."""
    out = []
    mfu = [(r.mode, r.gflops["bf16"] * 1e9 / peak) for r in results]
    out.append("| training step >= 60% of the bf16 matmul peak in model FLOPs | "
               + ", ".join(f"{s} {100 * x:.0f}%" for s, x in mfu)
               + f" at B = {batch_size} (estimate, see (d)) | {verdict(min(x for _, x in mfu) >= 0.6)} |")
    for b in sorted({b_ for r in results for b_ in r.compiled.get("by_b", {})}):
        rows_c = [(r.mode, r.compiled["by_b"][b]["gflops_compiled"] * 1e9 / peak) for r in results
                  if b in r.compiled.get("by_b", {})]
        out.append(f"| (B = {b}, `--train.compile`: measured in (g)) | "
                   + ", ".join(f"{mo} {100 * x:.0f}%" for mo, x in rows_c)
                   + f" | {verdict(min(x for _, x in rows_c) >= 0.6)} |")
    best = {}
    for r in results:  # every configuration measured: eager at each B of (d), compiled at each B of (g)
        cands = [(x["gflops"] * 1e9 / peak, f"eager, B = {x['b']}") for x in r.mfu]
        cands += [(x["gflops_compiled"] * 1e9 / peak, f"compiled, B = {b_}")
                  for b_, x in r.compiled.get("by_b", {}).items()]
        if cands:
            best[r.mode] = max(cands)
    if len(best) == len(results):
        out.append("| (the best configuration measured, per scoring mode) | "
                   + ", ".join(f"{mo} {100 * x:.0f}% ({how})" for mo, (x, how) in best.items())
                   + f" | {verdict(min(x for x, _ in best.values()) >= 0.6)} |")
    for b in sorted({x["b"] for r in results for x in r.mfu}):
        rows = [(r.mode, x) for r in results for x in r.mfu if x["b"] == b]
        bounds = [x["bound_gflops"] * 1e9 / peak for _, x in rows]
        # One decimal on the bound: the verdict compares it with 60%, so "60%" must not hide 59.6%.
        below = [mo for (mo, _), bound in zip(rows, bounds, strict=True) if bound < 0.6]
        verdict_b = ("60% is not excluded by the bound" if not below
                     else f"60% is out of reach at this batch size for {', '.join(below)}")
        out.append(f"| (B = {b}: measured; upper bound from the required kernels, bare) | "
                   + ", ".join(f"{mo} {100 * x['gflops'] * 1e9 / peak:.0f}% (bound {100 * bound:.1f}%)"
                               for (mo, x), bound in zip(rows, bounds, strict=True))
                   + f" | {verdict_b} |")
    return out


def render(args, info: dict, peaks: dict, results: list[ModeResult], mem: list[dict], wall: float,
           command: str) -> str:
    m = args.members
    b = args.batch_size
    out = []
    out.append("## Setup\n")
    out.append(f"- Date: {info['date']}")
    out.append(f"- Machine: {info['nproc']} CPUs ({info['cpu']}; {info.get('matrix', 'unknown')}); load average at start {info['load']}; "
               "the cores are shared with other work, so absolute figures are noisy, the side-by-side ratios less so.")
    out.append(f"- Software: Python {info['python']}, torch {info['torch']} ({info['threads']} threads), "
               f"transformers {info['transformers']}, peft {info['peft']}")
    out.append(f"- Command: `{command}` (wall time {wall / 60:.1f} min)")
    out.append(f"- Model: SmolLM2-135M(-Instruct) via `load_base_model(ModelConfig())`; data: {args.dataset} "
               f"train (seeded subsample of {args.train_pool}), eval on {args.eval_questions} {args.eval_split} questions.")
    out.append(f"- Both sides: LoRA r={RANK}, alpha={ALPHA:g}, targets {', '.join(TARGETS)}, no dropout, AdamW lr {LR}, "
               f"clip norm {MAX_GRAD_NORM}; B = {b} questions per member per step; the same questions at every step "
               f"(loraens' per-member orders and length bucketing); choice-likelihood normalisation: mean.")
    out.append(f"- Baseline (\"PEFT-sequential\"): one `peft` model with M adapters, float32, `set_adapter(k)` then "
               f"`model(input_ids, attention_mask).logits` (full vocabulary at every position), letter: last-position "
               f"logits at the letter tokens; choice-likelihood: one sequence per (question, choice), mean token "
               f"log-prob from a full-vocabulary log-softmax; cross-entropy, backward, clip, AdamW per adapter. "
               f"Attention implementation: `{args.baseline_attn}` (loraens: `{ModelConfig().attn_implementation}`, "
               "its default: transformers' eager without repeating the key/value heads, `loraens.attention`).")
    out.append(f"- Timing: {args.warmup} warm-up + {args.reps} timed steps, interleaved (all sides at each step, order "
               f"alternating); figures are medians. PEFT-sequential time for M members = sum of the M adapters' "
               f"step times at that step.\n")

    out.append(f"## (a) Training throughput at M = {m} (member-examples/s, median)\n")
    out.append("| scoring | PEFT-sequential fp32 | loraens fp32 | loraens bf16 | loraens bf16 / PEFT | "
               "loraens fp32 / PEFT | bf16 / fp32 (loraens) |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        out.append(f"| {r.mode} | {fmt(r.peft[m])} | {fmt(r.fp32[m])} | {fmt(r.bf16[m])} | "
                   f"**{fmt(r.bf16[m] / r.peft[m])}x** | {fmt(r.fp32[m] / r.peft[m])}x | {fmt(r.bf16[m] / r.fp32[m])}x |")
    out.append("")
    out.append("Median seconds per optimizer step (all M members) and tokens per member-example "
               "(what the forward passes hold, padding included):\n")
    out.append("| scoring | PEFT-seq s/step | loraens fp32 s/step | loraens bf16 s/step | real tokens | "
               "loraens tokens (packed) | PEFT padded tokens |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        out.append(f"| {r.mode} | {fmt(r.step_s[f'peft M={m}'])} | {fmt(r.step_s[f'fp32 M={m}'])} | "
                   f"{fmt(r.step_s[f'bf16 M={m}'])} | {fmt(r.padded['real'], 1)} | {fmt(r.padded['loraens'], 1)} | "
                   f"{fmt(r.padded['peft'], 1)} |")
    out.append("")
    if any(len(r.sweep) > 1 for r in results):
        out.append("### Sweep over M (member-examples/s, median; loraens bf16 vs PEFT-sequential fp32)\n")
        out.append("| scoring | M | PEFT-sequential | loraens bf16 | ratio | loraens bf16 vs its own M=1 |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for r in results:
            base1 = r.bf16.get(1)
            for mm in r.sweep:
                rel = fmt(r.bf16[mm] / base1) + "x" if base1 else "n/a"
                out.append(f"| {r.mode} | {mm} | {fmt(r.peft[mm])} | {fmt(r.bf16[mm])} | **{fmt(r.bf16[mm] / r.peft[mm])}x** | {rel} |")
        out.append("")

    if any(r.eval_qps for r in results):
        out.append(f"## (b) Evaluation throughput at M = {m} (questions/s, median of {args.eval_reps})\n")
        out.append("| scoring | loraens `predict` (bf16) | PEFT `set_adapter` loop | PEFT mixed batch `adapter_names` | "
                   "loraens / better PEFT | max abs diff of member probs, loraens vs PEFT | ensemble argmax agreement |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in results:
            if not r.eval_qps:
                continue
            q = r.eval_qps
            best = max(q["peft_loop"], q["peft_mixed"])
            out.append(f"| {r.mode} | {fmt(q['loraens'])} | {fmt(q['peft_loop'])} | {fmt(q['peft_mixed'])} | "
                       f"**{fmt(q['loraens'] / best)}x** | {r.eval_check['max_abs_dp_loraens_vs_peft']:.4f} | "
                       f"{100 * r.eval_check['ensemble_argmax_agreement']:.0f}% |")
        out.append("")
        out.append(f"Eval: one warm-up call of every side on 2 questions, then {args.eval_reps} timed passes over "
                   f"{args.eval_questions} questions, interleaved. "
                   f"Batches: loraens and the PEFT loop take {args.eval_batch_size} questions per forward "
                   f"(loraens: x M member rows); the mixed batch takes {args.eval_batch_size} // M questions x M "
                   "adapters per forward. All three score the same M adapters (the loraens members' weights are "
                   "copied into the PEFT adapters), so the probability columns compare bf16 loraens with the fp32 "
                   "PEFT reference (the mixed-batch forward matched the loop to "
                   + ", ".join(f"{r.eval_check['max_abs_dp_mixed_vs_loop']:.1e}" for r in results if r.eval_check)
                   + ").\n")

    if mem:
        out.append("## (c) Peak memory (RSS) of training, same rows per step\n")
        out.append("| side | scoring | M | B | rows | real tokens | RSS loaded (MB) | peak in training (MB) | "
                   "increment (MB) | peak vs M=1 | increment vs M=1 | s/step |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        ref = {}
        for r in mem:
            if "error" not in r and r["m"] == 1:
                ref[(r["side"], r["scoring"])] = r
        lean = [r for r in mem if r.get("lean")]
        for r in [r for r in mem if r not in lean]:
            label = "loraens bf16" if r["side"] == "loraens" else "PEFT-seq fp32"
            if "error" in r:
                out.append(f"| {label} | {r['scoring']} | {r['m']} | {r['b']} | {r['m'] * r['b']} | | | failed: {r['error']} | | | | |")
                continue
            one = ref.get((r["side"], r["scoring"]))
            inc = r["step_peak_mb"] - r["rss_before_mb"]
            rel = fmt(r["step_peak_mb"] / one["step_peak_mb"]) + "x" if one else "n/a"
            rel_inc = fmt(inc / max(1e-9, one["step_peak_mb"] - one["rss_before_mb"])) + "x" if one else "n/a"
            out.append(f"| {label} | {r['scoring']} | {r['m']} | {r['b']} | {r['m'] * r['b']} | {r['tokens']} | "
                       f"{r['rss_before_mb']:.0f} | {r['step_peak_mb']:.0f} | {inc:.0f} | {rel} | {rel_inc} | {r['seconds']:.1f} |")
        out.append("")
        out.append("One subprocess per row: load the model, build the members/adapters, reset the kernel's peak-RSS "
                   "counter (`/proc/self/clear_refs`), run three optimizer steps (PEFT: M adapter steps of B questions each), "
                   "read `VmHWM`; s/step is the median of the second and third steps (the first is cold), with the "
                   "questions in their file order (no length bucketing), so it is not the throughput of (a). The increment is that peak minus the RSS with the model and members loaded. Rows = M x B are the same questions for M = 1 and 5 (same tokens); M = 16 "
                   "(if shown) has B = 1 and so at most as many rows. The loraens base is bf16 (~270 MB), PEFT's fp32.\n")
        if lean:
            out.append(render_lean_memory(lean))

    out.append("## (d) Model-FLOP utilisation (estimate)\n")
    peak = bf16_peak(peaks, results)
    sizes = ", ".join(str(n) for n in PEAK_SIZES)
    out.append(f"Matmul peak measured in this run: the best n x n x n `torch.mm` over n = {sizes} (best of 5 each): "
               f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s (n = {peaks['fp32_n']}), bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s "
               f"(n = {peaks['bf16_n']}).")
    if peak > peaks["bf16"]:
        out.append(f"The model's own bf16 GEMMs, bare, ran faster than that at some batch sizes (table below), "
                   f"so the bf16 MFU below is against their {peak / 1e9:.0f} GFLOP/s: a peak is the best the "
                   "machine was seen to do.")
    out.append("")
    compiled = all(r.compiled for r in results)
    out.append("| scoring | loraens bf16 GFLOP/s | MFU vs bf16 peak | loraens fp32 GFLOP/s | MFU vs fp32 peak |"
               + (" bf16 + `--train.compile` GFLOP/s | its MFU |" if compiled else ""))
    out.append("|---|---:|---:|---:|---:|" + ("---:|---:|" if compiled else ""))
    for r in results:
        line = (f"| {r.mode} | {r.gflops['bf16']:.0f} | {100 * r.gflops['bf16'] * 1e9 / peak:.0f}% | "
                f"{r.gflops['fp32']:.0f} | {100 * r.gflops['fp32'] * 1e9 / peaks['fp32']:.0f}% |")
        if compiled:
            g = r.compiled["gflops_compiled"]
            line += f" {g:.0f} | {100 * g * 1e9 / peak:.0f}% |"
        out.append(line)
    out.append("")
    if compiled:
        out.append("The compiled column is from the steps of (g) (M = 5, after compilation).\n")
    if all(r.mfu for r in results):
        out.append("How high a step could go: the kernels a step cannot do without, timed bare (`bench/ceiling.py`) "
                   "at the shapes of the same steps. These are the base's linear layers (forward and activation "
                   "gradient, on the real tokens as if packed without padding; q/k/v and gate/up as one GEMM each "
                   "where that is faster; each product in the faster of its two layouts), the attention core of "
                   "every layer (the faster of bare bmm + softmax and `scaled_dot_product_attention`, forward and "
                   "backward, timed at the padded length and scaled to the causal work of the real lengths), the "
                   "LoRA updates (faster of float32 and bf16) and, for choice-likelihood, the full-vocabulary head "
                   "at the positions it reads (the last layer's MLP, like the step, at those positions only). "
                   "Best of 3 calls each. Norms, rotary, SwiGLU, residual adds, casts, the loss, the optimizer and "
                   "Python are counted as free, so model FLOPs over this time is an upper bound on MFU with this "
                   "torch on this machine (not with hand-written kernels that fuse elementwise work into the "
                   "GEMMs). B = questions per member (M = 5); the first row of each mode is the throughput "
                   "section's steps, the others are extra steps timed here.\n")
        out.append("| scoring | B | real tokens per step | measured s/step | measured GFLOP/s | measured MFU "
                   "| bare: linear ms | attention ms | LoRA ms | head ms | sum ms | bare linear GFLOP/s "
                   "| **MFU bound** | measured / bound |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            for x in r.mfu:
                out.append(f"| {r.mode} | {x['b']} | {x['tokens']:.0f} | {x['step_s']:.2f} | {x['gflops']:.0f} | "
                           f"{100 * x['gflops'] * 1e9 / peak:.0f}% | {1e3 * x['linear']:.0f} | "
                           f"{1e3 * x['attention']:.0f} | {1e3 * x['lora']:.0f} | {1e3 * x['head']:.0f} | "
                           f"{1e3 * x['total']:.0f} | {x['linear_gflops']:.0f} | "
                           f"**{100 * x['bound_gflops'] * 1e9 / peak:.0f}%** | {100 * x['gflops'] / x['bound_gflops']:.0f}% |")
        out.append("")
    if all(r.shares for r in results):
        out.append("Where a loraens bf16 step's time goes (`torch.profiler`, one more M = 5 step on the same "
                   "batches; shares of the ops' self time):\n")
        out.append("| scoring | GEMMs (mm, bmm, addmm) | dtype casts and copies | all other ops | profiled step (s) |")
        out.append("|---|---:|---:|---:|---:|")
        for r in results:
            sh = r.shares
            out.append(f"| {r.mode} | {100 * sh['gemm']:.0f}% | {100 * sh['casts']:.0f}% | "
                       f"{100 * sh['other ops']:.0f}% | {sh['seconds']:.2f} |")
        out.append("")
    out.append("Model FLOPs per training step on real (unpadded) tokens: 4 N per token for the frozen base (forward "
               "2 N + activation gradients 2 N; no weight gradients), N = decoder linear weights (embedding excluded); "
               "+ 6 r (in + out) per token per LoRA layer; the last layer's MLP only at the positions the head "
               "reads, as loraens runs it (`loraens.last_layer`); + 4 H V per distinct position that predicts a "
               "choice token for the choice-likelihood head (the prompt's last token predicts every choice's first "
               "token, and its head row is computed once). Only the work this algorithm needs is counted: what it "
               "skips (the head at every position, the last MLP elsewhere, padding) would raise the count without "
               "being useful. Attention scores (~2% here) are not counted, so MFU is conservative.\n")

    comp = [r for r in results if r.compiled]
    if comp:
        out.append(f"## (g) `torch.compile` of the decoder layers (`--train.compile`) vs eager (training, bf16, M = {m})\n")
        out.append("| scoring | eager s/step | compiled s/step | compiled / eager speed | first compiled step (s) "
                   "| steps to pay back the compilation |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for r in comp:
            c = r.compiled
            saved = c["eager_s"] - c["compiled_s"]
            payback = f"{(c['first_step_s'] - c['compiled_s']) / saved:.0f}" if saved > 0 else "never"
            out.append(f"| {r.mode} | {c['eager_s']:.2f} | {c['compiled_s']:.2f} | **{c['eager_s'] / c['compiled_s']:.2f}x** "
                       f"| {c['first_step_s']:.0f} | {payback} |")
        out.append("")
        out.append(f"Medians over {args.compile_steps} interleaved steps on the same batches (different lengths: "
                   "`dynamic=True` keeps one graph). The first compiled step includes the compilation (each mode starts from a dynamo reset and an empty Inductor disk cache; a user's later runs reuse the on-disk cache and start faster). "
                   "It pays back only on runs longer than the "
                   "payback column, so loraens' default, `--train.compile auto`, compiles runs of at least "
                   f"{AUTO_MIN_MEMBER_QUESTIONS:,} member-questions (steps x M x B; when a C++ compiler is found) "
                   "and runs shorter ones eagerly.\n")
        by_b = [(r, b_, x) for r in comp for b_, x in sorted(r.compiled.get("by_b", {}).items())]
        if len({b_ for _, b_, _ in by_b}) > 1:  # `peak`: (d)'s, computed above
            out.append(f"The same two sides (M = {m}) at each B of (d), measured the same way after an untimed "
                       "step at the new shape; model FLOPs as in (d):\n")
            out.append("| scoring | B | eager s/step | compiled s/step | compiled / eager speed | eager MFU "
                       "| compiled MFU |")
            out.append("|---|---:|---:|---:|---:|---:|---:|")
            for r, b_, x in by_b:
                out.append(f"| {r.mode} | {b_} | {x['eager_s']:.2f} | {x['compiled_s']:.2f} | "
                           f"**{x['eager_s'] / x['compiled_s']:.2f}x** | {100 * x['gflops_eager'] * 1e9 / peak:.0f}% | "
                           f"**{100 * x['gflops_compiled'] * 1e9 / peak:.0f}%** |")
            out.append("")
        ev = [r for r in comp if "eval_eager_s" in r.compiled]
        if ev:
            out.append(f"Evaluation ({ev[0].compiled['eval_questions']:.0f} questions, M = {m}, "
                       f"median of {args.eval_reps} interleaved passes) with the same compiled layers:\n")
            out.append("| scoring | first compiled pass (s) | compiled pass (s) | eager pass (s) | eager / compiled speed |")
            out.append("|---|---:|---:|---:|---:|")
            for r in ev:
                c = r.compiled
                out.append(f"| {r.mode} | {c['first_eval_s']:.1f} | {c['eval_compiled_s']:.2f} | {c['eval_eager_s']:.2f} "
                           f"| **{c['eval_compiled_s'] / c['eval_eager_s']:.2f}x** |")
            out.append("")
            slower = all(r.compiled["eval_compiled_s"] > r.compiled["eval_eager_s"] for r in ev)
            out.append("The first compiled pass includes a compilation of its own (the `no_grad` forward). "
                       + ("Compiled passes were slower than eager ones even after it, so it never pays back: "
                          if slower else "Compiled passes were not slower than eager in every mode here; ")
                       + "loraens evaluates eagerly even when training compiled (`predict(compiled=False)`, the "
                       "default).\n")

    pre = [r for r in results if r.prefix]
    if pre:
        out.append(f"## (e) Frozen-prefix mode vs full-depth LoRA (training, M = {m}, member-examples/s, median)\n")
        out.append("| scoring | LoRA layers | full depth (bf16) | top K + prefix cache, first epoch | "
                   "top K + prefix cache, later epochs | later / full | first / full | FLOP bound on later / full |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in pre:
            p_ = r.prefix
            out.append(f"| {r.mode} | top {p_['k']} of {p_['layers']} | {fmt(p_['full'])} | {fmt(p_['cold'])} | "
                       f"{fmt(p_['warm'])} | **{fmt(p_['warm'] / p_['full'])}x** | {fmt(p_['cold'] / p_['full'])}x | "
                       f"{fmt(p_['flop_bound'])}x |")
        out.append("")
        out.append("FLOP bound: model FLOPs of a full-depth step over those of a top-K step from the cache, on the "
                   "timed batches (the counting of (d)). The choice-likelihood head over the full vocabulary at every "
                   "position that predicts a choice token runs in both (its log-softmax needs every logit), and so does "
                   "the last layer, so neither mode can gain L/K-fold.\n")
        out.append("Both sides train the same M members on the same batches, interleaved. First epoch: every timed "
                   "question meets the cache for the first time, so its frozen bottom layers run once (without "
                   "gradient) before the top K; later epochs read the bottom from the cache and run only the top K "
                   "layers forward and backward. Evaluation gains too: the bottom runs once per question instead of "
                   "once per member. The quality cost is in (f) if that section is present.\n")

    out.append("## Issue 4 targets, as measured in this run\n")
    out.append("| target | measured | verdict |")
    out.append("|---|---|---|")
    tr = [r.bf16[m] / r.peft[m] for r in results]
    out.append(f"| training >= 2.0x PEFT-sequential at M = {m} | "
               + ", ".join(f"{r.mode} {r.bf16[m] / r.peft[m]:.2f}x" for r in results) + f" | {verdict(min(tr) >= 2.0)} |")
    if any(len(r.sweep) > 1 for r in results):
        worst = min((r.bf16[mm] / r.peft[mm], r.mode, mm) for r in results for mm in r.sweep)
        swept = sorted({mm for r in results for mm in r.sweep})
        missing = [x for x in (1, 2, 4, 8, 16) if x not in swept]
        note = f" for the M measured; M = {', '.join(map(str, missing))} not measured" if missing else ""
        out.append(f"| not behind at any M of the sweep (measured: M = {', '.join(map(str, swept))}) | lowest "
                   f"{worst[0]:.2f}x ({worst[1]}, M = {worst[2]}) | {verdict(worst[0] >= 1.0)}{note} |")
    else:
        out.append("| not behind at any M in the sweep | sweep not run | not measured |")
    ev = [r for r in results if r.eval_qps]
    if ev:
        er = [r.eval_qps["loraens"] / max(r.eval_qps["peft_loop"], r.eval_qps["peft_mixed"]) for r in ev]
        out.append("| evaluation >= 2.0x the better PEFT baseline | "
                   + ", ".join(f"{r.mode} {x:.2f}x" for r, x in zip(ev, er)) + f" | {verdict(min(er) >= 2.0)} |")
    else:
        out.append("| evaluation >= 2.0x the better PEFT baseline | not run | not measured |")
    mm = {(r["side"], r["scoring"], r["m"]): r for r in mem if "error" not in r}
    pairs = [(s, mm[("loraens", s, 5)]["step_peak_mb"] / mm[("loraens", s, 1)]["step_peak_mb"])
             for s in sorted({r["scoring"] for r in mem}) if ("loraens", s, 5) in mm and ("loraens", s, 1) in mm]
    if pairs:
        out.append("| peak RSS at M = 5 <= 1.3x M = 1 (same tokens per step) | "
                   + ", ".join(f"{s} {x:.2f}x" for s, x in pairs) + f" | {verdict(max(x for _, x in pairs) <= 1.3)} |")
    else:
        out.append("| peak RSS at M = 5 <= 1.3x M = 1 | not run | not measured |")
    out.append(m16_target_row(results, mem))
    out += mfu_target_rows(results, peak, args.batch_size)
    if pre:
        ratios = [(r.mode, r.prefix["warm"] / r.prefix["full"], r.prefix["cold"] / r.prefix["full"]) for r in pre]
        out.append(f"| frozen-prefix mode at K = {args.prefix_fraction:.0%} >= 3x full depth, with quality cost | "
                   + ", ".join(f"{mo} {w:.2f}x later epochs ({c:.2f}x first epoch)" for mo, w, c in ratios)
                   + f" | {verdict(min(w for _, w, _ in ratios) >= 3.0)} (steady state; quality cost in (f)) |")
        out.append("| (what is reachable: the FLOP bound of the top-K step) | "
                   + ", ".join(f"{r.mode} {r.prefix['flop_bound']:.2f}x" for r in pre)
                   + " | 3x is " + ("reachable" if min(r.prefix["flop_bound"] for r in pre) >= 3.0
                                    else "out of reach in FLOPs for " + ", ".join(
                                        r.mode for r in pre if r.prefix["flop_bound"] < 3.0)) + " |")
    else:
        out.append("| frozen-prefix mode at K = 25% >= 3x full depth, with quality cost | not run | not measured |")
    out.append("")
    return "\n".join(out)


NOT_MEASURED = """## Levers not used, and what these figures are not

- Choice-likelihood: the question is computed once per question and member because all choices
  are packed into ONE sequence with a block attention mask (the same saving as reusing the
  question's KV cache for every choice, without a second pass); the head runs only at the positions
  that predict a choice token, once per distinct position (the prompt's last token predicts every
  choice's first token), and the last layer's MLP runs only at the positions the head reads
  (`loraens.last_layer`; for letter scoring, the answer position). There is no separate KV-cache
  path.
- Member-axis chunking (`--train.member_chunk`) and gradient checkpointing
  (`--train.gradient_checkpointing`) are off by default: a step's activations grow with the rows
  M x B, not with M at a fixed number of rows (see (c)), and at the sequence lengths of these tasks
  (~40-110 tokens) M = 16 fits. (c2) measures what they save and cost when the rows do grow.
- Choice-likelihood's full-vocabulary head runs over vocabulary blocks whose float32 logits stay
  in cache (`loraens.head`), with bf16 GEMMs. In evaluation each block's logits are two GEMMs (the
  product and its rounding residual), exact to ~1e-4, which is work the FLOP count of (d) does not
  include; training uses the bf16 product alone.
- `torch.compile` is measured in (g). `--train.compile auto` (the default) compiles only runs of
  at least AUTO_MIN_MEMBER_QUESTIONS member-questions (steps x M x B), because on short runs the
  compilation costs more than it saves; the throughput sections above run eagerly.
- Tried and not kept: an RMSNorm with fewer memory passes (3 forward and 5 backward instead of
  about 6 and 10, same outputs). In two alternating runs of three M = 5 letter steps on the same
  batches (on an AMX machine) it took 0.94-1.19 s per step against 0.95-1.21 s with HF's norm (medians 1.09 and 1.17
  against 1.16 and 1.13 s): no consistent gain, so HF's norm stays.
- Each member's questions run end to end in one row (`loraens.packing`): the linear layers,
  norms and MLPs see no padding, only the members' totals are padded to the longest (the
  "loraens tokens (packed)" column of (a)); attention moves q, k and v to the padded
  per-question rows and back. `bench/bench_levers.py` times it on and off ("+ packed tokens").
  A prototype on an AMX machine gained nothing (0.99-1.01x: its GEMMs are so fast there that the
  token moves cost what the padding saved); on AVX-512 BF16 machines it pays (section (h)).
- MFU is an estimate from counted model FLOPs (see (d)), not a profiler measurement. The bf16
  peak depends on the CPU's matrix instructions (Setup names them): with AMX tiles it is about
  five times the AVX-512 BF16 peak, while the elementwise work of a step (norms, rotary, SwiGLU,
  softmax, casts, optimizer) runs at about the same speed on both, so the same code reaches a far
  lower MFU on an AMX machine. The MFU bound of (d) counts everything but the required kernels
  as free, so it is an upper bound for this torch build, not for hand-written fused kernels.
- `mode="max-autotune-no-cudagraphs"` (Inductor's C++ GEMM templates, which can fuse elementwise
  work into the GEMMs) was tried for `--train.compile` by hand, not in this script: on one M = 5,
  B = 4 letter run (on an AMX machine) its first step took 100 s and later steps 0.78-0.97 s (median 0.84 s), no
  faster than the default mode's 0.74-0.87 s, so the default mode stays.
- Each figure is one run on a shared 2-core machine; there are no confidence intervals beyond the
  medians over the timed steps.
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-child"]:
        memory_child(json.loads(argv[1]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Writes a Markdown report.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="M = 5 only (no sweep), 16 eval questions, memory for M = 1 and 5 (letter)")
    p.add_argument("--members", type=int, default=5, help="M of the main comparison")
    p.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2, 4, 8],
                   help="other M values for the training sweep (comma-separated; empty for none)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per member per optimizer step")
    p.add_argument("--mfu-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[8],
                   help="larger B at M = --members for the MFU section (d), beside --batch-size (empty for none; "
                   "default 8, loraens' own default; B = 16 at M = 5 holds about 11 GB of activations)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    p.add_argument("--reps", type=int, default=3, help="timed steps (medians are taken over these)")
    p.add_argument("--modes", default="letter,choice-likelihood", help="scoring modes, comma-separated")
    p.add_argument("--eval-questions", type=int, default=32, help="eval questions (0 skips the evaluation benchmark)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="questions per eval forward")
    p.add_argument("--eval-reps", type=int, default=3, help="timed eval passes (after a warm-up on 2 questions)")
    p.add_argument("--memory-members", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 5, 16],
                   help="M values of the memory subprocesses (empty for none); PEFT runs for M <= 5")
    p.add_argument("--memory-rows", type=int, default=20, help="rows (M x B) per training step in the memory runs")
    p.add_argument("--memory-modes", default="letter", help="scoring modes of the memory runs")
    p.add_argument("--memory-lean", type=lambda s: tuple(int(x) for x in s.lower().split("x")) if s else None,
                   default=(16, 4), help="M x B of the member-chunking / gradient-checkpointing memory rows "
                   "(chunks of M // 4 members; empty for none)")
    p.add_argument("--dataset", default="arc_easy")
    p.add_argument("--data-dir", default=os.environ.get("LORAENS_DATA_DIR", "/work/shared/data/mcqa"))
    p.add_argument("--eval-split", default="validation")
    p.add_argument("--train-pool", type=int, default=256, help="training questions drawn (seeded) from the split")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--baseline-attn", default="eager",
                   help="attention implementation of the PEFT baseline (eager = transformers' eager, which loraens' default runs without repeating key/value heads; sdpa = HF default)")
    p.add_argument("--prefix-fraction", type=float, default=0.25,
                   help="frozen-prefix mode: LoRA in the top K = fraction x layers (0 skips it)")
    p.add_argument("--compile-steps", type=int, default=4,
                   help="timed steps of torch.compile vs eager after the compiling first step (0 skips it)")
    p.add_argument("--quality-mode", default="choice-likelihood", help="scoring mode of the quality run")
    p.add_argument("--quality-train", type=int, default=0, help="training questions of the quality run (0 skips it)")
    p.add_argument("--quality-eval", type=int, default=200, help="evaluation questions of the quality run")
    p.add_argument("--quality-epochs", type=int, default=2)
    p.add_argument("--quality-lr", type=float, default=1e-3)
    p.add_argument("--quality-members", type=int, default=4)
    p.add_argument("--quality-peft", action="store_true", help="also train the PEFT-sequential fp32 baseline (and loraens in fp32, to compare the same arithmetic) in the quality run")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="Markdown report to write ('' = do not write)")
    args = p.parse_args(argv)
    if args.quick:
        args.sweep, args.eval_questions, args.mfu_batches = [], min(args.eval_questions, 16), []
        args.memory_members = [x for x in args.memory_members if x != 16]
        args.memory_lean = None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    command = "python bench/bench.py " + " ".join(shlex.quote(a) for a in argv)
    t_start = time.perf_counter()
    info = machine_info(args)
    log(f"machine: {info}")

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[name], peaks[f"{name}_n"] = matmul_peak(dtype)
    log(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s (n = {peaks['fp32_n']}), "
        f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s (n = {peaks['bf16_n']})")

    base_bf16, tok = load_base_model(ModelConfig())
    base_fp32, _ = load_base_model(ModelConfig(dtype=DType.FLOAT32))
    train_ex = load_mcqa(args.dataset, "train", data_dir=args.data_dir, limit=args.train_pool, seed=SEED)
    eval_ex = load_mcqa(args.dataset, args.eval_split, data_dir=args.data_dir,
                        limit=max(1, args.eval_questions), seed=SEED)
    modes = [Scoring(s) for s in args.modes.split(",") if s]
    results = []
    for scoring in modes:
        # PEFT wraps its base in place: a fresh fp32 copy per mode.
        peft_base, _ = load_base_model(ModelConfig(dtype=DType.FLOAT32, attn_implementation=args.baseline_attn))
        results.append(bench_mode(args, scoring, tok, base_bf16, base_fp32, peft_base, train_ex, eval_ex))
        log(f"[{MODE_NAMES[scoring]}] done in {results[-1].seconds:.0f} s")
        del peft_base
        gc.collect()
    del base_bf16, base_fp32
    release_memory()  # the memory subprocesses below need the RAM the training steps above held

    mem = []
    if args.memory_members:
        configs = []
        for s in [x for x in args.memory_modes.split(",") if x]:
            for m in args.memory_members:
                b = max(1, args.memory_rows // m)
                configs.append(("loraens", s, m, b))
                if m <= 5:
                    configs.append(("peft", s, m, b))
        if args.memory_lean:
            m, b = args.memory_lean
            s = next(x for x in args.memory_modes.split(",") if x)
            configs += [("loraens", s, m, b, chunk, gc_on) for chunk, gc_on in
                        ((None, False), (max(1, m // 4), False), (None, True), (max(1, m // 4), True))]
        mem = run_memory(args, configs)

    quality = None
    if args.quality_train:
        q_train = load_mcqa(args.dataset, "train", data_dir=args.data_dir, limit=args.quality_train, seed=SEED + 1)
        q_eval = load_mcqa(args.dataset, args.eval_split, data_dir=args.data_dir, limit=args.quality_eval, seed=SEED + 1)
        quality = quality_check(args, tok, q_train, q_eval)

    wall = time.perf_counter() - t_start
    body = render(args, info, peaks, results, mem, wall, command)
    if quality is not None:
        body += "\n" + render_quality(quality)
    report = ("# Benchmarks: loraens vs the PEFT-sequential way\n\n"
              "Issue 4. Every figure below is from ONE run of the command shown, with both sides measured side "
              "by side in the same process; ratios are against the named baseline from that same run.\n\n"
              + body + "\n" + NOT_MEASURED.replace("AUTO_MIN_MEMBER_QUESTIONS", f"{AUTO_MIN_MEMBER_QUESTIONS:,}"))
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report)
        log(f"wrote {args.out}")
    log(f"total wall time {wall:.0f} s")


if __name__ == "__main__":
    main()

"""loraens on one CUDA GPU against PEFT, at three model shapes, side by side in one process (issue 18).

    python bench/bench_gpu.py [--out BENCHMARKS.md]

No weights are downloaded: every model is built from its config with seeded random weights, at
the shapes of SmolLM2-135M, Qwen2.5-1.5B and Llama-2-7B (random weights are fine for throughput).
Questions are ARC-Easy's (loraens' own data lookup: --data-dir or $LORAENS_DATA_DIR), tokenized
with SmolLM2's tokenizer (--tokenizer); token ids beyond a shape's vocabulary wrap around it.
Both sides are bf16 on the same GPU: loraens (bf16 base, float32 LoRA and AdamW state, its
defaults) and PEFT (bf16 base, PEFT's float32 adapters, transformers' SDPA attention). Sections:

(a) training throughput at M members: loraens' vectorised step against PEFT-sequential (the M
    adapters trained one after another, each on its own batch), interleaved step by step,
    medians; with loraens' model-FLOP utilisation against the bf16 matmul peak measured here;
(b) evaluation throughput at M: `loraens.predict` against PEFT's `set_adapter` loop and PEFT's
    mixed-batch `adapter_names` forward, the same adapter weights on every side;
(c) peak GPU memory (`torch.cuda.max_memory_allocated`) of a training step at M = 1, 5, 16
    with the same rows per step, one model on the GPU at a time;
(d) the step at larger batches: MFU against B;
(e) attention implementations on CUDA (loraens_sdpa, loraens_flex, loraens_grouped_eager);
(f) the speed levers on CUDA, each switched off against all on, and `torch.compile`.

Everything is written under --log-dir as it is measured, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # `python bench/bench_gpu.py`: import bench/ as the package `bench`, from the checkout
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch

from bench.common import (
    ALPHA,
    MODE_NAMES,
    RANK,
    SEED,
    TARGETS,
    LoraensSide,
    Task,
    build_loraens,
    fmt,
    full_batches,
    log,
    loraens_step,
    make_task,
    side_scorer,
    write_marked_block,
)
from bench.flops import flop_model, loraens_step_flops
from bench.peft_baseline import build_peft, copy_members_into_peft, peft_eval_loop, peft_eval_mixed, peft_member_step
from loraens.config import Scoring, SpeedConfig
from loraens.data import load_mcqa
from loraens.ensemble import member_layers
from loraens.fast import attention as _attention  # noqa: F401  (registers loraens' attention implementations)
from loraens.fast.compiling import compile_decoder_layers
from loraens.fast.support import FLEX, GROUPED_EAGER, SDPA_PACKED
from loraens.predict import predict

GB = 1024**3


def shape_configs() -> dict:
    """The model shapes, as transformers configs (random weights; `tiny` is for a CPU dry run)."""
    from transformers import LlamaConfig, Qwen2Config

    return {
        "tiny": LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                    rope_theta=100000.0, max_position_embeddings=8192),
        "qwen2.5-1.5b": Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                    rope_theta=1000000.0, max_position_embeddings=32768),
        "llama-2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                                  max_position_embeddings=4096),
    }


# ---------------------------------------------------------------- setup


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_peak(device: torch.device, n: int, reps: int) -> float:
    """Median bf16 FLOP/s of an n x n x n matmul on random data (CUDA events; CPU: perf_counter)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(timed(lambda: torch.mm(a, b), device))
    return 2 * n**3 / statistics.median(times)


def build_model(config, attn: str, device: torch.device) -> torch.nn.Module:
    """A bf16 causal LM of `config`'s shape with seeded random weights, on `device`, frozen, eval mode."""
    from transformers import AutoModelForCausalLM

    config = dataclasses.replace(config) if dataclasses.is_dataclass(config) else config.__class__(**config.to_dict())
    config._attn_implementation = attn
    config.use_cache = False
    torch.manual_seed(SEED)  # the same weights on every side
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    return model.eval()


def wrap_ids(task: Task, vocab: int) -> Task:
    """`task` with every token id taken modulo `vocab` (a shape whose vocabulary is smaller than the
    tokenizer's: the weights are random, so only the lengths matter)."""
    def wrap(q):
        return dataclasses.replace(q, prompt_ids=tuple(i % vocab for i in q.prompt_ids),
                                   continuations=tuple(tuple(i % vocab for i in c) for c in q.continuations))

    return dataclasses.replace(task, train_q=[wrap(q) for q in task.train_q], eval_q=[wrap(q) for q in task.eval_q],
                               letter_ids=tuple(i % vocab for i in task.letter_ids))


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- measurements


@dataclass
class Bench:
    """What every measurement needs: the settings, the device, the peak, and where results go."""

    args: argparse.Namespace
    device: torch.device
    peak: float
    tok: object
    train_ex: list
    eval_ex: list
    deadline: float
    results: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        path = Path(self.args.log_dir) / "bench_gpu.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results, indent=1, default=str))

    def task(self, scoring: Scoring, vocab: int) -> Task:
        task = make_task(self.tok, scoring, self.train_ex, self.eval_ex)
        return wrap_ids(task, vocab) if vocab < len(self.tok) else task


def peft_step(pm, params, opts, task: Task, chunk: np.ndarray) -> None:
    """PEFT-sequential: adapter k trains on member k's questions of `chunk` [M, B], one after another."""
    for k in range(chunk.shape[0]):
        peft_member_step(pm, params, opts, k, [task.train_q[i] for i in chunk[k]], task)


def measure_training(b: Bench, shape: str, scoring: Scoring) -> dict:
    """(a): loraens vs PEFT-sequential at M = --members, B = --batch-size, interleaved steps."""
    a, dev = b.args, b.device
    cfg = shape_configs()[shape]
    task = b.task(scoring, cfg.vocab_size)
    m = a.members
    chunks = full_batches(task, m, a.batch_size, a.warmup + a.reps)
    if not chunks:
        return {"skipped": f"too few training questions for {a.warmup + a.reps} steps of {m} x {a.batch_size}"}
    ours = build_loraens(build_model(cfg, SDPA_PACKED, dev), m, in_place=True)
    pm, params, opts = build_peft(build_model(cfg, "sdpa", dev), m)
    fm = flop_model(ours.model)
    times: dict[str, list[float]] = {"loraens": [], "peft": []}
    for i, chunk in enumerate(chunks):
        jobs = [("loraens", lambda c=chunk: loraens_step(ours, task, c)),
                ("peft", lambda c=chunk: peft_step(pm, params, opts, task, c))]
        for name, fn in (jobs if i % 2 == 0 else jobs[::-1]):
            seconds = timed(fn, dev)
            if i >= a.warmup:
                times[name].append(seconds)
    flops = statistics.median(loraens_step_flops(task, c, fm) for c in chunks[a.warmup:])
    t_ours, t_peft = statistics.median(times["loraens"]), statistics.median(times["peft"])
    out = {"members": m, "batch_size": a.batch_size, "loraens_s": t_ours, "peft_s": t_peft,
           "loraens_member_examples_per_s": m * a.batch_size / t_ours,
           "peft_member_examples_per_s": m * a.batch_size / t_peft, "speedup": t_peft / t_ours,
           "model_tflop_per_step": flops / 1e12, "mfu": flops / t_ours / b.peak,
           "tokens_per_step": int(statistics.median(sum(task.train_q[i].num_tokens for i in c.reshape(-1))
                                                    for c in chunks[a.warmup:]))}
    if a.eval_questions:
        out["eval"] = measure_eval(b, task, ours, pm)
    return out  # the models go with this frame; `main` releases the memory


def measure_eval(b: Bench, task: Task, ours: LoraensSide, pm) -> dict:
    """(b): questions/s of loraens `predict` vs the PEFT loop vs PEFT's mixed batch, same weights."""
    a, dev, m = b.args, b.device, b.args.members
    copy_members_into_peft(ours.model, pm, m)
    scorer = side_scorer(ours, task)
    jobs = {
        "loraens": lambda t: predict(ours.model, t.eval_q, t.eval_ids, m, scorer, batch_size=a.eval_batch_size,
                                     progress=False).member_probs,
        "peft_loop": lambda t: peft_eval_loop(pm, t, m, a.eval_batch_size),
        "peft_mixed": lambda t: peft_eval_mixed(pm, t, m, a.eval_batch_size),
    }
    small = dataclasses.replace(task, eval_q=task.eval_q[:2], eval_ids=task.eval_ids[:2])
    for fn in jobs.values():  # warm-up
        fn(small)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    probs = {}
    for r in range(a.eval_reps):
        for name in (list(jobs) if r % 2 == 0 else list(jobs)[::-1]):
            sync(dev)
            t0 = time.perf_counter()
            probs[name] = jobs[name](task)
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    ours.model.train()
    pm.train()
    qps = {k: len(task.eval_q) / statistics.median(v) for k, v in times.items()}
    best = max(qps["peft_loop"], qps["peft_mixed"])
    agree = (probs["loraens"].mean(1).argmax(-1) == probs["peft_loop"].mean(1).argmax(-1)).float().mean()
    return {"questions": len(task.eval_q), "questions_per_s": qps, "speedup_vs_better_peft": qps["loraens"] / best,
            "max_abs_dp_vs_peft": float((probs["loraens"] - probs["peft_loop"]).abs().max()),
            "ensemble_argmax_agreement": float(agree)}


def measure_memory(b: Bench, shape: str, scoring: Scoring) -> dict:
    """(c): peak GPU memory of a training step at M = --memory-members with --memory-rows rows (M x B)
    per step, one model on the GPU at a time; the peak of the second step (the first allocates
    the optimizer state), with what was resident before it. Every M trains on the same questions
    (the M = 1 batch's, split among the members), so the tokens per step are equal."""
    a, dev = b.args, b.device
    cfg = shape_configs()[shape]
    task = b.task(scoring, cfg.vocab_size)
    same = full_batches(task, 1, a.memory_rows, 2)  # [1, rows] twice
    rows = {}
    for m in a.memory_members:
        bsz = a.memory_rows // m
        if not same or a.memory_rows % m:
            rows[m] = {"skipped": "too few questions" if not same else f"--memory-rows is not a multiple of M = {m}"}
            continue
        chunks = [c.reshape(m, bsz) for c in same]
        release(dev)
        side = build_loraens(build_model(cfg, SDPA_PACKED, dev), m, in_place=True)
        loraens_step(side, task, chunks[0])
        sync(dev)
        resident = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        loraens_step(side, task, chunks[1])
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
        rows[m] = {"batch_size": bsz, "rows": m * bsz, "peak_gb": peak / GB, "resident_gb": resident / GB,
                   "tokens": int(sum(task.train_q[i].num_tokens for i in chunks[1].reshape(-1)))}
        log(f"  memory {shape} M = {m} x B = {bsz}: peak {peak / GB:.2f} GB (resident {resident / GB:.2f} GB)")
        del side
        release(dev)
    base = rows.get(1, {}).get("peak_gb")
    for r in rows.values():
        if base and "peak_gb" in r:
            r["ratio_vs_m1"] = r["peak_gb"] / base
    return rows


def step_seconds(side: LoraensSide, task: Task, chunks: list[np.ndarray], warmup: int, dev: torch.device,
                 speed: SpeedConfig | None = None) -> tuple[float, float]:
    """(median s/step over the timed chunks, seconds of the first warm-up step)."""
    first = None
    times = []
    for i, chunk in enumerate(chunks):
        s = timed(lambda c=chunk: loraens_step(side, task, c, speed=speed), dev)
        if i == 0:
            first = s
        if i >= warmup:
            times.append(s)
    return statistics.median(times), first


def measure_batch_sizes(b: Bench, shape: str, scoring: Scoring) -> dict:
    """(d): the loraens step at M = --members and B in --mfu-batches: s/step, tokens, MFU."""
    a, dev = b.args, b.device
    cfg = shape_configs()[shape]
    task = b.task(scoring, cfg.vocab_size)
    side = build_loraens(build_model(cfg, SDPA_PACKED, dev), a.members, in_place=True)
    fm = flop_model(side.model)
    out = {}
    for bsz in a.mfu_batches:
        chunks = full_batches(task, a.members, bsz, a.warmup + a.reps)
        if not chunks or b.left() < 20:
            out[bsz] = {"skipped": "too few questions" if not chunks else "time budget"}
            continue
        s, _ = step_seconds(side, task, chunks, a.warmup, dev)
        flops = statistics.median(loraens_step_flops(task, c, fm) for c in chunks[a.warmup:])
        out[bsz] = {"s_per_step": s, "mfu": flops / s / b.peak, "model_tflop_per_step": flops / 1e12,
                    "member_examples_per_s": a.members * bsz / s}
        log(f"  {shape} {MODE_NAMES[scoring]} B = {bsz}: {s * 1e3:.0f} ms/step, MFU {100 * out[bsz]['mfu']:.1f}%")
    del side
    release(dev)
    return out


def measure_attention(b: Bench, shape: str, scoring: Scoring) -> dict:
    """(e): the same step with each of loraens' attention implementations (first step: compile time)."""
    a, dev = b.args, b.device
    cfg = shape_configs()[shape]
    task = b.task(scoring, cfg.vocab_size)
    chunks = full_batches(task, a.members, a.batch_size, a.warmup + a.reps)
    out = {}
    for attn in (SDPA_PACKED, FLEX, GROUPED_EAGER):
        if b.left() < 60:
            out[attn] = {"skipped": "time budget"}
            continue
        side = build_loraens(build_model(cfg, attn, dev), a.members, in_place=True)
        try:
            s, first = step_seconds(side, task, chunks, a.warmup, dev)
            out[attn] = {"s_per_step": s, "first_step_s": first}
            log(f"  attention {attn}: {s * 1e3:.0f} ms/step (first step {first:.1f} s)")
        except Exception as err:  # noqa: BLE001 - a failing implementation is a result, not the end of the run
            out[attn] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            log(f"  attention {attn}: failed: {out[attn]['error']}")
        del side
        release(dev)
    return out


LEVERS = [f.name for f in dataclasses.fields(SpeedConfig)]


def measure_levers(b: Bench, shape: str, scoring: Scoring) -> dict:
    """(f): each `--speed.*` lever off against all on, interleaved on the same batches; then
    `torch.compile` of the decoder layers (first step, then steps) against eager."""
    a, dev = b.args, b.device
    cfg = shape_configs()[shape]
    task = b.task(scoring, cfg.vocab_size)
    chunks = full_batches(task, a.members, a.batch_size, a.warmup + a.reps)
    side = build_loraens(build_model(cfg, SDPA_PACKED, dev), a.members, in_place=True)
    variants = {"all on": SpeedConfig(), **{f"{lever} off": SpeedConfig(**{lever: False}) for lever in LEVERS}}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i, chunk in enumerate(chunks):
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            speed = variants[name]
            for layer in member_layers(side.model).values():
                layer.fused_update = speed.fused_update
            s = timed(lambda c=chunk, sp=speed: loraens_step(side, task, c, speed=sp), dev)
            if i >= a.warmup:
                times[name].append(s)
    for layer in member_layers(side.model).values():
        layer.fused_update = True
    out: dict = {"levers": {k: statistics.median(v) for k, v in times.items()}}
    out["levers_speed_vs_all_on"] = {k: out["levers"][k] / out["levers"]["all on"] for k in variants}
    log("  levers: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in out["levers"].items()))
    if a.compile and b.left() > 150:
        eager = build_loraens(build_model(cfg, SDPA_PACKED, dev), a.members, in_place=True)
        compile_decoder_layers(side.model)
        try:
            first = timed(lambda: loraens_step(side, task, chunks[0]), dev)
            pair = {"eager": [], "compiled": []}
            for i, chunk in enumerate(chunks[1:]):
                for name, s_ in ((("eager", eager), ("compiled", side)) if i % 2 == 0 else
                                 (("compiled", side), ("eager", eager))):
                    pair[name].append(timed(lambda c=chunk, sd=s_: loraens_step(sd, task, c), dev))
            out["compile"] = {"first_step_s": first, "eager_s": statistics.median(pair["eager"][1:] or pair["eager"]),
                              "compiled_s": statistics.median(pair["compiled"][1:] or pair["compiled"])}
            log(f"  compile: first step {first:.1f} s, eager {out['compile']['eager_s'] * 1e3:.0f} ms, "
                f"compiled {out['compile']['compiled_s'] * 1e3:.0f} ms")
        except Exception as err:  # noqa: BLE001
            out["compile"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    else:
        out["compile"] = {"skipped": "--no-compile" if not a.compile else "time budget"}
    return out


# ---------------------------------------------------------------- report


def render(b: Bench, command: str, wall: float) -> str:
    r, a = b.results, b.args
    lines = [
        "# GPU benchmarks: loraens vs PEFT on one CUDA GPU",
        "",
        f"One run of `{command}` ({wall / 60:.1f} min), every figure side by side in that run; ratios are "
        "against the named baseline from the same run, medians over the timed steps.",
        "",
        "## Setup",
        "",
        f"- GPU: **{r['setup']['gpu']}**; torch {r['setup']['torch']}, transformers {r['setup']['transformers']}, "
        f"peft {r['setup']['peft']}; Python {r['setup']['python']}.",
        f"- bf16 matmul peak measured here: **{r['setup']['peak_tflops']:.0f} TFLOP/s** "
        f"({a.peak_n}^3 on random data, median of {a.peak_reps}).",
        f"- Models built from configs with seeded random weights; M = {a.members} members, rank {RANK}, "
        f"alpha {ALPHA:g}, on {', '.join(TARGETS)}; B = {a.batch_size} questions per member per step; "
        f"{a.warmup} warm-up and {a.reps} timed steps; ARC-Easy questions, SmolLM2's tokenizer.",
        "- loraens: bf16 base, float32 LoRA and AdamW, `--model.attn_implementation auto` (loraens_sdpa on "
        "CUDA), its default levers. PEFT: bf16 base, PEFT's float32 adapters, transformers' SDPA, full-vocabulary "
        "logits, choice-likelihood as one sequence per (question, choice).",
        "",
        "## (a) Training throughput, loraens vs PEFT-sequential (bf16 both)",
        "",
        "| shape | scoring | tokens/step | loraens s/step | PEFT-seq s/step | loraens member-ex/s | PEFT member-ex/s "
        "| speed-up | loraens MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in r.get("training", {}).items():
        if "skipped" in row or "error" in row:
            lines.append(f"| {key.replace('/', ' | ')} | {row.get('skipped') or row.get('error')} |||||||")
            continue
        lines.append(
            f"| {key.replace('/', ' | ')} | {row['tokens_per_step']} | {row['loraens_s']:.3f} | "
            f"{row['peft_s']:.3f} | {row['loraens_member_examples_per_s']:.1f} | "
            f"{row['peft_member_examples_per_s']:.1f} | **{row['speedup']:.2f}x** | {100 * row['mfu']:.1f}% |"
        )
    lines += [
        "",
        "## (b) Evaluation throughput (questions/s), loraens vs PEFT",
        "",
        "| shape | scoring | questions | loraens | PEFT set_adapter loop | PEFT adapter_names batch | "
        "vs the better PEFT | max abs dp | same ensemble answer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in r.get("training", {}).items():
        e = row.get("eval")
        if not e:
            continue
        q = e["questions_per_s"]
        lines.append(
            f"| {key.replace('/', ' | ')} | {e['questions']} | {q['loraens']:.1f} | {q['peft_loop']:.1f} | "
            f"{q['peft_mixed']:.1f} | **{e['speedup_vs_better_peft']:.2f}x** | "
            f"{e['max_abs_dp_vs_peft']:.3f} | {100 * e['ensemble_argmax_agreement']:.0f}% |"
        )
    lines += [
        "",
        f"## (c) Peak GPU memory of a training step, {a.memory_rows} rows (M x B) per step",
        "",
        "| shape | scoring | M | B | tokens | peak GB | resident before the step GB | peak vs M = 1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, rows in r.get("memory", {}).items():
        for m, row in rows.items():
            if "peak_gb" in row:
                lines.append(
                    f"| {key.replace('/', ' | ')} | {m} | {row['batch_size']} | {row['tokens']} | "
                    f"{row['peak_gb']:.2f} | {row['resident_gb']:.2f} | {fmt(row.get('ratio_vs_m1'))}x |"
                )
    lines += [
        "",
        f"## (d) MFU against the batch size, M = {a.members}",
        "",
        "| shape | scoring | B | s/step | member-ex/s | model TFLOP/step | MFU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, rows in r.get("batch_sizes", {}).items():
        for bsz, row in rows.items():
            if "mfu" in row:
                lines.append(
                    f"| {key.replace('/', ' | ')} | {bsz} | {row['s_per_step']:.3f} | "
                    f"{row['member_examples_per_s']:.1f} | {row['model_tflop_per_step']:.1f} | "
                    f"{100 * row['mfu']:.1f}% |"
                )
    lines += [
        "",
        f"## (e) Attention implementations on CUDA, M = {a.members}, B = {a.batch_size}",
        "",
        "| shape | scoring | implementation | s/step | first step s |",
        "|---|---|---|---:|---:|",
    ]
    for key, rows in r.get("attention", {}).items():
        for attn, row in rows.items():
            cell = (
                f"{row['s_per_step']:.3f} | {row['first_step_s']:.1f}"
                if "s_per_step" in row
                else f"{row.get('error') or row.get('skipped')} |"
            )
            lines.append(f"| {key.replace('/', ' | ')} | {attn} | {cell} |")
    lines += [
        "",
        f"## (f) Speed levers on CUDA, M = {a.members}, B = {a.batch_size}",
        "",
        "| shape | scoring | variant | s/step | time vs all on |",
        "|---|---|---|---:|---:|",
    ]
    for key, row in r.get("levers", {}).items():
        for name, s in row.get("levers", {}).items():
            lines.append(
                f"| {key.replace('/', ' | ')} | {name} | {s:.3f} | {row['levers_speed_vs_all_on'][name]:.2f}x |"
            )
        c = row.get("compile", {})
        if "compiled_s" in c:
            lines.append(
                f"| {key.replace('/', ' | ')} | torch.compile (first step {c['first_step_s']:.0f} s) | "
                f"{c['compiled_s']:.3f} | {c['compiled_s'] / c['eager_s']:.2f}x of eager |"
            )
        elif c:
            lines.append(f"| {key.replace('/', ' | ')} | torch.compile | {c.get('error') or c.get('skipped')} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--shapes",
        default="smollm2-135m,qwen2.5-1.5b,llama-2-7b",
        help="model shapes for (a)-(c), comma-separated (tiny: a CPU dry run)",
    )
    p.add_argument("--modes", default="choice-likelihood,letter", help="scoring modes of (a)-(b)")
    p.add_argument("--members", type=int, default=5, help="M of (a), (b), (d)-(f)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per member per step (loraens' default)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--reps", type=int, default=5, help="timed steps")
    p.add_argument("--eval-questions", type=int, default=64, help="questions of (b) (0 skips it)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-reps", type=int, default=3)
    p.add_argument("--memory-members", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 5, 16])
    p.add_argument("--memory-rows", type=int, default=80, help="M x B of each memory row (the same tokens for every M)")
    p.add_argument("--memory-shapes", default="llama-2-7b", help="shapes of (c)")
    p.add_argument("--mfu-shape", default="llama-2-7b", help="shape of (d)")
    p.add_argument("--mfu-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[8, 16, 32])
    p.add_argument("--attention-shape", default="qwen2.5-1.5b", help="shape of (e) ('' skips it)")
    p.add_argument("--levers-shape", default="llama-2-7b", help="shape of (f) ('' skips it)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile in (f)")
    p.add_argument("--train-pool", type=int, default=400, help="training questions drawn (seeded) from ARC-Easy")
    p.add_argument("--dataset", default="arc_easy")
    p.add_argument("--data-dir", default=None, help="local mirror of the datasets (default: loraens' own lookup)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="folder with SmolLM2's tokenizer (default: the converted default model in loraens' cache)",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-n", type=int, default=8192)
    p.add_argument("--peak-reps", type=int, default=10)
    p.add_argument("--budget", type=float, default=450, help="seconds; later sections are skipped past it")
    p.add_argument("--log-dir", default="bench_gpu_out", help="raw results (JSON) as they are measured")
    p.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"),
        help="Markdown file whose GPU block is rewritten ('' = do not write)",
    )
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA GPU is visible; pass --device cpu --shapes tiny for a dry run.")
    from transformers import AutoTokenizer

    tok_dir = args.tokenizer
    if tok_dir is None:
        from loraens.model import converted_gguf_dir, default_gguf_path

        tok_dir = str(converted_gguf_dir(default_gguf_path()))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    train_ex = load_mcqa(args.dataset, "train", data_dir=args.data_dir, limit=args.train_pool, seed=SEED)
    eval_ex = load_mcqa(
        args.dataset, "validation", data_dir=args.data_dir, limit=max(2, args.eval_questions), seed=SEED
    )
    import peft
    import transformers

    peak = matmul_peak(device, args.peak_n, args.peak_reps)
    b = Bench(args, device, peak, tok, train_ex, eval_ex, start + args.budget)
    b.results["setup"] = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "peak_tflops": peak / 1e12,
    }
    log(f"setup: {b.results['setup']}")
    b.save()
    modes = [Scoring(m) for m in args.modes.split(",") if m]
    sections = []
    for shape in [s for s in args.shapes.split(",") if s]:
        for scoring in modes:
            sections.append(("training", shape, scoring, measure_training))
    for shape in [s for s in args.memory_shapes.split(",") if s]:
        sections.append(("memory", shape, modes[0], measure_memory))
    if args.mfu_shape:
        sections.append(("batch_sizes", args.mfu_shape, modes[0], measure_batch_sizes))
    if args.levers_shape:
        sections.append(("levers", args.levers_shape, modes[0], measure_levers))
    if args.attention_shape:
        sections.append(("attention", args.attention_shape, modes[0], measure_attention))
    for name, shape, scoring, fn in sections:
        key = f"{shape}/{MODE_NAMES[scoring]}"
        if b.left() < 15:
            b.results.setdefault(name, {})[key] = {"skipped": "time budget"}
            log(f"({name}) {key}: skipped (time budget)")
            continue
        log(f"({name}) {key} ...")
        t0 = time.perf_counter()
        try:
            b.results.setdefault(name, {})[key] = fn(b, shape, scoring)
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
            b.results.setdefault(name, {})[key] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
            log(f"({name}) {key}: failed: {type(err).__name__}: {err}")
            release(device)
        release(device)  # the section's models are gone with its frame
        log(f"({name}) {key}: {time.perf_counter() - t0:.0f} s {json.dumps(b.results[name][key], default=str)[:400]}")
        b.save()
    wall = time.perf_counter() - start
    command = "python bench/bench_gpu.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])
    )
    report = render(b, command, wall)
    (Path(args.log_dir) / "bench_gpu.md").write_text(report)
    print("\n" + report)
    if args.out:
        write_marked_block(args.out, "bench_gpu.py", report)
        log(f"wrote the GPU block of {args.out}")
    log(f"total wall time {wall:.0f} s")


if __name__ == "__main__":
    main()

"""The timed measurements of one scoring mode, one function per section of the report.

`bench_mode` builds both sides once and runs, in this order: the interleaved training steps of
(a), the padding and FLOP accounting of those steps, the MFU rows and the profile of (e), the
frozen-prefix mode of (g), `torch.compile` of (f), and the evaluation of (b) (last: it frees
the sides the other sections trained). `run_modes` loads the models and data and runs every mode.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from loraens.config import DType, ModelConfig, Scoring
from loraens.data import load_mcqa
from loraens.fast.compiling import compile_decoder_layers
from loraens.model import load_base_model
from loraens.predict import predict
from loraens.scoring import Scorer
from loraens.train import member_batches, member_orders

from .common import (
    MODE_NAMES,
    NORM,
    SEED,
    LoraensSide,
    Task,
    build_loraens,
    full_batches,
    log,
    loraens_step,
    make_task,
    med,
    release_memory,
)
from .config import BenchConfig
from .flops import FlopModel, flop_model, loraens_step_flops, padded_tokens, step_bound, step_time_shares
from .peft_baseline import build_peft, copy_members_into_peft, peft_eval_loop, peft_eval_mixed, peft_member_step


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
    mfu: list[dict] = field(default_factory=list)  # per batch size: measured step vs required kernels (e)
    seconds: float = 0.0


def run_modes(cfg: BenchConfig) -> tuple[list[ModeResult], object]:
    """Load the models and questions, run `bench_mode` for each of --modes; (results, tokenizer)."""
    base_bf16, tok = load_base_model(ModelConfig())
    base_fp32, _ = load_base_model(ModelConfig(dtype=DType.FLOAT32))
    train_ex = load_mcqa(cfg.dataset, "train", data_dir=cfg.data_dir, limit=cfg.train_pool, seed=SEED)
    eval_ex = load_mcqa(cfg.dataset, cfg.eval_split, data_dir=cfg.data_dir, limit=max(1, cfg.eval_questions),
                        seed=SEED)
    results = []
    for scoring in [Scoring(s) for s in cfg.modes.split(",") if s]:
        # PEFT wraps its base in place: a fresh fp32 copy per mode.
        peft_base, _ = load_base_model(ModelConfig(dtype=DType.FLOAT32, attn_implementation=cfg.baseline_attn))
        results.append(bench_mode(cfg, scoring, tok, base_bf16, base_fp32, peft_base, train_ex, eval_ex))
        log(f"[{MODE_NAMES[scoring]}] done in {results[-1].seconds:.0f} s")
        del peft_base
        gc.collect()
    del base_bf16, base_fp32
    release_memory()  # the memory subprocesses that follow need the RAM the training steps held
    return results, tok


def bench_mode(cfg: BenchConfig, scoring: Scoring, tok, base_bf16, base_fp32, peft_base, train_ex, eval_ex,
               ) -> ModeResult:
    t_mode = time.perf_counter()
    task = make_task(tok, scoring, train_ex, eval_ex)
    m_main = cfg.members
    sweep = sorted(set(cfg.sweep) | {m_main})
    res = ModeResult(MODE_NAMES[scoring], cfg.batch_size, m_main, sweep, cfg.reps)
    chunks = training_chunks(task, max(sweep), cfg.batch_size, cfg.warmup + cfg.reps)

    log(f"[{res.mode}] building models: PEFT fp32 with {max(sweep)} adapters, loraens bf16 M={sweep}, "
        f"loraens fp32 M={m_main}")
    peft = build_peft(peft_base, max(sweep))
    ours = {m: build_loraens(base_bf16, m) for m in sweep}
    ours32 = build_loraens(base_fp32, m_main)

    # (a) training throughput, and the padding and model FLOPs of the same steps at M = m_main.
    times = time_training(res.mode, task, chunks, cfg.warmup, peft, ours, ours32)
    fill_throughput(res, times)
    timed = chunks[cfg.warmup:]
    fm = flop_model(ours[m_main].model)
    fill_accounting(res, task, timed, times, fm)
    # (e) The same steps' required kernels, bare, and the MFU at larger batches.
    res.mfu = mfu_rows(cfg, task, base_bf16, ours[m_main], timed, times[("bf16", m_main)], fm)
    # One more step of the same batches under the profiler: what the time that is not GEMMs is.
    res.shares = step_time_shares(lambda: loraens_step(ours[m_main], task, timed[0][:m_main]))
    if cfg.prefix_fraction > 0:  # (g)
        ours32 = None
        gc.collect()
        res.prefix = measure_prefix(cfg, task, base_bf16, chunks, fm, res.mode)
        gc.collect()
    if cfg.compile_steps:  # (f)
        res.compiled = measure_compile(cfg, task, base_bf16, chunks, fm, res.mode)
        gc.collect()
    if cfg.eval_questions:  # (b)
        copy_members_into_peft(ours[m_main].model, peft[0], m_main)
        ours32 = None
        ours = {m_main: ours[m_main]}
        gc.collect()
        res.eval_qps, res.eval_check = measure_eval(cfg, task, ours[m_main].model, peft[0], res.mode)
    res.seconds = time.perf_counter() - t_mode
    return res


def training_chunks(task: Task, m_max: int, b: int, n_steps: int) -> list[np.ndarray]:
    """Every member's batches [m_max, b] at the first `n_steps` full steps of epoch 1; member k's
    batches do not depend on M."""
    n = len(task.train_q)
    lengths = np.array([q.num_tokens for q in task.train_q])
    chunks = member_batches(member_orders(n, m_max, 1, SEED, True), lengths, b, 8, SEED, 1)
    if len(chunks) < n_steps:
        raise SystemExit(f"--train-pool {n} gives {len(chunks)} steps per epoch; need {n_steps}.")
    return [c for c in chunks if c.shape[1] == b][:n_steps]


# ---------------------------------------------------------------- (a) training throughput


def time_training(label: str, task: Task, chunks: list[np.ndarray], warmup: int, peft: tuple,
                  ours: dict[int, LoraensSide], ours32: LoraensSide) -> dict[tuple[str, int], list[float]]:
    """Section (a)'s steps, interleaved: at every step each PEFT adapter k (of M = max sweep),
    each loraens bf16 side and the loraens fp32 side take one step on the same batches, in an
    order that alternates from step to step. Seconds per (side, k or M) over the timed steps."""
    pm, p_params, p_opts = peft
    m_max = len(p_opts)
    times: dict[tuple[str, int], list[float]] = {}
    for s, chunk in enumerate(chunks):
        jobs = [(("peft", k), lambda k=k, chunk=chunk: peft_member_step(
            pm, p_params, p_opts, k, [task.train_q[i] for i in chunk[k]], task)) for k in range(m_max)]
        jobs += [(("bf16", m), lambda m=m, chunk=chunk: loraens_step(ours[m], task, chunk[:m])) for m in ours]
        jobs += [(("fp32", ours32.m), lambda chunk=chunk: loraens_step(ours32, task, chunk[:ours32.m]))]
        if s % 2:
            jobs.reverse()
        t_step = time.perf_counter()
        for key, fn in jobs:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if s >= warmup:
                times.setdefault(key, []).append(dt)
        tag = "warm-up" if s < warmup else "timed"
        log(f"[{label}] step {s + 1}/{len(chunks)} ({tag}) took {time.perf_counter() - t_step:.1f} s")
        if s >= warmup:
            log("    " + "  ".join(f"{a}:{b}={times[(a, b)][-1]:.2f}s" for a, b in sorted(times)))
    return times


def fill_throughput(res: ModeResult, times: dict[tuple[str, int], list[float]]) -> None:
    """Member-examples/s and s/step of each side: PEFT-sequential for M members = the sum of its
    first M adapters' step times at each step."""
    b, m_main = res.batch_size, res.members
    for m in res.sweep:
        peft_steps = [sum(times[("peft", k)][i] for k in range(m)) for i in range(res.reps)]
        res.peft[m] = m * b / med(peft_steps)
        res.bf16[m] = m * b / med(times[("bf16", m)])
        res.step_s[f"peft M={m}"] = med(peft_steps)
        res.step_s[f"bf16 M={m}"] = med(times[("bf16", m)])
    res.fp32[m_main] = m_main * b / med(times[("fp32", m_main)])
    res.step_s[f"fp32 M={m_main}"] = med(times[("fp32", m_main)])


def fill_accounting(res: ModeResult, task: Task, timed: list[np.ndarray], times: dict, fm: FlopModel) -> None:
    """Tokens per member-example (real, loraens packed, PEFT padded) and the model GFLOP/s of the
    timed steps at M = res.members."""
    m, b = res.members, res.batch_size
    pads = [padded_tokens(task, c[:m]) for c in timed]
    res.padded["loraens"] = sum(p[0] for p in pads) / (len(timed) * m * b)
    res.padded["peft"] = sum(p[1] for p in pads) / (len(timed) * m * b)
    real = sum(task.train_q[i].num_tokens for c in timed for i in c[:m].reshape(-1))
    res.padded["real"] = real / (len(timed) * m * b)
    flops = sum(loraens_step_flops(task, c[:m], fm) for c in timed)
    res.gflops["bf16"] = flops / sum(times[("bf16", m)]) / 1e9
    res.gflops["fp32"] = flops / sum(times[("fp32", m)]) / 1e9


# ---------------------------------------------------------------- (e) model-FLOP utilisation


def mfu_rows(cfg: BenchConfig, task: Task, base, side: LoraensSide, timed: list[np.ndarray], timed_s: list[float],
             fm: FlopModel) -> list[dict]:
    """Section (e): per batch size B, a bf16 step's model GFLOP/s and the bound from its required kernels.

    B = --batch-size reuses the throughput section's timed steps (`timed`, `timed_s`); every other
    B of --mfu-batches trains a fresh M-member side for --warmup + --reps steps of B questions per
    member. Each timed step's required kernels are then timed bare (`step_bound`).
    """
    m = side.m
    rows = []
    for b in [cfg.batch_size] + [x for x in cfg.mfu_batches if x != cfg.batch_size]:
        if b == cfg.batch_size:
            steps, secs = [c[:m] for c in timed], list(timed_s)
        else:
            steps = full_batches(task, m, b, cfg.warmup + cfg.reps)
            if not steps:
                log(f"[{MODE_NAMES[task.scoring]}] MFU at B = {b}: too few questions for {cfg.warmup + cfg.reps} "
                    "steps; skipped")
                continue
            fresh = build_loraens(base, m)
            secs = []
            for i, chunk in enumerate(steps):
                t0 = time.perf_counter()
                loraens_step(fresh, task, chunk)
                if i >= cfg.warmup:
                    secs.append(time.perf_counter() - t0)
            steps = steps[cfg.warmup:]
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


# ---------------------------------------------------------------- (f) torch.compile vs eager


def measure_compile(cfg: BenchConfig, task: Task, base, chunks: list[np.ndarray], fm: FlopModel, label: str) -> dict:
    """Section (f): `torch.compile` of the decoder layers (--train.compile) vs eager, bf16, M =
    --members, the same batches: the first compiled step pays for compilation; then interleaved
    timed steps, at --batch-size and at each B of --mfu-batches; then evaluation (if
    --eval-questions) on the compiled side, compiled vs eager."""
    m = cfg.members
    eager_side = build_loraens(base, m)
    comp_side = build_loraens(base, m)
    # Each mode compiles anew: dynamo's traced graphs are dropped and Inductor gets an empty
    # on-disk cache (kernels compiled earlier in this process can still be found in memory).
    torch._dynamo.reset()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="loraens-bench-inductor-")
    compile_decoder_layers(comp_side.model)
    t0 = time.perf_counter()
    loraens_step(comp_side, task, chunks[0][:m])
    first = time.perf_counter() - t0
    loraens_step(eager_side, task, chunks[0][:m])
    steps = [chunks[(1 + i) % len(chunks)][:m] for i in range(cfg.compile_steps)]
    out = {"first_step_s": first, **time_compiled_steps(task, steps, eager_side, comp_side, fm)}
    log(f"[{label}] compile: first step {first:.1f} s; eager {out['eager_s']:.2f} s/step, "
        f"compiled {out['compiled_s']:.2f} s/step")
    # The same two sides at the larger B of (e): does compilation lift the MFU there too?
    out["by_b"] = {cfg.batch_size: {k: out[k] for k in ("eager_s", "compiled_s", "gflops_eager", "gflops_compiled")}}
    for b in [x for x in cfg.mfu_batches if x != cfg.batch_size]:
        steps = full_batches(task, m, b, 1 + cfg.compile_steps)
        if not steps:
            log(f"[{label}] compile at B = {b}: too few questions for {1 + cfg.compile_steps} steps; skipped")
            continue
        for side in (comp_side, eager_side):  # untimed: a recompilation, if the new shape needs one
            loraens_step(side, task, steps[0])
        out["by_b"][b] = time_compiled_steps(task, steps[1:], eager_side, comp_side, fm)
        log(f"[{label}] compile at B = {b}: eager {out['by_b'][b]['eager_s']:.2f} s/step, "
            f"compiled {out['by_b'][b]['compiled_s']:.2f} s/step")
    if cfg.eval_questions:
        out.update(time_compiled_eval(cfg, task, comp_side.model, label))
    return out


def time_compiled_steps(task: Task, steps: list[np.ndarray], eager_side: LoraensSide, comp_side: LoraensSide,
                        fm: FlopModel) -> dict[str, float]:
    """One step of each side per batch of `steps`, in alternating order: median s/step and GFLOP/s."""
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    pair = [("eager", eager_side), ("compiled", comp_side)]
    for i, chunk in enumerate(steps):
        for name, side in (pair if i % 2 == 0 else pair[::-1]):
            t0 = time.perf_counter()
            loraens_step(side, task, chunk)
            times[name].append(time.perf_counter() - t0)
    flops = sum(loraens_step_flops(task, c, fm) for c in steps)
    return {"eager_s": med(times["eager"]), "compiled_s": med(times["compiled"]),
            "gflops_eager": flops / sum(times["eager"]) / 1e9, "gflops_compiled": flops / sum(times["compiled"]) / 1e9}


def time_compiled_eval(cfg: BenchConfig, task: Task, model, label: str) -> dict[str, float]:
    """Evaluation of the compiled model with its compiled layers (predict(compiled=True): the
    first pass compiles the no_grad graph) against the same layers run eagerly, which is what
    loraens' evaluation does. Then interleaved passes over the same questions."""
    def evaluate(compiled: bool) -> float:
        t0 = time.perf_counter()
        predict(model, task.eval_q, task.eval_ids, cfg.members, Scorer(task.scoring, task.letter_ids, NORM),
                batch_size=cfg.eval_batch_size, progress=False, compiled=compiled)
        return time.perf_counter() - t0

    out = {"eval_questions": len(task.eval_q), "first_eval_s": evaluate(True)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(cfg.eval_reps):
        for compiled in ((True, False) if r % 2 else (False, True)):
            times[compiled].append(evaluate(compiled))
    out["eval_compiled_s"] = med(times[True])
    out["eval_eager_s"] = med(times[False])
    log(f"[{label}] compile: evaluation of {len(task.eval_q)} questions: first compiled pass "
        f"{out['first_eval_s']:.1f} s, then compiled {out['eval_compiled_s']:.2f} s, "
        f"eager {out['eval_eager_s']:.2f} s")
    return out


# ---------------------------------------------------------------- (g) frozen-prefix mode


def measure_prefix(cfg: BenchConfig, task: Task, base, chunks: list[np.ndarray], fm: FlopModel, label: str,
                   ) -> dict[str, float]:
    """Section (g): LoRA in the top K layers with the prefix cache vs full-depth LoRA, bf16, M =
    --members, the same batches. Pass 1 meets every timed question for the first time (cache
    misses: what epoch 1 costs); pass 2 repeats the same steps (cache hits: every later epoch)."""
    m = cfg.members
    n_layers = base.config.num_hidden_layers
    k = max(1, round(cfg.prefix_fraction * n_layers))
    full_side = build_loraens(base, m)
    pre_side = build_loraens(base, m, top_layers=k)
    times: dict[str, list[float]] = {}
    for phase in ("cold", "warm"):
        for s, chunk in enumerate(chunks):
            jobs = [("full", lambda chunk=chunk: loraens_step(full_side, task, chunk[:m])),
                    (phase, lambda chunk=chunk: loraens_step(pre_side, task, chunk[:m]))]
            if s % 2:
                jobs.reverse()
            for name, fn in jobs:
                t0 = time.perf_counter()
                fn()
                if s >= cfg.warmup:
                    times.setdefault(name, []).append(time.perf_counter() - t0)
        log(f"[{label}] prefix {phase} pass: " + ", ".join(f"{a} {med(v):.2f}s" for a, v in times.items()))
    out = {"k": k, "layers": n_layers, **{name: m * cfg.batch_size / med(v) for name, v in times.items()}}
    # The most the top-K mode can gain in model FLOPs: the top K of the layers (and of the LoRA
    # work) against all of them; the choice-likelihood head runs in both.
    timed = chunks[cfg.warmup:]
    f_full = sum(loraens_step_flops(task, c[:m], fm) for c in timed)
    f_top = sum(loraens_step_flops(task, c[:m], fm.top(k, n_layers)) for c in timed)
    out["flop_bound"] = f_full / f_top
    return out


# ---------------------------------------------------------------- (b) evaluation throughput


def measure_eval(cfg: BenchConfig, task: Task, model, pm, label: str) -> tuple[dict[str, float], dict[str, float]]:
    """Section (b): loraens `predict` vs the PEFT `set_adapter` loop vs PEFT's mixed batch, M =
    --members, the same adapter weights on every side (copied into `pm` beforehand). Returns
    questions/s per side and the agreement of their probabilities."""
    m, bs = cfg.members, cfg.eval_batch_size

    def run_ours(t: Task) -> torch.Tensor:
        return predict(model, t.eval_q, t.eval_ids, m, Scorer(t.scoring, t.letter_ids, NORM),
                       batch_size=bs, progress=False).member_probs

    eval_jobs = [("loraens", run_ours), ("peft_loop", lambda t: peft_eval_loop(pm, t, m, bs)),
                 ("peft_mixed", lambda t: peft_eval_mixed(pm, t, m, bs))]
    # Warm-up on 2 questions (every side once), then the timed passes over all of them.
    tiny = dataclasses.replace(task, eval_q=task.eval_q[:2], eval_ids=task.eval_ids[:2])
    for _, fn in eval_jobs:
        fn(tiny)
    times: dict[str, list[float]] = {}
    probs: dict[str, torch.Tensor] = {}
    for r in range(cfg.eval_reps):
        order = eval_jobs if r % 2 == 0 else eval_jobs[::-1]
        for name, fn in order:
            t0 = time.perf_counter()
            probs[name] = fn(task)
            times.setdefault(name, []).append(time.perf_counter() - t0)
        log(f"[{label}] eval pass {r + 1}/{cfg.eval_reps} done: "
            + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    nq = len(task.eval_q)
    ens = {k: v.mean(1).argmax(-1) for k, v in probs.items()}
    check = {
        "max_abs_dp_loraens_vs_peft": float((probs["loraens"] - probs["peft_loop"]).abs().max()),
        "max_abs_dp_mixed_vs_loop": float((probs["peft_mixed"] - probs["peft_loop"]).abs().max()),
        "ensemble_argmax_agreement": float((ens["loraens"] == ens["peft_loop"]).float().mean()),
        "questions": nq,
    }
    return {k: nq / med(v) for k, v in times.items()}, check

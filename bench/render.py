"""The Markdown report of `bench/bench.py`: one function per section, in the order they print.

Setup; (a) training throughput (and the sweep over M); (b) evaluation throughput; (c) peak
memory; (d) member-axis chunking and gradient checkpointing; (e) model-FLOP utilisation; (f)
`torch.compile`; (g) the frozen-prefix mode; the issue-4 targets (`targets.py`); (h) quality on
a real run; what these figures are not. Section (i) of BENCHMARKS.md, the lever ladder of
`bench/bench_levers.py`, is written by hand outside the script's block.
"""

from __future__ import annotations

from loraens.bootstrap import format_ci
from loraens.config import ModelConfig
from loraens.fast.compiling import AUTO_MIN_MEMBER_QUESTIONS

from .common import ALPHA, LR, MAX_GRAD_NORM, RANK, TARGETS, fmt
from .config import BenchConfig
from .flops import PEAK_SIZES, bf16_peak
from .measure import ModeResult
from .targets import render_targets

TITLE = "# Benchmarks: loraens vs the PEFT-sequential way\n"
INTRO = ("Issue 4. Every figure below is from ONE run of the command shown, with both sides measured side by side "
         "in the same process; ratios are against the named baseline from that same run.\n")


def render_report(cfg: BenchConfig, info: dict, peaks: dict, results: list[ModeResult], mem: list[dict],
                  quality: dict | None, wall: float, command: str) -> str:
    """The script's whole block of BENCHMARKS.md (everything but the file's title)."""
    peak = bf16_peak(peaks, results)
    lean = [r for r in mem if r.get("lean")]
    out = render_setup(cfg, info, wall, command)
    out += render_training(results, cfg.members)
    if any(r.eval_qps for r in results):
        out += render_eval(results, cfg)
    if mem:
        out += render_memory([r for r in mem if r not in lean])
        if lean:
            out += render_lean_memory(lean)
    out += render_mfu(results, peaks, peak)
    if any(r.compiled for r in results):
        out += render_compile(results, cfg, peak)
    if any(r.prefix for r in results):
        out += render_prefix(results, cfg.members)
    out += render_targets(results, mem, peak, cfg.members, cfg.batch_size, cfg.prefix_fraction)
    body = "\n".join(out)
    if quality is not None:
        body += "\n" + "\n".join(render_quality(quality))
    return INTRO + "\n" + body + "\n" + NOT_MEASURED.replace("AUTO_MIN_MEMBER_QUESTIONS",
                                                             f"{AUTO_MIN_MEMBER_QUESTIONS:,}")


def render_setup(cfg: BenchConfig, info: dict, wall: float, command: str) -> list[str]:
    return [
        "## Setup\n",
        f"- Date: {info['date']}",
        f"- Machine: {info['nproc']} CPUs ({info['cpu']}; {info.get('matrix', 'unknown')}); load average at start "
        f"{info['load']}; the cores are shared with other work, so absolute figures are noisy, the side-by-side "
        "ratios less so.",
        f"- Software: Python {info['python']}, torch {info['torch']} ({info['threads']} threads), "
        f"transformers {info['transformers']}, peft {info['peft']}",
        f"- Command: `{command}` (wall time {wall / 60:.1f} min)",
        f"- Model: SmolLM2-135M(-Instruct) via `load_base_model(ModelConfig())`; data: {cfg.dataset} "
        f"train (seeded subsample of {cfg.train_pool}), eval on {cfg.eval_questions} {cfg.eval_split} questions.",
        f"- Both sides: LoRA r={RANK}, alpha={ALPHA:g}, targets {', '.join(TARGETS)}, no dropout, AdamW lr {LR}, "
        f"clip norm {MAX_GRAD_NORM}; B = {cfg.batch_size} questions per member per step; the same questions at every "
        "step (loraens' per-member orders and length bucketing); choice-likelihood normalisation: mean.",
        "- Baseline (\"PEFT-sequential\"): one `peft` model with M adapters, float32, `set_adapter(k)` then "
        "`model(input_ids, attention_mask).logits` (full vocabulary at every position), letter: last-position "
        "logits at the letter tokens; choice-likelihood: one sequence per (question, choice), mean token "
        "log-prob from a full-vocabulary log-softmax; cross-entropy, backward, clip, AdamW per adapter. "
        f"Attention implementation: `{cfg.baseline_attn}` (loraens: `{ModelConfig().attn_implementation}`, "
        "its default: transformers' eager without repeating the key/value heads, `loraens.attention`).",
        f"- Timing: {cfg.warmup} warm-up + {cfg.reps} timed steps, interleaved (all sides at each step, order "
        "alternating); figures are medians. PEFT-sequential time for M members = sum of the M adapters' "
        "step times at that step.\n",
    ]


def render_training(results: list[ModeResult], m: int) -> list[str]:
    """(a): throughput at M = m, seconds and tokens per step, and the sweep over M."""
    out = [f"## (a) Training throughput at M = {m} (member-examples/s, median)\n",
           "| scoring | PEFT-sequential fp32 | loraens fp32 | loraens bf16 | loraens bf16 / PEFT | "
           "loraens fp32 / PEFT | bf16 / fp32 (loraens) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        out.append(f"| {r.mode} | {fmt(r.peft[m])} | {fmt(r.fp32[m])} | {fmt(r.bf16[m])} | "
                   f"**{fmt(r.bf16[m] / r.peft[m])}x** | {fmt(r.fp32[m] / r.peft[m])}x | "
                   f"{fmt(r.bf16[m] / r.fp32[m])}x |")
    out += ["", "Median seconds per optimizer step (all M members) and tokens per member-example "
            "(what the forward passes hold, padding included):\n",
            "| scoring | PEFT-seq s/step | loraens fp32 s/step | loraens bf16 s/step | real tokens | "
            "loraens tokens (packed) | PEFT padded tokens |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        out.append(f"| {r.mode} | {fmt(r.step_s[f'peft M={m}'])} | {fmt(r.step_s[f'fp32 M={m}'])} | "
                   f"{fmt(r.step_s[f'bf16 M={m}'])} | {fmt(r.padded['real'], 1)} | {fmt(r.padded['loraens'], 1)} | "
                   f"{fmt(r.padded['peft'], 1)} |")
    out.append("")
    if any(len(r.sweep) > 1 for r in results):
        out += ["### Sweep over M (member-examples/s, median; loraens bf16 vs PEFT-sequential fp32)\n",
                "| scoring | M | PEFT-sequential | loraens bf16 | ratio | loraens bf16 vs its own M=1 |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in results:
            base1 = r.bf16.get(1)
            for mm in r.sweep:
                rel = fmt(r.bf16[mm] / base1) + "x" if base1 else "n/a"
                out.append(f"| {r.mode} | {mm} | {fmt(r.peft[mm])} | {fmt(r.bf16[mm])} | "
                           f"**{fmt(r.bf16[mm] / r.peft[mm])}x** | {rel} |")
        out.append("")
    return out


def render_eval(results: list[ModeResult], cfg: BenchConfig) -> list[str]:
    """(b): evaluation throughput of the three sides and the agreement of their probabilities."""
    out = [f"## (b) Evaluation throughput at M = {cfg.members} (questions/s, median of {cfg.eval_reps})\n",
           "| scoring | loraens `predict` (bf16) | PEFT `set_adapter` loop | PEFT mixed batch `adapter_names` | "
           "loraens / better PEFT | max abs diff of member probs, loraens vs PEFT | ensemble argmax agreement |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if not r.eval_qps:
            continue
        q = r.eval_qps
        best = max(q["peft_loop"], q["peft_mixed"])
        out.append(f"| {r.mode} | {fmt(q['loraens'])} | {fmt(q['peft_loop'])} | {fmt(q['peft_mixed'])} | "
                   f"**{fmt(q['loraens'] / best)}x** | {r.eval_check['max_abs_dp_loraens_vs_peft']:.4f} | "
                   f"{100 * r.eval_check['ensemble_argmax_agreement']:.0f}% |")
    out.append("")
    out.append(f"Eval: one warm-up call of every side on 2 questions, then {cfg.eval_reps} timed passes over "
               f"{cfg.eval_questions} questions, interleaved. "
               f"Batches: loraens and the PEFT loop take {cfg.eval_batch_size} questions per forward "
               f"(loraens: x M member rows); the mixed batch takes {cfg.eval_batch_size} // M questions x M "
               "adapters per forward. All three score the same M adapters (the loraens members' weights are "
               "copied into the PEFT adapters), so the probability columns compare bf16 loraens with the fp32 "
               "PEFT reference (the mixed-batch forward matched the loop to "
               + ", ".join(f"{r.eval_check['max_abs_dp_mixed_vs_loop']:.1e}" for r in results if r.eval_check)
               + ").\n")
    return out


def render_memory(rows: list[dict]) -> list[str]:
    """(c): peak RSS of training steps at the same rows per step, one subprocess per row."""
    out = ["## (c) Peak memory (RSS) of training, same rows per step\n",
           "| side | scoring | M | B | rows | real tokens | RSS loaded (MB) | peak in training (MB) | "
           "increment (MB) | peak vs M=1 | increment vs M=1 | s/step |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = {(r["side"], r["scoring"]): r for r in rows if "error" not in r and r["m"] == 1}
    for r in rows:
        label = "loraens bf16" if r["side"] == "loraens" else "PEFT-seq fp32"
        if "error" in r:
            out.append(f"| {label} | {r['scoring']} | {r['m']} | {r['b']} | {r['m'] * r['b']} | | | "
                       f"failed: {r['error']} | | | | |")
            continue
        one = ref.get((r["side"], r["scoring"]))
        inc = r["step_peak_mb"] - r["rss_before_mb"]
        rel = fmt(r["step_peak_mb"] / one["step_peak_mb"]) + "x" if one else "n/a"
        rel_inc = fmt(inc / max(1e-9, one["step_peak_mb"] - one["rss_before_mb"])) + "x" if one else "n/a"
        out.append(f"| {label} | {r['scoring']} | {r['m']} | {r['b']} | {r['m'] * r['b']} | {r['tokens']} | "
                   f"{r['rss_before_mb']:.0f} | {r['step_peak_mb']:.0f} | {inc:.0f} | {rel} | {rel_inc} | "
                   f"{r['seconds']:.1f} |")
    out.append("")
    out.append("One subprocess per row: load the model, build the members/adapters, reset the kernel's peak-RSS "
               "counter (`/proc/self/clear_refs`), run three optimizer steps (PEFT: M adapter steps of B questions "
               "each), read `VmHWM`; s/step is the median of the second and third steps (the first is cold), with "
               "the questions in their file order (no length bucketing), so it is not the throughput of (a). The "
               "increment is that peak minus the RSS with the model and members loaded. Rows = M x B are the same "
               "questions for M = 1 and 5 (same tokens); M = 16 (if shown) has B = 1 and so at most as many rows. "
               "The loraens base is bf16 (~270 MB), PEFT's fp32.\n")
    return out


def render_lean_memory(rows: list[dict]) -> list[str]:
    """(d): the same M x B step all at once, in member chunks, with gradient checkpointing."""
    ref = next((r for r in rows if not r.get("chunk") and not r.get("gc") and "error" not in r), None)
    out = ["## (d) Bounding activation memory: member-axis chunking and gradient checkpointing\n",
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
               "step in every row, measured like (c) (peak over three steps; s/step the median of the warm second "
               "and third). A member chunk of c runs c x B rows per forward/backward and accumulates the members' "
               "gradients (the same gradients, `tests/test_train.py`); checkpointing keeps only each decoder "
               "layer's input and recomputes the layer in the backward pass.\n")
    return out


def render_mfu(results: list[ModeResult], peaks: dict, peak: float) -> list[str]:
    """(e): model GFLOP/s against the matmul peak, the bound from the required kernels, the profile."""
    sizes = ", ".join(str(n) for n in PEAK_SIZES)
    out = ["## (e) Model-FLOP utilisation (estimate)\n",
           f"Matmul peak measured in this run: the best n x n x n `torch.mm` over n = {sizes} (best of 5 each): "
           f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s (n = {peaks['fp32_n']}), bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s "
           f"(n = {peaks['bf16_n']})."]
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
        out.append("The compiled column is from the steps of (f) (M = 5, after compilation).\n")
    if all(r.mfu for r in results):
        out += render_mfu_bound(results, peak)
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
    return out


def render_mfu_bound(results: list[ModeResult], peak: float) -> list[str]:
    """(e)'s table of measured steps against the bound of their required kernels, bare."""
    out = ["How high a step could go: the kernels a step cannot do without, timed bare (`bench/ceiling.py`) "
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
           "section's steps, the others are extra steps timed here.\n",
           "| scoring | B | real tokens per step | measured s/step | measured GFLOP/s | measured MFU "
           "| bare: linear ms | attention ms | LoRA ms | head ms | sum ms | bare linear GFLOP/s "
           "| **MFU bound** | measured / bound |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for x in r.mfu:
            out.append(f"| {r.mode} | {x['b']} | {x['tokens']:.0f} | {x['step_s']:.2f} | {x['gflops']:.0f} | "
                       f"{100 * x['gflops'] * 1e9 / peak:.0f}% | {1e3 * x['linear']:.0f} | "
                       f"{1e3 * x['attention']:.0f} | {1e3 * x['lora']:.0f} | {1e3 * x['head']:.0f} | "
                       f"{1e3 * x['total']:.0f} | {x['linear_gflops']:.0f} | "
                       f"**{100 * x['bound_gflops'] * 1e9 / peak:.0f}%** | "
                       f"{100 * x['gflops'] / x['bound_gflops']:.0f}% |")
    out.append("")
    return out


def render_compile(results: list[ModeResult], cfg: BenchConfig, peak: float) -> list[str]:
    """(f): torch.compile vs eager in training (at each B of (e)) and in evaluation."""
    m = cfg.members
    comp = [r for r in results if r.compiled]
    out = [f"## (f) `torch.compile` of the decoder layers (`--train.compile`) vs eager (training, bf16, M = {m})\n",
           "| scoring | eager s/step | compiled s/step | compiled / eager speed | first compiled step (s) "
           "| steps to pay back the compilation |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in comp:
        c = r.compiled
        saved = c["eager_s"] - c["compiled_s"]
        payback = f"{(c['first_step_s'] - c['compiled_s']) / saved:.0f}" if saved > 0 else "never"
        out.append(f"| {r.mode} | {c['eager_s']:.2f} | {c['compiled_s']:.2f} | "
                   f"**{c['eager_s'] / c['compiled_s']:.2f}x** "
                   f"| {c['first_step_s']:.0f} | {payback} |")
    out.append("")
    out.append(f"Medians over {cfg.compile_steps} interleaved steps on the same batches (different lengths: "
               "`dynamic=True` keeps one graph). The first compiled step includes the compilation (each mode starts "
               "from a dynamo reset and an empty Inductor disk cache; a user's later runs reuse the on-disk cache and "
               "start faster). It pays back only on runs longer than the payback column, so loraens' default, "
               "`--train.compile auto`, compiles runs of at least "
               f"{AUTO_MIN_MEMBER_QUESTIONS:,} member-questions (steps x M x B; when a C++ compiler is found) "
               "and runs shorter ones eagerly.\n")
    by_b = [(r, b_, x) for r in comp for b_, x in sorted(r.compiled.get("by_b", {}).items())]
    if len({b_ for _, b_, _ in by_b}) > 1:  # `peak`: (e)'s
        out.append(f"The same two sides (M = {m}) at each B of (e), measured the same way after an untimed "
                   "step at the new shape; model FLOPs as in (e):\n")
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
                   f"median of {cfg.eval_reps} interleaved passes) with the same compiled layers:\n")
        out.append("| scoring | first compiled pass (s) | compiled pass (s) | eager pass (s) "
                   "| eager / compiled speed |")
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
    return out


def render_prefix(results: list[ModeResult], m: int) -> list[str]:
    """(g): the frozen-prefix mode against full-depth LoRA, and its FLOP bound."""
    out = [f"## (g) Frozen-prefix mode vs full-depth LoRA (training, M = {m}, member-examples/s, median)\n",
           "| scoring | LoRA layers | full depth (bf16) | top K + prefix cache, first epoch | "
           "top K + prefix cache, later epochs | later / full | first / full | FLOP bound on later / full |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if not r.prefix:
            continue
        p_ = r.prefix
        out.append(f"| {r.mode} | top {p_['k']} of {p_['layers']} | {fmt(p_['full'])} | {fmt(p_['cold'])} | "
                   f"{fmt(p_['warm'])} | **{fmt(p_['warm'] / p_['full'])}x** | {fmt(p_['cold'] / p_['full'])}x | "
                   f"{fmt(p_['flop_bound'])}x |")
    out.append("")
    out.append("FLOP bound: model FLOPs of a full-depth step over those of a top-K step from the cache, on the "
               "timed batches (the counting of (e)). The choice-likelihood head over the full vocabulary at every "
               "position that predicts a choice token runs in both (its log-softmax needs every logit), and so does "
               "the last layer, so neither mode can gain L/K-fold.\n")
    out.append("Both sides train the same M members on the same batches, interleaved. First epoch: every timed "
               "question meets the cache for the first time, so its frozen bottom layers run once (without "
               "gradient) before the top K; later epochs read the bottom from the cache and run only the top K "
               "layers forward and backward. Evaluation gains too: the bottom runs once per question instead of "
               "once per member. The quality cost is in (h) if that section is present.\n")
    return out


def render_quality(q: dict) -> list[str]:
    """(h): each side's ensemble metrics with intervals, and its paired differences to full depth."""
    out = [(f"## (h) Quality on a real run: {q['mode']}, M = {q['members']}, {q['train']} training questions, "
            f"{q['epochs']} epochs at lr {q['lr']:g}, {q['eval']} evaluation questions\n"),
           "| side | training (s) | ensemble accuracy | NLL | ECE | minus full depth: accuracy | NLL | ECE | "
           "same answer as full depth |",
           "|---|---:|---|---|---|---|---|---|---:|"]
    for name, side in q["sides"].items():
        label = name if side["k"] is None else f"top {side['k']} of {q['layers']} layers + prefix cache"
        cis = side["cis"]
        row = [label, f"{side['train_s']:.0f}", format_ci(cis["accuracy"]), format_ci(cis["nll"]),
               format_ci(cis["ece"])]
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
    return out


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
  (~40-110 tokens) M = 16 fits. (d) measures what they save and cost when the rows do grow.
- Choice-likelihood's full-vocabulary head runs over vocabulary blocks whose float32 logits stay
  in cache (`loraens.head`), with bf16 GEMMs. In evaluation each block's logits are two GEMMs (the
  product and its rounding residual), exact to ~1e-4, which is work the FLOP count of (e) does not
  include; training uses the bf16 product alone.
- `torch.compile` is measured in (f). `--train.compile auto` (the default) compiles only runs of
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
  token moves cost what the padding saved); on AVX-512 BF16 machines it pays (section (i)).
- MFU is an estimate from counted model FLOPs (see (e)), not a profiler measurement. The bf16
  peak depends on the CPU's matrix instructions (Setup names them): with AMX tiles it is about
  five times the AVX-512 BF16 peak, while the elementwise work of a step (norms, rotary, SwiGLU,
  softmax, casts, optimizer) runs at about the same speed on both, so the same code reaches a far
  lower MFU on an AMX machine. The MFU bound of (e) counts everything but the required kernels
  as free, so it is an upper bound for this torch build, not for hand-written fused kernels.
- `mode="max-autotune-no-cudagraphs"` (Inductor's C++ GEMM templates, which can fuse elementwise
  work into the GEMMs) was tried for `--train.compile` by hand, not in this script: on one M = 5,
  B = 4 letter run (on an AMX machine) its first step took 100 s and later steps 0.78-0.97 s (median 0.84 s), no
  faster than the default mode's 0.74-0.87 s, so the default mode stays.
- Each figure is one run on a shared 2-core machine; there are no confidence intervals beyond the
  medians over the timed steps.
"""

"""Peak memory of training steps (sections (c) and (d)): one subprocess per configuration.

The parent (`run_memory`) starts `bench/bench.py --memory-child SPEC` once per configuration;
the child (`memory_child`) loads the model, builds one side, resets the kernel's peak-RSS counter,
runs three optimizer steps and prints its figures as one JSON line.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from loraens.config import DType, ModelConfig, Scoring
from loraens.data import load_mcqa
from loraens.model import enable_gradient_checkpointing, load_base_model

from .common import REPO, SEED, build_loraens, log, loraens_step, make_task
from .config import BenchConfig
from .peft_baseline import build_peft, peft_member_step

CHILD_SCRIPT = REPO / "bench" / "bench.py"  # whose main hands `--memory-child SPEC` to `memory_child`


def _vm(key: str) -> int:
    """VmRSS / VmHWM of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def memory_configs(cfg: BenchConfig) -> list[tuple]:
    """The memory runs that `cfg` asks for: (side, scoring, M, B) for (c), then
    (side, scoring, M, B, member_chunk, gradient checkpointing) for (d)."""
    configs = []
    if not cfg.memory_members:
        return configs
    for s in [x for x in cfg.memory_modes.split(",") if x]:
        for m in cfg.memory_members:
            b = max(1, cfg.memory_rows // m)
            configs.append(("loraens", s, m, b))
            if m <= 5:
                configs.append(("peft", s, m, b))
    if cfg.memory_lean:
        m, b = cfg.memory_lean
        s = next(x for x in cfg.memory_modes.split(",") if x)
        configs += [("loraens", s, m, b, chunk, gc_on) for chunk, gc_on in
                    ((None, False), (max(1, m // 4), False), (None, True), (max(1, m // 4), True))]
    return configs


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


def run_memory(cfg: BenchConfig, configs: list[tuple]) -> list[dict]:
    """One subprocess per (side, scoring, M, B[, member_chunk, gradient checkpointing])."""
    results = []
    for side, scoring, m, b, *lean in configs:
        chunk, gc_on = lean if lean else (None, False)
        spec = {"side": side, "scoring": scoring, "m": m, "b": b, "chunk": chunk, "gc": gc_on, "lean": bool(lean),
                "dtype": "bfloat16", "dataset": cfg.dataset,
                "data_dir": cfg.data_dir, "pool": cfg.train_pool, "threads": cfg.threads,
                "baseline_attn": cfg.baseline_attn, "steps": 3}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(CHILD_SCRIPT), "--memory-child", json.dumps(spec)],
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
        log(f"memory {side:8s} {scoring:17s} M={m:2d} B={b:2d} chunk={chunk} gc={gc_on}: "
            f"step peak {res['step_peak_mb']:.0f} MB "
            f"(RSS loaded {res['rss_before_mb']:.0f} MB), "
            f"subprocess {time.perf_counter() - t0:.1f} s")
    return results

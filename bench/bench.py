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
    subprocess per configuration; (d) the same with member-axis chunking and gradient checkpointing;
(e) an estimate of model-FLOP utilisation against a matmul peak measured in the same run;
(f) `torch.compile` vs eager; (g) the frozen-prefix mode vs full depth; (h) quality on a real run.

Both sides use the same questions at every step (member k's batch is the same for every M), the
same LoRA targets (q_proj, v_proj), rank 8, alpha 16, no dropout, AdamW lr 5e-4, clip norm 1.0.
The PEFT-sequential time for M members at a step is the sum of the M adapters' step times, each
timed on its own: that is exactly what training them one after another costs.

The report replaces this script's marked block of --out (`<!-- bench.py: begin -->` to
`<!-- bench.py: end -->`), or is appended to it; the rest of the file is kept as it is.
Modules: common (setup), config (the flags), peft_baseline, flops (with ceiling), memory,
quality, measure (the timed sections), targets and render (the Markdown).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

if not __package__:  # `python bench/bench.py`: import bench/ as the package `bench`, from the checkout
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from bench.common import SEED, log, machine_info, write_marked_block
from bench.config import parse_config
from bench.flops import matmul_peaks
from bench.measure import run_modes
from bench.memory import memory_child, memory_configs, run_memory
from bench.quality import run_quality
from bench.render import TITLE, render_report

BLOCK_OWNER = "bench.py"  # the markers of this script's block in --out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-child"]:  # one configuration of (c)/(d), started by `memory.run_memory`
        memory_child(json.loads(argv[1]))
        return
    cfg = parse_config(argv, __doc__.split("\n\n")[0] + " Writes a Markdown report.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(SEED)
    command = "python bench/bench.py " + " ".join(shlex.quote(a) for a in argv)
    t_start = time.perf_counter()
    info = machine_info()
    log(f"machine: {info}")
    peaks = matmul_peaks()
    log(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s (n = {peaks['fp32_n']}), "
        f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s (n = {peaks['bf16_n']})")

    results, tok = run_modes(cfg)
    mem = run_memory(cfg, memory_configs(cfg))
    quality = run_quality(cfg, tok) if cfg.quality_train else None

    wall = time.perf_counter() - t_start
    block = render_report(cfg, info, peaks, results, mem, quality, wall, command)
    print("\n" + block)
    if cfg.out:
        write_marked_block(cfg.out, BLOCK_OWNER, block, new_file_header=TITLE)
        log(f"wrote the {BLOCK_OWNER} block of {cfg.out}")
    log(f"total wall time {wall:.0f} s")


if __name__ == "__main__":
    main()

"""Each speed lever of a loraens training step on and off, side by side on the same batches.

One bf16 loraens ensemble (SmolLM2-135M, M members, B questions per member) trains on
length-bucketed batches, as in `bench/bench.py` section (a). At every step each variant runs
once, in alternating order, so the machine's drift hits all of them alike. Variants:

- `plain`: transformers' eager attention (`repeat_kv`) and every `--speed.*` lever off (the
  members' update through plain autograd, and so on): what loraens did before these levers;
- `+ fused update`: the member update as one `autograd.Function` (`ensemble._MemberLoraAdd`);
- `+ grouped attention`: both levers on, with `loraens.fast.attention`'s grouped eager attention;
- `+ bf16 training head`: all three on: choice-likelihood's full-vocabulary head
  takes the bf16 logits alone in training (`--speed.bf16_train_head`), not the
  float32-exact two-GEMM logits that the variants above use. No change for letter scoring.
- `+ packed tokens`: all four on: the decoder runs on each member's real tokens end to end,
  without padding (`--speed.pack_tokens`); the variants above run the padded rows.
- `+ shared head positions`: all five on: choice-likelihood's full-vocabulary head runs once per
  distinct position (the prompt's last token predicts every choice's first token;
  `--speed.shared_head_positions`); the variants above run it once per choice token. No change for
  letter scoring.
- `+ last layer at head positions`: all six on (the defaults): the last decoder layer's MLP runs
  only at the positions the head reads (`--speed.last_layer_trim`); the variants above run it on
  every position.

`--top-layers K` runs the ladder with LoRA in the top K layers only and the frozen-prefix cache
filled beforehand (the later-epoch steps of `bench/bench.py` section (g)).

Reported: median seconds per step and the median over steps of each variant's speed against
`plain` measured at the same step.

    python bench/bench_levers.py --steps 7
    python bench/bench_levers.py --steps 9 --modes choice-likelihood --top-layers 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

if not __package__:  # `python bench/bench_levers.py`: import bench/ as the package `bench`, from the checkout
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch

from bench.common import MODE_NAMES, build_loraens, loraens_step, make_task
from loraens.config import ModelConfig, Scoring, SpeedConfig
from loraens.data import load_mcqa
from loraens.ensemble import member_layers
from loraens.fast.support import GROUPED_EAGER
from loraens.model import load_base_model
from loraens.train import member_batches, member_orders

_OFF = SpeedConfig(fused_update=False, pack_tokens=False, shared_head_positions=False, last_layer_trim=False,
                   bf16_train_head=False)
# name: (attention implementation, the `--speed.*` levers on); each variant adds one lever to the one above.
VARIANTS = {
    "plain": ("eager", _OFF),
    "+ fused update": ("eager", replace(_OFF, fused_update=True)),
    "+ grouped attention": (GROUPED_EAGER, replace(_OFF, fused_update=True)),
    "+ bf16 training head": (GROUPED_EAGER, replace(_OFF, fused_update=True, bf16_train_head=True)),
    "+ packed tokens": (GROUPED_EAGER, replace(_OFF, fused_update=True, bf16_train_head=True, pack_tokens=True)),
    "+ shared head positions": (GROUPED_EAGER, replace(SpeedConfig(), last_layer_trim=False)),
    "+ last layer at head positions": (GROUPED_EAGER, SpeedConfig()),  # the defaults
}


@contextmanager
def variant(model: torch.nn.Module, attn: str, speed: SpeedConfig):
    """`model` with `speed.fused_update` in its member layers and attention `attn`; both are back
    to the defaults on exit. The other levers go to the step's `Scorer` (`loraens_step(speed=...)`)."""
    config = model.config
    saved = config._attn_implementation
    layers = list(member_layers(model).values())
    try:
        for layer in layers:
            layer.fused_update = speed.fused_update
        config._attn_implementation = attn  # read by every attention module at each forward
        yield
    finally:
        for layer in layers:
            layer.fused_update = True  # the default
        config._attn_implementation = saved


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4, help="questions per member per step")
    p.add_argument("--steps", type=int, default=7, help="timed steps (after one warm-up step)")
    p.add_argument("--modes", default="letter,choice-likelihood")
    p.add_argument("--dataset", default="arc_easy")
    p.add_argument("--data-dir", default=None,
                   help="local mirror of the datasets (default: loraens' own lookup, $LORAENS_DATA_DIR, else the hub)")
    p.add_argument("--top-layers", type=int, default=None,
                   help="LoRA in the top K layers only, with the frozen-prefix cache filled before timing")
    args = p.parse_args(argv)

    base, tok = load_base_model(ModelConfig())
    train_ex = load_mcqa(args.dataset, "train", data_dir=args.data_dir, limit=256, seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; M = {args.members}, "
          f"B = {args.batch_size}, {args.steps} timed steps after 1 warm-up"
          + (f", LoRA in the top {args.top_layers} layers (prefix cache filled first)" if args.top_layers else "")
          + "\n")
    print("| scoring | variant | median s/step | speed vs plain (median over steps) |")
    print("|---|---|---:|---:|")
    side = build_loraens(base, args.members, in_place=True, top_layers=args.top_layers)
    for mode in args.modes.split(","):
        scoring = Scoring(mode)
        task = make_task(tok, scoring, train_ex, train_ex[:4])
        lengths = np.array([q.num_tokens for q in task.train_q])
        orders = member_orders(len(task.train_q), args.members, 1, 0, True)
        chunks = [c for c in member_batches(orders, lengths, args.batch_size, 8, 0, 1)
                  if c.shape[1] == args.batch_size][: args.steps + 1]
        if args.top_layers:  # every timed step reads the frozen bottom from the cache, as in later epochs
            for chunk in chunks:
                loraens_step(side, task, chunk)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for i, chunk in enumerate(chunks):
            names = list(VARIANTS) if i % 2 else list(reversed(VARIANTS))
            for name in names:
                attn, speed = VARIANTS[name]
                with variant(side.model, attn, speed):
                    t0 = time.perf_counter()
                    loraens_step(side, task, chunk, speed=speed)
                    times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            ts = ts[1:]  # drop the warm-up step
            speed = statistics.median(a / b for a, b in zip(times["plain"][1:], ts, strict=True))
            print(f"| {MODE_NAMES[scoring]} | {name} | {statistics.median(ts):.2f} | {speed:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

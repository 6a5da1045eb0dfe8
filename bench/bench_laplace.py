"""Laplace-LoRA's cost: the K-FAC fit of all M members in one vectorised pass against one member at a time.

`loraens.laplace.fit_laplace` accumulates every member's factors in one forward over M*B member
rows (`member_chunk=None`) or M forwards over B rows (`member_chunk=1`). Both run here on the
same questions, alternating, `--repeats` times; the script prints the median seconds of each,
their ratio, how far apart their factors are, and the predictive's cost: the
GLM predictive (one forward and C backward passes per batch; probit, and MC with 10,000 draws)
against `loraens.predict`'s plain forward, both vectorised.

The questions are synthetic (seeded), with ARC-Easy-like lengths (a 12-30 word question, four
3-6 word choices): the timing needs their shapes, not their content, and no dataset download.

    python bench/bench_laplace.py --model ~/.cache/loraens/gguf/<converted SmolLM2 folder> --members 4
    python bench/bench_laplace.py --model ... --top-layers 8
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # `python bench/bench_laplace.py`: import bench/ as the package `bench`, from the checkout
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from bench.common import ALPHA, NORM, RANK, TARGETS, log
from loraens.config import DType, EnsembleConfig, ModelConfig, PromptConfig, Scoring
from loraens.data import MCQAExample
from loraens.ensemble import attach_members, first_lora_layer, member_layers
from loraens.fast.prefix import prefix_cache_for
from loraens.laplace import fit_laplace
from loraens.model import load_base_model
from loraens.predict import predict
from loraens.prompts import PromptEncoder
from loraens.scoring import Scorer

WORDS = ("the of a to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more what up out "
         "water plant animal energy heat light earth sun moon rock soil air food cell body").split()


def questions(n: int, seed: int = 0) -> list[MCQAExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30))) + "?"
        choices = tuple(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(4))
        out.append(MCQAExample(id=f"q{i}", question=q, choices=choices, answer=rng.randrange(4)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward (each repeated per member)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--top-layers", type=int, default=None)
    p.add_argument("--scoring", default="choice-likelihood", choices=["choice-likelihood", "letter"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_base_model(ModelConfig(name=args.model, dtype=DType(args.dtype), device="cpu"))
    attach_members(model, EnsembleConfig(num_members=args.members, rank=RANK, alpha=ALPHA, target_modules=TARGETS,
                                         top_layers=args.top_layers))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking members: B != 0
        for layer in member_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    scoring = Scoring(args.scoring)
    enc = PromptEncoder(tokenizer, PromptConfig(scoring=scoring, normalization=NORM))
    qs = enc.encode_all(questions(args.questions))
    cache = prefix_cache_for(model, first_lora_layer(model)) if args.top_layers else None
    scorer = Scorer(scoring, enc.letter_ids, NORM, prefix_cache=cache)
    tokens = sum(q.num_tokens for q in qs) / len(qs)
    log(f"{args.model}: M={args.members}, {len(qs)} questions ({tokens:.1f} tokens per row), "
        f"B={args.batch_size}, top_layers={args.top_layers}, threads={torch.get_num_threads()}")
    if cache is not None:  # fill the frozen-prefix cache first, so both variants find it full
        fit_laplace(model, scorer, qs, batch_size=args.batch_size, progress=False)

    times: dict[str, list[float]] = {"vectorised": [], "one at a time": []}
    accumulation: dict[str, list[float]] = {"vectorised": [], "one at a time": []}  # the factors alone
    fits = {}
    for r in range(args.repeats):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for name in order:
            t0 = time.perf_counter()
            fits[name] = fit_laplace(model, scorer, qs, batch_size=args.batch_size,
                                     member_chunk=None if name == "vectorised" else 1, progress=False)
            times[name].append(time.perf_counter() - t0)
            accumulation[name].append(fits[name].timings["factors"])
            log(f"fit {name}: {times[name][-1]:.1f} s ({fits[name].timings})")
    worst = 0.0
    for block in fits["vectorised"].blocks:
        for a, b in zip(fits["vectorised"].factors(block), fits["one at a time"].factors(block)):
            worst = max(worst, float((a - b).norm() / a.norm().clamp(min=1e-30)))
    for what, series in (("K-FAC factor accumulation", accumulation), ("whole fit", times)):
        vec, one = statistics.median(series["vectorised"]), statistics.median(series["one at a time"])
        log(f"{what}, median of {args.repeats}: vectorised {vec:.1f} s, one member at a time {one:.1f} s, "
            f"ratio (one at a time / vectorised) {one / vec:.2f}x")
    log(f"the two fits' factors differ by at most {worst:.1e} (relative Frobenius norm, over blocks; "
        f"in bfloat16 this is rounding: the float32 fits agree to ~1e-6)")

    post = fits["vectorised"]
    ids = [str(i) for i in range(len(qs))]
    t0 = time.perf_counter()
    predict(model, qs, ids, args.members, scorer, batch_size=args.batch_size, progress=False)
    t_map = time.perf_counter() - t0
    for link in ("probit", "mc"):
        t0 = time.perf_counter()
        post.predict(model, scorer, qs, ids, link=link, batch_size=args.batch_size, progress=False)
        t_lap = time.perf_counter() - t0
        log(f"predictive on {len(qs)} questions: MAP predict {t_map:.1f} s, Laplace {link} {t_lap:.1f} s "
            f"({t_lap / t_map:.1f}x)")
    log(f"prior precision (marglik): {post.prior_precision.tolist()}")


if __name__ == "__main__":
    main()

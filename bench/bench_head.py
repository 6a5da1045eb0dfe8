"""The choice-likelihood head alone: `loraens.head.token_log_probs` vs the plain float32 head.

Forward and backward of the log-probability of K target tokens under a full-vocabulary head of
SmolLM2-135M's shape (V = 49,152, H = 576, bf16 weights), on random inputs. The baseline is what
`loraens` did before `loraens.head`: a float32 GEMM (casting the bf16 weight), a [K, V]
log-softmax and a gather. Both sides alternate, medians of `--reps` calls per round.

    python bench/bench_head.py --tokens 240,480
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from loraens.fast.head import token_log_probs


def float32_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden.float(), weight.float()).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="240,480", help="K values (scored tokens per call), comma-separated")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--reps", type=int, default=5, help="calls per side per round (the median is kept)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden) * 0.05).to(torch.bfloat16)
    sides = {"float32 head": float32_head, "loraens.head": token_log_probs}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; V = {args.vocab}, H = {args.hidden}")
    print("| tokens K | float32 head (s) | loraens.head (s) | speed-up |")
    print("|---:|---:|---:|---:|")
    for k in (int(x) for x in args.tokens.split(",") if x):
        hidden = (torch.randn(k, args.hidden) * 3).to(torch.bfloat16)
        targets = torch.randint(0, args.vocab, (k,))
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, fn in sides.items():
                per_call = []
                for _ in range(args.reps):
                    h = hidden.clone().requires_grad_(True)
                    t0 = time.perf_counter()
                    fn(h, weight, targets).sum().backward()
                    per_call.append(time.perf_counter() - t0)
                times[name].append(statistics.median(per_call))
        base, ours = statistics.median(times["float32 head"]), statistics.median(times["loraens.head"])
        print(f"| {k} | {base:.3f} | {ours:.3f} | {base / ours:.2f}x |")


if __name__ == "__main__":
    main()

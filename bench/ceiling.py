"""How fast a training step could be at best: the kernels it cannot do without, timed bare.

A LoRA-ensemble training step on a frozen base must at least run

- the base's linear layers: forward X W^T and activation gradient G W for every decoder weight
  (no weight gradient: the base is frozen), weights that read the same input optionally stacked
  into one GEMM;
- the attention core of every layer, forward and backward;
- the low-rank updates of every adapted layer, forward and backward;
- for choice-likelihood scoring, the full-vocabulary head at every position that predicts a
  choice token, forward and backward.

`required_kernel_seconds` times each of these as bare `torch` calls at the shapes of a given step,
on real (unpadded) tokens (attention: scaled to the causal work of the real lengths), and takes the
fastest formulation and the best repetition wherever
there is a choice. Everything else a step does is left out: norms, rotary embeddings, SwiGLU,
residual adds, casts, the loss, the optimizer, Python. The sum is therefore a lower bound on the
time of that step with the kernels this torch build has on this machine, and model FLOPs over that
sum is an upper bound on the step's model-FLOP utilisation (`bench.py`, section (e)).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    """The fastest of `reps` timed calls of `fn`, after one untimed warm-up call."""
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_product(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    """Seconds of a @ b in the faster of its two layouts: as is, or as (b^T a^T) used transposed."""
    return min(best_seconds(partial(torch.mm, a, b), reps), best_seconds(partial(torch.mm, b.t(), a.t()), reps))


def linear_seconds(groups: Counter, tokens: int, dtype: torch.dtype, reps: int) -> float:
    """Forward X W_j^T and activation gradient sum_j G_j W_j of every group of weights sharing an input.

    groups: Counter of tuples of weight shapes (out, in) that read the same input (q/k/v, or
    gate/up, or one weight alone), e.g. {((576, 576), (192, 576), (192, 576)): 30, ...}. Each
    group is timed both ways, as one GEMM per weight and as one GEMM over the stacked weights,
    each product in the faster of its two layouts (oneDNN's speed at a shape depends on which
    side is the long one), and the faster way counts.
    """
    total = 0.0
    for shapes, count in groups.items():
        fan_in = shapes[0][1]
        x = torch.randn(tokens, fan_in, dtype=dtype)
        ws = [torch.randn(o, fan_in, dtype=dtype) for o, _ in shapes]
        gs = [torch.randn(tokens, o, dtype=dtype) for o, _ in shapes]
        forward = sum(_best_product(x, w.t(), reps) for w in ws)
        gradient = sum(_best_product(g, w, reps) for g, w in zip(gs, ws, strict=True))
        if len(ws) > 1:
            stacked = torch.cat(ws)
            forward = min(forward, _best_product(x, stacked.t(), reps))
            gradient = min(gradient, _best_product(torch.cat(gs, 1), stacked, reps))
        total += count * (forward + gradient)
    return total


def attention_bare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """softmax(q k^T) v and its backward for the output gradient g, as bare calls: (out, dq, dk, dv).

    q, g: [N, gT, d], k, v: [N, T, d] (no mask, no scaling): N = rows x heads with g = 1 (k/v
    repeated to every head), or N = rows x kv_heads with a group's g query heads stacked along
    the query axis (grouped-query attention without copies). The two forward products, the
    softmax, its backward and the four backward products: the attention work a step must do.
    """
    p = torch.bmm(q, k.transpose(1, 2)).softmax(-1)  # [N, T, T]
    out = torch.bmm(p, v)
    dp = torch.bmm(g, v.transpose(1, 2))
    dv = torch.bmm(p.transpose(1, 2), g)
    ds = torch._softmax_backward_data(dp, p, -1, q.dtype)
    return out, torch.bmm(ds, k), torch.bmm(ds.transpose(1, 2), q), dv


def attention_seconds(rows: int, length: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                      reps: int) -> dict[str, float]:
    """One layer's attention core, forward + backward, on q [rows, heads, T, d], k/v [rows, kv_heads, T, d].

    Three formulations: `attention_bare` with k/v repeated to every head ("bare") or with each
    group's query heads stacked ("grouped"; no mask, no scaling, no autograd), and
    `F.scaled_dot_product_attention` (causal, grouped-query) forward and backward. Returns the
    seconds of each; the caller takes the fastest. None pays for a mask, so each is at most the
    work of the step's masked attention.
    """
    n, group = rows * heads, heads // kv_heads
    q, k, v, g = (torch.randn(n, length, head_dim, dtype=dtype) for _ in range(4))
    qg, gg = (torch.randn(rows * kv_heads, group * length, head_dim, dtype=dtype) for _ in range(2))
    kg, vg = (torch.randn(rows * kv_heads, length, head_dim, dtype=dtype) for _ in range(2))
    qs = torch.randn(rows, heads, length, head_dim, dtype=dtype, requires_grad=True)
    ks, vs = (torch.randn(rows, kv_heads, length, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
    gs = torch.randn(rows, heads, length, head_dim, dtype=dtype)

    def sdpa() -> None:
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        torch.autograd.grad(out, (qs, ks, vs), gs)

    return {"bare": best_seconds(partial(attention_bare, q, k, v, g), reps),
            "grouped": best_seconds(partial(attention_bare, qg, kg, vg, gg), reps),
            "sdpa": best_seconds(sdpa, reps)}


def lora_bare(x: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The members' low-rank update B_k A_k x and its backward, as bare bmm: (delta, dx, dA, dB).

    x [M, N, in], g [M, N, out] (the output gradient), a [M, r, in], b [M, out, r].
    """
    u = torch.bmm(x, a.transpose(1, 2))  # [M, N, r]
    delta = torch.bmm(u, b.transpose(1, 2))
    du = torch.bmm(g, b)
    db = torch.bmm(g.transpose(1, 2), u)
    da = torch.bmm(du.transpose(1, 2), x)
    return delta, torch.bmm(du, a), da, db


def lora_seconds(layers: Counter, members: int, tokens: int, rank: int, dtype: torch.dtype, reps: int) -> float:
    """The low-rank updates of `count` adapted layers of each (in, out), forward + backward, bare bmm.

    Per layer and member k, on x [N, in] with N = tokens / members: u = x A_k^T, delta = u B_k^T
    (forward); dU = G B_k, dB_k = G^T u, dA_k = dU^T x, dX = dU A_k (backward): the 6 r (in + out)
    FLOPs per token that the MFU estimate counts.
    """
    n = max(1, math.ceil(tokens / members))
    data = []
    for (fan_in, fan_out), count in layers.items():
        x = torch.randn(members, n, fan_in, dtype=dtype)
        g = torch.randn(members, n, fan_out, dtype=dtype)
        a = torch.randn(members, rank, fan_in, dtype=dtype)
        b = torch.randn(members, fan_out, rank, dtype=dtype)
        data.append((x, g, a, b, count))

    def run() -> None:
        for x, g, a, b, count in data:
            for _ in range(count):
                lora_bare(x, g, a, b)

    return best_seconds(run, reps)


def head_seconds(scored: int, hidden: int, vocab: int, dtype: torch.dtype, reps: int) -> float:
    """The full-vocabulary head at `scored` tokens: logits h W^T [K, V] and gradient G W [K, H]."""
    h = torch.randn(scored, hidden, dtype=dtype)
    g = torch.randn(scored, vocab, dtype=dtype)
    w = torch.randn(vocab, hidden, dtype=dtype)

    def run() -> None:
        F.linear(h, w)
        torch.mm(g, w)

    return best_seconds(run, reps)


def required_kernel_seconds(*, linear_groups: Counter, lora_layers: Counter, members: int, lengths: list[int],
                            heads: int, kv_heads: int, head_dim: int, layers: int, rank: int,
                            scored_tokens: int = 0, hidden: int = 0, vocab: int = 0,
                            tail_groups: Counter | None = None, tail_tokens: int = 0,
                            dtype: torch.dtype = torch.bfloat16, reps: int = 3) -> dict[str, float | str]:
    """Lower bound on one training step's time, by part (seconds; see the module docstring).

    linear_groups: see `linear_seconds`; lora_layers: Counter of adapted layers' (in, out);
    lengths: the real tokens of each of the step's M*B rows. Linear layers and LoRA run on the
    real tokens as if packed without padding. Attention is timed on [rows, max length] and
    scaled to the causal work of the real lengths, sum L (L + 1) / 2 over rows x max^2
    (a kernel that skipped all padding and all masked entries; choice-likelihood's block mask
    hides more than a causal one, which this does not credit). scored_tokens: the positions
    the choice-likelihood head reads (0 for letter scoring, whose head is C rows at one
    position). tail_groups: linear groups that run on `tail_tokens` tokens only (the last
    layer's MLP at the head's positions, `loraens.last_layer`). LoRA runs in the faster of
    float32 and `dtype`.
    """
    rows, length, tokens = len(lengths), max(lengths), sum(lengths)
    att = attention_seconds(rows, length, heads, kv_heads, head_dim, dtype, reps)
    causal_share = sum(n * (n + 1) / 2 for n in lengths) / (rows * length ** 2)
    out = {
        "linear": linear_seconds(linear_groups, tokens, dtype, reps)
        + (linear_seconds(tail_groups, tail_tokens, dtype, reps) if tail_groups and tail_tokens else 0.0),
        "attention": layers * min(att.values()) * causal_share,
        "attention_impl": min(att, key=att.get),
        "lora": min(lora_seconds(lora_layers, members, tokens, rank, d, reps) for d in {torch.float32, dtype}),
        "head": head_seconds(scored_tokens, hidden, vocab, dtype, reps) if scored_tokens else 0.0,
    }
    out["total"] = out["linear"] + out["attention"] + out["lora"] + out["head"]
    return out

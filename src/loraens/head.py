"""Token log-probabilities from the full-vocabulary output head, fast in bfloat16 and exact.

Choice-likelihood scoring needs `log softmax(h W^T)[target]` at every choice token, over the whole
vocabulary (49,152 rows for SmolLM2). That head is the largest single GEMM of a training step, and
with LoRA only in the top layers (the prefix cache) it is a large share of the step.

The plain way computes it in float32: the bf16 weight is cast to float32 on every forward (a copy
of the whole embedding), the GEMMs run at the float32 rate (about a quarter of the bf16 rate
with AMX), and the log-softmax writes a second [K, V] float32 tensor that the backward reads.
bf16 logits alone would be fast but round each logit by up to ~0.06 at |logit| ~ 16, which
blurs NLL and ECE.

`token_log_probs` keeps the float32 accuracy at bf16 speed:

- Forward: two bf16 GEMMs. `y = bf16(h W^T)`, then the residual `r = h W^T - y` from one
  `addmm` (the GEMM accumulates in float32 and subtracts `y` before it rounds, so `r` is tiny
  and its own rounding is ~2^-9 |r|). `y + r` in float32 is then exact to ~1e-4, against ~1e-5
  for a float32 GEMM and ~6e-2 for bf16 logits. `h` and `W` are exact in bf16 (they are the
  model's own bf16 tensors), so the output rounding was the only error.
- The loss needs only `logit[target] - logsumexp(logits)`: no [K, V] log-softmax is kept.
- Backward: `d/dh = (onehot - softmax) W`. The forward saves each block's `exp(logit - max)` in
  bf16 (half the memory of the two logit parts), so the backward is one scaling pass and one bf16
  GEMM per block, accumulated in float32.
- Both run over blocks of the vocabulary sized so that a block's float32 logits (~4 MB) stay in
  cache: the elementwise passes (cast, max, exp, sum, scale, cast) are memory-bound; on this
  machine `torch.exp` streams 50-80 GB/s over 1-17 MB tensors and 20 GB/s over 67 MB.

Training does not need the float32-exact logits (`exact=False`, which `train_step` passes): the
bf16 product alone, one GEMM fewer, everything after it unchanged. The loss and its gradient then
carry the logits' bf16 rounding, like every other bf16 product of the step; NLL and ECE are
measured in evaluation, which keeps the exact logits, and `bench/bench.py` section (f) compares
the trained ensemble with float32 PEFT. `bench/bench_levers.py` times it on and off ("+ bf16
training head"; a frozen-prefix step gains most, since the head is a larger share of it).

Forward and backward at the SmolLM2 head (V = 49,152, H = 576), medians over 3 alternating
rounds (`python bench/bench_head.py --rounds 3`): 240 tokens 0.216 s with the float32 head
against 0.094 s here (2.30x), 480 tokens 0.371 s against 0.161 s (2.30x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Vocabulary columns per block: about 2^20 float32 logits (4 MB) per block stay in the CPU's L2/L3
# cache through the elementwise passes, which run several times faster there than from DRAM.
BLOCK_ELEMENTS = 1 << 20


def _logit_parts(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors whose float32 sum is `hidden @ weight.T`, [K, H] x [V, H] -> each [K, V].

    bf16 inputs: the bf16 product `y` and its rounding residual `h W^T - y` (one `addmm` that
    subtracts `y` before it rounds; see the module docstring). Other dtypes: one GEMM in float32
    (float64 stays float64).
    """
    if hidden.dtype == weight.dtype == torch.bfloat16:
        y = F.linear(hidden, weight)  # rounded to bf16
        return y, torch.addmm(y, hidden, weight.t(), beta=-1)  # h W^T - y, rounded once, tiny
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return (F.linear(hidden.to(dtype), weight.to(dtype)),)


def _sum_parts(parts: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    out = parts[0].to(torch.promote_types(parts[0].dtype, torch.float32))  # a fresh GEMM output if no cast
    for extra in parts[1:]:
        out.add_(extra)
    return out


def exact_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight.T` as float32 (exact to ~1e-4 for bf16 inputs), [K, H] x [V, H] -> [K, V]."""
    return _sum_parts(_logit_parts(hidden, weight))


def vocab_block(rows: int, vocab: int) -> int:
    """Vocabulary columns per block for `rows` scored tokens (a multiple of 256, at most `vocab`)."""
    return min(vocab, max(256, BLOCK_ELEMENTS // max(rows, 1) // 256 * 256))


class _TokenLogProb(torch.autograd.Function):
    """`log softmax(h W^T)[k, targets[k]]` for each row k, with gradients to `h` only.

    The vocabulary is processed in blocks (`vocab_block`). The forward keeps, per row, the
    running max `m` of the logits and `s = log sum exp(logit - m)`, and returns
    `(logit[target] - m) - s`, with the target's logit taken from the same block logits: the
    result is never above 0, and a near-certain token keeps its small `1 - p` (as a
    log-softmax that subtracts the max first does).

    For the backward it saves each block's `e = exp(logit - m_b)` (m_b: the block's row max),
    in bf16 when `h` is bf16 (the precision the gradient GEMM runs at anyway), so the backward
    is one scaling pass per block, `-grad * e * exp(m_b - m - s)`, and the GEMM: no logits are
    recomputed or re-exponentiated. The target's own term is summed apart from the rest, so
    `1 - p` is the sum of the other terms (no cancellation) and `log p = -log1p(rest / target)`
    keeps a near-certain token's tiny `1 - p` in both the value and the gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                exact: bool = True) -> torch.Tensor:
        block = vocab_block(hidden.shape[0], weight.shape[0])
        keep = ctx.needs_input_grad[0]
        rows = torch.arange(len(targets), device=targets.device)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        save_dtype = hidden.dtype if hidden.dtype == torch.bfloat16 else acc
        target_logit = torch.zeros(len(targets), dtype=acc, device=hidden.device)  # [K]
        maxes, sums, saved = [], [], []
        fast = not exact and hidden.dtype == weight.dtype  # the bf16 product alone: one GEMM fewer
        for v0 in range(0, weight.shape[0], block):
            w = weight[v0:v0 + block]
            logits = F.linear(hidden, w).to(acc) if fast else exact_logits(hidden, w)  # [K, block] float32 (or float64)
            inside = (targets >= v0) & (targets < v0 + block)
            at = (rows[inside], targets[inside] - v0)
            target_logit[inside] = logits[at]
            m_b = logits.amax(dim=-1)  # [K]
            e = logits.sub_(m_b[:, None]).exp_()  # exp(logit - m_b), in place
            e[at] = 0.0  # the target's own term is kept apart (below), so 1 - p is a sum, not a difference
            sums.append(e.sum(-1))  # [K]
            maxes.append(m_b)
            if keep:
                saved.append(e.to(save_dtype))  # a fresh tensor per block: no copy when the dtype matches
        m_blocks = torch.stack(maxes, -1)  # [K, blocks]
        m = m_blocks.amax(-1)  # [K]
        rest = (torch.stack(sums, -1) * (m_blocks - m[:, None]).exp()).sum(-1)  # sum over v != target of exp(l_v - m)
        t = (target_logit - m).exp()  # exp(l_target - m), in (0, 1]
        s = (t + rest).log()  # log sum exp(logit - m)
        # log p = (l_t - m) - s; when the target dominates (rest < t), -log1p(rest / t) keeps a tiny 1 - p.
        out = torch.where(rest < t, -torch.log1p(rest / t), (target_logit - m) - s)
        ctx.block, ctx.hidden_dtype = block, hidden.dtype
        ctx.save_for_backward(weight, targets, rest / (t + rest), (m_blocks - (m + s)[:, None]).exp(), *saved)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, targets, one_minus_p, block_scale, *saved = ctx.saved_tensors  # [K], [K, blocks]
        block = ctx.block
        rows = torch.arange(len(targets), device=targets.device)
        # d out_k / d logit_kv = onehot(target_k) - p_kv; the target's 1 - p was summed in the forward.
        target_grad = grad * one_minus_p  # [K]
        coef = -grad[:, None] * block_scale  # [K, blocks]: -grad_k * exp(m_b - m - s)
        grad_hidden = torch.zeros(len(targets), weight.shape[1], dtype=one_minus_p.dtype, device=one_minus_p.device)  # [K, H]
        for i, v0 in enumerate(range(0, weight.shape[0], block)):
            e = saved[i]
            grad_logits = e * coef[:, i:i + 1].to(e.dtype)  # -grad * p, [K, block], in e's dtype
            inside = (targets >= v0) & (targets < v0 + block)
            grad_logits[rows[inside], targets[inside] - v0] = target_grad[inside].to(e.dtype)
            w = weight[v0:v0 + block].to(ctx.hidden_dtype)
            grad_hidden.add_(grad_logits.to(ctx.hidden_dtype) @ w)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None


def token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, softcap: float | None = None,
                    exact: bool = True) -> torch.Tensor:
    """Log-probability of `targets` [K] under the output head at `hidden` [K, H]; float32 [K].

    `weight` [V, H] is the head's (frozen) weight. A head with a bias, soft-capped logits
    (Gemma) or a trainable weight takes the plain float32 path.
    `exact=False` (training): for bf16 `hidden` and `weight`, the logits are the bf16 product
    alone (rounded by up to ~0.06 at |logit| ~ 16), without the residual GEMM; everything after
    the GEMM stays float32. Other dtypes are unaffected.
    """
    if bias is None and not softcap and not weight.requires_grad:
        return _TokenLogProb.apply(hidden, weight, targets, exact)
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

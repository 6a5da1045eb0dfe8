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
- Backward: `d/dh = (onehot - softmax) W`, with the softmax from the saved logit parts and the
  GEMMs in bf16, accumulated in float32.
- Both run over blocks of the vocabulary sized so that a block's float32 logits (~4 MB) stay in
  cache: the elementwise passes (cast, max, exp, sum, scale, cast) are memory-bound; on this
  machine `torch.exp` streams 50-80 GB/s over 1-17 MB tensors and 20 GB/s over 67 MB.

Forward and backward at the SmolLM2 head (V = 49,152, H = 576), medians over 3 alternating
rounds (`python bench/bench_head.py --rounds 3`): 240 tokens 0.211 s with the float32 head
against 0.094 s here (2.25x), 480 tokens 0.357 s against 0.175 s (2.04x).
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
    out = parts[0].to(torch.promote_types(parts[0].dtype, torch.float32))
    if out is parts[0]:
        out = out.clone()  # the saved part must stay intact for a second backward
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
    log-softmax that subtracts the max first does). The backward forms each block's
    `onehot - softmax` as `exp((logit - m) - s)` from the saved logit parts and accumulates
    `grad_h` over the blocks in float32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        block = vocab_block(hidden.shape[0], weight.shape[0])
        keep = ctx.needs_input_grad[0]
        rows = torch.arange(len(targets), device=targets.device)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        target_logit = torch.zeros(len(targets), dtype=acc, device=hidden.device)  # [K]
        maxes, sums, saved = [], [], []
        for v0 in range(0, weight.shape[0], block):
            parts = _logit_parts(hidden, weight[v0:v0 + block])
            logits = _sum_parts(parts)  # [K, block] float32
            inside = (targets >= v0) & (targets < v0 + block)
            target_logit[inside] = logits[rows[inside], targets[inside] - v0]
            m_b = logits.amax(dim=-1)  # [K]
            sums.append(logits.sub_(m_b[:, None]).exp_().sum(-1))  # sum exp(logit - m_b), [K]
            maxes.append(m_b)
            if keep:
                saved += parts
        m_blocks = torch.stack(maxes, -1)  # [K, blocks]
        m = m_blocks.amax(-1)  # [K]
        s = (torch.stack(sums, -1) * (m_blocks - m[:, None]).exp()).sum(-1).log()  # [K]
        ctx.block, ctx.parts, ctx.hidden_dtype = block, len(saved) // max(1, len(maxes)), hidden.dtype
        ctx.save_for_backward(weight, targets, m, s, *saved)
        return (target_logit - m) - s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, targets, m, s, *saved = ctx.saved_tensors
        block, n = ctx.block, ctx.parts
        rows = torch.arange(len(targets), device=targets.device)
        grad_hidden = torch.zeros(len(targets), weight.shape[1], dtype=m.dtype, device=m.device)  # [K, H]
        for i, v0 in enumerate(range(0, weight.shape[0], block)):
            # d out_k / d logits_k = onehot(target_k) - softmax(logits_k), times grad_k
            softmax = _sum_parts(saved[i * n:(i + 1) * n]).sub_(m[:, None]).sub_(s[:, None]).exp_()
            grad_logits = softmax.mul_(-grad[:, None])
            inside = (targets >= v0) & (targets < v0 + block)
            grad_logits[rows[inside], targets[inside] - v0] += grad[inside]
            w = weight[v0:v0 + block].to(ctx.hidden_dtype)
            grad_hidden.add_(grad_logits.to(ctx.hidden_dtype) @ w)
        return grad_hidden.to(ctx.hidden_dtype), None, None


def token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Log-probability of `targets` [K] under the output head at `hidden` [K, H]; float32 [K].

    `weight` [V, H] is the head's (frozen) weight. A head with a bias, soft-capped logits
    (Gemma) or a trainable weight takes the plain float32 path.
    """
    if bias is None and not softcap and not weight.requires_grad:
        return _TokenLogProb.apply(hidden, weight, targets)
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

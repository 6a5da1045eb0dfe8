"""Token log-probabilities from the full-vocabulary output head, fast in bfloat16 and exact.

Choice-likelihood scoring needs `log softmax(h W^T)[target]` at every choice token, over the whole
vocabulary (49,152 rows for SmolLM2). That head is the largest single GEMM of a training step, and
with LoRA only in the top layers (the prefix cache) it is a large share of the step.

The plain way computes it in float32: the bf16 weight is cast to float32 on every forward (a copy
of the whole embedding), the GEMMs run at the float32 rate (a fraction of the bf16 rate), and
the log-softmax writes a second [K, V] float32 tensor that the backward reads.
bf16 logits alone would be fast but round each logit by up to 2^-8 of its size, which blurs
NLL and ECE.

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
  cache: the elementwise passes (cast, max, exp, sum, scale, cast) are memory-bound, and run
  several times faster from cache than from DRAM (docs/design.md).

Training does not need the float32-exact logits (`exact=False`, which `train_step` passes): the
bf16 product alone, one GEMM fewer, everything after it unchanged. The loss and its gradient then
carry the logits' bf16 rounding, like every other bf16 product of the step; NLL and ECE are
measured in evaluation, which keeps the exact logits, and `bench/bench.py` section (h) compares
the trained ensemble with float32 PEFT. `bench/bench_levers.py` times it on and off ("+ bf16
training head"; a frozen-prefix step gains most, since the head is a larger share of it).

Measured against the float32 head (`python bench/bench_head.py`): docs/design.md, "Choices we measured".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# Vocabulary columns per block: about 2^20 float32 logits (4 MB) per block stay in the CPU's L2/L3
# cache through the elementwise passes, which run several times faster there than from DRAM. A GPU
# streams from its memory at several TB/s and pays a launch per kernel and block instead: large
# blocks (2^27 logits, 512 MB) there, which covers the vocabulary in one or two blocks.
BLOCK_ELEMENTS = 1 << 20
CUDA_BLOCK_ELEMENTS = 1 << 27


def _logit_parts(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors whose float32 sum is `hidden @ weight.T`, [K, H] x [V, H] -> each [K, V].

    bf16 inputs: the bf16 product `y` and its rounding residual `h W^T - y` (one `addmm` that
    subtracts `y` before it rounds; see the module docstring). Other dtypes: one GEMM in float32
    (float64 stays float64).
    """
    if hidden.dtype == weight.dtype == torch.bfloat16:
        with _full_precision_reductions(hidden.device):
            y = F.linear(hidden, weight)  # rounded to bf16
            return y, torch.addmm(y, hidden, weight.t(), beta=-1)  # h W^T - y, rounded once, tiny
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return (F.linear(hidden.to(dtype), weight.to(dtype)),)


@contextmanager
def _full_precision_reductions(device: torch.device) -> Iterator[None]:
    """On CUDA, bf16 GEMMs that accumulate in float32 throughout (cuBLAS may otherwise reduce
    split-K partial sums in bf16, which would round the residual GEMM's `h W^T - y` away)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved


def _sum_parts(parts: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    out = parts[0].to(torch.promote_types(parts[0].dtype, torch.float32))  # a fresh GEMM output if no cast
    for extra in parts[1:]:
        out.add_(extra)
    return out


def exact_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight.T` as float32 (exact to ~1e-4 for bf16 inputs), [K, H] x [V, H] -> [K, V]."""
    return _sum_parts(_logit_parts(hidden, weight))


def vocab_block(rows: int, vocab: int, device: torch.device | str = "cpu") -> int:
    """Vocabulary columns per block for `rows` scored tokens (a multiple of 256, at most `vocab`)."""
    elements = CUDA_BLOCK_ELEMENTS if torch.device(device).type == "cuda" else BLOCK_ELEMENTS
    return min(vocab, max(256, elements // max(rows, 1) // 256 * 256))


class _TokenLogProb(torch.autograd.Function):
    """`log softmax(h W^T)[rows[k], targets[k]]` for each k, with gradients to `h` only.

    `hidden` [U, H] holds the distinct positions; `rows` [K] says which one each target is
    scored at, and the (row, target) pairs are distinct (`token_log_probs` makes them so).
    Choice-likelihood shares a position among targets: the prompt's last token predicts the
    first token of every choice, so one full-vocabulary row serves all of them.

    The vocabulary is processed in blocks (`vocab_block`). The forward keeps, per position, the
    running max `m` of the logits and `s = log sum exp(logit - m)`, and returns
    `(logit[target] - m) - s`, with the target's logit taken from the same block logits: the
    result is never above 0, and a near-certain token keeps its small `1 - p` (as a
    log-softmax that subtracts the max first does).

    For the backward it saves each block's `e = exp(logit - m_b)` (m_b: the block's row max),
    in bf16 when `h` is bf16 (the precision the gradient GEMM runs at anyway), so the backward
    is one scaling pass per block, `-G * e * exp(m_b - m - s)` with G the row's summed output
    gradient, and the GEMM: no logits are recomputed or re-exponentiated. The targets' own terms
    are summed apart from the rest, so target k's `1 - p` is a sum of the other terms (no
    cancellation) and `log p = -log1p(rest / target)` keeps a near-certain token's tiny `1 - p`
    in both the value and the gradient. The other targets of the same position enter `rest` as
    (sum of the position's targets) - (its own), in float64: exact to ~1e-16 of the sum, and
    exactly 0 for a position with one target.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                exact: bool = True) -> torch.Tensor:
        block = vocab_block(hidden.shape[0], weight.shape[0], hidden.device)
        keep = ctx.needs_input_grad[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        save_dtype = hidden.dtype if hidden.dtype == torch.bfloat16 else acc
        target_logit = torch.zeros(len(targets), dtype=acc, device=hidden.device)  # [K]
        maxes, sums, saved = [], [], []
        fast = not exact and hidden.dtype == weight.dtype  # the bf16 product alone: one GEMM fewer
        for v0 in range(0, weight.shape[0], block):
            w = weight[v0:v0 + block]
            logits = F.linear(hidden, w).to(acc) if fast else exact_logits(hidden, w)  # [U, block] float32 (or float64)
            inside = (targets >= v0) & (targets < v0 + block)
            at = (rows[inside], targets[inside] - v0)
            target_logit[inside] = logits[at]
            m_b = logits.amax(dim=-1)  # [U]
            e = logits.sub_(m_b[:, None]).exp_()  # exp(logit - m_b), in place
            e[at] = 0.0  # the targets' own terms are kept apart (below), so 1 - p is a sum, not a difference
            sums.append(e.sum(-1))  # [U]
            maxes.append(m_b)
            if keep:
                saved.append(e.to(save_dtype))  # a fresh tensor per block: no copy when the dtype matches
        m_blocks = torch.stack(maxes, -1)  # [U, blocks]
        m = m_blocks.amax(-1)  # [U]
        rest_all = (torch.stack(sums, -1) * (m_blocks - m[:, None]).exp()).sum(-1)  # [U]: the non-target terms
        t = (target_logit - m[rows]).exp()  # [K]: exp(l_target - m), in (0, 1]
        wide = torch.promote_types(acc, torch.float64)
        t_all = torch.zeros(len(m), dtype=wide, device=t.device).index_add_(0, rows, t.to(wide))  # [U]
        rest = rest_all[rows] + (t_all[rows] - t.to(wide)).to(acc)  # [K]: sum over v != target of exp(l_v - m)
        total = rest_all + t_all.to(acc)  # [U]: sum over v of exp(l_v - m)
        s = total.log()  # [U]
        # log p = (l_t - m) - s; when the target dominates (rest < t), -log1p(rest / t) keeps a tiny 1 - p.
        out = torch.where(rest < t, -torch.log1p(rest / t), (target_logit - m[rows]) - s[rows])
        ctx.block, ctx.hidden_dtype = block, hidden.dtype
        ctx.save_for_backward(weight, targets, rows, rest / total[rows], t / total[rows],
                              (m_blocks - (m + s)[:, None]).exp(), *saved)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        weight, targets, rows, one_minus_p, p, block_scale, *saved = ctx.saved_tensors  # [K] x 4, [U, blocks]
        block = ctx.block
        grad = grad.to(one_minus_p.dtype)
        # d out_k / d logit_uv = [u = rows_k] (onehot(target_k) - p_uv): row u's softmax term is
        # scaled by G_u, the sum of its targets' gradients.
        g_row = torch.zeros(len(block_scale), dtype=grad.dtype, device=grad.device).index_add_(0, rows, grad)  # [U]
        # At target k: grad_k (1 - p_k) - (G_u - grad_k) p_k, with 1 - p_k from the forward (no cancellation).
        target_grad = grad * one_minus_p - (g_row[rows] - grad) * p  # [K]
        coef = -g_row[:, None] * block_scale  # [U, blocks]: -G_u * exp(m_b - m - s)
        grad_hidden = torch.zeros(len(block_scale), weight.shape[1], dtype=grad.dtype, device=grad.device)  # [U, H]
        for i, v0 in enumerate(range(0, weight.shape[0], block)):
            e = saved[i]
            grad_logits = e * coef[:, i:i + 1].to(e.dtype)  # -G * p, [U, block], in e's dtype
            inside = (targets >= v0) & (targets < v0 + block)
            grad_logits[rows[inside], targets[inside] - v0] = target_grad[inside].to(e.dtype)
            w = weight[v0:v0 + block].to(ctx.hidden_dtype)
            grad_hidden.add_(grad_logits.to(ctx.hidden_dtype) @ w)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None


def token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, softcap: float | None = None,
                    exact: bool = True, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of `targets` [K] under the output head; float32 [K].

    `hidden` [U, H] holds the positions; target k is scored at `hidden[rows[k]]` (`rows` [K]
    long; None: U = K, one target per position). A position shared by several targets costs one
    row of the head, not one per target. `weight` [V, H] is the head's (frozen) weight. A head
    with a bias, soft-capped logits (Gemma) or a trainable weight takes the plain float32 path.
    `exact=False` (training): for bf16 `hidden` and `weight`, the logits are the bf16 product
    alone (rounded by up to ~0.06 at |logit| ~ 16), without the residual GEMM; everything after
    the GEMM stays float32. Other dtypes are unaffected.
    """
    if rows is None:
        rows = torch.arange(len(targets), device=targets.device)
    if bias is None and not softcap and not weight.requires_grad:
        # One output per distinct (position, target) pair; repeats read it back (and their
        # gradients add up there).
        pairs, inverse = torch.unique(rows * weight.shape[0] + targets, return_inverse=True)
        if len(pairs) == len(targets):
            return _TokenLogProb.apply(hidden, weight, targets, rows, exact)
        out = _TokenLogProb.apply(hidden, weight, pairs % weight.shape[0], pairs // weight.shape[0], exact)
        return out[inverse]
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1)[rows, targets]

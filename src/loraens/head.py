"""Token log-probabilities from the full-vocabulary output head, fast in bfloat16 and exact.

Choice-likelihood scoring needs `log softmax(h W^T)[target]` at every choice token, over the whole
vocabulary (49,152 rows for SmolLM2). That head is the largest single GEMM of a training step, and
with LoRA only in the top layers (the prefix cache) it is most of the step.

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
- The loss needs only `logit[target] - logsumexp(logits)`: no [K, V] log-softmax is formed.
- Backward: `d/dh = (onehot - softmax) W`, with the softmax from the saved float32 logits and
  the GEMM in bf16 (the gradient into the bf16 decoder is bf16 anyway).

Measured on SmolLM2-135M, 193 tokens, forward and backward: float32 path 0.18-0.20 s, this one
0.10-0.11 s (`bench/bench.py` measures it inside a training step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exact_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight.T` as float32, [K, H] x [V, H] -> [K, V].

    bf16 inputs take two bf16 GEMMs (product and rounding residual, see the module docstring);
    other dtypes one GEMM in float32 (float64 stays float64).
    """
    if hidden.dtype == weight.dtype == torch.bfloat16:
        y = F.linear(hidden, weight)  # rounded to bf16
        residual = torch.addmm(y, hidden, weight.t(), beta=-1)  # h W^T - y, rounded once, tiny
        return y.float().add_(residual)
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 if given
    return F.linear(hidden.to(dtype), weight.to(dtype))


class _TokenLogProb(torch.autograd.Function):
    """`log softmax(h W^T)[k, targets[k]]` for each row k, with gradients to `h` only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = exact_logits(hidden, weight)  # [K, V] float32
        lse = torch.logsumexp(logits, dim=-1)  # [K]
        out = logits.gather(1, targets[:, None]).squeeze(1) - lse
        ctx.save_for_backward(weight, targets, logits, lse)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, targets, logits, lse = ctx.saved_tensors
        # d out_k / d logits_k = onehot(target_k) - softmax(logits_k); a new tensor, so that the
        # saved logits stay valid for a second backward (retain_graph).
        grad_logits = torch.sub(logits, lse[:, None]).exp_().mul_(-grad[:, None])  # [K, V]
        grad_logits[torch.arange(len(targets), device=targets.device), targets] += grad
        grad_hidden = grad_logits.to(ctx.hidden_dtype) @ weight.to(ctx.hidden_dtype)  # [K, H]
        return grad_hidden, None, None


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

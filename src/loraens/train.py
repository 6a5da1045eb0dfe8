"""Train all members together: one forward/backward and one optimizer step per batch.

Optimizer semantics are per member. AdamW and weight decay act elementwise, so a parameter
stacked over the member axis behaves exactly like M separate parameters. The loss is the SUM of
each member's mean loss, so member k's gradient is the one it would get training alone, and
gradient-norm clipping is computed per member (`clip_grad_norm_per_member`).

Regularisers are per member too, so they keep that equivalence: `train.kl_coef` adds
KL(member || frozen base) over each training question's choices (the base distribution is computed
once, before training), and `train.delta_l2` adds the squared norm of the member's weight update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import collate
from .config import EnsembleConfig, TrainConfig
from .ensemble import (
    active_members,
    clip_grad_norm_per_member,
    delta_sq_norms,
    lora_disabled,
    lora_parameters,
)
from .prompts import EncodedQuestion
from .scoring import Scorer


@dataclass
class EpochSummary:
    epoch: int  # 1-based
    step: int  # optimizer steps so far
    train_loss: list[float]  # mean training loss of each member over this epoch, [M]
    seconds: float


def member_orders(n: int, num_members: int, epoch: int, seed: int, per_member: bool,
                  first_member: int = 0) -> np.ndarray:
    """Question order of members first_member .. first_member + M - 1 in `epoch`, shape [M, n].

    With `per_member` each member draws its own permutation (a source of diversity); otherwise
    all members see the same order. Member k's order depends on (seed, k, epoch) only, so a
    process that trains a share of the members (torchrun) gives them the orders they would get
    in one process.
    """
    members = range(first_member, first_member + num_members)
    rows = [np.random.default_rng([seed, k if per_member else 0, epoch]).permutation(n) for k in members]
    return np.stack(rows)


def member_batches(orders: np.ndarray, lengths: np.ndarray, batch_size: int, window: int, seed: int,
                   epoch: int) -> list[np.ndarray]:
    """Split each member's order into batches; returns one [M, b] index array per step.

    With `window > 1`, each member sorts its questions by length within windows of `window`
    batches before splitting them, and all members then visit the batches in one shared shuffled
    order. At every step the members' questions are different but of similar length, so the
    padding to a common length stays small (docs/design.md gives the measured padding), while each
    batch is still a random draw from the member's own order. The window shrinks on small sets so
    that an epoch always spans at least 4 windows.
    """
    m, n = orders.shape
    # Keep at least 4 windows per epoch: one window holding every question would sort all
    # members into the same batches and erase their own data orders.
    window = max(1, min(window, math.ceil(n / batch_size) // 4))
    per_member = []
    for k in range(m):
        batches = []
        for start in range(0, n, window * batch_size):
            block = orders[k, start: start + window * batch_size]
            if window > 1:
                block = block[np.argsort(-lengths[block], kind="stable")]
            batches += [block[i: i + batch_size] for i in range(0, len(block), batch_size)]
        per_member.append(batches)
    steps = np.arange(len(per_member[0]))
    if window > 1:  # the same visiting order for all members keeps their lengths aligned
        steps = np.random.default_rng([seed, 1_000_003, epoch]).permutation(len(steps))
    return [np.stack([per_member[k][s] for k in range(m)]) for s in steps]


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0 to 1, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def planned_steps(num_questions: int, train: TrainConfig) -> int:
    """Optimizer steps of a full run: ceil(N / batch_size) per epoch, capped by max_steps."""
    total = math.ceil(num_questions / train.batch_size) * train.epochs
    return total if train.max_steps is None else min(total, train.max_steps)


def train_members(
    model: nn.Module,
    questions: list[EncodedQuestion],
    train: TrainConfig,
    ensemble: EnsembleConfig,
    scorer: Scorer,
    on_epoch_end: Callable[[EpochSummary], bool | None] | None = None,
    progress: bool = True,
    first_member: int = 0,
) -> list[EpochSummary]:
    """Fine-tune every member of `model` on `questions`; returns one summary per epoch.

    Each optimizer step takes `train.batch_size` questions per member (a different set per
    member when `ensemble.member_data_order`), split into `train.grad_accum` micro-batches.
    `on_epoch_end` may return True to stop training (early stopping). `first_member`: the
    model's M = `ensemble.num_members` members are members first_member .. of a larger ensemble
    (one torchrun process's share); they see those members' data orders.
    """
    m, b = ensemble.num_members, train.batch_size
    n = len(questions)
    if n == 0:
        raise ValueError("No training questions: check --data.dataset, --data.train_split and --data.train_limit.")
    c = max(q.num_choices for q in questions)
    lengths = np.array([q.num_tokens for q in questions])
    total = planned_steps(n, train)
    base_lp = None
    if train.kl_coef > 0:
        base_lp = base_log_probs(model, questions, scorer, train.eval_batch_size, progress)  # [N, C]
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(total, round(train.warmup_ratio * total))
    )
    # Dropout masks come from torch's global generator: seed it from the run seed, so a run (or a
    # sweep cell resumed in a fresh process) is reproducible from its config alone.
    torch.manual_seed(ensemble.seed)
    model.train()
    summaries: list[EpochSummary] = []
    step = 0
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(1, train.epochs + 1):
        if step >= total:
            break
        start = time.perf_counter()
        orders = member_orders(n, m, epoch, ensemble.seed, ensemble.member_data_order, first_member)
        losses = torch.zeros(m)
        seen = 0
        for chunk in member_batches(orders, lengths, b, train.bucket_window, ensemble.seed, epoch):
            if step >= total:
                break
            # chunk: [M, b] question indices, member k's in row k; the last batch may be shorter
            losses += train_step(model, questions, chunk, scorer, train, c, base_lp) * chunk.shape[1]
            seen += chunk.shape[1]
            if train.max_grad_norm is not None:
                clip_grad_norm_per_member(params, train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{float(losses.sum() / max(seen, 1) / m):.4f}")
        summary = EpochSummary(epoch, step, (losses / max(seen, 1)).tolist(), time.perf_counter() - start)
        summaries.append(summary)
        if on_epoch_end is not None:
            stop = on_epoch_end(summary)
            model.train()
            if stop:
                break
    bar.close()
    model.eval()
    return summaries


def train_step(
    model: nn.Module,
    questions: list[EncodedQuestion],
    chunk: np.ndarray,
    scorer: Scorer,
    train: TrainConfig,
    num_choices: int,
    base_lp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Accumulate gradients for one optimizer step; returns each member's mean loss, [M].

    `chunk` [M, b] holds question indices, member k's in row k. The step runs
    `train.grad_accum` micro-batches, each in groups of `train.member_chunk` members per
    forward/backward (None: all M at once; the gradients are the same, the activation memory is
    that of member_chunk * b rows instead of M * b). The loss of member k is its mean
    cross-entropy, plus `train.kl_coef` * mean KL(member || base) over its questions (`base_lp`
    [N, C] holds the frozen base's log-probabilities), plus `train.delta_l2` * its squared update
    norm.
    """
    num_members = chunk.shape[0]
    kl_coef, delta_l2 = train.kl_coef, train.delta_l2
    b = chunk.shape[1]
    group = train.member_chunk or num_members
    total = torch.zeros(num_members)
    for micro in np.array_split(np.arange(b), min(train.grad_accum, b)):
        for k0 in range(0, num_members, group):
            k1 = min(k0 + group, num_members)
            idx = chunk[k0:k1, micro]  # [members of this group, mb]
            members = nullcontext() if k1 - k0 == num_members else active_members(model, k0, k1)
            with members:  # the backward too: gradient checkpointing re-runs the forward in it
                batch = collate([questions[i] for i in idx.reshape(-1)], num_choices=num_choices)  # member-major
                lp = scorer.log_probs(model, batch, k1 - k0, training=True)  # [k1-k0, mb, C]
                targets = batch.targets.view(k1 - k0, -1, 1).to(lp.device)
                per_member = -lp.gather(-1, targets).squeeze(-1).mean(1)  # [k1-k0]
                if kl_coef > 0:
                    if base_lp is None:
                        raise ValueError("kl_coef > 0 needs the base model's log-probabilities (base_lp).")
                    ref = base_lp[torch.as_tensor(idx)][..., : lp.shape[-1]].to(lp.device)  # [k1-k0, mb, C]
                    per_member = per_member + kl_coef * choice_kl(lp, ref).mean(1)
                # Sum over members (each gets its own gradient), weight micro-batches by their size.
                (per_member.sum() * (len(micro) / b)).backward()
            total[k0:k1] += per_member.detach().float().cpu() * (len(micro) / b)
    if delta_l2 > 0:
        # Once per step (not per micro-batch): the penalty is on the weights, not on the data.
        penalty = delta_l2 * delta_sq_norms(model)  # [M]
        penalty.sum().backward()
        total += penalty.detach().float().cpu()
    return total


def choice_kl(lp: torch.Tensor, ref_lp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the choices, from log-probabilities [..., C] (masked choices at -inf); [...]."""
    real = torch.isfinite(lp) & torch.isfinite(ref_lp)
    # Masked choices have p = q = 0: their terms are 0. Zero the -inf entries BEFORE subtracting,
    # since a nan in the unused branch of torch.where would still poison the gradient.
    lp0, ref0 = lp.masked_fill(~real, 0.0), ref_lp.masked_fill(~real, 0.0)
    return (lp0.exp() * (lp0 - ref0)).masked_fill(~real, 0.0).sum(-1)


@torch.no_grad()
def base_log_probs(model: nn.Module, questions: list[EncodedQuestion], scorer: Scorer, batch_size: int = 16,
                   progress: bool = True) -> torch.Tensor:
    """The frozen base model's log-distribution over each question's choices, [N, C] (-inf if masked)."""
    from .predict import predict

    with lora_disabled(model):
        preds = predict(model, questions, [str(i) for i in range(len(questions))], 1, scorer, batch_size, progress,
                        desc="base model (KL reference)")
    probs = preds.member_probs[:, 0]
    # A real choice never gets log 0 (which would make the KL infinite); padded choices stay -inf.
    return torch.where(preds.choice_mask, probs.clamp_min(1e-30).log(), torch.tensor(float("-inf")))

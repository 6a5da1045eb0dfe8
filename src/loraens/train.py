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
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .config import EnsembleConfig, TrainConfig
from .diversity import apply_member_hyperparameters, member_bag, member_hyperparameters
from .ensemble import (
    active_members,
    clip_grad_norm_per_member,
    delta_sq_norms,
    lora_disabled,
    lora_parameters,
    member_grad_norms,
)
from .member_prompts import MemberQuestions, Questions, member_batch
from .prompts import EncodedQuestion
from .scoring import Scorer


@dataclass
class EpochSummary:
    epoch: int  # 1-based
    step: int  # optimizer steps so far
    train_loss: list[float]  # mean training loss of each member over this epoch, [M]
    seconds: float


def member_orders(n: int, num_members: int, epoch: int, seed: int, per_member: bool,
                  first_member: int = 0, bagging: bool = False) -> np.ndarray:
    """Question order of members first_member .. first_member + M - 1 in `epoch`, shape [M, n].

    With `per_member` each member draws its own permutation (a source of diversity); otherwise
    all members see the same order. With `bagging` member k visits its own bootstrap resample of
    the n questions (`diversity.member_bag`, fixed over epochs) in that order. Member k's order
    depends on (seed, k, epoch) only, so a process that trains a share of the members (torchrun)
    gives them the orders they would get in one process.
    """
    members = range(first_member, first_member + num_members)
    rows = [np.random.default_rng([seed, k if per_member else 0, epoch]).permutation(n) for k in members]
    if bagging:
        rows = [member_bag(n, seed, k)[row] for k, row in zip(members, rows)]
    return np.stack(rows)


def member_batches(orders: np.ndarray, lengths: np.ndarray, batch_size: int, window: int, seed: int,
                   epoch: int) -> list[np.ndarray]:
    """Split each member's order into batches; returns one [M, b] index array per step.

    With `window > 1`, each member sorts its questions by length within windows of `window`
    batches before splitting them, and all members then visit the batches in one shared shuffled
    order. At every step the members' questions are different but of similar length, so the
    padding to a common length stays small (docs/design.md gives the measured padding), while each
    batch is still a random draw from the member's own order. The window shrinks on small sets so
    that an epoch always spans at least 4 windows. `lengths`: [N] tokens per question, or [M, N]
    when members read different prompts (member k sorts by its own rows' lengths, so its batches
    do not depend on the other members' prompts, nor on how torchrun shards the members).
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
                own = lengths[k] if lengths.ndim == 2 else lengths
                block = block[np.argsort(-own[block], kind="stable")]
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


class NonFiniteError(RuntimeError):
    """A member's training loss or gradient norm is NaN or infinite. Training stops before the step
    is applied, so the weights stay finite; the message says where and what to change."""


@dataclass
class TrainProgress:
    """Where training stands: with the members' weights, the optimizer's and scheduler's states and
    the RNG states (`TrainResume`), enough to continue exactly as an uninterrupted run would.

    Between epochs `epoch` is the next one and `position` 0; inside an epoch `orders` holds its
    members' data orders ([M, n], this process's members) and `position` the batches done.
    """

    epoch: int = 1  # the epoch in progress or next (1-based)
    position: int = 0  # batches of `epoch` done
    step: int = 0  # optimizer steps done
    losses: list[float] | None = None  # each member's loss summed over this epoch's questions so far
    seen: int = 0  # questions per member so far in this epoch
    epoch_seconds: float = 0.0
    orders: np.ndarray | None = None
    summaries: list[EpochSummary] = field(default_factory=list)
    done: bool = False  # early stopping ended training
    watch: dict[str, Any] = field(default_factory=dict)  # `DivergenceWatch` state
    warnings: list[str] = field(default_factory=list)


@dataclass
class TrainResume:
    """What `train_members` restores before its first step: the progress, this process's AdamW state
    (per parameter index, as `optimizer.state_dict()["state"]` holds it), the AdamW param groups and
    the scheduler state (JSON-able), and the torch RNG states ("cpu", and "cuda" on a GPU)."""

    progress: TrainProgress
    optimizer_state: dict[int, dict[str, torch.Tensor]]
    param_groups: list[dict[str, Any]]
    scheduler_state: dict[str, Any]
    rng: dict[str, torch.Tensor]


class DivergenceWatch:
    """A warning when the members' mean training loss stays above its starting value.

    The starting value is the mean loss over the first window of steps; after every later window,
    a mean above it counts one and a mean at or below it resets the count. At `patience` windows
    in a row the run may be diverging (a learning rate far too large does this without ever
    producing a NaN): `update` returns the warning, once.
    """

    def __init__(self, patience: int | None, window: int, state: dict[str, Any] | None = None) -> None:
        self.patience, self.window = patience, max(1, window)
        self.state = state if state is not None else {}
        self.state.setdefault("start", None)
        self.state.setdefault("sum", 0.0)
        self.state.setdefault("count", 0)
        self.state.setdefault("above", 0)
        self.state.setdefault("warned", False)

    def update(self, mean_loss: float, lr: float) -> str | None:
        st = self.state
        if self.patience is None or st["warned"]:
            return None
        st["sum"] += mean_loss
        st["count"] += 1
        if st["count"] < self.window:
            return None
        mean, st["sum"], st["count"] = st["sum"] / st["count"], 0.0, 0
        if st["start"] is None:
            st["start"] = mean
            return None
        st["above"] = st["above"] + 1 if mean > st["start"] else 0
        if st["above"] < self.patience:
            return None
        st["warned"] = True
        return (f"the members' mean training loss has stayed above its starting value ({st['start']:.4g}) for "
                f"{st['above']} windows of {self.window} step(s) in a row (now {mean:.4g}): the run may be "
                f"diverging. A smaller --train.lr (now {lr:g}) usually helps.")


def train_members(
    model: nn.Module,
    questions: Questions,
    train: TrainConfig,
    ensemble: EnsembleConfig,
    scorer: Scorer,
    on_epoch_end: Callable[[EpochSummary], bool | None] | None = None,
    progress: bool = True,
    first_member: int = 0,
    *,
    on_checkpoint: Callable[[TrainProgress, torch.optim.Optimizer, Any], None] | None = None,
    resume: TrainResume | None = None,
) -> list[EpochSummary]:
    """Fine-tune every member of `model` on `questions`; returns one summary per epoch.

    Each optimizer step takes `train.batch_size` questions per member (a different set per
    member when `ensemble.member_data_order`), split into `train.grad_accum` micro-batches.
    `on_epoch_end` may return True to stop training (early stopping). `first_member`: the
    model's M = `ensemble.num_members` members are members first_member .. of a larger ensemble
    (one torchrun process's share); they see those members' data orders.

    `on_checkpoint(progress, optimizer, scheduler)` is called after every epoch end (after
    `on_epoch_end`) and every `train.checkpoint_every` steps inside an epoch; `resume` continues
    from such a point (the members' weights already restored in `model`), and the remaining steps
    are exactly those of the uninterrupted run. A NaN or infinite loss or gradient norm raises
    `NonFiniteError` before its step is applied.
    """
    m, b = ensemble.num_members, train.batch_size
    n = len(questions)
    if n == 0:
        raise ValueError("No training questions: check --data.dataset, --data.train_split and --data.train_limit.")
    c = max(q.num_choices for q in questions)
    if isinstance(questions, MemberQuestions):  # [M, N]: each member's own rows
        lengths = np.array([[q.num_tokens for q in questions.member(j)] for j in range(m)])
    else:
        lengths = np.array([q.num_tokens for q in questions])
    total = planned_steps(n, train)
    base_lp = None
    if train.kl_coef > 0:
        base_lp = base_log_probs(model, questions, scorer, train.eval_batch_size, progress)  # [N, C] or [M, N, C]
    params = lora_parameters(model)
    # Per-member lr and weight decay (--ensemble.lr_range / weight_decay_range): one AdamW step
    # without decay, then each member's step rescaled to its own (diversity.apply_member_hyperparameters).
    hyper = member_hyperparameters(ensemble, train, first_member, m)
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=0.0 if hyper else train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(total, round(train.warmup_ratio * total))
    )
    # Dropout masks come from torch's global generator: seed it from the run seed, so a run (or a
    # sweep cell resumed in a fresh process) is reproducible from its config alone.
    torch.manual_seed(ensemble.seed)
    state = TrainProgress()
    if resume is not None:
        state = resume.progress
        optimizer.load_state_dict({"state": resume.optimizer_state,
                                   "param_groups": [{**g, "params": own["params"]} for g, own in
                                                    zip(resume.param_groups, optimizer.state_dict()["param_groups"])]})
        scheduler.load_state_dict(resume.scheduler_state)
        set_rng_state(resume.rng, params[0].device if params else torch.device("cpu"))
    device = params[0].device if params else torch.device("cpu")
    main = first_member == 0
    lr_flag = (f"the top of --ensemble.lr_range (now {ensemble.lr_range[1]:g})" if ensemble.lr_range
               else f"--train.lr (now {train.lr:g})")
    hint = (f"Lower {lr_flag} or --ensemble.init_scale (now {ensemble.init_scale:g}); clipping "
            "cannot rescue a gradient that is already infinite.")
    watch = DivergenceWatch(train.divergence_patience, math.ceil(n / b) // 4, state.watch)
    state.watch = watch.state
    model.train()
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    while not state.done and state.epoch <= train.epochs and state.step < total:
        epoch = state.epoch
        start = time.perf_counter() - state.epoch_seconds
        if state.orders is None:
            state.orders = member_orders(n, m, epoch, ensemble.seed, ensemble.member_data_order, first_member,
                                         ensemble.bagging)
        batches = member_batches(state.orders, lengths, b, train.bucket_window, ensemble.seed, epoch)
        losses = torch.zeros(m) if state.losses is None else torch.tensor(state.losses, dtype=torch.float32)
        for chunk in batches[state.position:]:
            if state.step >= total:
                break
            # chunk: [M, b] question indices, member k's in row k; the last batch may be shorter
            step_loss = train_step(model, questions, chunk, scorer, train, c, base_lp)
            if train.max_grad_norm is not None:
                norms = clip_grad_norm_per_member(params, train.max_grad_norm)
            else:
                norms = member_grad_norms(params)
            # One all-reduce: any rank's non-finite loss stops every rank; the mean loss is the ensemble's.
            mean_loss = _stop_if_not_finite(step_loss, norms, epoch, state.step + 1, first_member, device, hint)
            before = [p.detach().clone() for p in params] if hyper else []
            lr_now = optimizer.param_groups[0]["lr"]
            try:
                optimizer.step()
            except RuntimeError as err:  # AdamW's lr / (1 - beta1^t) past float32's range
                if "overflow" not in str(err):
                    raise
                raise NonFiniteError(f"training stopped at epoch {epoch}, step {state.step + 1}: the AdamW step "
                                     f"overflowed ({err}). {hint}") from None
            if hyper:
                apply_member_hyperparameters(params, before, lr_now, train.lr, hyper)
            _stop_if_weights_not_finite(params, epoch, state.step + 1, device, hint)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses += step_loss * chunk.shape[1]
            state.seen += chunk.shape[1]
            state.step += 1
            state.position += 1
            warning = watch.update(mean_loss, train.lr)
            if warning is not None:
                state.warnings.append(f"epoch {epoch}, step {state.step}: {warning}")
                if main:
                    print(f"loraens: warning: {state.warnings[-1]}", file=sys.stderr, flush=True)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{float(losses.sum() / max(state.seen, 1) / m):.4f}")
            every = train.checkpoint_every
            if (on_checkpoint is not None and every is not None and state.step % every == 0
                    and state.position < len(batches) and state.step < total):
                state.losses, state.epoch_seconds = losses.tolist(), time.perf_counter() - start
                on_checkpoint(state, optimizer, scheduler)
        summary = EpochSummary(epoch, state.step, (losses / max(state.seen, 1)).tolist(), time.perf_counter() - start)
        state.summaries.append(summary)
        state.epoch, state.position, state.losses, state.seen, state.epoch_seconds, state.orders = (
            epoch + 1, 0, None, 0, 0.0, None)
        if on_epoch_end is not None:
            state.done = bool(on_epoch_end(summary))
            model.train()
        if on_checkpoint is not None:
            on_checkpoint(state, optimizer, scheduler)
    bar.close()
    model.eval()
    return state.summaries


def _stop_if_not_finite(loss: torch.Tensor, norms: torch.Tensor, epoch: int, step: int, first_member: int,
                        device: torch.device, hint: str) -> float:
    """Raise `NonFiniteError` on every process when any member's loss or gradient norm is not
    finite; else return the mean loss over every member of every process. loss, norms: [m]."""
    bad = not (bool(torch.isfinite(loss).all()) and bool(torch.isfinite(norms).all()))
    flags, total, count = distributed.sum_over_ranks([float(bad), float(loss.sum()) if not bad else 0.0,
                                                      float(len(loss))], device)
    if not flags:
        return total / max(count, 1.0)
    pieces = distributed.gather((first_member, loss.tolist(), norms.float().cpu().tolist()))
    text = None
    if pieces is not None:
        rows = [(first + j, lo, no) for first, ls, ns in pieces for j, (lo, no) in enumerate(zip(ls, ns))]
        bad_rows = [f"member {k}: loss {lo:.4g}, gradient norm {no:.4g}" for k, lo, no in rows
                    if not (math.isfinite(lo) and math.isfinite(no))]
        text = (f"training stopped at epoch {epoch}, step {step}: a non-finite loss or gradient norm "
                f"({'; '.join(bad_rows)}). The step was not applied. {hint}")
    raise NonFiniteError(distributed.broadcast(text))


def _stop_if_weights_not_finite(params: list[nn.Parameter], epoch: int, step: int, device: torch.device,
                                hint: str) -> None:
    """After a step: a weight that overflowed to inf (a finite but huge update) stops the run too,
    before any checkpoint or export could keep it."""
    bad = bool(params) and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
    if distributed.any_true(bad, device):
        raise NonFiniteError(f"training stopped at epoch {epoch}, step {step}: the step made some LoRA weights "
                             f"infinite or NaN. {hint}")


def get_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global RNG states that training draws from (LoRA dropout): the CPU's, and `device`'s on a GPU."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def train_step(
    model: nn.Module,
    questions: Questions,
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
    [N, C], or [M, N, C] with per-member prompts, holds the frozen base's log-probabilities), plus
    `train.delta_l2` * its squared update norm.
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
                batch = member_batch(questions, idx, range(k0, k1), num_choices)  # member-major, own prompts
                lp = scorer.log_probs(model, batch, k1 - k0, training=True)  # [k1-k0, mb, C]
                targets = batch.targets.view(k1 - k0, -1, 1).to(lp.device)
                per_member = -lp.gather(-1, targets).squeeze(-1).mean(1)  # [k1-k0]
                if kl_coef > 0:
                    if base_lp is None:
                        raise ValueError("kl_coef > 0 needs the base model's log-probabilities (base_lp).")
                    if base_lp.dim() == 3:  # [M, N, C]: each member's reference under its own prompt
                        ref = base_lp[torch.arange(k0, k1)[:, None], torch.as_tensor(idx)]
                    else:
                        ref = base_lp[torch.as_tensor(idx)]
                    ref = ref[..., : lp.shape[-1]].to(lp.device)  # [k1-k0, mb, C]
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
def base_log_probs(model: nn.Module, questions: Questions, scorer: Scorer, batch_size: int = 16,
                   progress: bool = True) -> torch.Tensor:
    """The frozen base model's log-distribution over each question's choices (-inf if masked): [N, C],
    or [M, N, C] for `MemberQuestions` (member k's reference is the base under member k's prompt)."""
    if isinstance(questions, MemberQuestions):
        per_prompt = [_base_log_probs(model, list(qs), scorer, batch_size, progress) for qs in questions.per_prompt]
        return torch.stack([per_prompt[p] for p in questions.prompt_of])
    return _base_log_probs(model, list(questions), scorer, batch_size, progress)


def _base_log_probs(model: nn.Module, questions: list[EncodedQuestion], scorer: Scorer, batch_size: int,
                    progress: bool) -> torch.Tensor:
    from .predict import predict

    with lora_disabled(model):
        preds = predict(model, questions, [str(i) for i in range(len(questions))], 1, scorer, batch_size, progress,
                        desc="base model (KL reference)")
    probs = preds.member_probs[:, 0]
    # A real choice never gets log 0 (which would make the KL infinite); padded choices stay -inf.
    return torch.where(preds.choice_mask, probs.clamp_min(1e-30).log(), torch.tensor(float("-inf")))

"""Per-member diversity levers: what makes the members of one ensemble differ beyond their seeds.

An ensemble is only worth its cost if its members disagree where the data does not pin them
down. Besides the init (`--ensemble.init_scale`, `--ensemble.member_init`) and the data order
(`--ensemble.member_data_order`), four levers act per member:

- **bagging** (`--ensemble.bagging`): member k trains on its own bootstrap resample of the
  training questions, drawn once from (seed, k) and reshuffled every epoch;
- **hyper-diversity** (`--ensemble.lr_range`, `--ensemble.weight_decay_range`): member k's
  learning rate (log-uniform) and AdamW weight decay (uniform) are drawn from a stated range, as
  in hyper-deep ensembles (Wenzel et al., 2020);
- **per-member targets** (`--ensemble.member_targets`): member k adapts only its own subset of
  the target modules (q/v for some members, k/o or the MLP for others).
- **per-member prompts** (`--ensemble.member_prompts`, in `loraens.member_prompts`): member k
  reads every question through its own template.

Every draw depends on (seed, global member index) only, so a torchrun process that trains a share
of the members gives them the values they get in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .config import EnsembleConfig, TrainConfig

if TYPE_CHECKING:  # ensemble imports this module; the layer type is only needed for the annotations
    from .ensemble import MemberLoraLinear

# Stream tags, so the bag, lr and weight-decay draws of a member are independent of each other
# and of its init (`ensemble.member_seed`) and data order (`train.member_orders`).
_BAG, _LR, _WD = 2_000_003, 2_000_029, 2_000_039


def member_bag(n: int, seed: int, member: int) -> np.ndarray:
    """Member `member`'s bootstrap resample of n training questions: [n] indices drawn with replacement.

    About 1 - 1/e = 63% of the questions are in a bag, some of them several times.
    """
    return np.random.default_rng([seed, member, _BAG]).integers(0, n, size=n)


@dataclass(frozen=True)
class MemberHyperparameters:
    """Per-member optimizer settings of members first .. first + M - 1: lr [M] and weight_decay [M]."""

    lr: torch.Tensor  # float64 [M], the peak learning rate of each member
    weight_decay: torch.Tensor  # float64 [M], AdamW's decoupled weight decay of each member

    def to_dict(self) -> dict[str, list[float]]:
        return {"lr": [float(v) for v in self.lr], "weight_decay": [float(v) for v in self.weight_decay]}


def member_hyperparameters(ensemble: EnsembleConfig, train: TrainConfig, first_member: int = 0,
                           num_members: int | None = None) -> MemberHyperparameters | None:
    """The drawn lr and weight decay of each member, or None when neither range is set (all members
    use `--train.lr` and `--train.weight_decay`).

    lr is log-uniform in `ensemble.lr_range`, weight decay uniform in `ensemble.weight_decay_range`;
    a member's draw depends on (ensemble.seed, its global index) only.
    """
    if ensemble.lr_range is None and ensemble.weight_decay_range is None:
        return None
    m = ensemble.num_members if num_members is None else num_members
    members = range(first_member, first_member + m)
    if ensemble.lr_range is None:
        lr = [train.lr] * m
    else:
        lo, hi = np.log(ensemble.lr_range[0]), np.log(ensemble.lr_range[1])
        lr = [float(np.exp(np.random.default_rng([ensemble.seed, k, _LR]).uniform(lo, hi))) for k in members]
    if ensemble.weight_decay_range is None:
        wd = [train.weight_decay] * m
    else:
        lo, hi = ensemble.weight_decay_range
        wd = [float(np.random.default_rng([ensemble.seed, k, _WD]).uniform(lo, hi)) for k in members]
    return MemberHyperparameters(torch.tensor(lr, dtype=torch.float64), torch.tensor(wd, dtype=torch.float64))


@torch.no_grad()
def apply_member_hyperparameters(params: list[nn.Parameter], before: list[torch.Tensor], lr_now: float,
                                 base_lr: float, hyper: MemberHyperparameters) -> None:
    """Turn one AdamW step taken at `lr_now` with no weight decay into each member's own step.

    params: the member-stacked LoRA parameters after `optimizer.step()` ([M, ...] each); before:
    their values before it. AdamW's update is lr * (adaptive direction) and its decoupled decay is
    lr * wd * p, so member k's step is the common step scaled by lr_k / base_lr, minus
    lr_now * (lr_k / base_lr) * wd_k * p_before: exactly torch's AdamW with lr_k and wd_k (the
    schedule's factor lr_now / base_lr applies to every member alike).
    """
    ratio = (hyper.lr / base_lr).float()
    decay = (lr_now * hyper.lr / base_lr * hyper.weight_decay).float()
    for p, old in zip(params, before):
        shape = (-1,) + (1,) * (p.dim() - 1)
        r, d = ratio.to(p.device).view(shape), decay.to(p.device).view(shape)
        p.copy_(old + (p - old) * r - d * old)


def member_targets(ensemble: EnsembleConfig, member: int) -> set[str] | None:
    """The module names member `member` (its global index) adapts: entry member mod the number of
    `--ensemble.member_targets` entries; None when every member adapts every target module.

    A member's other modules keep A = B = 0. That is a fixed point of training: both gradients
    vanish there (grad B = (x A^T)^T g and grad A = (g B)^T x), AdamW moves nothing with a zero
    gradient and decays nothing that is zero, so those modules stay exactly the base model's, and
    the Laplace posterior puts no variance on the member's outputs through them.
    """
    if not ensemble.member_targets:
        return None
    groups = [set(g.split("+")) for g in ensemble.member_targets]
    return groups[member % len(groups)]


def trainable_per_member(layers: dict[str, MemberLoraLinear], ensemble: EnsembleConfig) -> int:
    """LoRA parameters one member trains, averaged over the members (rounded): with
    `--ensemble.member_targets` a member's other modules hold zeros it never trains, so they do not
    count. layers: `ensemble.member_layers(model)` (lora_A [M, r, in], lora_B [M, out, r] each)."""
    counts: list[int] = []
    for k in range(ensemble.num_members):
        own = member_targets(ensemble, k)
        counts.append(sum(layer.lora_A[0].numel() + layer.lora_B[0].numel() for name, layer in layers.items()
                          if own is None or name.rsplit(".", 1)[-1] in own))
    return round(sum(counts) / len(counts))

"""Several processes, one ensemble: members sharded over torchrun's ranks.

`torchrun --nproc_per_node W -m loraens train ...` (or `accelerate launch`, which sets the same
environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) starts W processes. Members
are independent (each one's loss, gradient, clipping and AdamW state are its own), so nothing is
averaged across processes: each rank holds the frozen base on its own device and trains its own
contiguous share of the M members. Member k draws the init and data order it would draw in one
process (they depend on the run seed and k only), so a W-process run gives the one-process
run's members up to float rounding.

The processes meet only to gather: every rank predicts its members on every question, rank 0
gathers the [N, m_rank, C] pieces into the usual [N, M, C] predictions, and the members' weights
to write them. Rank 0 writes the run folder; the others write nothing. When W does not divide M,
the first M mod W ranks hold one member more (the step time is that of the largest share); more
processes than members is an error. With LoRA dropout, each rank draws its own masks, so such a
run differs from the one-process run as two seeds would.

The process group uses gloo on CPU and NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's share of an ensemble: members first .. first + count - 1."""

    rank: int = 0
    world: int = 1
    first: int = 0
    count: int = 1

    @property
    def members(self) -> range:
        return range(self.first, self.first + self.count)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder and prints the results."""
        return self.rank == 0


def member_shard(total: int, rank: int = 0, world: int = 1) -> Shard:
    """Rank `rank`'s contiguous share of `total` members over `world` processes.

    The first `total % world` ranks hold one member more: 5 members over 2 ranks are 0-2 and 3-4.
    """
    if world > total:
        raise ValueError(f"{world} processes cannot share an ensemble of {total} members: each process trains at "
                         f"least one member. Start at most {total} processes (torchrun --nproc_per_node), or raise "
                         "--ensemble.num_members.")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes.")
    base, extra = divmod(total, world)
    count = base + (rank < extra)
    first = rank * base + min(rank, extra)
    return Shard(rank, world, first, count)


def world_from_env() -> tuple[int, int]:
    """(rank, world size) that torchrun or `accelerate launch` set; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(total_members: int, device: torch.device) -> Shard:
    """This process's `Shard`; joins the process group first when several processes run.

    Called once per process, before the model loads: a rank with a bad setting fails alone
    otherwise, and the others would wait for it until the timeout.
    """
    rank, world = world_from_env()
    shard = member_shard(total_members, rank, world)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's object collectives use the current device
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
    return shard


def active() -> bool:
    """Whether this process is one of several (a process group is up)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0, in rank order (None elsewhere); [obj] in a single process.

    For the small things the ranks exchange: member probabilities [N, m, C] and member weights,
    moved to the CPU first.
    """
    if not active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a decision such as early stopping, taken on rank 0 alone)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """`values` summed over the ranks (every rank gets the sums); `values` in a single process.

    One tiny all-reduce, on `device` (NCCL needs a GPU tensor): e.g. each rank's count of
    non-finite losses and its loss sum, so every rank stops at the same step and watches the
    whole ensemble's mean loss."""
    if not active():
        return list(values)
    box = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.SUM)
    return box.tolist()


def any_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (every rank gets the answer); `flag` in a single process."""
    return sum_over_ranks([1.0 if flag else 0.0], device)[0] > 0


def teardown() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

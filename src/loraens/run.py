"""A run, end to end: data -> model -> members -> training -> predictions -> metrics -> run folder.

Run folder layout::

    <output_dir>/
      config.yaml                        resolved configuration, enough to rerun
      members/member_<k>/                PEFT adapter folders (rewritten after every epoch)
      metrics.jsonl                      one line per (epoch, split) evaluation
      predictions/<dataset>_<split>.safetensors   member_probs [N, M, C], targets, choice_mask, ids
      predictions/epochs/epoch_<e>/<dataset>_<split>.safetensors   the same after every epoch
      results.json                       final metrics per split: each member, mean member, ensemble

With early stopping (`train.early_stopping_patience`), members/ and the final predictions are
those of the epoch with the best ensemble NLL on the validation split.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CompileMode, RunConfig
from .data import load_examples, warn_if_evaluating_on_training_file
from .ensemble import attach_members, export_member, first_lora_layer, import_member
from .fast.compiling import compile_decision, compile_decoder_layers, layers_to_compile
from .fast.prefix import prefix_cache_for
from .metrics import evaluate_ensemble
from .model import enable_gradient_checkpointing, load_base_model
from .predict import predict
from .predictions import (
    Predictions,
    epoch_predictions_dir,
    load_predictions,
    predictions_dir,
    save_predictions,
    split_key,
)
from .prompts import PromptEncoder
from .scoring import Scorer
from .train import EpochSummary, planned_steps, train_members


@dataclass
class LoadedEnsemble:
    """A base model with its members attached, plus what is needed to score questions."""

    config: RunConfig
    model: nn.Module
    encoder: PromptEncoder
    scorer: Scorer

    def predict(self, examples: list, progress: bool = True, desc: str = "predict") -> Predictions:
        """Member probabilities [N, M, C] for `examples` (records with question/choices/answer/id)."""
        return predict(self.model, self.encoder.encode_all(examples), [e.id for e in examples],
                       self.config.ensemble.num_members, self.scorer, self.config.train.eval_batch_size, progress,
                       desc)


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]  # split key -> evaluate_ensemble(...) output
    epochs: list[EpochSummary] = field(default_factory=list)
    ensemble: LoadedEnsemble | None = None  # the trained members, still in memory


def build_ensemble(config: RunConfig) -> LoadedEnsemble:
    """Load the base model, attach freshly initialised members, and build the run's `Scorer`.

    With `--ensemble.top_layers` (and `--ensemble.prefix_cache`, the default) the frozen layers
    below the members get a frozen-prefix cache, which the scorer holds.
    """
    model, tokenizer = load_base_model(config.model)
    attach_members(model, config.ensemble, fused_update=config.speed.fused_update)
    cache = None
    if config.ensemble.top_layers is not None and config.ensemble.prefix_cache:
        cache = prefix_cache_for(model, first_lora_layer(model))
    encoder = PromptEncoder(tokenizer, config.prompt)
    return LoadedEnsemble(config, model, encoder, Scorer.from_prompt(config.prompt, encoder, config.speed, cache))


def _evaluate(ens: LoadedEnsemble, run_dir: Path, key: str, examples: list, progress: bool,
              epoch: int | None = None) -> dict[str, Any]:
    preds = ens.predict(examples, progress=progress, desc=f"eval {key}")
    save_predictions(preds, run_dir, key)
    if epoch is not None:
        save_predictions(preds, run_dir, key, epoch)
    return evaluate_ensemble(preds.member_probs, preds.targets)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _update_results(run_dir: Path, key: str, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    path = run_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"splits": {}}
    results["splits"][key] = metrics
    results.update(extra or {})
    path.write_text(json.dumps(results, indent=2))
    return results


def _clear_previous_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote to this folder, so old results never mix with new ones."""
    stale = [p for p in (run_dir / "members", predictions_dir(run_dir)) if p.is_dir()]
    stale += [p for p in (run_dir / "results.json", run_dir / "metrics.jsonl") if p.is_file()]
    if stale:
        print(f"loraens: replacing the previous run in {run_dir} ({', '.join(p.name for p in stale)})")
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def export_members(ens: LoadedEnsemble, run_dir: Path) -> list[Path]:
    return [
        export_member(ens.model, k, run_dir / "members" / f"member_{k}", ens.config.ensemble, ens.config.model.name)
        for k in range(ens.config.ensemble.num_members)
    ]


def train_run(config: RunConfig, progress: bool = True) -> RunResult:
    """Train the members described by `config` and write the run folder.

    Members are exported after every epoch, so an interrupted run keeps what it finished.
    """
    run_dir = Path(config.output_dir)
    started = time.time()
    warn_if_evaluating_on_training_file(config.data)
    train_examples = load_examples(config.data, config.data.train_split, config.data.train_limit)
    eval_sets = {split_key(config.data.dataset, s): load_examples(config.data, s, config.data.eval_limit)
                 for s in config.data.eval_splits}
    ens = build_ensemble(config)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(ens.model)
    train_q = ens.encoder.encode_all(train_examples)
    use_compile, note = compile_decision(config.train, planned_steps(len(train_q), config.train),
                                         config.ensemble.num_members,
                                         layers_to_compile(ens.model, ens.scorer.prefix_cache))
    if note:
        print(f"loraens: {note}")
    if use_compile:
        compile_decoder_layers(ens.model, ens.scorer.prefix_cache)
    # Under `auto` a long run must not die in Inductor: on a compiler error, dynamo runs that frame
    # eagerly. Only for this run's training and evaluation; the setting is restored afterwards.
    fallback = (torch._dynamo.config.patch(suppress_errors=True)
                if use_compile and config.train.compile is CompileMode.AUTO else nullcontext())
    run_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_run(run_dir)
    config.save(run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    last: dict[str, Any] = {}
    patience = config.train.early_stopping_patience
    watch = split_key(config.data.dataset, config.data.selection_split or "") if patience else None
    best: dict[str, Any] = {"nll": float("inf"), "epoch": None, "metrics": {}, "bad": 0}
    eval_seconds = 0.0

    def on_epoch_end(summary: EpochSummary) -> bool:
        nonlocal eval_seconds
        final = summary.epoch == config.train.epochs or summary.step == config.train.max_steps
        if patience is None:
            export_members(ens, run_dir)
        if not (config.train.eval_every_epoch or final):
            return False
        t0 = time.perf_counter()
        for key, examples in eval_sets.items():
            metrics = _evaluate(ens, run_dir, key, examples, progress, epoch=summary.epoch)
            last[key] = metrics
            _append_jsonl(metrics_path, {
                "epoch": summary.epoch, "step": summary.step, "split": key, "train_loss": summary.train_loss,
                "epoch_seconds": round(summary.seconds, 2), **metrics,
            })
        eval_seconds += time.perf_counter() - t0
        if patience is None:
            return False
        nll = last[watch]["ensemble"]["nll"]
        if best["epoch"] is None or nll < best["nll"]:  # the first epoch is always kept: members/ is never empty
            best.update(nll=float("inf") if math.isnan(nll) else nll, epoch=summary.epoch, metrics=dict(last), bad=0)
            export_members(ens, run_dir)  # members/ always holds the best epoch so far
            return False
        best["bad"] += 1
        return best["bad"] >= patience

    with fallback:
        epochs = train_members(ens.model, train_q, config.train, config.ensemble, ens.scorer, on_epoch_end, progress)
        if best["epoch"] is not None and best["epoch"] != epochs[-1].epoch:
            # Early stopping: the final predictions and metrics are those of the best epoch.
            for path in epoch_predictions_dir(run_dir, best["epoch"]).glob("*.safetensors"):
                shutil.copyfile(path, predictions_dir(run_dir) / path.name)
            last = best["metrics"]
            for k in range(config.ensemble.num_members):  # the in-memory members too
                import_member(ens.model, k, run_dir / "members" / f"member_{k}")
        if not epochs or not last:  # e.g. max_steps ended training before an evaluation ran
            export_members(ens, run_dir)
            for key, examples in eval_sets.items():
                last[key] = _evaluate(ens, run_dir, key, examples, progress)
    results: dict[str, Any] = {}
    info = {"num_train_questions": len(train_examples), "train_seconds": round(time.time() - started, 1),
            "eval_seconds": round(eval_seconds, 1), "num_members": config.ensemble.num_members,
            "epochs_trained": epochs[-1].epoch if epochs else 0}
    if patience is not None:
        info["best_epoch"] = best["epoch"]
    for key, metrics in last.items():
        results = _update_results(run_dir, key, metrics, info)
    return RunResult(run_dir, results.get("splits", {}), epochs, ens)


def load_run(run_dir: str | Path) -> LoadedEnsemble:
    """Rebuild a trained ensemble from its run folder (config.yaml + members/)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a loraens run folder: config.yaml is missing.")
    config = RunConfig.load(run_dir / "config.yaml")
    ens = build_ensemble(config)
    for k in range(config.ensemble.num_members):
        folder = run_dir / "members" / f"member_{k}"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: the run has {config.ensemble.num_members} members "
                                    "in config.yaml but was interrupted before exporting them.")
        import_member(ens.model, k, folder)
    return ens


def evaluate_run(run_dir: str | Path, dataset: str | None = None, split: str = "validation",
                 limit: int | None = None, ood: Sequence[str] = (), ood_split: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Score a saved run on any dataset and split, plus optional out-of-distribution sets.

    Writes predictions/<key>.safetensors for every set, adds their metrics to results.json, and
    for OOD sets the detection metrics (AUROC, AUPR, FPR@95) of every uncertainty score under
    results.json["ood"][<in key>][<ood key>]. Returns {"key", "metrics", "ood"}.
    """
    from .ood import ood_table  # sklearn and scipy load slowly, and training never needs them

    run_dir = Path(run_dir)
    ens = load_run(run_dir)
    dataset = dataset or ens.config.data.dataset
    key = split_key(dataset, split)
    metrics = _evaluate(ens, run_dir, key, load_examples(ens.config.data, split, limit, dataset), progress)
    results = _update_results(run_dir, key, metrics)
    in_preds = load_predictions(run_dir, key)
    ood_results: dict[str, Any] = {}
    for other in ood:
        other_split = ood_split or split
        other_key = split_key(other, other_split)
        other_metrics = _evaluate(ens, run_dir, other_key,
                                  load_examples(ens.config.data, other_split, limit, other), progress)
        _update_results(run_dir, other_key, other_metrics)
        ood_results[other_key] = ood_table(in_preds, load_predictions(run_dir, other_key))
    if ood_results:
        results = json.loads((run_dir / "results.json").read_text())
        results.setdefault("ood", {}).setdefault(key, {}).update(ood_results)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return {"key": key, "metrics": metrics, "ood": ood_results}

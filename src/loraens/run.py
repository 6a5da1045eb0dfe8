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

import dataclasses
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

from . import distributed
from .config import CompileMode, RunConfig
from .data import load_examples, warn_if_evaluating_on_training_file
from .distributed import Shard
from .ensemble import (
    attach_members,
    first_lora_layer,
    import_member,
    lora_parameters,
    member_tensors,
    write_member,
)
from .fast.compiling import compile_decision, compile_decoder_layers, layers_to_compile
from .fast.prefix import prefix_cache_for
from .metrics import evaluate_ensemble
from .model import enable_gradient_checkpointing, load_base_model, resolve_device
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
    """A base model with its members attached, plus what is needed to score questions.

    Under torchrun the model holds this process's share of the members (`shard`); `predict`
    still returns every member's probabilities, on rank 0.
    """

    config: RunConfig
    model: nn.Module
    encoder: PromptEncoder
    scorer: Scorer
    shard: Shard = field(default_factory=Shard)

    def predict(self, examples: list, progress: bool = True, desc: str = "predict") -> Predictions:
        """Member probabilities [N, M, C] for `examples` (records with question/choices/answer/id).

        Under torchrun, each rank scores its own members and rank 0 gets all M; the other ranks
        get their own share [N, m, C] (and nothing is for them to write).
        """
        local = predict(self.model, self.encoder.encode_all(examples), [e.id for e in examples], self.shard.count,
                        self.scorer, self.config.train.eval_batch_size, progress and self.shard.is_main, desc)
        pieces = distributed.gather(local.member_probs)  # [N, m_r, C] of every rank, in member order
        if pieces is None:
            return local
        return Predictions(torch.cat(pieces, dim=1), local.targets, local.choice_mask, local.ids)


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]  # split key -> evaluate_ensemble(...) output
    epochs: list[EpochSummary] = field(default_factory=list)
    ensemble: LoadedEnsemble | None = None  # the trained members, still in memory


def build_ensemble(config: RunConfig, shard: Shard | None = None) -> LoadedEnsemble:
    """Load the base model, attach freshly initialised members, and build the run's `Scorer`.

    With `--ensemble.top_layers` (and `--ensemble.prefix_cache`, the default) the frozen layers
    below the members get a frozen-prefix cache, which the scorer holds. `shard`: this process's
    share of the members under torchrun (default: all of them).
    """
    shard = shard or Shard(count=config.ensemble.num_members, total=config.ensemble.num_members)
    model, tokenizer = load_base_model(config.model)
    local = dataclasses.replace(config.ensemble, num_members=shard.count)
    attach_members(model, local, fused_update=config.speed.fused_update, first_member=shard.first)
    cache = None
    if config.ensemble.top_layers is not None and config.ensemble.prefix_cache:
        cache = prefix_cache_for(model, first_lora_layer(model))
    encoder = PromptEncoder(tokenizer, config.prompt)
    scorer = Scorer.from_prompt(config.prompt, encoder, config.speed, cache)
    return LoadedEnsemble(config, model, encoder, scorer, shard)


def _evaluate(ens: LoadedEnsemble, run_dir: Path, key: str, examples: list, progress: bool,
              epoch: int | None = None) -> dict[str, Any] | None:
    """Score `examples` with every member, save the predictions and return the metrics (rank 0;
    None on the other ranks, which write nothing)."""
    preds = ens.predict(examples, progress=progress, desc=f"eval {key}")
    if not ens.shard.is_main:
        return None
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
    """Write every member's PEFT folder, members/member_<k>; under torchrun rank 0 writes them all."""
    every = distributed.gather([member_tensors(ens.model, j) for j in range(ens.shard.count)])
    if every is None:
        return []
    tensors = [t for share in every for t in share]  # members 0 .. M-1, in rank order
    return [write_member(t, run_dir / "members" / f"member_{k}", ens.config.ensemble, ens.config.model.name)
            for k, t in enumerate(tensors)]


def train_run(config: RunConfig, progress: bool = True) -> RunResult:
    """Train the members described by `config` and write the run folder.

    Members are exported after every epoch, so an interrupted run keeps what it finished. Under
    torchrun each process trains its share of the members on its own device and rank 0 writes
    the run folder (`loraens.distributed`); the other ranks return a `RunResult` without results.
    """
    run_dir = Path(config.output_dir)
    started = time.time()
    device = resolve_device(config.model)  # a bad device fails here, before any data or model loads
    shard = distributed.setup(config.ensemble.num_members, device)
    main = shard.is_main
    progress = progress and main
    if main:
        warn_if_evaluating_on_training_file(config.data)
    train_examples = load_examples(config.data, config.data.train_split, config.data.train_limit)
    eval_sets = {split_key(config.data.dataset, s): load_examples(config.data, s, config.data.eval_limit)
                 for s in config.data.eval_splits}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ens = build_ensemble(config, shard)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(ens.model)
    train_q = ens.encoder.encode_all(train_examples)
    use_compile, note = compile_decision(config.train, planned_steps(len(train_q), config.train), shard.count,
                                         layers_to_compile(ens.model, ens.scorer.prefix_cache), device.type)
    if note and main:
        print(f"loraens: {note}")
    if use_compile:
        compile_decoder_layers(ens.model, ens.scorer.prefix_cache)
    # Under `auto` a long run must not die in Inductor: on a compiler error, dynamo runs that frame
    # eagerly. Only for this run's training and evaluation; the setting is restored afterwards.
    fallback = (torch._dynamo.config.patch(suppress_errors=True)
                if use_compile and config.train.compile is CompileMode.AUTO else nullcontext())
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _clear_previous_run(run_dir)
        config.save(run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    last: dict[str, Any] = {}
    patience = config.train.early_stopping_patience
    watch = split_key(config.data.dataset, config.data.selection_split or "") if patience else None
    best: dict[str, Any] = {"nll": float("inf"), "epoch": None, "metrics": {}, "bad": 0, "members": None}
    eval_seconds = 0.0

    def on_epoch_end(summary: EpochSummary) -> bool:
        nonlocal eval_seconds
        final = summary.epoch == config.train.epochs or summary.step == config.train.max_steps
        if patience is None:
            export_members(ens, run_dir)
        if not (config.train.eval_every_epoch or final):
            return False
        t0 = time.perf_counter()
        losses = distributed.gather(summary.train_loss)  # every member's training loss, on rank 0
        for key, examples in eval_sets.items():
            metrics = _evaluate(ens, run_dir, key, examples, progress, epoch=summary.epoch)
            if metrics is None:
                continue  # not rank 0
            last[key] = metrics
            _append_jsonl(metrics_path, {
                "epoch": summary.epoch, "step": summary.step, "split": key,
                "train_loss": [x for share in losses for x in share], "epoch_seconds": round(summary.seconds, 2),
                **metrics,
            })
        eval_seconds += time.perf_counter() - t0
        if patience is None:
            return False
        # Rank 0 holds the metrics and decides; every rank acts on its decision.
        improved, stop = distributed.broadcast(_early_stopping_step(best, last, watch, summary.epoch, patience)
                                               if main else None)
        if improved:
            best["members"] = [p.detach().clone() for p in lora_parameters(ens.model)]
            export_members(ens, run_dir)  # members/ always holds the best epoch so far
        return stop

    with fallback:
        epochs = train_members(ens.model, train_q, config.train, dataclasses.replace(config.ensemble,
                               num_members=shard.count), ens.scorer, on_epoch_end, progress, shard.first)
        best_epoch = distributed.broadcast(best["epoch"])
        if best_epoch is not None and best_epoch != epochs[-1].epoch:
            # Early stopping: the final predictions, metrics and in-memory members are the best epoch's.
            if main:
                for path in epoch_predictions_dir(run_dir, best_epoch).glob("*.safetensors"):
                    shutil.copyfile(path, predictions_dir(run_dir) / path.name)
                last = best["metrics"]
            with torch.no_grad():
                for param, saved in zip(lora_parameters(ens.model), best["members"], strict=True):
                    param.copy_(saved)
        if not epochs or not distributed.broadcast(bool(last)):  # max_steps ended training before an evaluation
            export_members(ens, run_dir)
            for key, examples in eval_sets.items():
                metrics = _evaluate(ens, run_dir, key, examples, progress)
                if metrics is not None:
                    last[key] = metrics
    peaks = distributed.gather(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    if not main:
        return RunResult(run_dir, {}, epochs, ens)
    results: dict[str, Any] = {}
    info = {"num_train_questions": len(train_examples), "train_seconds": round(time.time() - started, 1),
            "eval_seconds": round(eval_seconds, 1), "num_members": config.ensemble.num_members,
            "epochs_trained": epochs[-1].epoch if epochs else 0, **_device_info(device, shard, peaks)}
    if patience is not None:
        info["best_epoch"] = best["epoch"]
    for key, metrics in last.items():
        results = _update_results(run_dir, key, metrics, info)
    return RunResult(run_dir, results.get("splits", {}), epochs, ens)


def _early_stopping_step(best: dict[str, Any], last: dict[str, Any], watch: str, epoch: int,
                         patience: int) -> tuple[bool, bool]:
    """Update `best` with this epoch's ensemble NLL on the watched split: (improved, stop)."""
    nll = last[watch]["ensemble"]["nll"]
    if best["epoch"] is None or nll < best["nll"]:  # the first epoch is always kept: members/ is never empty
        best.update(nll=float("inf") if math.isnan(nll) else nll, epoch=epoch, metrics=dict(last), bad=0)
        return True, False
    best["bad"] += 1
    return False, best["bad"] >= patience


def _device_info(device: torch.device, shard: Shard, peaks: list[int | None]) -> dict[str, Any]:
    """Where the run trained, for results.json: device, processes, and the peak GPU memory."""
    info: dict[str, Any] = {"device": str(device) if shard.world == 1 else device.type, "processes": shard.world}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        # torch.cuda.max_memory_allocated over the whole run (the base, members, activations), the
        # largest over the processes; each process's own under "_per_process".
        info["peak_gpu_memory_bytes"] = max(p or 0 for p in peaks)
        if shard.world > 1:
            info["peak_gpu_memory_bytes_per_process"] = peaks
    return info


def load_run(run_dir: str | Path, device: str | None = "auto", shard: Shard | None = None) -> LoadedEnsemble:
    """Rebuild a trained ensemble from its run folder (config.yaml + members/).

    `device`: where to load it (`--model.device` values); "auto" by default, not the device it
    trained on, so a run trained on a GPU evaluates on a CPU and the other way round; None keeps
    the run's own setting. `shard`: this process's share of the members under torchrun.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a loraens run folder: config.yaml is missing.")
    config = RunConfig.load(run_dir / "config.yaml")
    if device is not None:
        config.model = dataclasses.replace(config.model, device=device)
    ens = build_ensemble(config, shard)
    for j, k in enumerate(ens.shard.members):
        folder = run_dir / "members" / f"member_{k}"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: the run has {config.ensemble.num_members} members "
                                    "in config.yaml but was interrupted before exporting them.")
        import_member(ens.model, j, folder)
    return ens


def evaluate_run(run_dir: str | Path, dataset: str | None = None, split: str = "validation",
                 limit: int | None = None, ood: Sequence[str] = (), ood_split: str | None = None,
                 progress: bool = True, device: str = "auto") -> dict[str, Any]:
    """Score a saved run on any dataset and split, plus optional out-of-distribution sets.

    Writes predictions/<key>.safetensors for every set, adds their metrics to results.json, and
    for OOD sets the detection metrics (AUROC, AUPR, FPR@95) of every uncertainty score under
    results.json["ood"][<in key>][<ood key>]. Returns {"key", "metrics", "ood"} (on rank 0 under
    torchrun, where each process scores its share of the members; {} on the other ranks).
    """
    from .ood import ood_table  # sklearn and scipy load slowly, and training never needs them

    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    shard = None
    if config is not None:
        shard = distributed.setup(config.ensemble.num_members,
                                  resolve_device(dataclasses.replace(config.model, device=device), "--device"))
    ens = load_run(run_dir, device, shard)
    main = ens.shard.is_main
    dataset = dataset or ens.config.data.dataset
    key = split_key(dataset, split)
    metrics = _evaluate(ens, run_dir, key, load_examples(ens.config.data, split, limit, dataset), progress)
    if main:
        _update_results(run_dir, key, metrics)
    ood_results: dict[str, Any] = {}
    for other in ood:
        other_split = ood_split or split
        other_key = split_key(other, other_split)
        other_metrics = _evaluate(ens, run_dir, other_key,
                                  load_examples(ens.config.data, other_split, limit, other), progress)
        if main:
            _update_results(run_dir, other_key, other_metrics)
            ood_results[other_key] = ood_table(load_predictions(run_dir, key), load_predictions(run_dir, other_key))
    if not main:
        return {}
    if ood_results:
        results = json.loads((run_dir / "results.json").read_text())
        results.setdefault("ood", {}).setdefault(key, {}).update(ood_results)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return {"key": key, "metrics": metrics, "ood": ood_results}

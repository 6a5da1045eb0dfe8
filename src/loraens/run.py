"""A run, end to end: data -> model -> members -> training -> predictions -> metrics -> run folder.

Run folder layout::

    <output_dir>/
      manifest.json                      status (running | interrupted | failed | complete), base model
                                         identity, each member file's sha256 and epoch (`loraens.runfolder`)
      config.yaml                        resolved configuration, enough to rerun
      members/member_<k>/                PEFT adapter folders (rewritten after every epoch)
      metrics.jsonl                      one line per (epoch, split) evaluation
      predictions/<dataset>_<split>.safetensors   member_probs [N, M, C], targets, choice_mask, ids
      predictions/epochs/epoch_<e>/<dataset>_<split>.safetensors   the same after every epoch
      results.json                       final metrics per split: each member, mean member, ensemble
      checkpoint.safetensors             while the run is unfinished: where to resume (`loraens.checkpoint`)
      .lock                              held by the process writing the folder

With early stopping (`train.early_stopping_patience`), members/ and the final predictions are
those of the epoch with the best ensemble NLL on the validation split.

Every file is replaced atomically. A run is checkpointed at every epoch end (and every
`train.checkpoint_every` steps); `train_run` into a folder holding an interrupted run of the same
configuration continues from its checkpoint and ends with the members an uninterrupted run gets.
A folder holding a complete run (or another configuration's) is never replaced without
`overwrite`. `load_run` checks the members against the manifest and the base model before
scoring them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from . import distributed
from .checkpoint import checkpoint_record, load_checkpoint, read_checkpoint_state, restore, save_checkpoint
from .config import CompileMode, RunConfig
from .data import load_examples, warn_if_evaluating_on_training_file
from .distributed import Shard
from .diversity import member_hyperparameters
from .ensemble import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    attach_members,
    first_lora_layer,
    import_member,
    lora_parameters,
    member_tensors,
    write_member,
)
from .fast.compiling import compile_decision, compile_decoder_layers, layers_to_compile
from .fast.prefix import prefix_cache_for
from .member_prompts import MemberEncoder, Questions
from .metrics import evaluate_ensemble
from .model import (
    base_identity,
    config_differs,
    describe_base,
    enable_gradient_checkpointing,
    load_base_model,
    peft_base_name,
    resolve_device,
    same_base,
)
from .predict import predict
from .predictions import (
    PREDICTIONS_DIR,
    Predictions,
    epoch_predictions_dir,
    predictions_dir,
    predictions_path,
    split_key,
)
from .runfolder import (
    CHECKPOINT,
    COMPLETE,
    FAILED,
    INTERRUPTED,
    MANIFEST,
    RUNNING,
    IntegrityError,
    RunFolderError,
    RunLock,
    atomic_path,
    check_complete,
    config_sha256,
    describe_checkpoint,
    dumps,
    member_record,
    new_manifest,
    read_json,
    read_manifest,
    remove_temp_files,
    set_status,
    sha256_file,
    write_json,
    write_manifest,
    write_text,
)
from .scoring import Scorer
from .train import EpochSummary, NonFiniteError, TrainResume, planned_steps, train_members

# Settings a resumed run may change: they alter where and how often, not what is trained.
RESUMABLE_CHANGES = ("output_dir", "model.device", "train.checkpoint_every", "train.divergence_patience",
                     "train.eval_batch_size")
_RUN_FILES = (CHECKPOINT, "results.json", "metrics.jsonl", "config.yaml")
_RUN_DIRS = ("members", PREDICTIONS_DIR)


LAPLACE_PREDICT_BATCH = 8  # questions per batch of the Laplace predictive (its Jacobians' memory)


@dataclass
class LoadedEnsemble:
    """A base model with its members attached, plus what is needed to score questions.

    Under torchrun the model holds this process's share of the members (`shard`); `predict`
    still returns every member's probabilities, on rank 0. `base`: the base model's identity
    (`loraens.model.base_identity`), as the run's manifest records it.
    """

    config: RunConfig
    model: nn.Module
    encoder: MemberEncoder  # this process's members' prompts (--ensemble.member_prompts)
    scorer: Scorer
    shard: Shard = field(default_factory=Shard)
    base: dict[str, Any] = field(default_factory=dict)

    def predict(self, examples: list, progress: bool = True, desc: str = "predict") -> Predictions:
        """Member probabilities [N, M, C] for `examples` (records with question/choices/answer/id).

        Under torchrun, each rank scores its own members and rank 0 gets all M; the other ranks
        get their own share [N, m, C] (and nothing is for them to write).
        """
        return self.predict_encoded(self.encoder.encode_all(examples), [e.id for e in examples], progress, desc)

    def predict_encoded(self, questions: Questions, ids: list[str], progress: bool = True,
                        desc: str = "predict") -> Predictions:
        """`predict` for questions already encoded with `self.encoder` (no second tokenization)."""
        local = predict(self.model, questions, ids, self.shard.count, self.scorer, self.config.train.eval_batch_size,
                        progress and self.shard.is_main, desc)
        return self.gather(local)

    def gather(self, local: Predictions) -> Predictions:
        """Every member's predictions from this process's share [N, m, C]: all M on rank 0 under
        torchrun (the others keep their own share); `local` itself in a single process."""
        pieces = distributed.gather(local.member_probs)  # [N, m_r, C] of every rank, in member order
        if pieces is None:
            return local
        return Predictions(torch.cat(pieces, dim=1), local.targets, local.choice_mask, local.ids)

    def laplace_predictor(self, progress: bool = True) -> tuple[Callable[[list, bool, str], Predictions], dict]:
        """Fit each member's Laplace-LoRA posterior on the run's training questions (`loraens.laplace`:
        K-FAC GGN, prior precision by marginal likelihood) and return a `predict`-like function of
        (examples, progress, desc) that gives every member's Laplace predictive (MC link), with the
        fit's facts (questions, seconds, prior precision per member) for results.json."""
        from .laplace import fit_laplace

        data = self.config.data
        train = load_examples(data, data.train_split, data.train_limit)
        started = time.perf_counter()
        post = fit_laplace(self.model, self.scorer, self.encoder.encode_all(train),
                           batch_size=self.config.train.eval_batch_size, progress=progress and self.shard.is_main)
        facts = {"method": "laplace (K-FAC GGN, prior precision by marginal likelihood, MC predictive)",
                 "fit_questions": len(train), "fit_seconds": round(time.perf_counter() - started, 1),
                 # The posterior's memory: every block's eigenvalues and eigenvectors, this process's members.
                 "posterior_bytes": sum(t.numel() * t.element_size() for b in post.blocks.values()
                                        for t in (b.in_vals, b.in_vecs, b.out_vals, b.out_vecs)),
                 "prior_precision": [float(x) for share in distributed.gather(post.prior_precision.tolist()) or []
                                     for x in share]}

        # The predictive holds every LoRA matrix's Jacobian for a batch at once (M x B x C x out x in
        # floats per matrix): at B = 32 on MMLU questions that passed 13 GB for the default model and
        # a second process was OOM-killed. A batch of at most LAPLACE_PREDICT_BATCH bounds it.
        predict_batch = min(self.config.train.eval_batch_size, LAPLACE_PREDICT_BATCH)

        def predict_fn(examples: list, progress_: bool, desc: str) -> Predictions:
            local = post.predict(self.model, self.scorer, self.encoder.encode_all(examples), [e.id for e in examples],
                                 batch_size=predict_batch, progress=progress_ and self.shard.is_main)
            return self.gather(local)

        return predict_fn, facts


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]  # split key -> evaluate_ensemble(...) output
    epochs: list[EpochSummary] = field(default_factory=list)
    ensemble: LoadedEnsemble | None = None  # the trained members, still in memory
    resumed: bool = False  # continued an interrupted run from its checkpoint


def build_ensemble(config: RunConfig, shard: Shard | None = None) -> LoadedEnsemble:
    """Load the base model, attach freshly initialised members, and build the run's `Scorer`.

    With `--ensemble.top_layers` (and `--ensemble.prefix_cache`, the default) the frozen layers
    below the members get a frozen-prefix cache, which the scorer holds. `shard`: this process's
    share of the members under torchrun (default: all of them).
    """
    shard = shard or Shard(count=config.ensemble.num_members)
    model, tokenizer = load_base_model(config.model)
    base = base_identity(config.model, model)  # of the plain base, before members wrap its layers
    local = dataclasses.replace(config.ensemble, num_members=shard.count)
    attach_members(model, local, fused_update=config.speed.fused_update, first_member=shard.first)
    cache = None
    if config.ensemble.top_layers is not None and config.ensemble.prefix_cache:
        cache = prefix_cache_for(model, first_lora_layer(model))
    encoder = MemberEncoder(tokenizer, config.prompt, config.ensemble, shard.members)
    scorer = Scorer.from_prompt(config.prompt, encoder, config.speed, cache)
    return LoadedEnsemble(config, model, encoder, scorer, shard, base)


def _save_predictions(preds: Predictions, run_dir: Path, key: str, epoch: int | None = None) -> None:
    with atomic_path(predictions_path(run_dir, key, epoch)) as tmp:
        preds.save(tmp)


def _evaluate(ens: LoadedEnsemble, run_dir: Path, key: str, examples: list, progress: bool,
              epoch: int | None = None, write: bool = True,
              predict_fn: Callable[[list, bool, str], Predictions] | None = None,
              ) -> tuple[dict[str, Any], Predictions] | None:
    """Score `examples` with every member, save the predictions (unless not `write`) and return the
    metrics and predictions (rank 0; None on the other ranks, which write nothing). `predict_fn`
    (examples, progress, desc) -> all members' predictions replaces `ens.predict` (the Laplace
    predictive of `evaluate --method laplace`)."""
    preds = (predict_fn or ens.predict)(examples, progress, f"eval {key}")
    if not ens.shard.is_main:
        return None
    if write:
        _save_predictions(preds, run_dir, key)
        if epoch is not None:
            _save_predictions(preds, run_dir, key, epoch)
    return evaluate_ensemble(preds.member_probs, preds.targets), preds


def _update_results(run_dir: Path, key: str, metrics: dict[str, Any]) -> dict:
    path = run_dir / "results.json"
    results = read_json(path) if path.is_file() else {"splits": {}}
    results.setdefault("splits", {})[key] = metrics
    write_json(path, results)
    return results


def export_members(ens: LoadedEnsemble, run_dir: Path, epoch: int | None = None) -> list[Path]:
    """Write every member's PEFT folder, members/member_<k>; under torchrun rank 0 writes them all.

    Each adapter_config.json names a base plain PEFT can load (`loraens.model.peft_base_name`).
    """
    every = distributed.gather([member_tensors(ens.model, j) for j in range(ens.shard.count)])
    if every is None:
        return []
    tensors = [t for share in every for t in share]  # members 0 .. M-1, in rank order
    base = ens.base.get("peft_base") or peft_base_name(ens.config.model)
    return [write_member(t, run_dir / "members" / f"member_{k}", ens.config.ensemble, base, epoch)
            for k, t in enumerate(tensors)]


def data_sha256(examples: list) -> str:
    """A hash of the training questions (ids, texts, choices, answers), to resume on the same data only."""
    rows = [[e.id, e.question, list(e.choices), e.answer, e.subject] for e in examples]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- starting: fresh, replace or resume


@dataclass
class _Start:
    mode: str  # "fresh" (nothing there) | "replace" (a previous run is replaced) | "resume"
    message: str | None = None
    checkpoint: dict[str, Any] | None = None  # the checkpoint's JSON state (resume)
    manifest: dict[str, Any] | None = None  # the folder's manifest (resume)


def _holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in (MANIFEST, *_RUN_FILES, *_RUN_DIRS))


def _config_changes(run_dir: Path, config: RunConfig) -> list[str]:
    """The settings (flag: there -> here) in which `config` differs from the run's config.yaml,
    apart from those a resumed run may change (`RESUMABLE_CHANGES`)."""
    try:
        stored = RunConfig.load_saved(run_dir / "config.yaml").to_dict()
    except (ValueError, OSError) as err:
        return [f"config.yaml cannot be read ({err})"]
    current = config.to_dict()

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(stored), flat(current)
    return [f"--{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]


def _plan_start(run_dir: Path, config: RunConfig, resume: bool | None, overwrite: bool) -> _Start:
    """What to do with what `run_dir` holds (rank 0, under the folder's lock); a `RunFolderError`
    when it must not be touched. `resume`: True requires an interrupted run to continue, False
    never continues one, None continues an interrupted run of the same configuration. `overwrite`
    lets a complete, failed or other run be replaced."""
    manifest = read_manifest(run_dir)
    replace = "replace"
    if not _holds_a_run(run_dir):
        if resume:
            raise RunFolderError(f"--resume {run_dir}: there is no run to resume in that folder.")
        return _Start("fresh")
    if manifest is None:
        if resume:
            raise RunFolderError(f"--resume {run_dir}: the folder has no {MANIFEST} (it was written by an older "
                                 "loraens, or is not a run folder), so there is no checkpoint to resume.")
        if overwrite:
            return _Start(replace, f"replacing the previous contents of {run_dir} (--overwrite)")
        raise RunFolderError(f"{run_dir} already holds a run without a {MANIFEST} (written by an older loraens): "
                             "loraens does not replace it. Pass --overwrite to replace it, or choose another "
                             "--output_dir.")
    status = manifest["status"]
    if status == COMPLETE:
        if resume:
            raise RunFolderError(f"--resume {run_dir}: that run is complete; there is nothing to resume.")
        if overwrite:
            return _Start(replace, f"replacing the complete run in {run_dir} (--overwrite)")
        raise RunFolderError(f"{run_dir} already holds a complete run (finished {manifest.get('finished', '?')}); "
                             "loraens never replaces one silently. Pass --overwrite to replace it, or choose another "
                             "--output_dir.")
    if status == FAILED:
        if overwrite and not resume:
            return _Start(replace, f"replacing the failed run in {run_dir} (--overwrite)")
        raise RunFolderError(f"{run_dir} holds a failed run: {manifest.get('reason')} Resuming it would fail the same "
                             "way; pass --overwrite to start it again (with other settings), or choose another "
                             "--output_dir.")
    # running (its process died: we hold the lock) or interrupted
    if not (run_dir / "config.yaml").exists() and not (run_dir / CHECKPOINT).exists() and not resume:
        # Killed between its manifest and its config.yaml: it trained nothing, so nothing is lost.
        return _Start(replace, f"{run_dir} holds a run that was stopped before it wrote its config.yaml (nothing "
                               "was trained); starting it over")
    changes = _config_changes(run_dir, config)
    if changes:
        if overwrite and not resume:
            return _Start(replace, f"replacing the interrupted run of another configuration in {run_dir} "
                                   "(--overwrite)")
        raise RunFolderError(f"{run_dir} holds an interrupted run of another configuration ({'; '.join(changes)}). "
                             f"Resume it as it was with `loraens train --resume {run_dir}`, start over with "
                             "--overwrite, or choose another --output_dir.")
    if resume is False:
        return _Start(replace, f"starting the interrupted run in {run_dir} over (--overwrite)")
    try:
        state = read_checkpoint_state(run_dir)
    except IntegrityError as err:
        raise _unresumable(err, run_dir) from None
    if state is None or state.get("run", {}).get("config_sha256") != manifest.get("config_sha256"):
        return _Start(replace, f"{run_dir} holds an interrupted run that has no checkpoint yet; starting it over")
    record = checkpoint_record(state)
    how = "--resume" if resume else "the same command again"
    return _Start("resume", f"{run_dir} holds an interrupted run of this configuration ({how}); resuming it from "
                            f"its last checkpoint, {describe_checkpoint(record)} of "
                            f"{state['run'].get('planned_steps', '?')} (--overwrite starts over)", state, manifest)


def _unresumable(err: Exception, run_dir: Path) -> RunFolderError:
    return RunFolderError(f"{err} The interrupted run in {run_dir} cannot be resumed from it; pass --overwrite "
                          "to start it over.")


def _load_checkpoint_checked(run_dir: Path) -> Any:
    """The checkpoint (rank 0); its tensors' hash is checked here, the header's in `_plan_start`."""
    try:
        return load_checkpoint(run_dir)
    except IntegrityError as err:
        raise _unresumable(err, run_dir) from None


def _agree(fn: Callable[[], Any], main: bool) -> Any:
    """Run `fn` on rank 0 and give its result to every rank; its `RunFolderError` (or other
    user-facing error) is raised on every rank, so none waits for the others in vain."""
    out: tuple[str, Any] = ("ok", None)
    if main:
        try:
            out = ("ok", fn())
        except (ValueError, OSError) as err:
            if not distributed.active():
                raise
            out = ("error", str(err))
    kind, value = distributed.broadcast(out)
    if kind == "error":
        raise RunFolderError(value)
    return value


def _clear_previous_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote to this folder, so old results never mix with new ones
    (the checkpoint first: it must never outlive the run it belongs to)."""
    for name in _RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in _RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    remove_temp_files(run_dir)


def _say(text: str) -> None:
    print(f"loraens: {text}", flush=True)


# ---------------------------------------------------------------- training


def train_run(config: RunConfig, progress: bool = True, *, resume: bool | None = None,
              overwrite: bool = False) -> RunResult:
    """Train the members described by `config` and write the run folder.

    Cheap checks come first: the output folder (and its lock), what it holds, the data; the model
    loads last. A folder holding an interrupted run of this configuration is resumed from its
    checkpoint (`resume=None`, the default; `resume=True` requires one, `resume=False` starts
    over); a complete, failed or other run is replaced only with `overwrite=True`.

    Under torchrun each process trains its share of the members on its own device and rank 0
    writes the run folder (`loraens.distributed`); the other ranks return a `RunResult` without
    results. A non-finite loss raises `NonFiniteError` (the folder is marked failed, its last
    checkpoint kept).
    """
    run_dir = Path(config.output_dir)
    started = time.time()
    device = resolve_device(config.model)  # a bad device fails here, before any data or model loads
    shard = distributed.setup(config.ensemble.num_members, device)
    main = shard.is_main
    progress = progress and main
    lock = RunLock(run_dir, "train")
    created = not run_dir.exists()

    def take_folder() -> _Start:
        lock.acquire()  # checks that --output_dir is (or can be) a folder
        try:
            return _plan_start(run_dir, config, resume, overwrite)
        except BaseException:
            lock.release()
            raise

    plan: _Start = _agree(take_folder, main)
    try:
        return _train_locked(config, run_dir, device, shard, plan, progress, started)
    except BaseException:
        if main and created and lock.held and [p.name for p in run_dir.iterdir()] == [".lock"]:
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before writing anything: leave no trace
        raise
    finally:
        lock.release()


def _train_locked(config: RunConfig, run_dir: Path, device: torch.device, shard: Shard, plan: _Start,
                  progress: bool, started: float) -> RunResult:
    main = shard.is_main
    if main:
        warn_if_evaluating_on_training_file(config.data)
    train_examples = load_examples(config.data, config.data.train_split, config.data.train_limit)
    eval_sets = {split_key(config.data.dataset, s): load_examples(config.data, s, config.data.eval_limit)
                 for s in config.data.eval_splits}
    data_hash = data_sha256(train_examples)
    if plan.mode == "resume" and plan.checkpoint is not None:  # every rank holds the plan: all stop alike
        if plan.checkpoint["run"].get("data_sha256") != data_hash:
            raise RunFolderError(f"{run_dir} holds an interrupted run, but its training questions differ from the ones "
                                 "read now (the data files changed?); it cannot be resumed on other data. Pass "
                                 "--overwrite to start over, or choose another --output_dir.")
    if main and plan.message:
        _say(plan.message)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ens = build_ensemble(config, shard)
    if plan.mode == "resume" and plan.manifest is not None and not same_base(plan.manifest["base_model"], ens.base):
        raise IntegrityError(f"{run_dir} was trained on the base model {describe_base(plan.manifest['base_model'])}, "
                             f"but --model.name now loads {describe_base(ens.base)}: another model. Resume it with "
                             "the model it started with, or pass --overwrite to start over.")
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(ens.model)
    train_q = ens.encoder.encode_all(train_examples)
    total_steps = planned_steps(len(train_q), config.train)
    use_compile, note = compile_decision(config.train, total_steps, shard.count,
                                         layers_to_compile(ens.model, ens.scorer.prefix_cache), device.type)
    if note and main:
        _say(note)
    if use_compile:
        compile_decoder_layers(ens.model, ens.scorer.prefix_cache)
    # Under `auto` a long run must not die in Inductor: on a compiler error, dynamo runs that frame
    # eagerly. Only for this run's training and evaluation; the setting is restored afterwards.
    fallback = (torch._dynamo.config.patch(suppress_errors=True)
                if use_compile and config.train.compile is CompileMode.AUTO else nullcontext())

    cfg_hash = config_sha256(config.to_dict(), RESUMABLE_CHANGES)  # the same run, wherever and however resumed
    metrics_path = run_dir / "metrics.jsonl"
    records: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    patience = config.train.early_stopping_patience
    watch = split_key(config.data.dataset, config.data.selection_split or "") if patience else None
    best: dict[str, Any] = {"nll": float("inf"), "epoch": None, "metrics": {}, "bad": 0, "members": None}
    eval_seconds, elapsed_before = 0.0, 0.0
    train_resume: TrainResume | None = None
    manifest: dict[str, Any] = {}

    if plan.mode == "resume":
        # Rank 0 reads it; an error reaches every rank (`_agree`), so none waits in the broadcast.
        ckpt = _agree(lambda: _load_checkpoint_checked(run_dir), main)
        state, tensors = ckpt
        train_resume, best_members = restore(ens.model, shard, state, tensors)
        run_state = state["run"]
        records, last = run_state["records"], run_state["last"]
        saved = run_state["best"]
        best.update(nll=float("inf") if saved["nll"] is None else saved["nll"], epoch=saved["epoch"],
                    metrics=saved["metrics"], bad=saved["bad"], members=best_members)
        eval_seconds, elapsed_before = run_state["eval_seconds"], run_state["elapsed"]
        if main:
            assert plan.manifest is not None
            manifest = plan.manifest
            manifest["resumed"] = manifest.get("resumed", 0) + 1
            manifest["pid"] = os.getpid()
            # The settings matched (`_plan_start`), but a run saved by an older loraens was hashed
            # without the settings added since; its new checkpoints carry today's hash, so the
            # manifest must too, or a second interruption would look like "no checkpoint yet".
            manifest["config_sha256"] = cfg_hash
            set_status(run_dir, manifest, RUNNING)
            remove_temp_files(run_dir)
            write_text(metrics_path, "".join(dumps(r) + "\n" for r in records))
    elif main:
        manifest = new_manifest(ens.base, config.ensemble.num_members, cfg_hash)
        write_manifest(run_dir, manifest)  # status running first: from here on the folder is not complete
        _clear_previous_run(run_dir)
        with atomic_path(run_dir / "config.yaml") as tmp:
            config.save(tmp)

    def publish_members(epoch: int, step: int) -> None:
        """Export the members, then record their files' hashes and epoch in the manifest."""
        folders = export_members(ens, run_dir, epoch)
        if main:
            manifest["members"] = {f.name: member_record(f, run_dir, epoch, step) for f in folders}
            manifest["members_epoch"] = epoch
            write_manifest(run_dir, manifest)

    def on_epoch_end(summary: EpochSummary) -> bool:
        nonlocal eval_seconds
        final = summary.epoch == config.train.epochs or summary.step == config.train.max_steps
        if patience is None:
            publish_members(summary.epoch, summary.step)
        if not (config.train.eval_every_epoch or final):
            return False
        t0 = time.perf_counter()
        losses = distributed.gather(summary.train_loss)  # every member's training loss, on rank 0
        for key, examples in eval_sets.items():
            out = _evaluate(ens, run_dir, key, examples, progress, epoch=summary.epoch)
            if out is None:
                continue  # not rank 0
            last[key] = out[0]
            records.append({
                "epoch": summary.epoch, "step": summary.step, "split": key,
                "train_loss": [x for share in losses or [] for x in share],
                "epoch_seconds": round(summary.seconds, 2), **out[0],
            })
        if main:
            write_text(metrics_path, "".join(dumps(r) + "\n" for r in records))
        eval_seconds += time.perf_counter() - t0
        if patience is None:
            return False
        # Rank 0 holds the metrics and decides; every rank acts on its decision.
        improved, stop = distributed.broadcast(_early_stopping_step(best, last, watch, summary.epoch, patience)
                                               if main else None)
        if improved:
            best["members"] = [p.detach().clone() for p in lora_parameters(ens.model)]
            publish_members(summary.epoch, summary.step)  # members/ always holds the best epoch so far
        return stop

    def on_checkpoint(state: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        run_state = {"records": records, "last": last, "eval_seconds": eval_seconds,
                     "best": {"nll": best["nll"] if math.isfinite(best["nll"]) else None, "epoch": best["epoch"],
                              "metrics": best["metrics"], "bad": best["bad"]},
                     "elapsed": elapsed_before + time.time() - started, "data_sha256": data_hash,
                     "config_sha256": cfg_hash, "planned_steps": total_steps}
        record = save_checkpoint(run_dir, ens.model, shard, state, optimizer, scheduler, run_state, best["members"])
        if main:
            manifest["checkpoint"] = record
            manifest["warnings"] = list(state.warnings)
            write_manifest(run_dir, manifest)

    try:
        with fallback:
            epochs = train_members(ens.model, train_q, config.train, dataclasses.replace(config.ensemble,
                                   num_members=shard.count), ens.scorer, on_epoch_end, progress, shard.first,
                                   on_checkpoint=on_checkpoint, resume=train_resume)
            best_epoch = distributed.broadcast(best["epoch"])
            if best_epoch is not None and best_epoch != epochs[-1].epoch:
                # Early stopping: the final predictions, metrics and in-memory members are the best epoch's.
                if main:
                    for path in epoch_predictions_dir(run_dir, best_epoch).glob("*.safetensors"):
                        with atomic_path(predictions_dir(run_dir) / path.name) as tmp:
                            shutil.copyfile(path, tmp)
                    last = best["metrics"]
                with torch.no_grad():
                    for param, saved_param in zip(lora_parameters(ens.model), best["members"], strict=True):
                        param.copy_(saved_param)
            if not epochs or not distributed.broadcast(bool(last)):  # max_steps ended training before an evaluation
                publish_members(epochs[-1].epoch if epochs else 0, epochs[-1].step if epochs else 0)
                for key, examples in eval_sets.items():
                    out = _evaluate(ens, run_dir, key, examples, progress)
                    if out is not None:
                        last[key] = out[0]
    except NonFiniteError as err:
        if main:
            kept = manifest.get("checkpoint")
            where = (f"its last good checkpoint ({describe_checkpoint(kept)}) is kept" if kept
                     else "it has no checkpoint yet")
            exported = (f"the members of epoch {manifest['members_epoch']} are kept" if manifest.get("members")
                        else "no members were exported yet")
            text = f"{err} {run_dir} is marked failed; {where}, and {exported}."
            set_status(run_dir, manifest, FAILED, text)
            raise NonFiniteError(text) from None
        raise
    except BaseException as err:
        if main and manifest:
            set_status(run_dir, manifest, INTERRUPTED, f"{type(err).__name__}: {err}".rstrip(": "))
        raise
    peaks = distributed.gather(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    if not main:
        return RunResult(run_dir, {}, epochs, ens, plan.mode == "resume")
    info = {"num_train_questions": len(train_examples),
            "train_seconds": round(elapsed_before + time.time() - started, 1),
            "eval_seconds": round(eval_seconds, 1), "num_members": config.ensemble.num_members,
            "epochs_trained": epochs[-1].epoch if epochs else 0, **_device_info(device, shard, peaks)}
    if patience is not None:
        info["best_epoch"] = best["epoch"]
    hyper = member_hyperparameters(config.ensemble, config.train)
    if hyper is not None:  # the drawn values, so a reader sees what each member trained with
        info["member_hyperparameters"] = hyper.to_dict()
    read = [config.ensemble.member_prompt(k) for k in range(config.ensemble.num_members)]
    if len(set(read)) > 1:  # the prompt each member read
        info["member_prompts"] = read
    results = {"splits": dict(last), **info}
    write_json(run_dir / "results.json", results)
    manifest["checkpoint"] = None  # removed right below: a complete run needs none
    set_status(run_dir, manifest, COMPLETE)  # the last write: only now is the run complete
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return RunResult(run_dir, results["splits"], epochs, ens, plan.mode == "resume")


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


# ---------------------------------------------------------------- loading and evaluating


def _check_members(run_dir: Path, config: RunConfig, manifest: dict[str, Any] | None) -> None:
    """Before the model loads: the member folders are exactly member_0 .. member_{M-1}, each
    adapter names this run's base, and (with a manifest) every file has the recorded sha256."""
    m = config.ensemble.num_members
    members_dir = run_dir / "members"
    expected = [f"member_{k}" for k in range(m)]
    found = sorted((p.name for p in members_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda n: (len(n), n)) if members_dir.is_dir() else []
    extra = [n for n in found if n not in expected]
    if extra:
        raise IntegrityError(f"{members_dir} holds {', '.join(found)}, but config.yaml has num_members {m} "
                             f"({', '.join(expected)}): {', '.join(extra)} would be silently left out. Fix "
                             "ensemble.num_members in config.yaml, or remove the extra folders.")
    missing = [n for n in expected if n not in found]
    if missing:
        raise IntegrityError(f"{members_dir / missing[0]} is missing: the run has {m} members in config.yaml, "
                             f"but members/ holds {', '.join(found) or 'none'} (the run was interrupted before "
                             "exporting them, or they were removed).")
    if manifest is not None and sorted(manifest.get("members", {})) != sorted(expected):
        raise IntegrityError(f"{run_dir / MANIFEST} records the members {sorted(manifest.get('members', {}))}, but "
                             f"config.yaml has num_members {m}.")
    expected_base = manifest["base_model"]["peft_base"] if manifest is not None else None
    allowed = {expected_base} if expected_base else {config.model.name, peft_base_name(config.model)}
    for name in expected:
        cfg_path = members_dir / name / PEFT_CONFIG
        if not cfg_path.is_file():
            raise IntegrityError(f"{cfg_path} is missing.")
        cfg = read_json(cfg_path)
        named = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
        if named not in allowed:
            theirs = f"{run_dir / MANIFEST}" if manifest is not None else "config.yaml"
            raise IntegrityError(f"{cfg_path} names the base model {named!r}, but this run's members were trained on "
                                 f"{' or '.join(repr(a) for a in sorted(allowed))} ({theirs}): this member comes "
                                 "from another run.")
        if manifest is None:
            continue
        record = manifest["members"][name]
        for file_name in (PEFT_WEIGHTS, PEFT_CONFIG):
            path = members_dir / name / file_name
            if not path.is_file():
                raise IntegrityError(f"{path} is missing.")
            actual, recorded = sha256_file(path), record["sha256"].get(file_name)
            if actual != recorded:
                raise IntegrityError(f"{path} has sha256 {actual[:16]}..., but {run_dir / MANIFEST} records "
                                     f"{str(recorded)[:16]}... (written at epoch {record.get('epoch')}): the file was "
                                     "changed or damaged after the run wrote it. Restore it, or retrain.")
    # All members from one epoch: read on every process from the files' headers, so every
    # torchrun rank sees every member and they all agree (one rank alone failing would leave the
    # others waiting in a collective).
    epochs = {}
    for name in expected:
        try:
            with safe_open(str(members_dir / name / PEFT_WEIGHTS), framework="pt") as f:
                epochs[name] = (f.metadata() or {}).get("loraens_epoch")
        except Exception as err:  # noqa: BLE001 - a damaged header: name the file
            raise IntegrityError(f"{members_dir / name / PEFT_WEIGHTS} cannot be read as a safetensors file "
                                 f"({type(err).__name__}: {err}); it is truncated or damaged.") from None
    if len({e for e in epochs.values() if e is not None}) > 1:
        raise IntegrityError(f"{run_dir}'s members are from different epochs "
                             f"({', '.join(f'{name}: epoch {e}' for name, e in epochs.items())}).")


def load_run(run_dir: str | Path, device: str | None = "auto", shard: Shard | None = None, *,
             verb: str = "load_run", holding_lock: bool = False) -> LoadedEnsemble:
    """Rebuild a trained ensemble from its run folder (config.yaml + members/), checked first.

    The run must be complete (manifest.json; an older folder without one gets a warning), its
    member folders must match num_members, each member file its recorded sha256 and each adapter
    the run's base, the loaded base model the identity the run recorded, and all members one
    epoch with finite weights; anything else is an `IntegrityError` (or `RunFolderError`) that
    names the file and both sides.

    `device`: where to load it (`--model.device` values); "auto" by default, not the device it
    trained on, so a run trained on a GPU evaluates on a CPU and the other way round; None keeps
    the run's own setting. `shard`: this process's share of the members under torchrun.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a loraens run folder: config.yaml is missing.")
    manifest = check_complete(run_dir, verb, holding_lock)
    config = RunConfig.load_saved(run_dir / "config.yaml")
    if device is not None:
        config.model = dataclasses.replace(config.model, device=device)
    _check_members(run_dir, config, manifest)
    ens = build_ensemble(config, shard)
    if manifest is not None and not same_base(manifest["base_model"], ens.base):
        raise IntegrityError(f"{run_dir}'s members were trained on the base model "
                             f"{describe_base(manifest['base_model'])} ({run_dir / MANIFEST}), but config.yaml's "
                             f"model loads {describe_base(ens.base)}: another model. Point model.name in config.yaml "
                             "back at the model the run trained on.")
    if manifest is not None and config_differs(manifest["base_model"], ens.base) and ens.shard.is_main:
        print(f"loraens {verb}: warning: the base model has the weights {run_dir}'s members were trained on, but "
              f"its config reads differently now ({describe_base(manifest['base_model'])} then, "
              f"{describe_base(ens.base)} now; another transformers version?).", file=sys.stderr)
    for j, k in enumerate(ens.shard.members):
        import_member(ens.model, j, run_dir / "members" / f"member_{k}")
    return ens


def evaluation_key(config: RunConfig, dataset: str, split: str, limit: int | None) -> tuple[str, bool]:
    """(key, is the training run's own) under which `evaluate` records a set.

    The training run's figures are never overwritten: the very set training scored (same dataset,
    split and limit) keeps its key and is not rewritten; `--limit N` records under
    `<dataset>_<split>_limitN`, and the whole of a split that training scored a subset of under
    `<dataset>_<split>_all`.
    """
    key = split_key(dataset, split)
    trained = dataset == config.data.dataset and split in config.data.eval_splits
    if trained and limit == config.data.eval_limit:
        return key, True
    if limit is not None:
        return f"{key}_limit{limit}", False
    return (f"{key}_all", False) if trained else (key, False)


def evaluate_run(run_dir: str | Path, dataset: str | None = None, split: str = "validation",
                 limit: int | None = None, ood: Sequence[str] = (), ood_split: str | None = None,
                 progress: bool = True, device: str = "auto", method: str = "ensemble") -> dict[str, Any]:
    """Score a saved, complete run on any dataset and split, plus optional out-of-distribution sets.

    Writes predictions/<key>.safetensors for every set, adds their metrics to results.json, and
    for OOD sets the detection metrics (AUROC, AUPR, FPR@95) of every uncertainty score under
    results.json["ood"][<in key>][<ood key>]; the keys are `evaluation_key`'s, so the training
    run's figures are never overwritten. Returns {"key", "metrics", "ood", "kept"} (on rank 0 under
    torchrun, where each process scores its share of the members; {} on the other ranks).

    method: "ensemble" (the members as trained) or "laplace": each member's Laplace-LoRA predictive,
    fit on the run's training questions first (`LoadedEnsemble.laplace_predictor`); its keys end in
    "_laplace" ("ensemble" in its metrics is then ensemble + Laplace, the members' mixture), and
    results.json["laplace"] records the fit.
    """
    if method not in ("ensemble", "laplace"):
        raise ValueError(f"--method must be ensemble or laplace, but got {method!r}.")
    from .ood import ood_table  # sklearn and scipy load slowly, and training never needs them

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a loraens run folder: config.yaml is missing.")
    config = RunConfig.load_saved(run_dir / "config.yaml")
    shard = distributed.setup(config.ensemble.num_members,
                              resolve_device(dataclasses.replace(config.model, device=device), "--device"))
    main = shard.is_main
    lock = RunLock(run_dir, "evaluate")
    _agree(lambda: lock.acquire() and None, main)  # a training or another evaluate writing this folder stops us
    try:
        ens = load_run(run_dir, device, shard, verb="evaluate", holding_lock=True)
        dataset = dataset or ens.config.data.dataset
        predict_fn, suffix, laplace = None, "", None
        if method == "laplace":
            predict_fn, laplace = ens.laplace_predictor(progress)
            suffix = "_laplace"
        key, own = evaluation_key(ens.config, dataset, split, limit)
        key, own = key + suffix, own and not suffix  # a Laplace key never holds the training run's figures
        out = _evaluate(ens, run_dir, key, load_examples(ens.config.data, split, limit, dataset), progress,
                        write=not own, predict_fn=predict_fn)
        if main and not own:
            assert out is not None
            _update_results(run_dir, key, out[0])
        ood_results: dict[str, Any] = {}
        for other in ood:
            other_split = ood_split or split
            other_key, other_own = evaluation_key(ens.config, other, other_split, limit)
            other_key, other_own = other_key + suffix, other_own and not suffix
            other_out = _evaluate(ens, run_dir, other_key, load_examples(ens.config.data, other_split, limit, other),
                                  progress, write=not other_own, predict_fn=predict_fn)
            if main:
                assert out is not None and other_out is not None
                if not other_own:
                    _update_results(run_dir, other_key, other_out[0])
                ood_results[other_key] = ood_table(out[1], other_out[1])
        if not main:
            return {}
        if ood_results or laplace:
            results = read_json(run_dir / "results.json")
            if ood_results:
                results.setdefault("ood", {}).setdefault(key, {}).update(ood_results)
            if laplace:
                results["laplace"] = laplace
            write_json(run_dir / "results.json", results)
        assert out is not None
        return {"key": key, "metrics": out[0], "ood": ood_results, "kept": own}
    finally:
        lock.release()


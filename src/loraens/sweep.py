"""`loraens sweep SWEEP.yaml`: a grid of datasets x variants x seeds, resumable, aggregated.

A sweep file names the datasets, the training *variants* (a regulariser, a randomness
ablation, ...) and the seeds. Every cell of the grid is trained as a normal run folder::

    <output_dir>/
      sweep.yaml                                   the resolved sweep, as run
      cells/<dataset>/<variant>/seed_<s>/          a run folder (config.yaml, members/, predictions/, ...)
                                      cell.json    written LAST: the cell's methods, costs, curves
      summary.md, summary.html, summary_files/     the aggregated tables and figures

A cell counts as complete when its `cell.json` exists and holds the same configuration, so a
rerun of the same command skips finished cells and redoes only the one that was interrupted.

Each cell derives several *methods* from its one training run (the members are trained
independently, so member k of the vectorised run is exactly a single LoRA trained with seed k):

- ``single``: one LoRA (MAP); its metrics are the mean over the M members' metrics.
- ``ensemble``: the M members' averaged probabilities.
- ``single+ts`` / ``ensemble+ts``: temperature scaling fitted on the validation split.
- ``checkpoint_ensemble``: one member's checkpoints after every epoch, averaged (mean over members).
- ``weight_average``: the members' mean weight update (one adapter), not their mean prediction.
- ``mc_dropout``: member 0 with LoRA dropout kept on, `mc_dropout_passes` passes averaged.
- ``early_stop_single`` / ``early_stop_ensemble``: the epoch with the lowest validation NLL.
- ``laplace`` / ``ensemble+laplace``: each member's Laplace-LoRA posterior (K-FAC GGN on the
  training questions, prior precision by marginal likelihood, MC predictive); its metrics are the
  mean over members, and the mixture of the members' posteriors is ensemble + Laplace.

Every cell also keeps paired bootstrap resamples of its test questions for every method (the
summary's intervals combine seeds and questions), and the variants with ``ood: true`` evaluate
their members on the dataset's transfer / OOD sets (`loraens.transfer`). Unless the sweep sets
``data.seed``, each seed draws its own training and evaluation samples.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .bootstrap import member_metric_resamples, metric_resamples
from .config import SAVED_BEFORE, ConfigError, RunConfig, with_saved_defaults
from .data import load_examples
from .diversity import trainable_per_member
from .ensemble import mc_dropout, member_layers, weight_averaged
from .ensemble_size import ensemble_size_curve
from .member_prompts import MemberQuestions
from .methods import (
    best_epoch,
    checkpoint_ensemble,
    ensemble_temperature_scaled,
    temperature_scaled,
)
from .metrics import compute_metrics, ensemble_probs, evaluate_ensemble
from .predict import predict
from .predictions import Predictions, load_predictions, saved_epochs, split_key
from .run import LoadedEnsemble, train_run
from .transfer import LaplacePredict, OodSet, ood_block
from .uncertainty import uncertainty_scores


class SweepWorkerError(RuntimeError):
    """A worker process of `run_sweep_workers` failed; its finished cells are kept."""


METHODS = ("single", "ensemble", "single+ts", "ensemble+ts", "checkpoint_ensemble", "weight_average",
           "mc_dropout", "early_stop_single", "early_stop_ensemble", "laplace", "ensemble+laplace")
PER_EPOCH = ("checkpoint_ensemble", "early_stop_single", "early_stop_ensemble")
NEEDS_VALIDATION = ("single+ts", "ensemble+ts", "early_stop_single", "early_stop_ensemble")
GROUPS = ("base", "regulariser", "randomness", "diversity")
RESAMPLE_SEED = 0  # one seed for every cell's question resamples (see method_resamples)
PRESETS = ("paper-small", "paper", "diversity-small", "ablations-small")
_METRICS = ("accuracy", "nll", "ece", "brier")


@dataclass
class DatasetSpec:
    name: str  # as --data.dataset takes it
    label: str = ""
    test_split: str = "test"
    val_split: str = "validation"
    config: dict[str, Any] = field(default_factory=dict)  # RunConfig overrides for this dataset
    # Transfer / OOD sets: dataset names (test split) or {name, split, label}; evaluated in the
    # cells of variants with `ood: true` (loraens.transfer).
    ood: list[Any] = field(default_factory=list)


@dataclass
class VariantSpec:
    name: str
    label: str = ""
    group: str = "regulariser"  # base | regulariser | randomness
    config: dict[str, Any] = field(default_factory=dict)  # RunConfig overrides for this variant
    methods: list[str] = field(default_factory=lambda: ["single", "ensemble"])
    datasets: list[str] | None = None  # only these datasets (default: all)
    ood: bool = False  # evaluate this variant's cells on their dataset's OOD sets too


@dataclass
class SweepSpec:
    name: str
    output_dir: str
    datasets: list[DatasetSpec]
    variants: list[VariantSpec]
    seeds: list[int] = field(default_factory=lambda: [0])
    base: dict[str, Any] = field(default_factory=dict)  # RunConfig overrides for every cell
    mc_dropout_passes: int = 8
    resamples: int = 200  # bootstrap resamples of the test questions per cell, for the summary's intervals


@dataclass
class Cell:
    dataset: DatasetSpec
    variant: VariantSpec
    seed: int
    config: RunConfig

    @property
    def folder(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def title(self) -> str:
        return f"{self.dataset.name} / {self.variant.name} / seed {self.seed}"


# --------------------------------------------------------------------------- the sweep file

def _fields(cls: type, raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, but got {raw!r}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {where}; valid keys are {sorted(names)}.")
    return raw


def preset_path(name: str) -> Path:
    """The YAML file of a built-in preset (`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; the presets are {', '.join(PRESETS)}.")
    return Path(str(resources.files("loraens") / "presets" / f"{name}.yaml"))


def load_sweep(source: str | Path, output_dir: str | None = None) -> SweepSpec:
    """Read and check a sweep file (or a preset name); every cell's RunConfig is validated here."""
    path = Path(source)
    if not path.is_file():
        if str(source) in PRESETS:
            path = preset_path(str(source))
        else:
            raise ConfigError(f"Sweep file {str(source)!r} does not exist (and is not a preset: "
                              f"{', '.join(PRESETS)}).")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Sweep file {str(path)!r} is not valid YAML: {err}") from None
    raw = dict(_fields(SweepSpec, raw, f"sweep file {str(path)!r}"))
    for key in ("name", "datasets", "variants"):
        if key not in raw:
            raise ConfigError(f"Sweep file {str(path)!r} needs a {key!r} entry.")
    raw.setdefault("output_dir", f"sweeps/{raw['name']}")
    if output_dir:
        raw["output_dir"] = output_dir
    datasets = [DatasetSpec(**_fields(DatasetSpec, {"name": d} if isinstance(d, str) else d, f"datasets[{i}]"))
                for i, d in enumerate(raw.pop("datasets") or [])]
    variants = [VariantSpec(**_fields(VariantSpec, v, f"variants[{i}]"))
                for i, v in enumerate(raw.pop("variants") or [])]
    spec = SweepSpec(datasets=datasets, variants=variants, **raw)
    _check_spec(spec)
    return spec


def _check_spec(spec: SweepSpec) -> None:
    if not spec.datasets or not spec.variants or not spec.seeds:
        raise ConfigError("A sweep needs at least one dataset, one variant and one seed.")
    if spec.resamples < 1:
        raise ConfigError(f"resamples must be at least 1, but got {spec.resamples}.")
    for d in spec.datasets:
        for o in d.ood:
            try:
                OodSet.parse(o, f"dataset {d.name!r}")
            except ValueError as err:
                raise ConfigError(str(err)) from None
    if spec.mc_dropout_passes < 2:
        raise ConfigError(f"mc_dropout_passes must be at least 2, but got {spec.mc_dropout_passes}.")
    names = [d.name for d in spec.datasets]
    for what, items in (("dataset", names), ("variant", [v.name for v in spec.variants])):
        dupes = sorted({n for n in items if items.count(n) > 1})
        if dupes:
            raise ConfigError(f"The sweep lists the {what}(s) {dupes} twice.")
    for v in spec.variants:
        if v.group not in GROUPS:
            raise ConfigError(f"variant {v.name!r}: group must be one of {GROUPS}, but got {v.group!r}.")
        bad = [m for m in v.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"variant {v.name!r}: unknown method(s) {bad}; the methods are {', '.join(METHODS)}.")
        missing = sorted(set(v.datasets or []) - set(names))
        if missing:
            raise ConfigError(f"variant {v.name!r} lists dataset(s) {missing} that the sweep does not have ({names}).")
    for cell in cells(spec):  # builds (and so validates) every RunConfig
        if "mc_dropout" in cell.variant.methods and cell.config.ensemble.dropout <= 0:
            raise ConfigError(f"variant {cell.variant.name!r} asks for mc_dropout but trains without dropout; "
                              "set ensemble.dropout > 0 in its config.")
        per_epoch = [m for m in cell.variant.methods if m in PER_EPOCH]
        if per_epoch and not cell.config.train.eval_every_epoch:
            raise ConfigError(f"variant {cell.variant.name!r}: {per_epoch} need the predictions of every epoch; "
                              "set train.eval_every_epoch: true in its config.")
        if per_epoch and cell.config.train.epochs < 2:
            raise ConfigError(f"variant {cell.variant.name!r}: {per_epoch} need at least 2 epochs.")
        if "weight_average" in cell.variant.methods and cell.config.ensemble.num_members < 2:
            raise ConfigError(f"variant {cell.variant.name!r}: weight_average needs at least 2 members.")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def cells(spec: SweepSpec) -> list[Cell]:
    """Every cell of the grid, in run order: dataset-major, then variant, then seed."""
    out = []
    for d in spec.datasets:
        for v in spec.variants:
            if v.datasets is not None and d.name not in v.datasets:
                continue
            for seed in spec.seeds:
                raw = _merge(_merge(_merge(spec.base, d.config), v.config), {
                    "output_dir": str(Path(spec.output_dir) / "cells" / _slug(d.name) / _slug(v.name) / f"seed_{seed}"),
                    "data": {"dataset": d.name,
                             "eval_splits": list(dict.fromkeys([d.val_split, d.test_split])),
                             "val_split": d.val_split},
                    "ensemble": {"seed": int(seed)},
                })
                # Each seed draws its own question samples (train_limit / eval_limit), unless the
                # sweep fixes --data.seed: one shared sample would leave question-sampling noise out
                # of the spread over seeds.
                raw["data"].setdefault("seed", int(seed))
                try:
                    config = RunConfig.from_dict(raw)
                except ConfigError as err:
                    raise ConfigError(f"cell {d.name} / {v.name} / seed {seed}: {err}") from None
                needs_val = [m for m in v.methods if m in NEEDS_VALIDATION]
                if needs_val and d.val_split == d.test_split:
                    raise ConfigError(f"dataset {d.name!r}: {needs_val} fit on the validation split, which must "
                                      f"differ from the test split ({d.test_split!r}).")
                out.append(Cell(d, v, int(seed), config))
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


# --------------------------------------------------------------------------- running

def _ood_requested(cell: Cell) -> list[dict[str, Any]]:
    """The OOD sets this cell scores (none unless its variant says `ood: true`), as plain dicts."""
    if not cell.variant.ood:
        return []
    return [dataclasses.asdict(OodSet.parse(o, cell.dataset.name)) for o in cell.dataset.ood]


def is_complete(cell: Cell, mc_passes: int | None = None, resamples: int | None = None) -> bool:
    return completeness(cell, mc_passes, resamples) == "complete"


def completeness(cell: Cell, mc_passes: int | None = None, resamples: int | None = None) -> str:
    """"complete"; "outdated": finished under settings this sweep now means otherwise only because a
    default changed since (`config.SAVED_BEFORE`: the cell's record lacks the key); else "to run"."""
    path = cell.folder / "cell.json"
    if not path.is_file():
        return "to run"
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return "to run"
    if record.get("status") != "complete" or record.get("methods_requested") != cell.variant.methods:
        return "to run"
    if mc_passes is not None and "mc_dropout" in cell.variant.methods and record.get("mc_dropout_passes") != mc_passes:
        return "to run"
    # A sweep that gained OOD sets or changed its resample count redoes the cells that lack them.
    if record.get("ood_requested", []) != _ood_requested(cell):
        return "to run"
    if resamples is not None and record.get("resamples_requested") != resamples:
        return "to run"
    raw = record.get("config") or {}
    try:  # re-read through RunConfig, so a setting added later with its default does not void old cells
        stored = RunConfig.from_dict(with_saved_defaults(raw)).to_dict()
    except ConfigError:
        return "to run"
    current = cell.config.to_dict()
    stored.pop("output_dir", None), current.pop("output_dir", None)  # a moved sweep folder is still complete
    if stored == current:
        return "complete"
    for (section, key), old in SAVED_BEFORE.items():
        if key not in (raw.get(section) or {}) and section in current:
            current[section][key] = old
    return "outdated" if stored == current else "to run"


class OutdatedCellsError(ConfigError):
    """Finished cells that this sweep file would now retrain (and replace) only because a default changed."""


def check_outdated(spec: SweepSpec) -> None:
    """Refuse to run a sweep whose finished cells a changed default would silently retrain and replace."""
    stale = [c for c in cells(spec) if completeness(c, spec.mc_dropout_passes, spec.resamples) == "outdated"]
    if not stale:
        return
    keys = ", ".join(f"{sec}: {{{key}: {yaml.safe_dump(old).strip().removesuffix('...').strip()}}}"
                     for (sec, key), old in SAVED_BEFORE.items())
    raise OutdatedCellsError(
        f"{len(stale)} finished cell(s) (first: {stale[0].title}) were run before a default changed: the sweep file "
        f"does not set {', '.join(f'--{s}.{k}' for s, k in SAVED_BEFORE)}, which now means something else, so they "
        f"would be retrained and replaced. To keep them (they ran with the old setting), add {keys} to the sweep's "
        "base; to retrain them with today's default, delete their folders first.")


def run_sweep(spec: SweepSpec, progress: bool = True, log=print,
              worker: tuple[int, int] | None = None, claims: str | Path | None = None) -> list[dict[str, Any]]:
    """Run every incomplete cell, then write the summary; returns the cell records.

    `worker` = (i, W) with `claims` = a folder shared by the W worker processes of
    `run_sweep_workers`: run each incomplete cell this worker claims first, and write no summary.
    A cell is claimed by creating `claims/<cell number>` exclusively, so the workers split the
    cells as they free up (a worker on long cells takes fewer), and no cell runs twice.
    """
    if (worker is None) != (claims is None):
        raise ValueError("run_sweep: `worker` and `claims` go together (one worker of run_sweep_workers).")
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = cells(spec)
    if worker is None:
        check_outdated(spec)
        (out / "sweep.yaml").write_text(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
        done = sum(is_complete(c, spec.mc_dropout_passes, spec.resamples) for c in grid)
        log(f"loraens sweep {spec.name}: {len(grid)} cells, {done} already complete -> {out}")
    for i, cell in enumerate(grid, 1):
        if is_complete(cell, spec.mc_dropout_passes, spec.resamples):
            continue
        if claims is not None and not _claim(Path(claims) / str(i)):
            continue  # another worker has it
        log(f"[{i}/{len(grid)}] {cell.title}")
        started = time.time()
        run_cell(cell, spec.mc_dropout_passes, progress, spec.resamples)
        log(f"[{i}/{len(grid)}] {cell.title}: done in {time.time() - started:.0f} s")
    if worker is not None:
        return []
    records = collect(spec)
    html, md = write_summary(spec, records)
    log(f"Wrote {md} and {html}")
    return records


def run_sweep_workers(spec: SweepSpec, devices: list[str | None], log=print) -> list[dict[str, Any]]:
    """Spread the incomplete cells over one worker process per entry of `devices`, then write the summary.

    Each worker process takes the next incomplete cell no other worker has claimed
    (`run_sweep(worker=(i, W), claims=...)`), so a worker whose cells are slow takes fewer. It runs with
    CUDA_VISIBLE_DEVICES set to devices[i] (one GPU each; None keeps the environment's). Its
    output lines are passed to `log` prefixed with its number. Cells are resumable as always: a
    worker that fails stops only itself, its finished cells are kept, and the error names it.
    """
    check_outdated(spec)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "sweep.yaml"  # the workers read the resolved sweep, so they see the same cells
    resolved.write_text(yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    grid = cells(spec)
    done = sum(is_complete(c, spec.mc_dropout_passes, spec.resamples) for c in grid)
    width = len(devices)
    where = ", ".join(f"worker {i}: {'GPU ' + d if d is not None else 'same device setting'}"
                      for i, d in enumerate(devices))
    log(f"loraens sweep {spec.name}: {len(grid)} cells, {done} already complete, {width} workers ({where}) -> {out}")
    # A fresh claims folder per launch: claims left by an interrupted launch do not hold cells back.
    claims = Path(tempfile.mkdtemp(prefix=".claims-", dir=out))
    procs: list[subprocess.Popen] = []

    def relay(i: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log(f"[worker {i}] {line.rstrip()}")

    try:
        for i, device in enumerate(devices):
            env = dict(os.environ)
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            cmd = [sys.executable, "-m", "loraens", "sweep", str(resolved), "--output_dir", str(out),
                   "--worker", f"{i}/{width}", "--claims", str(claims), "--quiet"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          bufsize=1))
        threads = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for t in threads:
            t.start()
        codes = [p.wait() for p in procs]
        for t in threads:
            t.join()
    finally:  # Ctrl-C or an error here: stop the workers (their finished cells are kept), drop the claims
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(claims, ignore_errors=True)
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        raise SweepWorkerError(f"sweep worker(s) {', '.join(f'{i} (exit code {c})' for i, c in failed)} failed; their "
                           "finished cells are kept: rerun the same command to resume.")
    records = collect(spec)
    html, md = write_summary(spec, records)
    log(f"Wrote {md} and {html}")
    return records


def _claim(path: Path) -> bool:
    """Create `path` if no one has; True when this process did (O_EXCL: atomic on a local disk)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def collect(spec: SweepSpec) -> list[dict[str, Any]]:
    """The records of the complete cells (in grid order)."""
    return [json.loads((c.folder / "cell.json").read_text()) for c in cells(spec)
            if is_complete(c, spec.mc_dropout_passes, spec.resamples)]


def write_summary(spec: SweepSpec, records: list[dict[str, Any]], output: str | Path | None = None,
                  notes: str = "") -> tuple[Path, Path]:
    """summary.md/html (or `<output>.md/html`) from the complete cells' records."""
    from .sweep_report import build_sweep_report

    if not records:
        raise ValueError(f"No complete cells in {spec.output_dir} yet; run `loraens sweep` first.")
    output = Path(output) if output else Path(spec.output_dir) / "summary"
    return build_sweep_report(records, output.with_suffix("") if output.suffix in (".md", ".html") else output,
                              title=f"loraens sweep: {spec.name}", notes=notes)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak of the whole process


def run_cell(cell: Cell, mc_passes: int = 8, progress: bool = True, resamples: int = 200) -> dict[str, Any]:
    """Train one cell, derive its methods, and write its cell.json (last, atomically)."""
    marker = cell.folder / "cell.json"
    if marker.exists():
        marker.unlink()  # an incomplete or outdated record must not survive a rerun
    exact_peak = _reset_peak_rss()
    started = time.time()
    # An interrupted cell resumes from its checkpoint; a finished or outdated one is replaced.
    result = train_run(cell.config, progress=progress, overwrite=True)
    assert result.ensemble is not None
    info = json.loads((cell.folder / "results.json").read_text())
    d = cell.config.data
    test_key, val_key = split_key(d.dataset, cell.dataset.test_split), split_key(d.dataset, cell.dataset.val_split)
    methods, probs, laplace = derive_methods(result.ensemble, cell, test_key, val_key, mc_passes)
    members = cell.config.ensemble.num_members
    per_member = trainable_per_member(member_layers(result.ensemble.model), cell.config.ensemble)
    test = load_predictions(cell.folder, test_key)  # read once for the curves below
    ood = {}
    if cell.variant.ood and cell.dataset.ood:
        ood = ood_block(result.ensemble, [OodSet.parse(o, cell.dataset.name) for o in cell.dataset.ood], test,
                        laplace, progress)
    record = {
        "dataset": cell.dataset.name, "dataset_label": cell.dataset.label or cell.dataset.name,
        "variant": cell.variant.name, "variant_label": cell.variant.label or cell.variant.name,
        "variant_group": cell.variant.group, "seed": cell.seed, "num_members": members,
        "test_key": test_key, "val_key": val_key,
        "cost": {
            "train_seconds": round(info["train_seconds"] - info.get("eval_seconds", 0.0), 1),
            "eval_seconds": info.get("eval_seconds", 0.0),
            "wall_seconds": round(time.time() - started, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "peak_rss_exact": exact_peak,
            "trainable_params_per_member": int(per_member),
            # torch.cuda.max_memory_allocated over the cell's training (results.json), on a GPU
            **({"peak_gpu_memory_bytes": info["peak_gpu_memory_bytes"], "gpu": info.get("gpu")}
               if "peak_gpu_memory_bytes" in info else {}),
        },
        "methods": methods,
        "epochs": epoch_curve(cell.folder, test_key),
        "ensemble_size": [{"m": r["m"], **{k: r["first"][k] for k in _METRICS}}
                          for r in ensemble_size_curve(test.member_probs, test.targets)],
        "diversity": _diversity(test),
        # Fitted on the validation split and measured on the test split; none when they are one split
        # (measuring on the calibration questions would report an in-sample, optimistic coverage).
        "guarantees": None if val_key == test_key else guarantees(load_predictions(cell.folder, val_key), test),
        # Paired question resamples of every method, seeded by the cell's seed: intervals over seeds
        # AND questions in the summary (bootstrap.seeds_and_questions_interval).
        "resamples": method_resamples(probs, test.targets, test.ids, resamples),
        "resamples_requested": resamples,
        "num_test_questions": len(test.ids),
        "ood": ood,
        "ood_requested": _ood_requested(cell),
        "epochs_trained": info.get("epochs_trained"),
        "methods_requested": list(cell.variant.methods),
        "mc_dropout_passes": mc_passes,
        "config": cell.config.to_dict(),
        "status": "complete",
    }
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, marker)
    return record


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in _METRICS}


def _entry(test: dict[str, float], members: int, params: int, val: dict[str, float] | None = None,
           extra: float = 0.0, **more: Any) -> dict[str, Any]:
    out = {"test": test, "members": members, "trainable_params": int(params), "extra_seconds": round(extra, 2)}
    if val is not None:
        out["val"] = val
    out.update(more)
    return out


def derive_methods(ens: LoadedEnsemble, cell: Cell, test_key: str, val_key: str,
                   mc_passes: int) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                            tuple[LaplacePredict, Predictions] | None]:
    """Every requested method's metrics on the test (and validation) split of a trained cell.

    Returns (methods, probs, laplace): methods -> its cell.json entry; probs -> its test
    probabilities, [N, C] for a method that is one model and [N, M, C] for a mean-member method
    (its metrics are the mean of the M members' metrics); laplace: (the fitted Laplace predictive,
    a `predict`-like function of examples; its test predictions) when a Laplace method was asked
    for, else None.
    """
    folder, cfg, wanted = cell.folder, ens.config, cell.variant.methods
    m = cfg.ensemble.num_members
    per_member = trainable_per_member(member_layers(ens.model), cfg.ensemble)
    test, val = load_predictions(folder, test_key), load_predictions(folder, val_key)
    ev_test = evaluate_ensemble(test.member_probs, test.targets)
    ev_val = evaluate_ensemble(val.member_probs, val.targets)
    out: dict[str, Any] = {}
    probs: dict[str, torch.Tensor] = {}
    if "single" in wanted:
        out["single"] = _entry(ev_test["mean_member"], 1, per_member, ev_val["mean_member"])
        probs["single"] = test.member_probs
    if "ensemble" in wanted:
        out["ensemble"] = _entry(ev_test["ensemble"], m, m * per_member, ev_val["ensemble"])
        probs["ensemble"] = ensemble_probs(test.member_probs)
    if "single+ts" in wanted:
        _, scaled, temps = temperature_scaled(val, test)
        out["single+ts"] = _entry(evaluate_ensemble(scaled.member_probs, test.targets)["mean_member"], 1, per_member,
                                  temperatures=[round(t, 4) for t in temps[:-1]])
        probs["single+ts"] = scaled.member_probs
    if "ensemble+ts" in wanted:
        p_ts, t = ensemble_temperature_scaled(val, test)
        out["ensemble+ts"] = _entry(compute_metrics(p_ts, test.targets), m, m * per_member, temperature=round(t, 4))
        probs["ensemble+ts"] = p_ts
    epochs = saved_epochs(folder)
    if "checkpoint_ensemble" in wanted and epochs:
        per_epoch = [load_predictions(folder, test_key, e) for e in epochs]
        stacked = torch.stack([ensemble_probs(checkpoint_ensemble(per_epoch, k).member_probs) for k in range(m)], 1)
        out["checkpoint_ensemble"] = _entry(evaluate_ensemble(stacked, test.targets)["mean_member"], len(epochs),
                                            per_member, epochs=epochs)
        probs["checkpoint_ensemble"] = stacked
    if ("early_stop_single" in wanted or "early_stop_ensemble" in wanted) and epochs:
        val_e = [evaluate_ensemble(load_predictions(folder, val_key, e).member_probs, val.targets) for e in epochs]
        test_p = [load_predictions(folder, test_key, e).member_probs for e in epochs]
        if "early_stop_single" in wanted:
            picks = [best_epoch([v["members"][k]["nll"] for v in val_e]) for k in range(m)]
            stacked = torch.stack([test_p[p - 1][:, k] for k, p in enumerate(picks)], 1)
            out["early_stop_single"] = _entry(evaluate_ensemble(stacked, test.targets)["mean_member"], 1, per_member,
                                              best_epochs=picks)
            probs["early_stop_single"] = stacked
        if "early_stop_ensemble" in wanted:
            pick = best_epoch([v["ensemble"]["nll"] for v in val_e])
            p_es = ensemble_probs(test_p[pick - 1])
            out["early_stop_ensemble"] = _entry(compute_metrics(p_es, test.targets), m, m * per_member,
                                                best_epoch=pick)
            probs["early_stop_ensemble"] = p_es
    examples = _examples(cfg, test_key, cell)
    questions = ens.encoder.encode_all(examples)
    if isinstance(questions, MemberQuestions):  # both methods collapse the members into member 0: its prompt
        questions = questions.member(0)
    run = lambda members, desc: predict(
        ens.model, questions, test.ids, members, ens.scorer, cfg.train.eval_batch_size, progress=False, desc=desc)
    if "weight_average" in wanted:
        t0 = time.perf_counter()
        with weight_averaged(ens.model):
            wa = run(1, "weight average")
        out["weight_average"] = _entry(compute_metrics(wa.member_probs[:, 0], test.targets), 1, per_member,
                                       extra=time.perf_counter() - t0)
        probs["weight_average"] = wa.member_probs[:, 0]
    if "mc_dropout" in wanted:
        t0 = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(cell.seed)  # the passes' dropout masks are reproducible
            with mc_dropout(ens.model, 0, mc_passes, cfg.ensemble.dropout):
                mc = run(mc_passes, "MC dropout")
        probs["mc_dropout"] = ensemble_probs(mc.member_probs)
        out["mc_dropout"] = _entry(compute_metrics(probs["mc_dropout"], test.targets), mc_passes,
                                   per_member, extra=time.perf_counter() - t0,
                                   pass_disagreement=float(_diversity(mc)["disagreement"]))
    laplace = None
    if "laplace" in wanted or "ensemble+laplace" in wanted:
        fn, facts = ens.laplace_predictor(progress=False)
        t0 = time.perf_counter()
        lap = fn(examples, False, "laplace")
        seconds = time.perf_counter() - t0
        laplace = (fn, lap)
        cost = {"fit_seconds": facts["fit_seconds"], "predict_seconds": round(seconds, 2),
                "posterior_bytes": facts["posterior_bytes"], "prior_precision": facts["prior_precision"]}
        if "laplace" in wanted:
            out["laplace"] = _entry(evaluate_ensemble(lap.member_probs, test.targets)["mean_member"], 1, per_member,
                                    extra=facts["fit_seconds"] + seconds, laplace=cost)
            probs["laplace"] = lap.member_probs
        if "ensemble+laplace" in wanted:
            probs["ensemble+laplace"] = ensemble_probs(lap.member_probs)
            out["ensemble+laplace"] = _entry(compute_metrics(probs["ensemble+laplace"], test.targets), m,
                                             m * per_member, extra=facts["fit_seconds"] + seconds, laplace=cost)
    return out, probs, laplace


def method_resamples(probs: dict[str, torch.Tensor], targets: torch.Tensor, ids: list[str],
                     n_resamples: int) -> dict[str, dict[str, list[float]]]:
    """Each method's test metrics on `n_resamples` bootstrap resamples of the questions, the SAME
    resamples for every method (so differences between methods are paired). A [N, M, C] entry is a
    mean-member method: the mean over members of each member's metric on the resample.
    {method: {metric: [n_resamples floats]}}; `sweep_report` combines them over seeds.

    The questions are put in the order of their ids and resampled with one fixed seed, whatever the
    cell: two seeds that scored the same questions get the same resample in row r, so the summary
    can pair them (`bootstrap.seeds_and_questions_interval`) instead of counting their shared
    question noise as independent."""
    order = torch.as_tensor(sorted(range(len(ids)), key=lambda i: ids[i]), dtype=torch.long)
    out = {}
    for name, p in probs.items():
        p, t = p[order].double(), targets[order]
        values = (member_metric_resamples(p, t, n_resamples, RESAMPLE_SEED) if p.ndim == 3
                  else metric_resamples(p, t, n_resamples, RESAMPLE_SEED))
        out[name] = {k: [round(float(x), 6) for x in v] for k, v in values.items()}
    return out


def _examples(cfg: RunConfig, test_key: str, cell: Cell) -> list:
    examples = load_examples(cfg.data, cell.dataset.test_split, cfg.data.eval_limit)
    ids = load_predictions(cell.folder, test_key).ids
    if [e.id for e in examples] != ids:
        raise RuntimeError(f"{cell.title}: the test questions changed since the run's evaluation.")
    return examples


def epoch_curve(run_dir: Path, key: str) -> list[dict[str, Any]]:
    """Mean-member and ensemble metrics on `key` after every epoch (from the epoch predictions)."""
    rows = []
    for e in saved_epochs(run_dir):
        p = load_predictions(run_dir, key, e)
        ev = evaluate_ensemble(p.member_probs, p.targets)
        rows.append({"epoch": e, "single": ev["mean_member"], "ensemble": ev["ensemble"]})
    return rows


GUARANTEE_ALPHAS = (0.1,)
GUARANTEE_RISKS = (0.1, 0.2, 0.3)  # a 135M model answers nothing at 0.1 on a few hundred questions


def guarantees(val: Predictions, test: Predictions) -> dict[str, Any]:
    """Conformal sets and SGR abstention fitted on validation, measured on test: mean member and ensemble.

    {"mean_member" | "ensemble": {"sets": {"lac" | "aps": {"0.1": {coverage, mean_size, ...}}},
    "risk": {"0.1": {test_coverage, test_risk, ...}}}, "alphas", "risks", "delta"} (delta 0.1, score 1-max_prob).
    """
    from .conformal import ENSEMBLE, MEAN_MEMBER, single_vs_ensemble

    res = single_vs_ensemble(val.member_probs, val.targets, test.member_probs, test.targets,
                             cal_mask=val.choice_mask, test_mask=test.choice_mask, alphas=GUARANTEE_ALPHAS,
                             risks=GUARANTEE_RISKS, delta=0.1)
    return {MEAN_MEMBER: res[MEAN_MEMBER], ENSEMBLE: res[ENSEMBLE], "alphas": list(GUARANTEE_ALPHAS),
            "risks": list(GUARANTEE_RISKS), "delta": 0.1}


def _diversity(p: Predictions) -> dict[str, float]:
    s = uncertainty_scores(p.member_probs, p.choice_mask)
    return {"disagreement": float(np.mean(s["member_disagreement"])),
            "mutual_information": float(np.mean(s["mutual_information"]))}

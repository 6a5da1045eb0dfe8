"""The report of an experiment sweep: datasets x variants x seeds of training runs ("cells").

It follows the study of LoRA ensembles in Wang, Aitchison & Rudolph (2023): a main table of
accuracy / ECE / NLL per method and dataset, metrics vs training epoch, regularisers combined
with ensembling, an ablation of the sources of randomness, ensemble size, and compute cost.

Every cell is one training run (one dataset, one variant, one seed) summarised by its `cell.json`
(see `build_sweep_report`). Numbers are aggregated over seeds: each entry is "mean [min, max]"
over the seeds, i.e. the spread over independent runs, not an interval over questions.
Where a number is averaged over datasets as well, each seed's datasets are averaged first and the
entry is mean [min, max] of those per-seed averages.

Words, as in the run report (`report.py`): "mean member" is the mean over a run's members of each
member's metric (each member is a single LoRA, so it is the expected single LoRA); "member 0"
is one particular member. A cell.json stores the mean member under the method key "single"
(and "single+ts", "early_stop_single"); those keys are the sweep files' method names and stay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from . import plots
from .bootstrap import seeds_and_questions_interval
from .pages import Section, write_page

METHOD_LABELS = {  # cell.json method key -> row label
    "single": "mean member",
    "ensemble": "LoRA ensemble",
    "single+ts": "mean member + temperature",
    "ensemble+ts": "ensemble + temperature",
    "checkpoint_ensemble": "checkpoint ensemble (mean over members)",
    "weight_average": "weight-averaged LoRA",
    "mc_dropout": "MC dropout (member 0)",
    "early_stop_single": "early stopping (mean member)",
    "early_stop_ensemble": "early stopping (ensemble)",
    "laplace": "Laplace-LoRA (mean member)",
    "ensemble+laplace": "ensemble + Laplace",
}
GROUP_ORDER = ("base", "regulariser", "randomness", "diversity")  # any other group comes after these
METRIC_LABELS = {"accuracy": "ACC", "ece": "ECE", "nll": "NLL", "brier": "Brier"}
LOWER_IS_BETTER = {"ece", "nll", "brier"}
# Keys of a cell's "epochs" entries and of the two methods compared throughout -> column words.
MODEL_WORDS = {"single": "mean member", "ensemble": "ensemble"}
DASH = "—"

Stat = tuple[float, float, float, int]  # mean, min, max, number of values


def build_sweep_report(cells: list[dict], output: str | Path, title: str = "loraens sweep",
                       notes: str = "") -> tuple[Path, Path]:
    """Write `<output>.html` (self-contained, plots embedded) and `<output>.md` (+ `<output>_files/figure_N.png`).

    `cells` are the parsed `cell.json` dicts of a sweep, one per (dataset, variant, seed). Only cells
    whose status is "complete" are used; of two cells with the same (dataset, variant, seed) the later
    one wins. Sections whose data are absent (no randomness variants, no per-epoch metrics, ...) are
    left out. `notes` (Markdown) goes right after the introduction, e.g. how to regenerate the
    report and a reading of its results. Returns (html_path, md_path).
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep = _Sweep(cells)
    builders = (_main_section, _epoch_section, _regulariser_section, _randomness_section, _diversity_section,
                _transfer_section, _size_section, _guarantee_section, _cost_section)
    sections = [sec for build in builders if (sec := build(sweep)) is not None]
    return write_page(sections, output, title, _intro(sweep), notes)


class _Sweep:
    """The complete cells, indexed by (dataset, variant) and seed, with display labels and orders."""

    def __init__(self, cells: Iterable[dict]) -> None:
        self.runs: dict[tuple[str, str], dict[int, dict]] = {}
        self.dataset_labels: dict[str, str] = {}
        self.variant_labels: dict[str, str] = {}
        self.groups: dict[str, str] = {}
        self.skipped = 0
        for cell in cells:
            if cell.get("status", "complete") != "complete":
                self.skipped += 1
                continue
            dataset, variant = str(cell["dataset"]), str(cell["variant"])
            self.dataset_labels.setdefault(dataset, str(cell.get("dataset_label") or dataset))
            self.variant_labels.setdefault(variant, str(cell.get("variant_label") or variant))
            self.groups.setdefault(variant, str(cell.get("variant_group") or "other"))
            self.runs.setdefault((dataset, variant), {})[int(cell.get("seed", 0))] = cell
        self.datasets = list(self.dataset_labels)
        rank = {g: i for i, g in enumerate(GROUP_ORDER)}
        self.variants = sorted(self.variant_labels, key=lambda v: rank.get(self.groups[v], len(GROUP_ORDER)))
        bases = self.in_groups("base")
        self.base: str | None = bases[0] if bases else None

    def in_groups(self, *groups: str) -> list[str]:
        """Variants of the given groups, in report order."""
        return [v for v in self.variants if self.groups[v] in groups]

    def seeds(self, dataset: str, variant: str) -> dict[int, dict]:
        """seed -> cell of one (dataset, variant); empty when that pair was not run."""
        return self.runs.get((dataset, variant), {})

    def all_cells(self, variant: str) -> list[dict]:
        """Every cell of `variant`, all datasets and seeds."""
        return [c for d in self.datasets for c in self.seeds(d, variant).values()]

    def methods(self, variant: str) -> list[str]:
        """Methods present in any cell of `variant`: the known ones in METHOD_LABELS order, then others."""
        present = {m for c in self.all_cells(variant) for m in c.get("methods") or {}}
        return [m for m in METHOD_LABELS if m in present] + sorted(present - set(METHOD_LABELS))

    def rows(self) -> list[tuple[str, str]]:
        """(method, variant) pairs of the main table, in report order."""
        return [(m, v) for v in self.variants for m in self.methods(v)]

    def label(self, method: str, variant: str) -> str:
        """Row label: "LoRA ensemble" for the base variant, "LoRA ensemble · KL 0.1" for the others."""
        name = METHOD_LABELS.get(method, method)
        return name if variant == self.base else f"{name} · {self.variant_labels[variant]}"

    def values(self, dataset: str, variant: str, *path: str) -> dict[int, float]:
        """seed -> number at `path` inside the cell (e.g. "methods", "ensemble", "test", "nll"), where present."""
        out = {}
        for seed, cell in self.seeds(dataset, variant).items():
            value = _get(cell, *path)
            if isinstance(value, (int, float)) and not np.isnan(value):
                out[seed] = float(value)
        return out

    def by_dataset(self, variant: str, *path: str, only: Sequence[str] | None = None) -> dict[str, dict[int, float]]:
        """dataset -> seed -> number at `path`, for one variant (on the datasets `only`, if given)."""
        return {d: self.values(d, variant, *path) for d in (self.datasets if only is None else only)}

    def datasets_of(self, variant: str) -> list[str]:
        """The datasets on which `variant` has at least one complete cell."""
        return [d for d in self.datasets if self.seeds(d, variant)]

    def comparisons(self, variants: Sequence[str]) -> list[tuple[list[str], list[str]]]:
        """Group `variants` by the datasets they cover: [(datasets, [base, variants...]), ...].

        Averages over datasets are only comparable on the same datasets, so every group gets the
        base variant restricted to the group's datasets as its first row.
        """
        groups: dict[tuple[str, ...], list[str]] = {}
        for v in variants:
            if v != self.base:
                groups.setdefault(tuple(self.datasets_of(v)), []).append(v)
        full = tuple(self.datasets_of(self.base)) if self.base else tuple(self.datasets)
        order = sorted(groups, key=lambda ds: ds != full)  # the full set first
        if self.base and full not in groups:
            order.insert(0, full)
            groups[full] = []
        return [(list(ds), ([self.base] if self.base else []) + groups[ds]) for ds in order]

    def subset_label(self, variant: str, datasets: Sequence[str]) -> str:
        """The variant's label, plus "(on X, Y)" when `datasets` is not every dataset of the sweep."""
        label = self.variant_labels[variant]
        if list(datasets) == self.datasets:
            return label
        return f"{label} (on {', '.join(self.dataset_labels[d] for d in datasets)})"


def _get(obj: object, *path: str) -> object:
    """obj[path[0]][path[1]]...; None where a key is missing or a level is not a mapping."""
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


# --- Aggregation and formatting -----------------------------------------------------------------

def _stat(values: Iterable[float]) -> Stat | None:
    """mean, min, max and count of the values; None when there are none."""
    a = np.asarray(list(values), dtype=float)
    return (float(a.mean()), float(a.min()), float(a.max()), len(a)) if len(a) else None


def _over_seeds(per_dataset: Mapping[str, Mapping[int, float]]) -> Stat | None:
    """Average each seed's datasets (those it has), then mean [min, max] over seeds."""
    seeds = sorted({s for v in per_dataset.values() for s in v})
    return _stat(np.mean([v[s] for v in per_dataset.values() if s in v]) for s in seeds)


def _resamples(cell: Mapping, method: str, metric: str, minus: str | None = None) -> np.ndarray | None:
    """The cell's resampled test metric of `method` [R] (minus `minus`'s on the same resamples), or None."""
    a = _get(cell, "resamples", method, metric)
    if not isinstance(a, list) or not a:
        return None
    if minus is None:
        return np.asarray(a, dtype=float)
    b = _get(cell, "resamples", minus, metric)
    return None if not isinstance(b, list) or len(b) != len(a) else np.asarray(a, dtype=float) - np.asarray(b, float)


def _same_questions(a: Mapping, b: Mapping) -> bool:
    """Two cells scored the same test questions: same split, count and data settings (so the same sample)."""
    return (a.get("test_key") == b.get("test_key") and a.get("num_test_questions") == b.get("num_test_questions")
            and _get(a, "config", "data") == _get(b, "config", "data"))


def _combined(sweep: _Sweep, datasets: Sequence[str], variant: str, method: str, metric: str,
              minus: str | None = None, against: str | None = None) -> Stat | None:
    """mean [low, high] of `method`'s test metric (minus `minus`'s, paired), averaged over `datasets`:
    the mean over seeds of the per-seed values, and a 95% interval that resamples seeds AND questions
    (`bootstrap.seeds_and_questions_interval`). A seed counts when it has every dataset. Falls back
    to [min, max] over seeds (`_over_seeds`) where cells hold no resamples. Stat's count: seeds.

    `against`: another variant (the base); the value is then this variant's minus that variant's
    (same method, same seed), paired over questions where both cells scored the same ones (a seed
    whose cells did not is left out)."""
    point: dict[str, dict[int, float]] = {}
    for d in datasets:
        ours = _combined_point(sweep, d, variant, method, metric, minus)
        if against is not None:
            other = _combined_point(sweep, d, against, method, metric, minus)
            mine, base = sweep.seeds(d, variant), sweep.seeds(d, against)
            ours = {s: v - other[s] for s, v in ours.items() if s in other and _same_questions(mine[s], base[s])}
        point[d] = ours
    seeds = sorted(set.intersection(*(set(v) for v in point.values()))) if point else []
    if not seeds:
        return None
    per_seed = []
    for s in seeds:
        found = [_resamples(sweep.seeds(d, variant)[s], method, metric, minus) for d in datasets]
        if against is not None:
            theirs = [_resamples(sweep.seeds(d, against)[s], method, metric, minus) for d in datasets]
            found = [None if a is None or b is None or len(a) != len(b) else a - b for a, b in zip(found, theirs)]
        arrays = [a for a in found if a is not None]
        if len(arrays) < len(found) or len({len(a) for a in arrays}) != 1:
            return _over_seeds({d: {s: point[d][s] for s in seeds} for d in datasets})
        per_seed.append(np.mean(arrays, axis=0))
    mean = float(np.mean([np.mean([point[d][s] for d in datasets]) for s in seeds]))
    low, high = seeds_and_questions_interval(per_seed, seed=0)
    return mean, low, high, len(seeds)


def _combined_point(sweep: _Sweep, dataset: str, variant: str, method: str, metric: str,
                    minus: str | None) -> dict[int, float]:
    """seed -> `method`'s test metric of (dataset, variant), minus `minus`'s when given."""
    ours = sweep.values(dataset, variant, "methods", method, "test", metric)
    if minus is None:
        return ours
    theirs = sweep.values(dataset, variant, "methods", minus, "test", metric)
    return {s: v - theirs[s] for s, v in ours.items() if s in theirs}


def _axis_label(metric: str) -> str:
    return "ACC (%)" if metric == "accuracy" else METRIC_LABELS[metric]


def _scale(metric: str) -> float:
    return 100.0 if metric == "accuracy" else 1.0


def _number(x: float, spec: str) -> str:
    """`x` formatted with `spec`; a value that rounds to zero prints as 0.0 (+0.0), never -0.0."""
    text = format(x, spec)
    return text if float(text) != 0 else format(0.0, spec)


def _fmt(stat: Stat | None, metric: str, signed: bool = False) -> str:
    """"mean [min, max]": accuracy in percent with 1 decimal, everything else with 3 decimals."""
    if stat is None:
        return DASH
    spec = ("+" if signed else "") + (".1f" if metric == "accuracy" else ".3f")
    mean, low, high = (_number(x * _scale(metric), spec) for x in stat[:3])
    return f"{mean} [{low}, {high}]"


def _fmt_mean(stat: Stat | None, metric: str) -> str:
    return DASH if stat is None else format(stat[0] * _scale(metric), ".1f" if metric == "accuracy" else ".3f")


def _count_range(counts: Sequence[int]) -> str:
    if not counts:
        return "0"
    return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"


def _int_range(values: Iterable[float]) -> str:
    v = sorted({round(x) for x in values})
    if not v:
        return DASH
    return f"{v[0]:,}" if len(v) == 1 else f"{v[0]:,}–{v[-1]:,}"


def _band(points: Mapping[float, list[float]], scale: float = 1.0) -> plots.Band:
    """x -> values over seeds  ->  (x, mean, min, max) arrays sorted by x."""
    x = np.array(sorted(points), dtype=float)
    vals = [np.asarray(points[k], dtype=float) * scale for k in sorted(points)]
    return x, np.array([v.mean() for v in vals]), np.array([v.min() for v in vals]), np.array([v.max() for v in vals])


def _best(column: Sequence[Stat | None], metric: str) -> set[int]:
    """Rows holding the best displayed mean of a column (ties all count); none if fewer than two values."""
    shown = {i: round(s[0] * _scale(metric), 1 if metric == "accuracy" else 3) for i, s in enumerate(column)
             if s is not None}
    if len(shown) < 2:
        return set()
    best = min(shown.values()) if metric in LOWER_IS_BETTER else max(shown.values())
    return {i for i, v in shown.items() if v == best}


# --- Sections -----------------------------------------------------------------------------------

def _main_section(sweep: _Sweep) -> Section | None:
    """The paper's table: ACC / ECE / NLL on the test split per (method, variant) and dataset."""
    rows = sweep.rows()
    if not rows:
        return None
    sec = Section("Main table: test accuracy, calibration and NLL")
    sec.text("Test split of each dataset; every entry is the mean over seeds [95% interval over seeds and questions: "
             "a bootstrap that redraws the seeds and, within each seed, its test questions; [min, max] over seeds "
             "where a run kept no resamples]. ACC in percent (higher is "
             "better); ECE and NLL: lower is better. The best mean of each column is in bold. The members of a run "
             "train independently, so each member is a single LoRA: the mean-member rows (mean member, mean member "
             "+ temperature, checkpoint ensemble (mean over members), early stopping (mean member)) are the mean of "
             "the members' metrics; MC dropout uses member 0; temperatures and early-stopping epochs are chosen on "
             "the validation split. Laplace-LoRA (mean member) scores each member's Laplace predictive as a single "
             "model and averages the members' metrics; ensemble + Laplace is the mixture of the members' "
             "posteriors.")
    metrics = ("accuracy", "ece", "nll")
    header = ["method"] + [f"{sweep.dataset_labels[d]} {METRIC_LABELS[k]}" for d in sweep.datasets for k in metrics]
    stats = [[_combined(sweep, [d], v, m, k) for d in sweep.datasets for k in metrics] for m, v in rows]
    seeds = [_count_range([len(sweep.values(d, v, "methods", m, "test", "accuracy")) for d in sweep.datasets
                           if sweep.seeds(d, v)]) for m, v in rows]
    table = [[sweep.label(m, v), *(_fmt(s, metrics[j % 3]) for j, s in enumerate(r)), n]
             for (m, v), r, n in zip(rows, stats, seeds)]
    bold = {(i, j + 1) for j in range(len(header) - 1)
            for i in _best([r[j] for r in stats], metrics[j % 3])}
    sec.table(header + ["n seeds"], table, bold)
    return sec


def _epoch_section(sweep: _Sweep) -> Section | None:
    """Metrics after every epoch for the base variant: mean member vs ensemble."""
    if sweep.base is None:
        return None
    metrics = ("accuracy", "ece", "nll")
    panels: dict[str, dict[str, dict[str, plots.Band]]] = {}
    ece_means: dict[str, dict[int, dict[str, float]]] = {}  # dataset -> epoch -> model -> mean ECE
    for d in sweep.datasets:
        points: dict[str, dict[str, dict[float, list[float]]]] = {}  # model -> metric -> epoch -> values
        for cell in sweep.seeds(d, sweep.base).values():
            for entry in cell.get("epochs") or []:
                for model in MODEL_WORDS:
                    for k in metrics:
                        value = _get(entry, model, k)
                        if isinstance(value, (int, float)) and "epoch" in entry:
                            points.setdefault(model, {}).setdefault(k, {}).setdefault(entry["epoch"], []).append(value)
        # A curve needs two epochs: runs evaluated after their last epoch only have one point.
        if len({e for by_metric in points.values() for p in by_metric.values() for e in p}) < 2:
            continue
        label = sweep.dataset_labels[d]
        panels[label] = {MODEL_WORDS[model]: {_axis_label(k): _band(p, _scale(k)) for k, p in by_metric.items()}
                         for model, by_metric in points.items()}
        for model, by_metric in points.items():
            for epoch, values in by_metric.get("ece", {}).items():
                ece_means.setdefault(d, {}).setdefault(int(epoch), {})[model] = float(np.mean(values))
    if not panels:
        return None
    sec = Section(f"Metrics vs training epoch ({sweep.variant_labels[sweep.base]})")
    caption = ("Test ACC, ECE and NLL after every epoch: the mean member (mean over the members' metrics) vs the "
               "LoRA ensemble; lines are means over seeds, the shaded band spans min to max. In the paper, single "
               "members become overconfident as training goes on, so their ECE (and NLL) grows with the epochs, while "
               "the ensemble's grows much less.")
    sec.figures.append((caption, plots.metric_vs_epoch(panels, [_axis_label(k) for k in metrics])))
    datasets = [d for d in sweep.datasets if d in ece_means]
    epochs = sorted({e for d in datasets for e in ece_means[d]})

    def pair(d: str, e: int) -> str:
        m = ece_means[d].get(e, {})
        return " / ".join(f"{m[k]:.3f}" if k in m else DASH for k in MODEL_WORDS)

    words = " / ".join(MODEL_WORDS.values())
    sec.table(["epoch"] + [f"{sweep.dataset_labels[d]} ECE {words}" for d in datasets],
              [[str(e)] + [pair(d, e) for d in datasets] for e in epochs])
    sec.text("ECE on the test split, mean over seeds; mean member = the mean of the members' ECE.")
    return sec


def _regulariser_section(sweep: _Sweep) -> Section | None:
    """Mean member vs ensemble for the base run and every regulariser, averaged over the same datasets."""
    if not sweep.in_groups("regulariser"):
        return None
    metrics = ("ece", "nll", "accuracy")
    sec = Section("Regularisers combined with ensembling")
    rows, figure_rows = [], []
    for datasets, variants in sweep.comparisons(sweep.in_groups("base", "regulariser")):
        for v in variants:
            stat = {(k, m): _over_seeds(sweep.by_dataset(v, "methods", m, "test", k, only=datasets))
                    for k in metrics for m in ("single", "ensemble")}
            rows.append([sweep.subset_label(v, datasets)] + [_fmt(stat[k, m], k) for k in metrics
                                                              for m in ("single", "ensemble")])
            if datasets == sweep.datasets:
                figure_rows.append((sweep.variant_labels[v], stat))
    if figure_rows:
        def arrays(k: str, m: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            a = np.array([st[k, m][:3] if st[k, m] else (np.nan,) * 3 for _, st in figure_rows], dtype=float)
            a = a * _scale(k)
            return a[:, 0], a[:, 1], a[:, 2]

        panels = {_axis_label(k): {METHOD_LABELS[m]: arrays(k, m) for m in ("single", "ensemble")} for k in metrics}
        caption = ("Test ECE, NLL and ACC of the mean member and the LoRA ensemble, for each regulariser run on every "
                   "dataset; bars are the mean over datasets and seeds, whiskers the min and max over seeds of the "
                   "dataset mean.")
        sec.figures.append((caption, plots.grouped_bars([label for label, _ in figure_rows], panels)))
    header = ["variant"] + [f"{METRIC_LABELS[k]} {MODEL_WORDS[m]}" for k in metrics for m in ("single", "ensemble")]
    sec.table(header, rows)
    sec.text("Test split; mean [min, max] over seeds of the mean over the datasets named in the row (every dataset "
             "unless it says otherwise; a variant run on fewer datasets is compared with the base variant on the "
             "same datasets). Mean member = the mean of the members' metrics. Lower is better for ECE and NLL.")
    return sec


def _randomness_section(sweep: _Sweep) -> Section | None:
    """Which source of randomness makes the ensemble better than its members."""
    randomness = sweep.in_groups("randomness")
    if not randomness:
        return None
    sec = Section("Randomness ablation: where the members' diversity comes from")
    rows = []
    for datasets, variants in sweep.comparisons(randomness):
        if variants == [sweep.base]:
            continue
        for v in variants:
            diffs = {k: {d: _diff(sweep, d, v, k) for d in datasets} for k in ("nll", "ece")}
            rows.append([sweep.subset_label(v, datasets), _fmt(_over_seeds(diffs["nll"]), "nll", signed=True),
                         _fmt(_over_seeds(diffs["ece"]), "ece", signed=True),
                         _fmt(_over_seeds(sweep.by_dataset(v, "methods", "ensemble", "test", "accuracy",
                                                           only=datasets)), "accuracy"),
                         _fmt(_over_seeds(sweep.by_dataset(v, "diversity", "disagreement", only=datasets)),
                              "disagreement"),
                         _fmt(_over_seeds(sweep.by_dataset(v, "diversity", "mutual_information", only=datasets)),
                              "mutual_information")])
    sec.table(["variant", "ensemble minus mean member NLL", "ensemble minus mean member ECE", "ensemble ACC",
               "disagreement", "mutual information"], rows)
    sec.text("Test split; mean [min, max] over seeds of the mean over the datasets named in the row; the base "
             "variant (members differ in both init and data order) is shown on the same datasets. A more negative "
             "difference means ensembling helps more. Disagreement is the mean share of members whose top choice "
             "differs from the ensemble's; mutual information is the ensemble's epistemic uncertainty (nats).")
    return sec


def _diversity_section(sweep: _Sweep) -> Section | None:
    """The diversity levers: how much each makes the members differ, and what the ensemble gains by it."""
    levers = sweep.in_groups("diversity")
    if not levers:
        return None
    sec = Section("Diversity levers: members that disagree where the data does not pin them down")
    rows = []
    for datasets, variants in sweep.comparisons(levers):
        for v in variants:
            versus = [DASH] * 3 if v == sweep.base or not sweep.base else [
                _fmt(_combined(sweep, datasets, v, "ensemble", metric, against=sweep.base), metric, signed=True)
                for metric in ("nll", "ece", "accuracy")]
            rows.append([
                sweep.subset_label(v, datasets),
                _fmt(_combined(sweep, datasets, v, "ensemble", "nll", minus="single"), "nll", signed=True),
                _fmt(_combined(sweep, datasets, v, "ensemble", "ece", minus="single"), "ece", signed=True),
                _fmt(_combined(sweep, datasets, v, "ensemble", "accuracy"), "accuracy"),
                _fmt(_combined(sweep, datasets, v, "ensemble", "accuracy", minus="single"), "accuracy", signed=True),
                *versus,
                _fmt(_over_seeds(sweep.by_dataset(v, "diversity", "disagreement", only=datasets)), "disagreement"),
                _fmt(_over_seeds(sweep.by_dataset(v, "diversity", "mutual_information", only=datasets)),
                     "mutual_information"),
            ])
    sec.table(["variant", "ensemble minus mean member NLL", "ensemble minus mean member ECE", "ensemble ACC",
               "ensemble minus mean member ACC", "ensemble NLL minus the base's", "ensemble ECE minus the base's",
               "ensemble ACC minus the base's", "disagreement", "mutual information (nats)"], rows)
    sec.text("Test split, averaged over the datasets named in the row; the base variant is shown on the same "
             "datasets. The differences are paired (the same resampled questions for the ensemble and its members) "
             "and their 95% intervals resample seeds and questions; disagreement and mutual information are mean "
             "[min, max] over seeds. \"Minus the base's\" compares the lever's ensemble with the base variant's "
             "ensemble trained with the same seed on the same questions (paired over questions and seeds the same "
             "way). A lever earns its place when it makes the NLL and ECE differences more negative without lowering "
             "the ensemble's accuracy; it beats the base outright where a \"minus the base's\" interval excludes 0.")
    return sec


OOD_METHODS = ("single", "ensemble", "laplace", "ensemble+laplace")
OOD_SCORES = {"1-max_prob": "1 - max p", "predictive_entropy_norm": "entropy (norm.)",
              "mutual_information": "MI (nats)", "mutual_information_norm": "MI (norm.)",
              "member_disagreement": "disagreement"}


def _transfer_section(sweep: _Sweep) -> Section | None:
    """Transfer / OOD: each dataset's members on the OOD sets it names, per method."""
    rows = []
    for d in sweep.datasets:
        for v in sweep.variants:
            cells = sweep.seeds(d, v)
            names = list(dict.fromkeys(o for c in cells.values() for o in (c.get("ood") or {})))
            for o in names:
                label = next(str(c["ood"][o].get("label") or o) for c in cells.values() if o in (c.get("ood") or {}))
                for m in OOD_METHODS:
                    acc = sweep.values(d, v, "ood", o, "metrics", m, "accuracy")
                    if not acc:
                        continue
                    cols = [_fmt(_stat(acc.values()), "accuracy"),
                            _fmt(_stat(sweep.values(d, v, "ood", o, "metrics", m, "nll").values()), "nll")]
                    for score in OOD_SCORES:
                        cols.append(_fmt(_stat(sweep.values(d, v, "ood", o, "auroc", m, score).values()), "auroc"))
                    rows.append([f"{sweep.dataset_labels[d]} -> {label}", sweep.label(m, v), *cols, str(len(acc))])
    if not rows:
        return None
    sec = Section("Transfer and OOD detection: data the training never saw")
    sec.table(["trained on -> OOD set", "method", "OOD ACC", "OOD NLL",
               *(f"AUROC {w}" for w in OOD_SCORES.values()), "n seeds"], rows)
    sec.text("Each run's members answer a sample of a dataset they were not trained on. OOD ACC and NLL are their "
             "accuracy and NLL there (transfer). AUROC: how well a score tells those questions from the run's own "
             "test questions (OOD = positive, 0.5 = chance, below 0.5 = the score is LOWER on unseen data). A single "
             "model (mean member, Laplace mean member) has no member spread: its columns are 1 - max p and the "
             "entropy normalised by log C, averaged over the members as single models; MI is mutual information, "
             "raw in nats and normalised by log C (the two rank questions alike, so their AUROCs are equal, when "
             "every question of both sets has the same number of choices). Entries are mean [min, max] over seeds.")
    return sec


def _diff(sweep: _Sweep, dataset: str, variant: str, metric: str) -> dict[int, float]:
    """seed -> ensemble minus mean member on the test split, for seeds that have both."""
    ens = sweep.values(dataset, variant, "methods", "ensemble", "test", metric)
    mean = sweep.values(dataset, variant, "methods", "single", "test", metric)
    return {s: ens[s] - mean[s] for s in ens if s in mean}


def _size_section(sweep: _Sweep) -> Section | None:
    """NLL and ECE of the first m members, for the base variant."""
    if sweep.base is None:
        return None
    metrics = ("nll", "ece")
    points: dict[str, dict[str, dict[float, list[float]]]] = {}  # dataset -> metric -> m -> values
    for d in sweep.datasets:
        for cell in sweep.seeds(d, sweep.base).values():
            for entry in cell.get("ensemble_size") or []:
                for k in metrics:
                    if isinstance(entry.get(k), (int, float)) and "m" in entry:
                        points.setdefault(d, {}).setdefault(k, {}).setdefault(entry["m"], []).append(entry[k])
    if not points:
        return None
    sec = Section(f"Ensemble size ({sweep.variant_labels[sweep.base]})")
    curves = {sweep.dataset_labels[d]: {METRIC_LABELS[k]: _band(p) for k, p in by_metric.items()}
              for d, by_metric in points.items()}
    caption = ("Test NLL and ECE of the ensemble of the first m members, one line per dataset (mean over seeds, "
               "shaded min to max).")
    sec.figures.append((caption, plots.ensemble_size_by_dataset(curves, ["NLL", "ECE"])))
    datasets = [d for d in sweep.datasets if d in points]
    sizes = sorted({int(m) for d in datasets for by_m in points[d].values() for m in by_m})

    def size_text(d: str, k: str, m: int) -> str:
        return _fmt(_stat(points[d].get(k, {}).get(m, [])), k)

    sec.table(["m"] + [f"{sweep.dataset_labels[d]} {METRIC_LABELS[k]}" for d in datasets for k in metrics],
              [[str(m)] + [size_text(d, k, m) for d in datasets for k in metrics] for m in sizes])
    sec.text("Test split; mean [min, max] over seeds.")
    return sec


def _guarantee_section(sweep: _Sweep) -> Section | None:
    """Conformal sets and the risk-controlled abstention, mean member vs ensemble (base variant, test split)."""
    if sweep.base is None:
        return None
    cells = sweep.all_cells(sweep.base)
    # Cells whose calibration split is their test split measured the guarantees in-sample: left out.
    cells = [c for c in cells if isinstance(c.get("guarantees"), Mapping)
             and not (c.get("test_key") and c.get("test_key") == c.get("val_key"))]
    if not cells:
        return None
    alpha = f"{cells[0]['guarantees']['alphas'][0]:g}"
    risks = [f"{r:g}" for r in cells[0]["guarantees"]["risks"]]
    columns: list[tuple[str, tuple[str, ...], str]] = [
        (f"LAC coverage (alpha {alpha})", ("sets", "lac", alpha, "coverage"), "higher"),
        (f"LAC set size (alpha {alpha})", ("sets", "lac", alpha, "mean_size"), "lower"),
        (f"APS set size (alpha {alpha})", ("sets", "aps", alpha, "mean_size"), "lower")]
    for r in risks:
        columns += [(f"answered at risk {r}", ("risk", r, "test_coverage"), "higher"),
                    (f"error among answered (target {r})", ("risk", r, "test_risk"), "info")]
    rows: list[list[str]] = []
    bold: set[tuple[int, int]] = set()
    for d in [d for d in sweep.datasets_of(sweep.base) if any(c["dataset"] == d for c in cells)]:
        block = []
        for model in ("mean_member", "ensemble"):
            stats = [_stat(sweep.values(d, sweep.base, "guarantees", model, *path).values())
                     for _, path, _ in columns]
            label = MODEL_WORDS["single" if model == "mean_member" else model]
            block.append((label, stats))
        for j, (_, _, better) in enumerate(columns):
            pair = [stats[j] for _, stats in block]
            if better != "info" and all(pair):
                means = [p[0] for p in pair if p is not None]
                pick = int(np.argmax(means) if better == "higher" else np.argmin(means))
                bold.add((len(rows) + pick, j + 1))
        rows += [[f"{sweep.dataset_labels[d]}: {label}", *(_fmt(st, "guarantee") for st in stats)]
                 for label, stats in block]
    if not rows:
        return None
    sec = Section(f"Answers with guarantees: mean member vs ensemble ({sweep.variant_labels[sweep.base]})")
    sec.table(["dataset: model", *(c[0] for c in columns)], rows, bold)
    sec.text(f"Fitted on each run's validation split and measured on its test split; mean [min, max] over seeds. "
             f"Split-conformal sets promise coverage >= {1 - float(alpha):g}: LAC (score 1 - p) and APS (cumulative "
             "probability). The abstention rule is SGR (Geifman & El-Yaniv 2017) on 1 - max probability: its error "
             "among answered questions is at most the target with probability >= 0.9. The mean member averages each "
             "member's own sets and rule. Bold: the better of the two (smaller sets, more questions answered).")
    return sec


def _cost_section(sweep: _Sweep) -> Section | None:
    """Parameters, time and memory per (method, variant), averaged over datasets and seeds."""
    rows = []
    for m, v in sweep.rows():
        cells = sweep.all_cells(v)
        method = [c["methods"][m] for c in cells if m in c.get("methods", {})]
        rss = _nums(cells, "cost", "peak_rss_mb")
        posterior = _nums(method, "laplace", "posterior_bytes")
        rows.append([sweep.label(m, v), _int_range(_nums(method, "trainable_params")),
                     _seconds(_nums(cells, "cost", "train_seconds")), _seconds(_nums(method, "laplace", "fit_seconds")),
                     _seconds(_nums(method, "extra_seconds")),
                     DASH if not rss else f"{np.mean(rss):,.0f}",
                     DASH if not posterior else f"{np.mean(posterior) / 2**20:,.1f}",
                     _int_range(_nums(method, "members"))])
    if not rows:
        return None
    sec = Section("Compute cost")
    sec.table(["method", "trainable parameters", "training time per run (s)", "Laplace fit (s)",
               "added time (s)", "peak memory (MB)", "posterior (MiB)", "predictions averaged"], rows)
    sec.text("Means over all runs of the variant, datasets and seeds together (times: mean [min, max] over those "
             "runs). Training time is per run (all members): the mean-member methods are read from the members of "
             "the same vectorised run, so their training time is the whole run's. Added inference time is what a "
             "method needs beyond the run's own evaluation: the forward passes of weight averaging and MC dropout, and "
             "for Laplace the fit (K-FAC factors on the training questions, their eigendecomposition, the prior "
             "precision) plus the linearised predictive on the test split; the posterior column is the memory of "
             "every member's factors' eigendecompositions. "
             "Fitting a temperature takes milliseconds; a checkpoint ensemble of E epochs costs E forward passes at "
             "test time (the run's per-epoch evaluation already made them here). "
             "Peak memory is the process's peak resident set size.")
    return sec


def _nums(objs: Iterable[Mapping], *path: str) -> list[float]:
    """The numbers found at `path` in each object (objects without one are skipped)."""
    return [float(x) for o in objs if isinstance(x := _get(o, *path), (int, float))]


def _seconds(values: list[float]) -> str:
    return DASH if not values else f"{np.mean(values):.1f} [{min(values):.1f}, {max(values):.1f}]"


# --- Writing ------------------------------------------------------------------------------------

def _intro(sweep: _Sweep) -> str:
    seeds = sorted({s for runs in sweep.runs.values() for s in runs})
    n_cells = sum(len(r) for r in sweep.runs.values())
    text = (f"{n_cells} complete runs: {len(sweep.datasets)} dataset(s) x {len(sweep.variants)} variant(s) x "
            f"seeds {', '.join(map(str, seeds)) or 'none'}. Each section says what its intervals are: the main "
            "table and the diversity levers give 95% intervals that resample both the seeds (independent training "
            "runs, each on its own question samples) and the questions within each seed; the other sections give "
            "[min, max] over seeds. ACC in percent, higher is better; NLL, ECE, Brier: lower is better.")
    if sweep.skipped:
        text += f" {sweep.skipped} run(s) whose status is not \"complete\" are left out."
    return text

"""`loraens report RUN [RUN ...]`: a self-contained HTML file and a Markdown summary.

Everything is computed from the run folders' prediction files (member probabilities
[N, M, C]), so a report can be rebuilt at any time, with any number of bootstrap resamples.
Every metric is shown with a seeded bootstrap 95% interval; differences between the ensemble
and member 0 or the mean member use a paired bootstrap on the same questions.

Words, the same in the sweep report (`sweep_report.py`): "single member (member 0)" is member 0
alone, one particular single LoRA; "mean member" is the mean over the members of each member's
metric (the expected single LoRA), not the metric of some averaged prediction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import plots
from .bootstrap import (
    bootstrap_ci,
    ensemble_gain,
    format_ci,
    member_metric_resamples,
    metric_cis,
    metric_resamples,
    paired_bootstrap,
    paired_summary,
    percentile_ci,
)
from .calibration import CalibrationError, load_calibration
from .conformal import ENSEMBLE as ENSEMBLE_KEY
from .conformal import MEAN_MEMBER as MEAN_MEMBER_KEY
from .conformal import MEMBER_0 as MEMBER_0_KEY
from .conformal import binomial_interval, guarantee_summary, single_vs_ensemble
from .ensemble_size import ensemble_size_curve
from .metrics import adaptive_ece, ece, ensemble_probs, evaluate_ensemble, mce, nll
from .ood import auroc_interval, ood_metrics, roc_points
from .pages import Section, write_page
from .predictions import Predictions, load_all_predictions, split_key
from .selective import accuracy_at_coverage, accuracy_coverage_curve, aurc
from .uncertainty import DETECTION_SCORES, uncertainty_scores

MAIN_METRICS = ("accuracy", "nll", "ece", "brier")
MEMBER_0 = "single member (member 0)"  # member 0 alone: one particular single LoRA
MEAN_MEMBER = "mean member"  # the mean over members of each member's metric


def _split_section(run: str, key: str, preds: Predictions, n_resamples: int, seed: int) -> Section:
    """Metrics with intervals, calibration, selective prediction and ensemble size for one split."""
    mp = preds.member_probs.double().numpy()
    targets = preds.targets.numpy()
    ens, member0 = ensemble_probs(mp).numpy(), mp[:, 0]
    sec = Section(f"{run} / {key}: N = {len(targets)} questions, M = {mp.shape[1]} members")

    # The same resampled questions for every model, so differences are paired.
    ens_r = metric_resamples(ens, targets, n_resamples=n_resamples, seed=seed)
    mem_r = [metric_resamples(mp[:, j], targets, n_resamples=n_resamples, seed=seed) for j in range(mp.shape[1])]
    mean_r = {k: np.mean([r[k] for r in mem_r], axis=0) for k in MAIN_METRICS}
    point = evaluate_ensemble(mp, targets)
    ens_p, mem_p, mean_p = point["ensemble"], point["members"], point["mean_member"]
    models = ((MEMBER_0, mem_p[0], mem_r[0]), (MEAN_MEMBER, mean_p, mean_r), ("ensemble", ens_p, ens_r))
    sec.table(["model", "accuracy", "NLL", "ECE", "Brier"],
              [[name, *(_ci_text(p[k], r[k]) for k in MAIN_METRICS)] for name, p, r in models])
    sec.table(["paired difference (same questions)", "accuracy", "NLL", "ECE", "Brier"],
              [[f"ensemble minus {name}", *(_diff_text(ens_p[k] - p[k], ens_r[k] - r[k]) for k in MAIN_METRICS)]
               for name, p, r in models[:2]])
    sec.table(["model", "ECE (15 bins)", "MCE", "adaptive ECE"],
              [[name, *(format_ci(bootstrap_ci(fn, p, targets, n_resamples=n_resamples, seed=seed), 4)
                        for fn in (ece, mce, adaptive_ece))]
               for name, p in ((MEMBER_0, member0), ("ensemble", ens))])
    sec.figures.append((f"Reliability diagram and confidence histogram: {MEMBER_0} vs ensemble",
                        plots.reliability_diagram({MEMBER_0: member0, "ensemble": ens}, targets)))

    scores = uncertainty_scores(mp, preds.choice_mask.numpy())
    correct_e, correct_0 = ens.argmax(-1) == targets, member0.argmax(-1) == targets
    rows = []
    for name, correct, score in [(f"ensemble, {s}", correct_e, scores[s]) for s in scores] + \
            [(f"{MEMBER_0}, 1-max_prob", correct_0, 1 - member0.max(-1))]:
        cells = [format_ci(bootstrap_ci(fn, correct, score, n_resamples=n_resamples, seed=seed), 3)
                 for fn in (aurc, _acc_at(0.8), _acc_at(0.9))]
        rows.append([name, *cells])
    sec.table(["uncertainty score", "AURC (lower is better)", "acc @ 80% coverage", "acc @ 90% coverage"], rows)
    curves = {f"ensemble, {s}": accuracy_coverage_curve(correct_e, scores[s]) for s in DETECTION_SCORES}
    curves[f"{MEMBER_0}, 1-max_prob"] = accuracy_coverage_curve(correct_0, 1 - member0.max(-1))
    sec.figures.append(("Accuracy-coverage curves", plots.accuracy_coverage(curves)))

    size = ensemble_size_curve(mp, targets, n_subsets=20, seed=seed)
    sec.table(["members m", "accuracy (first m)", "NLL (first m)", "ECE (first m)", "NLL (random m-subsets)"],
              [[str(r["m"]), f"{r['first']['accuracy']:.3f}", f"{r['first']['nll']:.4f}", f"{r['first']['ece']:.4f}",
                f"{r['random_mean']['nll']:.4f} ± {r['random_std']['nll']:.4f}"] for r in size])
    sec.figures.append(("Ensemble-size curve", plots.ensemble_size(size)))
    return sec


def _ci_text(point: float, values: np.ndarray) -> str:
    return format_ci(percentile_ci(point, values, 0.05))


def _diff_text(point: float, diffs: np.ndarray) -> str:
    """Difference with its paired 95% interval and two-sided bootstrap p-value."""
    return _paired_text(paired_summary(point, diffs, 0.05))


def _paired_text(d: dict[str, float]) -> str:
    """"+0.012 [-0.004, +0.029] p=0.140" from a paired bootstrap result."""
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] p={d['p_value']:.3f}"


def _acc_at(coverage: float):
    def fn(correct: np.ndarray, uncertainty: np.ndarray) -> float:
        return accuracy_at_coverage(correct, uncertainty, coverage)
    return fn


def _ood_section(run: str, in_key: str, ood_keys: list[str], preds: dict[str, Predictions],
                 n_resamples: int, seed: int) -> Section:
    """OOD detection of every OOD set against `in_key`, with bootstrap intervals on AUROC."""
    sec = Section(f"{run}: out-of-distribution detection (in-distribution: {in_key})")
    sec.text("Each score is oriented so that higher means more uncertain; OOD questions are the positive class. "
             "Entropies marked _norm are divided by log(number of choices), so sets with more choices do not "
             "look more uncertain by construction; mutual_information is the raw value in nats.")
    s_in = uncertainty_scores(preds[in_key].member_probs.double().numpy(), preds[in_key].choice_mask.numpy())
    rows, outs = [], {}
    rng = np.random.default_rng(seed)
    for key in ood_keys:
        p = preds[key]
        s_out = uncertainty_scores(p.member_probs.double().numpy(), p.choice_mask.numpy())
        outs[key] = s_out
        roc = {}
        for score in DETECTION_SCORES:
            m = ood_metrics(s_in[score], s_out[score])
            low, high = auroc_interval(s_in[score], s_out[score], n_resamples, rng)
            rows.append([key, score, f"{m['auroc']:.3f} [{low:.3f}, {high:.3f}]", f"{m['aupr']:.3f}",
                         f"{m['fpr95']:.3f}"])
            roc[score] = (*roc_points(s_in[score], s_out[score]), m["auroc"])
        sec.figures.append((f"ROC curves: {key} vs {in_key}", plots.roc_curves(roc, f"OOD: {key}")))
    sec.table(["OOD set", "score", "AUROC [95% interval]", "AUPR", "FPR @ 95% TPR"], rows)
    sec.text("Transfer: how the members answer each OOD set (95% bootstrap intervals over its questions; the "
             "differences are paired).")
    sec.table(["OOD set", "model", "accuracy", "NLL", "ECE", "Brier"], [
        row for key in ood_keys for row in _transfer_rows(key, preds[key], n_resamples, seed)])
    for score in ("predictive_entropy_norm", "mutual_information_norm"):
        sec.figures.append((f"Score histograms: {score}",
                            plots.score_histograms(s_in[score], {k: v[score] for k, v in outs.items()}, in_key, score)))
    return sec


def _transfer_rows(key: str, p: Predictions, n_resamples: int, seed: int) -> list[list[str]]:
    """Mean member and ensemble metrics on one OOD set with intervals, and their paired difference."""
    mp, targets = p.member_probs.double().numpy(), p.targets.numpy()
    ens = ensemble_probs(mp).numpy()
    ens_r = metric_resamples(ens, targets, n_resamples=n_resamples, seed=seed)
    mean_r = member_metric_resamples(mp, targets, n_resamples=n_resamples, seed=seed)
    point = evaluate_ensemble(mp, targets)
    gain = ensemble_gain(mp, targets, n_resamples=n_resamples, seed=seed)  # the same resamples, paired
    return [[key, MEAN_MEMBER, *(_ci_text(point["mean_member"][k], mean_r[k]) for k in MAIN_METRICS)],
            [key, "ensemble", *(_ci_text(point["ensemble"][k], ens_r[k]) for k in MAIN_METRICS)],
            [key, f"ensemble minus {MEAN_MEMBER}", *(_paired_text(gain[k]) for k in MAIN_METRICS)]]


GUARANTEE_DEFAULTS = {"alphas": (0.05, 0.1, 0.2), "risks": (0.05, 0.1, 0.2, 0.3), "delta": 0.1,
                      "score": "1-max_prob"}


def _guarantee_pairs(run_dir: Path, preds: dict[str, Predictions],
                     ood_keys: set[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(calibration split, test split, settings) pairs of a run for the guarantees section.

    With a calibration.json: its split against every other split (not the OOD sets), with its
    alphas, risks, delta and score. Without one: each "<dataset>_validation" against
    "<dataset>_test", with `GUARANTEE_DEFAULTS`.
    """
    try:
        cal = load_calibration(run_dir, check_members=False)
    except CalibrationError:
        cal = None
    if cal is not None:
        key = split_key(cal.dataset, cal.split)
        if key in preds:
            settings = {"alphas": tuple(cal.alphas), "risks": tuple(cal.risks), "delta": cal.delta,
                        "score": cal.score, "source": "calibration.json"}
            return [(key, k, settings) for k in preds if k != key and k not in ood_keys]
    pairs = []
    for key in preds:
        test = key[: -len("validation")] + "test" if key.endswith("_validation") else None
        if test in preds and key not in ood_keys and test not in ood_keys:
            pairs.append((key, test, {**GUARANTEE_DEFAULTS, "source": "defaults (no calibration.json)"}))
    return pairs


def _guarantee_section(run: str, cal_key: str, test_key: str, cal: Predictions, test: Predictions,
                       settings: dict[str, Any]) -> Section:
    """Conformal sets and SGR abstention fitted on `cal_key`, measured on `test_key`.

    Member 0, the mean member and the ensemble side by side: coverage and size of the sets,
    realised risk and coverage kept by the abstention rule, and a figure of both over a grid.
    """
    alphas, risks, delta, score = settings["alphas"], settings["risks"], settings["delta"], settings["score"]
    sec = Section(f"{run}: guarantees on {test_key} (calibrated on {cal_key})")
    shared = set(cal.ids) & set(test.ids)
    args = (cal.member_probs.double().numpy(), cal.targets.numpy(), test.member_probs.double().numpy(),
            test.targets.numpy())
    masks = {"cal_mask": cal.choice_mask.numpy(), "test_mask": test.choice_mask.numpy()}
    res = single_vs_ensemble(*args, **masks, alphas=alphas, risks=risks, delta=delta, score=score)
    n_cal, n_test = len(cal.ids), len(test.ids)
    sec.text(f"Fitted on {cal_key} (N = {n_cal}) and measured on {test_key} (N = {n_test}); settings from "
             f"{settings['source']}. Split-conformal sets hold the right answer with probability at least 1 - alpha "
             "when the test questions are exchangeable with the calibration ones: LAC (score 1 - p of the answer) and "
             "APS (cumulative probability, not randomised). The abstention rule is SGR (Geifman & El-Yaniv 2017): it "
             f"answers when {score} (ensemble; 1-max_prob for a single member) is at most a threshold chosen so that "
             f"the error rate among answered questions is at most r with probability at least {1 - delta:g}. Test "
             "coverage and risk carry exact binomial 95% intervals; the mean member averages each member's numbers. A "
             "test risk above r can come from the test sample's own noise, or (with probability at most delta) from an "
             "unlucky calibration split. Bold: the smallest sets and the most questions answered.")
    if shared:
        sec.text(f"Warning: {len(shared)} question ids are in both splits, so the guarantees do not apply as such.")
    if cal_key.rsplit("_", 1)[0] != test_key.rsplit("_", 1)[0]:
        sec.text("The two splits come from different datasets: under such a shift the guarantees need not hold, "
                 "and this table measures how far they carry over.")
    labels = {MEMBER_0_KEY: MEMBER_0, MEAN_MEMBER_KEY: MEAN_MEMBER, ENSEMBLE_KEY: "ensemble"}
    rows, bold = [], set()
    for method in ("lac", "aps"):
        for a in alphas:
            k = f"{a:g}"
            for model, label in labels.items():
                e = res[model]["sets"][method][k]
                hit = round(e["coverage"] * n_test)
                ci = binomial_interval(hit, n_test) if model != MEAN_MEMBER_KEY else None
                ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
                rows.append([label, method.upper(), f"{1 - a:.2f}", f"{e['coverage']:.3f}{ci_text}",
                             f"{e['mean_size']:.2f}", f"{100 * e['singleton']:.1f}%", f"{100 * e['empty']:.1f}%"])
            sizes = [res[m]["sets"][method][k]["mean_size"] for m in labels]
            if max(sizes) > min(sizes):
                bold.add((len(rows) - len(labels) + int(np.argmin(sizes)), 4))
    sec.table(["model", "set", "promised coverage", "test coverage [95%]", "mean set size", "singletons", "empty"],
              rows, bold)
    rows, bold = [], set()
    for r in risks:
        k = f"{r:g}"
        for model, label in labels.items():
            e = res[model]["risk"][k]
            answered = int(round(e["test_answered"])) if model != MEAN_MEMBER_KEY else None
            if answered is not None and answered > 0:
                lo, hi = binomial_interval(round(e["test_risk"] * answered), answered)
                risk_text = f"{e['test_risk']:.3f} [{lo:.3f}, {hi:.3f}]"
            else:
                risk_text = f"{e['test_risk']:.3f}" if (answered is None and e["test_coverage"] > 0) else "— (none)"
            rows.append([label, f"{r:g}", f"{e['calibration_coverage']:.3f}", f"{e['bound']:.3f}",
                         f"{e['test_coverage']:.3f}", risk_text,
                         "yes" if e["test_risk"] <= r else "no"])
        kept = [res[m]["risk"][k]["test_coverage"] for m in labels]
        if max(kept) > min(kept):
            bold.add((len(rows) - len(labels) + int(np.argmax(kept)), 4))
    sec.table(["model", "target risk r", "answered (calibration)", "risk bound (calibration)",
               "answered (test coverage kept)", "error among answered (test) [95%]", "test risk <= r"], rows, bold)
    lines = []
    for method in ("lac", "aps"):
        a = 0.1 if 0.1 in alphas else alphas[len(alphas) // 2]
        s0, se = (res[m]["sets"][method][f"{a:g}"]["mean_size"] for m in (MEAN_MEMBER_KEY, ENSEMBLE_KEY))
        lines.append(f"{method.upper()} sets at alpha {a:g}: mean size {se:.2f} for the ensemble vs {s0:.2f} for the "
                     f"mean member ({'smaller' if se < s0 else 'not smaller'})")
    for r in risks:
        (k0, e0), (ke, ee) = ((res[m]["risk"][f"{r:g}"]["test_coverage"], res[m]["risk"][f"{r:g}"]["test_risk"])
                              for m in (MEAN_MEMBER_KEY, ENSEMBLE_KEY))
        if max(k0, ke) == 0:
            lines.append(f"at risk {r:g} neither answers any question (no threshold qualifies on {n_cal} calibration "
                         "questions)")
            continue
        lines.append(f"at risk {r:g} the ensemble answers {100 * ke:.1f}% of the test questions (error "
                     f"{100 * ee:.1f}%) vs {100 * k0:.1f}% (error {100 * e0:.1f}%) for the mean member")
    sec.text("Reading: " + "; ".join(lines) + ".")
    grid_a = np.round(np.arange(0.05, 0.41, 0.05), 2)
    grid_r = np.round(np.arange(0.05, 0.41, 0.05), 2)
    # The curves show member 0 and the ensemble only: two fits, not one per member.
    kw = dict(**masks, alphas=tuple(grid_a), risks=tuple(grid_r), delta=delta)
    grid = {MEMBER_0_KEY: guarantee_summary(*args, **kw, member=0, score="1-max_prob"),  # type: ignore[arg-type]
            ENSEMBLE_KEY: guarantee_summary(*args, **kw, score=score)}  # type: ignore[arg-type]
    curves = {}
    for model in (MEMBER_0_KEY, ENSEMBLE_KEY):
        g = grid[model]
        curves[labels[model]] = {"alpha": grid_a, "risk_target": grid_r,
                                 "coverage": np.array([g["sets"]["lac"][f"{a:g}"]["coverage"] for a in grid_a]),
                                 "size": np.array([g["sets"]["lac"][f"{a:g}"]["mean_size"] for a in grid_a]),
                                 "kept": np.array([g["risk"][f"{x:g}"]["test_coverage"] for x in grid_r]),
                                 "realised": np.array([g["risk"][f"{x:g}"]["test_risk"] for x in grid_r])}
    sec.figures.append((f"Guarantees on {test_key}: conformal coverage and set size, abstention at a target risk",
                        plots.guarantee_curves(curves)))
    return sec


def _comparison_section(runs: dict[str, dict[str, Predictions]], n_resamples: int, seed: int) -> Section | None:
    """Runs side by side on the splits they share; paired differences against the first run."""
    if len(runs) < 2:
        return None
    names = list(runs)
    sec = Section("Runs side by side (ensemble)")
    shared = sorted(set.intersection(*(set(p) for p in runs.values())))
    rows = []
    for key in shared:
        base = runs[names[0]][key]
        base_ens = ensemble_probs(base.member_probs.double().numpy()).numpy()
        for name in names:
            p = runs[name][key]
            e = ensemble_probs(p.member_probs.double().numpy()).numpy()
            ci = metric_cis(e, p.targets.numpy(), n_resamples=n_resamples, seed=seed)
            diff = "—"
            if name != names[0] and p.ids == base.ids:
                d = paired_bootstrap(nll, (e, p.targets.numpy()), (base_ens, base.targets.numpy()),
                                     n_resamples=n_resamples, seed=seed)
                diff = _paired_text(d)
            rows.append([key, name, *(format_ci(ci[k]) for k in MAIN_METRICS), diff])
    sec.table(["split", "run", "accuracy", "NLL", "ECE", "Brier", f"NLL minus {names[0]} (paired)"], rows)
    return sec


def build_report(run_dirs: list[str | Path], output: str | Path, n_resamples: int = 1000,
                 seed: int = 0) -> tuple[Path, Path]:
    """Write `<output>.html` (self-contained, plots embedded) and `<output>.md` (+ PNG files beside it)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Predictions]] = {}
    sections: list[Section] = []
    for run_dir in map(Path, run_dirs):
        name = run_dir.name if run_dir.name not in runs else str(run_dir)
        preds = runs[name] = load_all_predictions(run_dir)
        results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
        ood = results.get("ood", {})
        ood_keys = {k for v in ood.values() for k in v}
        for key, p in preds.items():
            if key not in ood_keys:
                sections.append(_split_section(name, key, p, n_resamples, seed))
        for cal_key, test_key, settings in _guarantee_pairs(run_dir, preds, ood_keys):
            sections.append(_guarantee_section(name, cal_key, test_key, preds[cal_key], preds[test_key], settings))
        for in_key, table in ood.items():
            present = [k for k in table if k in preds]
            if in_key in preds and present:
                sections.append(_ood_section(name, in_key, present, preds, n_resamples, seed))
    comparison = _comparison_section(runs, n_resamples, seed)
    if comparison is not None:
        sections.insert(0, comparison)
    return _write(sections, output, list(runs), n_resamples, seed)


def _write(sections: list[Section], output: Path, names: list[str], n_resamples: int, seed: int) -> tuple[Path, Path]:
    title = f"loraens report: {', '.join(names)}"
    intro = (f"Intervals: 95% percentile bootstrap over questions ({n_resamples} resamples, seed {seed}); "
             "differences are a paired bootstrap over the same questions, with a two-sided p-value. "
             "NLL, ECE, Brier, AURC: lower is better.")
    return write_page(sections, output, title, intro)

"""Fixed-width terminal tables of a run's metrics (what `loraens train | demo | evaluate` print).

Inputs are the plain dicts the run writes (``evaluate_ensemble`` output, metrics.jsonl lines,
``results.json["ood"]`` entries), so every table also works on results read back from JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .metrics import METRIC_NAMES
from .uncertainty import DETECTION_SCORES

_LABEL_WIDTH = 12
_HEADER = f"{'':<{_LABEL_WIDTH}} {'acc %':>8} {'NLL':>8} {'ECE':>8} {'Brier':>8}"


def _row(label: str, m: dict[str, float], signed: bool = False) -> str:
    s = "+" if signed else ""
    return (
        f"{label:<{_LABEL_WIDTH}} {100 * m['accuracy']:>{s}8.2f} {m['nll']:>{s}8.4f} "
        f"{m['ece']:>{s}8.4f} {m['brier']:>{s}8.4f}"
    )


def _frame(title: str | None, lines: list[str], footer: str) -> str:
    rule = "-" * len(_HEADER)
    out = ([title] if title else []) + [_HEADER, rule] + lines + [rule, footer]
    return "\n".join(out)


def format_table(results: dict[str, Any], title: str | None = None) -> str:
    """Fixed-width table of :func:`loraens.metrics.evaluate_ensemble` results.

    One row per member, then "mean member" and "ensemble"; accuracy in %, others to 4 decimals.
    """
    lines = [_row(f"member {k}", m) for k, m in enumerate(results["members"])]
    lines.append("-" * len(_HEADER))  # members above, summaries below
    lines.append(_row("mean member", results["mean_member"]))
    lines.append(_row("ensemble", results["ensemble"]))
    footer = (
        f"N = {results['num_questions']} questions, M = {results['num_members']} members; "
        "NLL, ECE, Brier: lower is better"
    )
    return _frame(title, lines, footer)


def format_comparison(results: dict[str, Any], title: str | None = None) -> str:
    """Mean member vs ensemble, plus their difference (ensemble - mean member).

    "mean member" is the mean of the members' metrics. Accuracy change is in percentage points;
    a negative change in NLL, ECE or Brier is a gain.
    """
    mean, ens = results["mean_member"], results["ensemble"]
    change = {k: ens[k] - mean[k] for k in METRIC_NAMES}
    lines = [
        _row("mean member", mean),
        _row("ensemble", ens),
        _row("change", change, signed=True),
    ]
    footer = (
        f"M = {results['num_members']} members, N = {results['num_questions']} questions; "
        "accuracy: higher is better, NLL/ECE/Brier: lower is better"
    )
    return _frame(title, lines, footer)


def format_epochs(metrics_jsonl: Path) -> str:
    """Mean member vs ensemble after every epoch (one metrics.jsonl line each): how calibration
    evolves with training."""
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    head = f"{'epoch':<7}{'split':<24}{'mean member acc/NLL/ECE':>26}{'ensemble acc/NLL/ECE':>26}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [f"{100 * r[w]['accuracy']:.1f}% {r[w]['nll']:.3f} {r[w]['ece']:.3f}"
                 for w in ("mean_member", "ensemble")]
        lines.append(f"{r['epoch']:<7}{r['split']:<24}{cells[0]:>26}{cells[1]:>26}")
    return "\n".join(lines)


def format_ood(in_key: str, ood: dict[str, dict[str, dict[str, float]]]) -> str:
    """AUROC of the main uncertainty scores for every OOD set (in-distribution: `in_key`).

    ood: OOD set key -> score name -> ``ood_metrics`` output (as in ``results.json["ood"][in_key]``).
    """
    head = f"{'OOD set (vs ' + in_key + ')':<34}" + "".join(f"{c:>26}" for c in DETECTION_SCORES)
    lines = ["OOD detection AUROC (higher is better; 0.5 = chance)", head, "-" * len(head)]
    for key, table in ood.items():
        lines.append(f"{key:<34}" + "".join(f"{table[c]['auroc']:>26.3f}" for c in DETECTION_SCORES))
    return "\n".join(lines)


def format_gain(key: str, gain: dict[str, dict[str, float]], n: int, n_resamples: int) -> str:
    """The ensemble's gain over the mean member with paired-bootstrap intervals (`bootstrap.ensemble_gain`),
    and whether each interval excludes 0."""
    head = f"{'':<8}{'ensemble minus mean member':>28}{'95% interval':>22}{'p':>8}  verdict"
    lines = [f"{key}: ensemble minus mean member, paired bootstrap over its {n} questions ({n_resamples} resamples)",
             head, "-" * len(head)]
    for metric, label, scale, better in (("accuracy", "acc %", 100.0, "higher"), ("nll", "NLL", 1.0, "lower"),
                                         ("ece", "ECE", 1.0, "lower"), ("brier", "Brier", 1.0, "lower")):
        g = gain[metric]
        d, lo, hi = (scale * g[k] for k in ("diff", "low", "high"))
        if lo > 0 or hi < 0:  # the interval's side, not the point's sign, says which way
            gained = (lo > 0) == (better == "higher")
            verdict = "ensemble better" if gained else "ensemble worse"
        else:
            verdict = "no difference shown (interval holds 0)"
        digits = 2 if metric == "accuracy" else 4
        lines.append(f"{label:<8}{d:>+28.{digits}f}{f'[{lo:+.{digits}f}, {hi:+.{digits}f}]':>22}"
                     f"{g['p_value']:>8.3f}  {verdict}")
    return "\n".join(lines)

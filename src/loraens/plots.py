"""Matplotlib figures of a report, each returned as PNG bytes (the report embeds them)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .arrays import equal_width_bins, prepare, top_label  # noqa: E402


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def reliability_diagram(curves: Mapping[str, np.ndarray], targets: np.ndarray, n_bins: int = 15) -> bytes:
    """Accuracy per confidence bin for each named [N, C] distribution, plus confidence histograms.

    Left: one line per model (bin accuracy vs bin confidence; the diagonal is perfect calibration).
    Right: how many questions fall into each confidence bin. The bins are those of ECE
    (`arrays.equal_width_bins`), so the figure shows the gaps that ECE sums.

    Args:
        curves: name -> float ``[N, C]`` probabilities.  targets: int ``[N]``.  n_bins: bins on [0, 1].
    """
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    for name, probs in curves.items():
        conf, correct = top_label(*prepare(probs, targets))
        bins = equal_width_bins(conf, correct, n_bins)
        ax.plot(bins.mean_confidence().numpy(), bins.accuracy().numpy(), marker="o", label=name)
        # Bars of the bin counts (what `hist.hist` would draw), so a confidence exactly on an edge
        # is counted in the same (lo, hi] bin as in the line and in ECE.
        edges = bins.edges.numpy()
        hist.bar(edges[:-1], bins.count.numpy(), width=np.diff(edges), align="edge", alpha=0.5, label=name)
    ax.set(xlabel="confidence (top-choice probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title="Reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="confidence (top-choice probability)", ylabel="questions", title="Confidence histogram")
    hist.legend(fontsize=8)
    return _png(fig)


def accuracy_coverage(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Accuracy of the most certain questions vs the share of questions answered."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (coverage, acc) in curves.items():
        ax.plot(coverage, acc, label=name)
    ax.set(xlabel="coverage (share of questions answered, most certain first)", ylabel="accuracy",
           xlim=(0, 1), title="Selective prediction")
    ax.legend(fontsize=8)
    return _png(fig)


def roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> bytes:
    """ROC curves of OOD detection: name -> (fpr, tpr, auroc)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.set(xlabel="false positive rate (in-distribution flagged)", ylabel="true positive rate (OOD flagged)",
           title=title)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def score_histograms(score_in: np.ndarray, scores_out: Mapping[str, np.ndarray], in_name: str, score: str) -> bytes:
    """Distribution of one uncertainty score on the in-distribution set and each OOD set."""
    fig, ax = plt.subplots(figsize=(6, 4))
    everything = np.concatenate([score_in, *scores_out.values()])
    bins = np.linspace(everything.min(), everything.max() + 1e-9, 30)
    ax.hist(score_in, bins=bins, alpha=0.6, density=True, label=f"{in_name} (in-distribution)")
    for name, values in scores_out.items():
        ax.hist(values, bins=bins, alpha=0.4, density=True, label=name)
    ax.set(xlabel=score, ylabel="density", title=f"{score}: in-distribution vs OOD")
    ax.legend(fontsize=8)
    return _png(fig)


def ensemble_size(rows: Sequence[Mapping], metrics: Sequence[str] = ("accuracy", "nll", "ece")) -> bytes:
    """Metric vs number of members: the first m members, and the mean (± std) over random m-subsets."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    m = [r["m"] for r in rows]
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        first = [r["first"][metric] for r in rows]
        mean = np.array([r["random_mean"][metric] for r in rows])
        std = np.array([r["random_std"][metric] for r in rows])
        ax.plot(m, first, marker="o", label="first m members")
        ax.plot(m, mean, marker="s", label="random m-subsets (mean ± std)")
        ax.fill_between(m, mean - std, mean + std, alpha=0.2)
        ax.set(xlabel="members in the ensemble (m)", ylabel=metric, title=f"{metric} vs ensemble size")
        ax.set_xticks(m)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    return _png(fig)


# --- Sweep report (datasets x variants x seeds) -------------------------------------------------

Band = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x, mean, low, high (low/high: min/max over seeds)


def _band(ax: plt.Axes, band: Band, label: str) -> None:
    """One line (mean) with a shaded low..high band in the same colour."""
    x, mean, low, high = band
    (line,) = ax.plot(x, mean, marker="o", label=label)
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)


def metric_vs_epoch(panels: Mapping[str, Mapping[str, Mapping[str, Band]]], metrics: Sequence[str]) -> bytes:
    """Metric vs training epoch: one row per metric, one column per dataset, one line per model.

    panels: dataset -> model (e.g. "mean member", "ensemble") -> metric -> (epochs, mean, low, high).
    `metrics` are the keys drawn, in row order; they are also the y-axis labels.
    """
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(metrics), max(len(panels), 1), figsize=(3.8 * max(len(panels), 1), 2.7 * len(metrics)),
                             squeeze=False)
    for col, (dataset, models) in enumerate(panels.items()):
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            for model, curves in models.items():
                if metric in curves:
                    _band(ax, curves[metric], model)
            ax.set(xlabel="epoch", ylabel=metric)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if row == 0:
                ax.set_title(dataset)
    axes[0, 0].legend(fontsize=8)
    return _png(fig)


def grouped_bars(labels: Sequence[str], panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]
                 ) -> bytes:
    """Grouped bar charts, one subplot per panel (metric): one group per label, one bar per series.

    panels: metric -> series -> (mean, low, high), three arrays aligned with `labels`; whiskers go from
    low to high; a NaN mean draws no bar.
    """
    width_in = max(4.0, 0.9 * len(labels) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in * len(panels), 4.0), squeeze=False)
    x = np.arange(len(labels))
    for ax, (metric, series) in zip(axes[0], panels.items()):
        width = 0.8 / max(len(series), 1)
        for k, (name, (mean, low, high)) in enumerate(series.items()):
            mean, low, high = (np.asarray(a, dtype=float) for a in (mean, low, high))
            ok = np.isfinite(mean)
            pos = x[ok] - 0.4 + width * (k + 0.5)
            ax.bar(pos, mean[ok], width, label=name,
                   yerr=np.stack([mean[ok] - low[ok], high[ok] - mean[ok]]), capsize=3)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set(ylabel=metric, title=metric)
    axes[0, 0].legend(fontsize=8)
    return _png(fig)


def ensemble_size_by_dataset(curves: Mapping[str, Mapping[str, Band]], metrics: Sequence[str]) -> bytes:
    """Metric vs number of members m: one subplot per metric, one line (mean, shaded band) per dataset.

    curves: dataset -> metric -> (m, mean, low, high).
    """
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for dataset, by_metric in curves.items():
            if metric in by_metric:
                _band(ax, by_metric[metric], dataset)
        ax.set(xlabel="members in the ensemble (m, first m)", ylabel=metric, title=f"{metric} vs ensemble size")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(fontsize=8)
    return _png(fig)


def guarantee_curves(curves: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    """What the guarantees cost, per model: conformal coverage and set size vs alpha, and the share of
    questions the risk-controlled rule answers (and the error among them) vs its target risk.

    curves: model -> {"alpha", "coverage", "size", "risk_target", "kept", "realised"} (arrays).
    """
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    cov, size, kept = axes
    alphas = next(iter(curves.values()))["alpha"]
    cov.plot(1 - alphas, 1 - alphas, ls="--", color="grey", label="target 1 - alpha")
    targets = next(iter(curves.values()))["risk_target"]
    for name, c in curves.items():
        (line,) = cov.plot(1 - c["alpha"], c["coverage"], marker="o", label=name)
        size.plot(c["alpha"], c["size"], marker="o", label=name, color=line.get_color())
        kept.plot(c["risk_target"], c["kept"], marker="o", label=f"{name}: answered", color=line.get_color())
        kept.plot(c["risk_target"], c["realised"], marker="x", ls=":", label=f"{name}: error among answered",
                  color=line.get_color())
    kept.plot(targets, targets, ls="--", color="grey", label="target risk")
    cov.set(xlabel="1 - alpha (promised coverage)", ylabel="test coverage of the LAC sets",
            title="Conformal sets: coverage")
    size.set(xlabel="alpha", ylabel="mean LAC set size (choices)", title="Conformal sets: size")
    kept.set(xlabel="target risk r (SGR)", ylabel="share of test questions", ylim=(0, 1),
             title="Abstention at a guaranteed risk")
    cov.legend(fontsize=8)
    kept.legend(fontsize=7, loc="center right")
    return _png(fig)

"""ROC curve and reliability diagram as PNG files (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy.typing as npt

from node.lab.train.metrics import reliability_bins, roc_auc, roc_curve


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(y_true: npt.ArrayLike, y_prob: npt.ArrayLike, path: Path, *, title: str) -> Path:
    """ROC curve with its AUC in the legend."""
    plt = _pyplot()
    fpr, tpr = roc_curve(y_true, y_prob)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc(y_true, y_prob):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    return _finish(
        plt, fig, ax, path, x="1 - specificity", y="sensitivity", title=title, legend="lower right"
    )


def plot_reliability(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike, path: Path, *, title: str, ece: float
) -> Path:
    """Reliability diagram: observed rate against mean predicted probability per bin."""
    plt = _pyplot()
    bins = [b for b in reliability_bins(y_true, y_prob) if b.count]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    ax.plot(
        [b.mean_probability for b in bins],
        [b.observed_rate for b in bins],
        marker="o",
        label=f"model (ECE {ece:.3f})",
    )
    for b in bins:
        ax.annotate(str(b.count), (b.mean_probability, b.observed_rate), fontsize=7)
    return _finish(
        plt,
        fig,
        ax,
        path,
        x="predicted probability (positive class)",
        y="observed frequency",
        title=title,
        legend="upper left",
    )


def _finish(
    plt: Any, fig: Any, ax: Any, path: Path, *, x: str, y: str, title: str, legend: str
) -> Path:
    """Axis labels, unit square, title and legend; save the PNG and free the figure."""
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=10)
    ax.legend(loc=legend)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

"""Evaluation metrics for binary and multi-class models (pure numpy, no torch).

AUC is the Mann-Whitney statistic (ties count half). Confidence intervals are percentile
bootstraps over patients (each patient contributes one prediction). ECE uses equal-width bins
on the predicted probability of the positive class, so the reliability diagram and the ECE
describe the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReliabilityBin:
    """One bin of a reliability diagram."""

    low: float
    high: float
    count: int
    mean_probability: float  # NaN when the bin is empty
    observed_rate: float  # NaN when the bin is empty


def sigmoid(z: npt.ArrayLike) -> Array:
    """1 / (1 + exp(-z)) elementwise, the logit clipped to +-50 so exp never overflows."""
    out: Array = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, dtype=np.float64), -50.0, 50.0)))
    return out


def log_loss(y_true: npt.ArrayLike, y_prob: npt.ArrayLike) -> float:
    """Mean binary negative log-likelihood of probabilities (clipped to 1e-12 from 0 and 1)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    q = np.clip(np.asarray(y_prob, dtype=np.float64).ravel(), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def brief(report: dict[str, Any]) -> dict[str, Any]:
    """A binary_report without its reliability bins (for per-fold and per-model summaries)."""
    return {k: v for k, v in report.items() if k != "reliability"}


def _check_binary(y_true: npt.ArrayLike, y_prob: npt.ArrayLike) -> tuple[Array, Array]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y_true must hold only 0 and 1")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("y_prob must be probabilities in 0..1")
    return y, p


def roc_auc(y_true: npt.ArrayLike, y_prob: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U / n_pos n_neg); NaN when one class is absent."""
    y, p = _check_binary(y_true, y_prob)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(p.size, dtype=np.float64)
    sorted_p = p[order]
    # average ranks for ties
    i = 0
    while i < p.size:
        j = i
        while j + 1 < p.size and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: npt.ArrayLike, y_prob: npt.ArrayLike) -> tuple[Array, Array]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y, p = _check_binary(y_true, y_prob)
    n_pos = max(int(y.sum()), 1)
    n_neg = max(y.size - int(y.sum()), 1)
    thresholds = np.unique(p)[::-1]
    fpr = [0.0]
    tpr = [0.0]
    for t in thresholds:
        pred = p >= t
        tpr.append(float((pred & (y == 1)).sum() / n_pos))
        fpr.append(float((pred & (y == 0)).sum() / n_neg))
    if fpr[-1] != 1.0 or tpr[-1] != 1.0:
        fpr.append(1.0)
        tpr.append(1.0)
    return np.asarray(fpr), np.asarray(tpr)


def bootstrap_auc_ci(
    y_true: npt.ArrayLike,
    y_prob: npt.ArrayLike,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC, resampling patients; resamples with one class skip."""
    y, p = _check_binary(y_true, y_prob)
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        aucs.append(roc_auc(yb, p[idx]))
    if not aucs:
        return (math.nan, math.nan)
    lo, hi = np.quantile(np.asarray(aucs), [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def reliability_bins(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike, *, n_bins: int = 10
) -> tuple[ReliabilityBin, ...]:
    """Equal-width bins on the positive-class probability: count, mean prediction, observed rate."""
    y, p = _check_binary(y_true, y_prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds edges[i] <= p < edges[i+1]; p == 1 goes in the last bin
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    bins = []
    for i in range(n_bins):
        mask = which == i
        n = int(mask.sum())
        bins.append(
            ReliabilityBin(
                low=float(edges[i]),
                high=float(edges[i + 1]),
                count=n,
                mean_probability=float(p[mask].mean()) if n else math.nan,
                observed_rate=float(y[mask].mean()) if n else math.nan,
            )
        )
    return tuple(bins)


def expected_calibration_error(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike, *, n_bins: int = 10
) -> float:
    """ECE: the count-weighted mean gap between predicted probability and observed rate."""
    bins = reliability_bins(y_true, y_prob, n_bins=n_bins)
    total = sum(b.count for b in bins)
    if total == 0:
        return math.nan
    return float(
        sum(b.count * abs(b.mean_probability - b.observed_rate) for b in bins if b.count) / total
    )


def ece_if_calibrated(
    y_prob: npt.ArrayLike, *, n_sim: int = 500, seed: int = 0, n_bins: int = 10
) -> tuple[float, float]:
    """(mean, 95th percentile) ECE of a perfectly calibrated model making these predictions:
    outcomes drawn as Bernoulli(p). A finite test set has an ECE floor above 0; an observed ECE
    inside this range is what perfect calibration would also show at this n."""
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if p.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    sims = [
        expected_calibration_error((rng.random(p.size) < p).astype(np.float64), p, n_bins=n_bins)
        for _ in range(n_sim)
    ]
    return float(np.mean(sims)), float(np.quantile(sims, 0.95))


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def binary_report(
    y_true: npt.ArrayLike,
    y_prob: npt.ArrayLike,
    *,
    threshold: float = 0.5,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every figure a model card needs for a binary task, as plain JSON-ready values."""
    y, p = _check_binary(y_true, y_prob)
    pred = p >= threshold
    tp = int((pred & (y == 1)).sum())
    tn = int((~pred & (y == 0)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    sens = _ratio(tp, tp + fn)
    ppv = _ratio(tp, tp + fp)
    f1 = 2 * ppv * sens / (ppv + sens) if ppv + sens > 0 else math.nan
    lo, hi = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    bins = reliability_bins(y, p)
    return {
        "n_patients": int(y.size),
        "n_positive": int(y.sum()),
        "threshold": threshold,
        "auc": roc_auc(y, p),
        "auc_ci": [lo, hi],
        "accuracy": _ratio(tp + tn, int(y.size)),
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "f1": f1,
        "ece": expected_calibration_error(y, p),
        "ece_if_calibrated": list(ece_if_calibrated(p, seed=seed)),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "reliability": [
            {
                "low": b.low,
                "high": b.high,
                "count": b.count,
                "mean_probability": None if b.count == 0 else b.mean_probability,
                "observed_rate": None if b.count == 0 else b.observed_rate,
            }
            for b in bins
        ],
    }


def _log_softmax(z: Array) -> Array:
    z = z - z.max(axis=1, keepdims=True)
    out: Array = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def nll(logits: npt.ArrayLike, labels: npt.ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer labels under softmax(logits / T).

    A 1-D ``logits`` is a binary logit (log-odds of class 1)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if z.ndim == 1:
        z = np.stack([np.zeros_like(z), z], axis=1)
    lp = _log_softmax(z / temperature)
    return float(-lp[np.arange(y.size), y].mean())


def fit_temperature(logits: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """The temperature minimising validation NLL (log-grid search, then golden-section refine)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if y.size == 0:
        return 1.0
    return _minimise_temperature(lambda t: nll(z, y, t))


def series_mean_probabilities(
    slice_logits: npt.ArrayLike, series: npt.ArrayLike, temperature: float = 1.0
) -> Array:
    """(n_series, n_classes): each series' mean over its slices of softmax(logits / T), the
    probability the sequence CNN serves for a series. ``series`` gives each slice's series
    index (0..n_series-1, every index present)."""
    z = np.asarray(slice_logits, dtype=np.float64)
    s = np.asarray(series, dtype=np.int64).ravel()
    if z.ndim != 2 or z.shape[0] != s.size:
        raise ValueError(f"need (n_slices, n_classes) logits for {s.size} slices, got {z.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    p = np.exp(_log_softmax(z / temperature))
    n = int(s.max()) + 1 if s.size else 0
    sums = np.zeros((n, z.shape[1]), dtype=np.float64)
    np.add.at(sums, s, p)
    counts = np.bincount(s, minlength=n).astype(np.float64)
    if np.any(counts == 0):
        raise ValueError("every series index from 0 to the largest needs at least one slice")
    out: Array = sums / counts[:, None]
    return out


def probability_nll(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Mean negative log-likelihood of integer labels under class probabilities (n, k)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    return float(-np.log(np.clip(p[np.arange(y.size), y], 1e-12, 1.0)).mean())


def top_label_ece(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """ECE of the top-label confidence: the highest probability against whether its class is
    the true one (10 equal-width bins)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return expected_calibration_error(correct, p.max(axis=1))


def fit_series_temperature(
    slice_logits: npt.ArrayLike, series: npt.ArrayLike, labels: npt.ArrayLike
) -> float:
    """The temperature minimising the NLL of the series mean probability
    (series_mean_probabilities) of labelled series; ``labels`` has one entry per series."""
    z = np.asarray(slice_logits, dtype=np.float64)
    s = np.asarray(series, dtype=np.int64).ravel()
    y = np.asarray(labels, dtype=np.int64).ravel()
    if y.size == 0:
        return 1.0
    return _minimise_temperature(lambda t: probability_nll(series_mean_probabilities(z, s, t), y))


def _minimise_temperature(loss: Callable[[float], float]) -> float:
    """The temperature in 0.05..50 minimising loss(T): a log-grid search, then golden-section
    refinement between the best grid point's neighbours."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(50.0), 121))
    losses = [loss(float(t)) for t in grid]
    k = int(np.argmin(losses))
    lo = float(grid[max(k - 1, 0)])
    hi = float(grid[min(k + 1, grid.size - 1)])
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(40):
        c = b - g * (b - a)
        d = a + g * (b - a)
        if loss(c) < loss(d):
            b = d
        else:
            a = c
    return float((a + b) / 2)


def multiclass_report(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall and the confusion matrix (true -> predicted)."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    q = np.asarray(y_pred, dtype=np.int64).ravel()
    if y.shape != q.shape:
        raise ValueError(f"y_true has {y.size} values but y_pred has {q.size}")
    k = len(class_names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, q), 1)
    per_class = {}
    for i, name in enumerate(class_names):
        per_class[name] = {
            "precision": _ratio(int(cm[i, i]), int(cm[:, i].sum())),
            "recall": _ratio(int(cm[i, i]), int(cm[i, :].sum())),
            "support": int(cm[i, :].sum()),
        }
    return {
        "n": int(y.size),
        "accuracy": _ratio(int(np.trace(cm)), int(y.size)),
        "per_class": per_class,
        "confusion": {
            class_names[i]: {class_names[j]: int(cm[i, j]) for j in range(k)} for i in range(k)
        },
    }


def fit_platt(
    logits: npt.ArrayLike, labels: npt.ArrayLike, *, l2: float = 1e-3
) -> tuple[float, float]:
    """Platt scaling of a binary logit: (a, b) with p = sigmoid(a z + b), by Newton's method
    with step halving (a full Newton step from a start far from the optimum, e.g. logits all
    near -3, overshoots and diverges).

    A temperature alone can only stretch the logit; the bias also corrects the asymmetry of a
    mean over slices (a diluted positive vs a uniformly negative control)."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.size == 0 or y.min() == y.max():
        return 1.0, 0.0
    x = np.stack([z, np.ones_like(z)], axis=1)

    def loss(w: Array) -> float:
        s = x @ w
        return float(np.sum(np.logaddexp(0.0, s) - y * s) + 0.5 * l2 * float(w @ w))

    w = np.array([1.0, 0.0])
    current = loss(w)
    for _ in range(100):
        p = sigmoid(x @ w)
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            trial = w - t * step
            value = loss(trial)
            if value <= current:
                break
            t *= 0.5
        else:
            break  # no step lowers the loss: at the optimum to numerical precision
        w, current = trial, value
        if np.abs(t * step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])

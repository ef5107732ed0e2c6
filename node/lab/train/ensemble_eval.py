"""Study-level ensemble: score it against its single models, and fit its weights and temperature.

Every labelled study of a task is run the way the node serves it: each series goes to the
bundles the rule file routes its sequence to (``bundles.predict_series``), and the study answer
is ``ensemble.fuse_task`` with the task's rules. Single models are scored on the same studies
(several series of one bundle combined by their mean logit, as the ensemble does first).

Fitting (``fit_weights``) is pure: on studies where every route ran it finds non-negative
coefficients c minimising the log-loss of sigmoid(sum c_i z_i) over the bundles' calibrated
logits z_i. That is exactly the weighted-mean-logit ensemble with weights w_i = c_i / max(c)
and temperature T = 1 / sum(c), so the result is written back as rule-file values. Fit on a
calibration set that is neither the bundles' training data nor the test set.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from node import NOT_FOR_CLINICAL_USE
from node.bundles.bundle import Bundle, predict_series
from node.bundles.detector import Detector
from node.config import TaskSettings
from node.ensemble import fuse_task, logit
from node.lab.train.data import DataError, SeriesItem, load_volume
from node.lab.train.evaluate import write_results
from node.lab.train.metrics import (
    binary_report,
    brief,
    expected_calibration_error,
    log_loss,
    roc_auc,
    sigmoid,
)
from node.records import SeriesPrediction

Array = npt.NDArray[np.float64]
VolumeLoader = Callable[[SeriesItem], Any]
Progress = Callable[[str], None]
MIN_COEFFICIENT = 1e-3  # rule-file weights must be > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyOutputs:
    """One labelled study: its truth (1 = the task's positive class) and every model answer."""

    study_uid: str
    truth: int
    predictions: tuple[SeriesPrediction, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class EnsembleFit:
    """Rule-file values fitted on calibration studies, with the log-loss before and after."""

    weights: dict[str, float]
    temperature: float
    n_studies: int
    nll_rules: float  # mean log-loss of the rules as given
    nll_fitted: float  # mean log-loss with the fitted weights and temperature


def task_labels(
    task_rules: TaskSettings, bundles: Mapping[str, Bundle | Detector]
) -> tuple[str, str]:
    """(negative, positive) label names shared by every bundle of the task."""
    names = {tuple(bundles[r.bundle].labels) for r in task_rules.models}
    if len(names) != 1:
        raise DataError(f"the task's bundles disagree on their labels: {sorted(names)}")
    labels = names.pop()
    if len(labels) != 2:
        raise DataError(f"a task bundle needs two labels, not {labels}")
    return labels[0], labels[1]


def collect_outputs(
    task: str,
    task_rules: TaskSettings,
    bundles: Mapping[str, Bundle | Detector],
    items: Sequence[SeriesItem],
    *,
    load: VolumeLoader = load_volume,
    progress: Progress | None = None,
) -> tuple[StudyOutputs, ...]:
    """Every labelled study's model answers: each routed series is loaded once and run through
    every bundle its sequence is routed to (the served code path)."""
    negative, positive = task_labels(task_rules, bundles)
    routed = {s for r in task_rules.models for s in r.sequences}
    by_study: dict[str, list[SeriesItem]] = defaultdict(list)
    for it in items:
        if it.label is not None:
            by_study[it.study_uid].append(it)
    out = []
    for i, (study, members) in enumerate(sorted(by_study.items())):
        label = members[0].label
        if label not in (negative, positive):
            raise DataError(f"label '{label}' is not one of {(negative, positive)} for {task}")
        preds: list[SeriesPrediction] = []
        for it in members:
            if it.sequence not in routed:
                continue
            volume = load(it)
            for route in task_rules.models:
                if it.sequence in route.sequences:
                    bundle = bundles[route.bundle]
                    preds.append(predict_series(bundle, volume, sequence=it.sequence))
        out.append(
            StudyOutputs(study_uid=study, truth=int(label == positive), predictions=tuple(preds))
        )
        if progress is not None and (i + 1) % 25 == 0:
            progress(f"[{task}] ran {i + 1}/{len(by_study)} studies")
    if not out:
        raise DataError(f"no study labelled for task {task}")
    return tuple(out)


def bundle_logits(outputs: Sequence[StudyOutputs], bundle_names: Sequence[str]) -> Array:
    """(studies, bundles): mean calibrated logit of each bundle's series, NaN where none ran."""
    z = np.full((len(outputs), len(bundle_names)), np.nan)
    for i, study in enumerate(outputs):
        for j, name in enumerate(bundle_names):
            values = [logit(p.probability) for p in study.predictions if p.model_id == name]
            if values:
                z[i, j] = math.fsum(values) / len(values)
    return z


def fit_weights(z: npt.ArrayLike, y: npt.ArrayLike) -> tuple[tuple[float, ...], float]:
    """(weights with max 1, temperature) of the weighted-mean-logit ensemble minimising the
    log-loss on complete rows of z (studies, bundles); weights stay > 0 as the rules require."""
    from scipy.optimize import minimize

    zz = np.asarray(z, dtype=np.float64)
    yy = np.asarray(y, dtype=np.float64).ravel()
    if zz.ndim != 2 or zz.shape[0] != yy.size:
        raise ValueError("z must be (studies, bundles) with one truth per study")
    keep = np.all(np.isfinite(zz), axis=1)
    zz, yy = zz[keep], yy[keep]
    if yy.size == 0 or yy.min() == yy.max():
        raise DataError("fitting needs complete studies of both classes")
    m = zz.shape[1]

    def loss(c: Array) -> tuple[float, Array]:
        p = sigmoid(zz @ c)
        return log_loss(yy, p), (zz.T @ (p - yy)) / yy.size

    result = minimize(
        loss,
        np.full(m, 1.0 / m),
        jac=True,
        method="L-BFGS-B",
        bounds=[(MIN_COEFFICIENT, None)] * m,
    )
    c = np.asarray(result.x, dtype=np.float64)
    weights = tuple(float(v) for v in c / c.max())
    return weights, float(1.0 / c.sum())


def fit_ensemble(
    task: str, task_rules: TaskSettings, outputs: Sequence[StudyOutputs]
) -> EnsembleFit:
    """Weights and temperature for the task's weighted_mean_logit fusion, from the outputs."""
    names = [r.bundle for r in task_rules.models]
    z = bundle_logits(outputs, names)
    y = np.asarray([o.truth for o in outputs], dtype=np.float64)
    weights, temperature = fit_weights(z, y)
    complete = np.all(np.isfinite(z), axis=1)
    fitted = task_rules.model_copy(
        update={
            "method": "weighted_mean_logit",
            "temperature": temperature,
            "models": tuple(
                r.model_copy(update={"weight": w})
                for r, w in zip(task_rules.models, weights, strict=True)
            ),
        }
    )
    done = [o for o, ok in zip(outputs, complete, strict=True) if ok]
    truth = np.asarray([o.truth for o in done], dtype=np.float64)
    return EnsembleFit(
        weights={n: round(w, 3) for n, w in zip(names, weights, strict=True)},
        temperature=round(temperature, 3),
        n_studies=len(done),
        nll_rules=log_loss(truth, _fused(task, task_rules, done)),
        nll_fitted=log_loss(truth, _fused(task, fitted, done)),
    )


def _fused(task: str, task_rules: TaskSettings, outputs: Sequence[StudyOutputs]) -> Array:
    """The ensemble probability of each study (NaN when not assessable)."""
    values = []
    for o in outputs:
        p = fuse_task(task, task_rules, o.predictions).probability
        values.append(math.nan if p is None else p)
    return np.asarray(values, dtype=np.float64)


def _paired_bootstrap(
    y: Array, p_a: Array, p_b: Array, *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile CI of AUC(a) - AUC(b), resampling studies (pairs kept together)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        if y[idx].min() == y[idx].max():
            continue
        diffs.append(roc_auc(y[idx], p_a[idx]) - roc_auc(y[idx], p_b[idx]))
    if not diffs:
        return (math.nan, math.nan)
    lo, hi = np.quantile(np.asarray(diffs), [0.025, 0.975])
    return (float(lo), float(hi))


def evaluate_ensemble(
    task: str,
    task_rules: TaskSettings,
    outputs: Sequence[StudyOutputs],
    *,
    seed: int = 0,
    out: Path | None = None,
) -> dict[str, Any]:
    """Patient-level metrics of each single model and of the ensemble, and their comparison on
    the studies where every model ran (the ensemble is "no worse" when its AUC is at least the
    best single model's)."""
    names = [r.bundle for r in task_rules.models]
    y_all = np.asarray([o.truth for o in outputs], dtype=np.float64)
    z = bundle_logits(outputs, names)
    fused = _fused(task, task_rules, outputs)
    assessable = np.isfinite(fused)
    if not assessable.any():
        raise DataError(f"no study had a series any {task} model could read")
    singles: dict[str, Any] = {}
    for j, name in enumerate(names):
        ran = np.isfinite(z[:, j])
        if ran.any() and 0 < y_all[ran].sum() < ran.sum():
            y_j, p_j = y_all[ran], sigmoid(z[ran, j])
            singles[name] = brief(binary_report(y_j, p_j, seed=seed))
            singles[name]["level"] = "patient (one study per patient; series by mean logit)"
            if out is not None:
                write_results(
                    out / name,
                    y_j,
                    p_j,
                    singles[name],
                    roc_title=f"{name}: ROC (patient level)",
                    reliability_title=name,
                )
    ensemble = binary_report(y_all[assessable], fused[assessable], seed=seed)
    complete = np.all(np.isfinite(z), axis=1)
    comparison: dict[str, Any] = {"n_patients": int(complete.sum())}
    if complete.any() and 0 < y_all[complete].sum() < complete.sum():
        y = y_all[complete]
        single_p = {n: sigmoid(z[complete, j]) for j, n in enumerate(names)}
        best = max(names, key=lambda n: (roc_auc(y, single_p[n]), -names.index(n)))
        auc_e, auc_b = roc_auc(y, fused[complete]), roc_auc(y, single_p[best])
        lo, hi = _paired_bootstrap(y, fused[complete], single_p[best], seed=seed)
        comparison.update(
            {
                "best_single_model": best,
                "best_single_auc": auc_b,
                "ensemble_auc": auc_e,
                "auc_difference": auc_e - auc_b,
                "auc_difference_ci": [lo, hi],
                "best_single_ece": expected_calibration_error(y, single_p[best]),
                "ensemble_ece": expected_calibration_error(y, fused[complete]),
                "ensemble_no_worse": bool(auc_e >= auc_b),
            }
        )
    report: dict[str, Any] = {
        "task": task,
        "level": "patient (one study per patient); ensemble = node.ensemble.fuse_task",
        "rules": {
            "method": task_rules.method,
            "temperature": task_rules.temperature,
            "weights": {r.bundle: r.weight for r in task_rules.models},
        },
        "n_patients": int(y_all.size),
        "n_not_assessable": int((~assessable).sum()),
        "auc": ensemble["auc"],
        "auc_ci": ensemble["auc_ci"],
        "ece": ensemble["ece"],
        "ensemble": ensemble,
        "single_models": singles,
        "comparison": comparison,
        "note": NOT_FOR_CLINICAL_USE,
    }
    if out is not None:
        write_results(
            out,
            y_all[assessable],
            fused[assessable],
            report,
            roc_title=f"{task} ensemble: ROC (patient level)",
            reliability_title=f"{task} ensemble",
        )
    return report


def rules_snippet(task: str, task_rules: TaskSettings, fit: EnsembleFit) -> str:
    """The rule-file lines to paste under tasks: for the fitted values."""
    lines = [f"  {task}:", "    models:"]
    for r in task_rules.models:
        seqs = ", ".join(s.value for s in r.sequences)
        lines += [
            f"      - bundle: {r.bundle}",
            f"        sequences: [{seqs}]",
            f"        weight: {fit.weights[r.bundle]:g}",
        ]
    lines += ["    method: weighted_mean_logit", f"    temperature: {fit.temperature:g}"]
    return "\n".join(lines)

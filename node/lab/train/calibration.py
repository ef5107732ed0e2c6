"""Refit a network bundle's calibration on labelled series that were not used for training.

Training fits the calibration on its own validation split, which shares the training data's
style: a bundle that is confident on that style can be confidently wrong on another (the
sequence CNN on rendering style b: series ECE 0.217). ``calibrate_bundle`` runs the bundle on
other labelled data exactly as the node serves it, fits the calibration on those series and
writes it to inference.json, its one place; the weights and their SHA-256 are untouched.
metadata.json records where the calibration came from (``calibration``: the data, the number
of series, log-loss and ECE before and after, and the same on held-out sets) and the model card
is rewritten from it.

What is fitted is what the bundle's training fits:

- a task bundle (binary): Platt scaling of the series mean logit, p = sigmoid(z / T + b)
  (temperature only if the fitted slope is not positive), node.lab.train.trainer.calibrate;
- the sequence CNN (multi-class): a temperature only, here chosen to minimise the log-loss of
  the **series** probability the node serves, the mean over the central slices of
  softmax(logits / T) (node.bundles.bundle.classify_slices), not the slices' own log-loss.

The network runs once per series; every temperature is then tried on the stored logits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from node.bundles.bundle import (
    Bundle,
    load_bundle,
    read_bundle_config,
    sequence_slice_logits,
    task_slice_logits,
    write_calibration,
)
from node.bundles.config import SEQUENCE_TASK
from node.errors import LoadError
from node.lab.train.data import DataError, SeriesItem, load_volume
from node.lab.train.evaluate import model_card
from node.lab.train.metrics import (
    expected_calibration_error,
    fit_series_temperature,
    log_loss,
    probability_nll,
    roc_auc,
    series_mean_probabilities,
    sigmoid,
    top_label_ece,
)
from node.lab.train.trainer import calibrate
from node.log import get_logger
from node.records import SeriesVolume

log = get_logger(__name__)

VolumeLoader = Callable[[SeriesItem], SeriesVolume]
Progress = Callable[[str], None]

SEQUENCE_METHOD = (
    "temperature minimising the log-loss of the series probability (mean over the central"
    " slices of softmax(logits / T), as served)"
)
TASK_METHOD = (
    "Platt scaling of the series mean logit, p = sigmoid(z / T + b), minimising the log-loss"
    " (temperature only if the fitted slope is not positive)"
)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SeriesOutputs:
    """A bundle's uncalibrated outputs on labelled series, as served.

    Sequence CNN: ``logits`` (n_slices, n_classes) of every read slice and ``series`` each
    slice's series index. Task bundle: ``logits`` (n_series,) series mean logits (positive minus
    negative) and ``series`` empty. ``labels`` is each series' class index."""

    multiclass: bool
    logits: npt.NDArray[np.float64]
    series: npt.NDArray[np.int64]
    labels: npt.NDArray[np.int64]
    n_patients: int
    skipped: tuple[str, ...]  # series UIDs that could not be loaded

    @property
    def n_series(self) -> int:
        """How many series were scored."""
        return int(self.labels.size)


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationScore:
    """How well one calibration fits a set of series."""

    temperature: float
    calibration_bias: float
    nll: float  # mean negative log-likelihood of the true class
    ece: float  # sequence: top-label ECE; task: ECE of the positive class (10 bins)
    auc: float  # sequence: macro one-vs-rest; task: binary

    def as_json(self) -> dict[str, float]:
        """The record as metadata.json stores it (rounded)."""
        return {
            "temperature": round(self.temperature, 4),
            "calibration_bias": round(self.calibration_bias, 4),
            "nll": round(self.nll, 4),
            "ece": round(self.ece, 4),
            "auc": round(self.auc, 4),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SetScores:
    """One set of series scored with the bundle's calibration before and after the fit."""

    data: str
    n_series: int
    n_patients: int
    before: CalibrationScore
    after: CalibrationScore

    def as_json(self) -> dict[str, Any]:
        """The record as metadata.json stores it."""
        return {
            "data": self.data,
            "n_series": self.n_series,
            "n_patients": self.n_patients,
            "before": self.before.as_json(),
            "after": self.after.as_json(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationFit:
    """A calibration fitted on one set of series, scored there and on held-out sets."""

    method: str
    temperature: float
    calibration_bias: float
    fitted_on: SetScores
    held_out: tuple[SetScores, ...]
    applied: bool  # whether inference.json now holds it (the bundle serves it)
    recorded: bool  # whether metadata.json's calibration record and the card describe it

    def as_json(self) -> dict[str, Any]:
        """metadata.json's ``calibration`` record."""
        return {
            "method": self.method,
            "applied": self.applied,
            "temperature": round(self.temperature, 4),
            "calibration_bias": round(self.calibration_bias, 4),
            "fitted_on": self.fitted_on.as_json(),
            "held_out": [s.as_json() for s in self.held_out],
        }


def _macro_auc(y: npt.NDArray[np.int64], probs: npt.NDArray[np.float64]) -> float:
    aucs = [
        roc_auc((y == k).astype(int), probs[:, k])
        for k in range(probs.shape[1])
        if 0 < int((y == k).sum()) < y.size
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def series_outputs(
    bundle: Bundle,
    items: Sequence[SeriesItem],
    *,
    load: VolumeLoader = load_volume,
    progress: Progress | None = None,
) -> SeriesOutputs:
    """Run the bundle once on every labelled series it reads (the sequence CNN: every series;
    a task bundle: its input sequences with a task label), as the node serves it."""
    meta = bundle.metadata
    multiclass = meta.task == SEQUENCE_TASK
    if multiclass:
        chosen = list(items)
    else:
        wanted = {s.value for s in meta.sequences}
        chosen = [it for it in items if it.sequence.value in wanted and it.label is not None]
    rows: list[npt.NDArray[np.float64]] = []
    series: list[int] = []
    labels: list[int] = []
    groups: set[str] = set()
    skipped: list[str] = []
    for i, it in enumerate(chosen):
        truth = it.sequence.value if multiclass else it.label
        if truth not in meta.labels:
            raise DataError(f"label '{truth}' is not one of {meta.labels}")
        try:
            volume = load(it)
        except LoadError:
            skipped.append(it.series_uid)
            continue
        if multiclass:
            _idx, logits = sequence_slice_logits(bundle, volume, meta.slice_n)
            z = logits.double().numpy()
            series.extend([len(labels)] * z.shape[0])
            rows.append(z)
        else:
            _idx, _box, slice_logit = task_slice_logits(bundle, volume)
            rows.append(np.asarray([slice_logit.mean()], dtype=np.float64))
        labels.append(meta.labels.index(str(truth)))
        groups.add(it.group)
        if progress is not None and (i + 1) % 50 == 0:
            progress(f"[{meta.name}] ran {i + 1}/{len(chosen)} series")
    if not labels:
        raise DataError(f"no labelled series for bundle {meta.name} to calibrate on")
    if skipped:
        log.warning("calibration_series_skipped", model_id=meta.name, count=len(skipped))
    return SeriesOutputs(
        multiclass=multiclass,
        logits=np.concatenate(rows) if multiclass else np.concatenate(rows).ravel(),
        series=np.asarray(series, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        n_patients=len(groups),
        skipped=tuple(skipped),
    )


def score(outputs: SeriesOutputs, temperature: float, calibration_bias: float) -> CalibrationScore:
    """Log-loss, ECE and AUC of the series probabilities under one calibration."""
    y = outputs.labels
    if outputs.multiclass:
        probs = series_mean_probabilities(outputs.logits, outputs.series, temperature)
        nll = probability_nll(probs, y)
        ece = top_label_ece(probs, y)
        auc = _macro_auc(y, probs)
    else:
        p = sigmoid(outputs.logits / temperature + calibration_bias)
        nll = log_loss(y, p)
        ece = expected_calibration_error(y, p)
        auc = roc_auc(y, p)
    return CalibrationScore(
        temperature=temperature,
        calibration_bias=calibration_bias,
        nll=nll,
        ece=ece,
        auc=auc,
    )


def fit_calibration(outputs: SeriesOutputs) -> tuple[float, float]:
    """(temperature, bias) fitted on the series: a temperature for the sequence CNN, Platt
    scaling for a task bundle, as each bundle's training fits it."""
    if outputs.multiclass:
        return fit_series_temperature(outputs.logits, outputs.series, outputs.labels), 0.0
    return calibrate(outputs.logits, outputs.labels, binary=True)


def _scores(
    data: str, outputs: SeriesOutputs, before: tuple[float, float], after: tuple[float, float]
) -> SetScores:
    return SetScores(
        data=data,
        n_series=outputs.n_series,
        n_patients=outputs.n_patients,
        before=score(outputs, *before),
        after=score(outputs, *after),
    )


def calibrate_bundle(
    bundle_dir: Path,
    items: Sequence[SeriesItem],
    *,
    data: str,
    held_out: Sequence[tuple[str, Sequence[SeriesItem]]] = (),
    apply: bool = True,
    record: bool = True,
    load: VolumeLoader = load_volume,
    progress: Progress | None = None,
) -> CalibrationFit:
    """Fit the bundle's calibration on ``items`` (described by ``data``) and score it there and
    on each held-out set (description, items) against the bundle's current calibration.

    ``apply``: inference.json gets the temperature and bias (the bundle serves them).
    ``record``: metadata.json's ``calibration`` record holds the fit and its figures, applied
    or not, and docs/README.md is regenerated. Neither: a dry run. The weights are never
    rewritten."""
    if apply and not record:
        raise ValueError("an applied calibration must be recorded (record=True)")
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    meta = bundle.metadata
    before = (meta.temperature, meta.calibration_bias)
    outputs = series_outputs(bundle, items, load=load, progress=progress)
    temperature, bias = fit_calibration(outputs)
    after = (round(temperature, 4), round(bias, 4))  # what inference.json will hold
    fitted_on = _scores(data, outputs, before, after)
    tests = tuple(
        _scores(name, series_outputs(bundle, its, load=load, progress=progress), before, after)
        for name, its in held_out
    )
    fit = CalibrationFit(
        method=SEQUENCE_METHOD if outputs.multiclass else TASK_METHOD,
        temperature=after[0],
        calibration_bias=after[1],
        fitted_on=fitted_on,
        held_out=tests,
        applied=apply,
        recorded=record,
    )
    if apply:
        write_calibration(bundle_dir, temperature=after[0], calibration_bias=after[1])
    if record:
        meta_path = bundle_dir / "configs" / "metadata.json"
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
        raw["calibration"] = fit.as_json()
        meta_path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        card = model_card(read_bundle_config(bundle_dir))
        (bundle_dir / "docs" / "README.md").write_text(card, encoding="utf-8")
        load_bundle(bundle_dir)  # still served: same weights, same checksum
    log.info(
        "bundle_calibrated",
        model_id=meta.name,
        n_series=outputs.n_series,
        status="applied" if apply else "recorded" if record else "dry_run",
    )
    return fit

"""`neuronode fit-detector`: measure labelled studies and write a detector bundle.

The detector (node.bundles.lesion) has no weights to learn: only the Platt calibration of its
series logit, log10(lesion volume fraction + floor), is fitted here on labelled studies, with
the same patient-level metrics and model card as a trained bundle. The measurement runs through
the served code path (node.bundles.detector.predict_detector with an uncalibrated bundle).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from node import NOT_FOR_CLINICAL_USE
from node.bundles.config import INFERENCE_FILE, METADATA_FILE, network_data_format
from node.bundles.detector import SERIES_AGGREGATION, Detector, load_detector, measure_series
from node.bundles.lesion import DETECTOR_METHOD, DetectorSpec
from node.lab.train.data import DataError, SeriesItem, load_volume
from node.lab.train.metrics import binary_report, fit_platt
from node.lab.train.recipes import TASK_DESCRIPTIONS, TASK_LABELS

if TYPE_CHECKING:
    from node.cli.lab import FitDetectorArgs

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyMeasure:
    """One labelled study's detector logit (the mean over its series of the sequence)."""

    study_uid: str
    truth: int  # 1: the task's positive label
    logit: float


def _measure_item(args: tuple[SeriesItem, DetectorSpec]) -> float:
    item, spec = args
    return measure_series(spec, load_volume(item)).logit


def measure_studies(
    items: Sequence[SeriesItem],
    *,
    sequence: str,
    labels: tuple[str, str],
    spec: DetectorSpec,
    jobs: int = 1,
    progress: Progress | None = None,
) -> tuple[StudyMeasure, ...]:
    """Every labelled study's logit: its series of ``sequence`` measured, in ``jobs`` processes."""
    chosen = [it for it in items if it.sequence.value == sequence and it.label is not None]
    for it in chosen:
        if it.label not in labels:
            raise DataError(f"label '{it.label}' is not one of {labels}")
    if not chosen:
        raise DataError(f"no labelled {sequence} series")
    work = [(it, spec) for it in chosen]
    logits: list[float] = []
    with ProcessPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        results = pool.map(_measure_item, work, chunksize=4) if pool else map(_measure_item, work)
        for i, z in enumerate(results):
            logits.append(z)
            if progress is not None and (i + 1) % 50 == 0:
                progress(f"measured {i + 1}/{len(work)} series")
    by_study: dict[str, list[float]] = defaultdict(list)
    truth: dict[str, int] = {}
    for it, z in zip(chosen, logits, strict=True):
        by_study[it.study_uid].append(z)
        truth[it.study_uid] = int(it.label == labels[1])
    return tuple(
        StudyMeasure(study_uid=uid, truth=truth[uid], logit=float(np.mean(zs)))
        for uid, zs in sorted(by_study.items())
    )


def calibrate(measures: Sequence[StudyMeasure]) -> tuple[float, float]:
    """(temperature, bias) with p = sigmoid(z / T + b), fitted by Platt scaling; the slope must
    be positive (a bigger lesion means a lesion more likely)."""
    z = np.array([m.logit for m in measures])
    y = np.array([m.truth for m in measures])
    if y.min() == y.max():
        raise DataError("calibration needs studies with and without the positive label")
    a, b = fit_platt(z, y)
    if not (a > 0 and math.isfinite(a) and math.isfinite(b)):
        raise DataError(f"the fitted slope {a:.4g} is not positive: the data do not separate")
    return 1.0 / a, b


def report_of(measures: Sequence[StudyMeasure], temperature: float, bias: float) -> dict[str, Any]:
    """Patient-level metrics of the calibrated detector on these studies."""
    z = np.array([m.logit for m in measures])
    y = np.array([m.truth for m in measures])
    p = 1.0 / (1.0 + np.exp(-(z / temperature + bias)))
    report = binary_report(y, p)
    report.pop("reliability", None)
    report["level"] = "patient (one study per patient; series by mean logit)"
    return report


def write_detector(
    out: Path,
    *,
    name: str,
    task: str,
    sequence: str,
    spec: DetectorSpec,
    temperature: float,
    bias: float,
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> Detector:
    """The bundle folder (configs/, docs/README.md), verified by loading it back."""
    import monai

    labels = TASK_LABELS[task]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    inference = {
        "detector": spec.to_json(),
        "postprocessing": {
            "temperature": round(temperature, 6),
            "calibration_bias": round(bias, 6),
            "series_aggregation": SERIES_AGGREGATION,
        },
    }
    t = inference["postprocessing"]["temperature"]
    b = inference["postprocessing"]["calibration_bias"]
    metadata = {
        "schema": (
            "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
            "meta_schema_20240725.json"
        ),
        "name": name,
        "version": "0.1.0",
        "changelog": {"0.1.0": "fitted with `neuronode fit-detector`"},
        "monai_version": monai.__version__,
        "pytorch_version": "n/a (no network)",
        "numpy_version": np.__version__,
        "required_packages_version": {"scipy": _scipy_version()},
        "task": task,
        "description": (
            f"Lesion detector on a {sequence} series: the volume of the largest compact region"
            " much brighter than the series' own brain tissue (robust z-score), calibrated."
            " No network. Calibrated on synthetic phantoms."
        ),
        "authors": "neuronode contributors",
        "copyright": "Copyright (c) neuronode contributors; Apache License 2.0",
        "labels": list(labels),
        "label_descriptions": list(TASK_DESCRIPTIONS[task]),
        "input": {
            "sequences": [sequence],
            "values": "per series, native DICOM values after the modality LUT, acquired grid",
        },
        "detector": DETECTOR_METHOD,
        "training": training,
        "metrics": metrics,
        "intended_use": "Research and demonstration of the neuronode pipeline only.",
        "not_for_clinical_use": True,
        "network_data_format": network_data_format(1, None, labels),
        "weights_sha256": spec.digest(t, b),
        "disclaimer": NOT_FOR_CLINICAL_USE,
    }
    for fname, content in ((METADATA_FILE, metadata), (INFERENCE_FILE, inference)):
        (out / "configs" / fname).write_text(json.dumps(content, indent=2) + "\n", "utf-8")
    detector = load_detector(out)
    (out / "docs" / "README.md").write_text(detector_card(detector), encoding="utf-8")
    return detector


def _scipy_version() -> str:
    import scipy

    return str(scipy.__version__)


def _table(m: dict[str, Any]) -> list[str]:
    ci = m.get("auc_ci") or [math.nan, math.nan]
    floor = m.get("ece_if_calibrated") or [math.nan, math.nan]
    rows = [
        ("patients (positive)", f"{m['n_patients']} ({m['n_positive']})"),
        ("AUC (95% bootstrap CI)", f"{m['auc']:.3f} ({ci[0]:.3f} - {ci[1]:.3f})"),
        ("ECE (10 bins)", f"{m['ece']:.3f}"),
        (
            "ECE a perfectly calibrated model would show here (mean, 95th pct)",
            f"{floor[0]:.3f}, {floor[1]:.3f}",
        ),
        ("sensitivity at 0.5", f"{m['sensitivity']:.3f}"),
        ("specificity at 0.5", f"{m['specificity']:.3f}"),
    ]
    return ["| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def detector_card(detector: Detector) -> str:
    """docs/README.md of a detector bundle, from its config files."""
    meta = detector.raw
    spec = detector.spec
    training = meta.get("training", {})
    metrics = meta.get("metrics", {})
    lines = [
        f"# {detector.name} (version {detector.version})",
        "",
        "> **NOT FOR CLINICAL USE.** Research software. This detector was calibrated only on",
        "> synthetic phantoms (node/lab/synth); it has never seen a patient and must not",
        "> inform any clinical decision.",
        "",
        "## What it does",
        "",
        f"Task `{detector.task}`: probability of **{detector.labels[1]}** versus"
        f" {detector.labels[0]} from a {', '.join(s.value for s in detector.sequences)} series."
        " No network: it measures the largest compact region much brighter than the series'"
        " own brain tissue (node/bundles/lesion.py), so it does not depend on one scanner's or"
        " one generator's absolute intensities.",
        "",
        "1. Head: the series scaled per series (percentile 0.5 -> 0, 99.5 -> 1) above 0.1,"
        f" holes filled, eroded by {spec.erode:g} of the smaller image side.",
        f"2. Candidates: native values above the head's median + {spec.z:g} x MAD (1.4826 scaled).",
        f"3. Each slice's candidates opened by {spec.opening:.4g} of the smaller image side"
        " (speckle, noise and bias-field rims go).",
        "4. The largest 3-D connected component as a fraction of the head; series logit"
        f" log10(fraction + {spec.floor:g}); p = sigmoid(z / T + b) with T ="
        f" {detector.temperature:.4g}, b = {detector.calibration_bias:.4g}.",
        "",
        "The key slices shown are the ones through that component, with its z-score map on the"
        " source grid.",
        "",
        "## Calibration data",
        "",
    ]
    for key in ("data", "n_studies", "wall_time_s", "hardware"):
        if key in training:
            lines.append(f"- {key}: {training[key]}")
    for name, title in (
        ("calibration", "Calibration studies (the fit; same data)"),
        ("test_same_style", "Test, same style (never used for the fit)"),
        ("test", "Test, a style never used for the fit"),
    ):
        m = metrics.get(name)
        if isinstance(m, dict) and "auc" in m:
            lines += ["", f"## {title}", "", f"Data: {m.get('data', 'n/a')}", "", *_table(m)]
    lines += [
        "",
        "## Limits",
        "",
        "- Calibrated and tested on synthetic phantoms only: the figures say nothing about"
        " real patients, scanners or pathology.",
        "- It finds bright space-occupying regions; a non-enhancing lesion that is not bright"
        " on FLAIR, or a lesion smaller than the opening, is missed; a large bright artefact"
        " can be called a lesion.",
        "",
        f"**{NOT_FOR_CLINICAL_USE}**",
        "",
    ]
    return "\n".join(lines)


def fit_detector(
    items: Sequence[SeriesItem],
    out: Path,
    *,
    name: str,
    task: str,
    sequence: str,
    spec: DetectorSpec,
    data: str,
    jobs: int = 1,
    progress: Progress | None = None,
) -> Detector:
    """Measure, calibrate and write a detector bundle; its card holds the calibration metrics."""
    if task not in TASK_LABELS:
        raise DataError(f"unknown task '{task}' (expected one of {sorted(TASK_LABELS)})")
    t0 = time.perf_counter()
    measures = measure_studies(
        items,
        sequence=sequence,
        labels=TASK_LABELS[task],
        spec=spec,
        jobs=jobs,
        progress=progress,
    )
    temperature, bias = calibrate(measures)
    report = report_of(measures, temperature, bias)
    report["data"] = data
    training = {
        "data": data,
        "n_studies": len(measures),
        "method": "Platt scaling of the series logit (no network weights)",
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "hardware": f"{platform.machine()} CPU, {jobs} process(es)",
    }
    return write_detector(
        out,
        name=name,
        task=task,
        sequence=sequence,
        spec=spec,
        temperature=temperature,
        bias=bias,
        training=training,
        metrics={"calibration": report},
    )


def evaluate_detector(
    detector: Detector,
    items: Sequence[SeriesItem],
    *,
    jobs: int = 1,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Patient-level metrics of a detector bundle on labelled studies."""
    measures = measure_studies(
        items,
        sequence=detector.sequences[0].value,
        labels=(detector.labels[0], detector.labels[1]),
        spec=detector.spec,
        jobs=jobs,
        progress=progress,
    )
    report = report_of(measures, detector.temperature, detector.calibration_bias)
    report["model"] = detector.name
    return report


def record_detector_metrics(
    detector: Detector, key: str, report: dict[str, Any], data: str
) -> Detector:
    """Store a test figure in the detector's metadata and rewrite its card (numbers unchanged)."""
    meta_path = detector.path / "configs" / METADATA_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.setdefault("metrics", {})[key] = {**report, "data": data}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    reloaded = load_detector(detector.path)
    (detector.path / "docs" / "README.md").write_text(detector_card(reloaded), "utf-8")
    return reloaded


def _describe(folders: Sequence[Path]) -> str:
    from node.lab.train.command import _describe as describe_one

    return "; ".join(describe_one(f) for f in folders)


def cmd_fit_detector(args: FitDetectorArgs) -> int:
    """`neuronode fit-detector NAME --data DIR --out BUNDLE [--test DIR]`."""
    import sys

    from node.lab.train.command import _task_items, _threads

    _threads()

    def progress(text: str) -> None:
        print(f"[{args.name}] {text}", file=sys.stderr, flush=True)

    sequence = args.sequence.strip().upper()
    spec = DetectorSpec(z=args.z, measure=args.measure, opening=args.opening)
    items = _task_items(args.data, args.task, args.labels, args.label_map)
    detector = fit_detector(
        items,
        args.out,
        name=args.name,
        task=args.task,
        sequence=sequence,
        spec=spec,
        data=_describe(args.data),
        jobs=max(1, args.jobs),
        progress=progress,
    )
    summary: dict[str, Any] = {
        "bundle": str(args.out),
        "temperature": detector.temperature,
        "calibration_bias": detector.calibration_bias,
        "calibration": _brief(detector.raw["metrics"]["calibration"]),
    }
    for key, folders in (("test_same_style", args.test_same_style), ("test", args.test)):
        if not folders:
            continue
        test_items = _task_items(folders, args.task, args.labels, args.label_map)
        report = evaluate_detector(detector, test_items, jobs=max(1, args.jobs), progress=progress)
        detector = record_detector_metrics(detector, key, report, _describe(folders))
        summary[key] = _brief(report)
    print(json.dumps(summary, indent=2))
    return 0


def _brief(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("n_patients", "auc", "auc_ci", "ece", "sensitivity", "specificity")}

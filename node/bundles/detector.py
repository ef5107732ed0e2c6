"""Detector bundles: a calibrated measurement instead of a network (the lesion gate).

A detector bundle has the same folder layout and the same MONAI metadata as a CNN bundle
(configs/metadata.json with network_data_format, task, labels, input.sequences, metrics and
training record; docs/README.md, its model card) but no weights: configs/inference.json holds a
``detector`` entry (node.bundles.lesion.DetectorSpec) and the Platt calibration of its series
logit. metadata.json's ``weights_sha256`` is the digest of those numbers, checked at load, so a
threshold edited by hand without refitting is refused like a replaced weights file.

``neuronode fit-detector`` (node.lab.train.detector) measures labelled studies and writes one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.bundles.config import (
    INFERENCE_FILE,
    Preprocessing,
    check_monai_metadata,
    labels_of,
    postprocessing_of,
    read_config_files,
    recipe_preprocessing,
    task_name,
)
from node.bundles.lesion import (
    DetectorSpec,
    LesionMeasure,
    key_slices,
    lesion_map,
    measure_lesion,
)
from node.ensemble import sigmoid
from node.errors import ModelUnavailable
from node.log import get_logger
from node.records import Heatmap, SequenceLabel, SeriesPrediction, SeriesVolume

log = get_logger(__name__)

SERIES_AGGREGATION = "lesion_volume"


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Detector:
    """A verified detector bundle (immutable: workers may share it)."""

    path: Path
    name: str
    version: str
    task: str
    labels: tuple[str, ...]  # (negative, positive)
    sequences: tuple[SequenceLabel, ...]
    spec: DetectorSpec
    temperature: float
    calibration_bias: float
    weights_sha256: str  # digest of spec + calibration
    raw: dict[str, Any]  # metadata.json
    inference: dict[str, Any]  # inference.json

    @property
    def model_id(self) -> str:
        """The bundle name, used in logs, the SR and the audit."""
        return self.name

    def copy(self) -> Detector:
        """Detectors hold no mutable state: the same object serves every worker."""
        return self


def is_detector_config(inference: Any) -> bool:
    """Whether an inference.json describes a detector (a ``detector`` entry, no network)."""
    return isinstance(inference, dict) and "detector" in inference


def parse_detector_config(metadata: Any, inference: Any, path: Path, where: str) -> Detector:
    """Check both files of a detector bundle; every problem names the file and key."""
    check_monai_metadata(metadata, where)
    if not isinstance(inference, dict):
        raise ModelUnavailable(f"{where}: {INFERENCE_FILE} is not a JSON object")
    if "network_def" in inference:
        raise ModelUnavailable(f"{where}: {INFERENCE_FILE} has both a detector and a network_def")
    task = task_name(metadata, where)
    labels = labels_of(metadata, task, where)
    inp = metadata.get("input")
    if not isinstance(inp, dict):
        raise ModelUnavailable(f"{where}: metadata has no 'input' object")
    try:
        sequences = tuple(SequenceLabel(s) for s in inp.get("sequences", []))
    except ValueError as exc:
        raise ModelUnavailable(f"{where}: input.sequences holds an unknown label") from exc
    if not sequences:
        raise ModelUnavailable(f"{where}: input.sequences is empty")
    try:
        spec = DetectorSpec.from_json(inference["detector"])
    except ValueError as exc:
        raise ModelUnavailable(f"{where}: {INFERENCE_FILE} {exc}") from exc
    temperature, bias, _ = postprocessing_of(inference, where, allowed=(SERIES_AGGREGATION,))
    if metadata.get("not_for_clinical_use") is not True:
        raise ModelUnavailable(f"{where}: metadata must declare not_for_clinical_use: true")
    sha = metadata.get("weights_sha256")
    digest = spec.digest(temperature, bias)
    if sha != digest:
        raise ModelUnavailable(
            f"{where}: detector digest {digest[:12]}... does not match metadata weights_sha256"
            f" {str(sha)[:12]}... (numbers edited without refitting)"
        )
    return Detector(
        path=path,
        name=str(metadata.get("name") or path.name),
        version=str(metadata["version"]),
        task=task,
        labels=labels,
        sequences=sequences,
        spec=spec,
        temperature=temperature,
        calibration_bias=bias,
        weights_sha256=digest,
        raw=dict(metadata),
        inference=dict(inference),
    )


def load_detector(path: Path) -> Detector:
    """Load and verify a detector bundle, or refuse it with ModelUnavailable and why."""
    path = Path(path)
    where = f"model bundle {path}"
    return detector_from(*read_config_files(path, where), path, where)


def detector_from(metadata: Any, inference: Any, path: Path, where: str) -> Detector:
    """The verified detector of config files already read (node.bundles.bundle.load_model)."""
    detector = parse_detector_config(metadata, inference, path, where)
    log.info("bundle_loaded", model_id=detector.name, version=detector.version, task=detector.task)
    return detector


def detector_scaling() -> Preprocessing:
    """The per-series scaling a detector reads its head mask from (percentile 0.5 -> 0,
    99.5 -> 1, as the CNN bundles read). Built once per process from MONAI's config; a worker
    builds it in its warm-up, because MONAI's first parse raises and catches import errors
    whose tracebacks keep the calling frames (and a series' pixels in them) alive until the
    next garbage collection."""
    return recipe_preprocessing(low=0.5, high=99.5)


def measure_series(
    spec: DetectorSpec, volume: SeriesVolume, *, keep_map: bool = False
) -> LesionMeasure:
    """The detector's measure of one series (uncalibrated), as served and as fitted."""
    # The head mask reads the scaled series a slice at a time: no scaled copy of the series.
    scaled = detector_scaling().scaled_slices(volume.pixels)
    return measure_lesion(volume.pixels, scaled, spec, keep_map=keep_map)


def predict_detector(
    detector: Detector,
    volume: SeriesVolume,
    *,
    sequence: SequenceLabel | None = None,
    top_k: int = 0,
) -> SeriesPrediction:
    """The detector's calibrated probability of a lesion in one series; with ``top_k`` the
    key slices through the lesion and its map, on the source grid."""
    m = measure_series(detector.spec, volume, keep_map=top_k > 0)
    prob = sigmoid(m.logit / detector.temperature + detector.calibration_bias)
    heatmaps: tuple[Heatmap, ...] = ()
    indices: tuple[int, ...] = ()
    if m.component is not None and m.zmap is not None:
        indices = key_slices(m.component, top_k)
        if prob >= 0.5:
            heatmaps = tuple(
                Heatmap(
                    series_uid=volume.series_uid,
                    slice_index=i,
                    source=volume.slices[i],
                    cam=lesion_map(m.zmap, i),
                    image=np.array(volume.pixels[i], dtype=np.float32),
                )
                for i in indices
            )
    log.debug("series_measured", model_id=detector.name, probability=round(prob, 4))
    return SeriesPrediction(
        task=detector.task,
        model_id=detector.name,
        model_version=detector.version,
        series_uid=volume.series_uid,
        sequence=sequence or detector.sequences[0],
        probability=prob,
        slice_indices=indices,
        slice_probabilities=tuple(prob for _ in indices),
        heatmaps=heatmaps,
        weights_sha256=detector.weights_sha256,
        map_kind="lesion",
    )

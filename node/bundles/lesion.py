"""The lesion detector: is there a space-occupying bright lesion in this series (pure numpy/scipy).

A CNN trained on one generator's look did not transfer as a lesion gate (style b AUC 0.66: it
passed 45 of 48 lesion-free studies). A tumour is, radiologically, a region much brighter than
the surrounding brain on FLAIR (tumour and oedema) or T1C (enhancement), large and compact, not
a thin rim or speckle. That is measured here relative to the series' own tissue, so it holds
whatever the scanner's absolute values, contrast settings or plane:

1. The head is where the series, scaled per series (percentile 0.5 -> 0, 99.5 -> 1, the same
   scaling the CNN bundles read), is above 0.1; each slice's head, holes filled, is eroded by
   ``erode`` of the smaller image side so the scalp and skull rim never count.
2. On the *native* values (not clipped: a clipped bright lesion is no brighter than white matter
   after scaling), voxels brighter than the head's median by ``z`` robust deviations (MAD) are
   candidates.
3. Each slice's candidates are opened (erosion then dilation) by ``opening`` of the smaller
   image side: speckle, noise and thin bias-field rims vanish, a lesion keeps its core.
4. The largest 3-D connected component (26-neighbourhood) gives the lesion volume as a fraction
   of the eroded head (``measure: beyond_largest``: every component but the largest, for
   many small foci such as cortical tubers). The series "logit" is log10(fraction + floor);
   the bundle's Platt calibration (temperature, bias), fitted by ``neuronode fit-detector`` on
   labelled studies, turns it into a probability.

The component itself is the explanation: the key slices are the ones through it, and the map
shown is its robust z-score, on the source pixel grid (no resampling).

Everything is computed on the acquired grid: the measure is a volume fraction, so it needs no
reorientation, and a thick-slice sagittal series is not smeared by resampling it to axial.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from node.bundles.roi import HEAD_ERODE, SliceStack, eroded_head, median_mad
from node.records import FloatArray

DETECTOR_METHOD = "bright_lesion_volume"
# What is measured: the largest component (a space-occupying lesion) or every component but the
# largest (many small foci, as cortical tubers are; one tumour with its oedema scores low).
MEASURES = ("largest", "beyond_largest")


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorSpec:
    """How the lesion is measured (a detector bundle's metadata ``detector`` entry)."""

    z: float = 2.5  # robust deviations above the head's median
    erode: float = HEAD_ERODE  # of the smaller image side: the scalp and skull rim
    opening: float = 1.0 / 64.0  # of the smaller image side: speckle and rims
    floor: float = 1e-4  # added to the fraction before log10 (no lesion: -4)
    measure: str = "largest"  # one of MEASURES

    def to_json(self) -> dict[str, Any]:
        """The metadata entry (``measure`` only when it is not the default)."""
        out: dict[str, Any] = {
            "method": DETECTOR_METHOD,
            "z": self.z,
            "erode": self.erode,
            "opening": self.opening,
            "floor": self.floor,
        }
        if self.measure != "largest":
            out["measure"] = self.measure
        return out

    @classmethod
    def from_json(cls, raw: Any) -> DetectorSpec:
        """ValueError says what is wrong with the entry."""
        if not isinstance(raw, dict) or raw.get("method") != DETECTOR_METHOD:
            raise ValueError(f"detector.method must be '{DETECTOR_METHOD}'")
        values = {}
        for key, low, high in (
            ("z", 0.5, 20.0),
            ("erode", 0.0, 0.3),
            ("opening", 0.0, 0.2),
            ("floor", 1e-9, 0.1),
        ):
            value = raw.get(key, getattr(cls(), key))
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"detector.{key} must be a number")
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"detector.{key} must be within {low}..{high}")
            values[key] = float(value)
        measure = raw.get("measure", "largest")
        if measure not in MEASURES:
            raise ValueError(f"detector.measure must be one of {MEASURES}")
        return cls(**values, measure=str(measure))

    def digest(self, temperature: float, bias: float) -> str:
        """SHA-256 of everything that decides the detector's answer (its 'weights')."""
        text = json.dumps({**self.to_json(), "t": temperature, "b": bias}, sort_keys=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class LesionMeasure:
    """The largest bright compact component of a series, on its acquired grid."""

    fraction: float  # its voxels / the eroded head's voxels (0: none)
    logit: float  # log10(fraction + floor)
    component: npt.NDArray[np.bool_] | None  # (slices, rows, cols); None when there is none
    zmap: FloatArray | None  # robust z-score inside the component, 0 elsewhere


def measure_lesion(
    pixels: npt.NDArray[Any],
    scaled: FloatArray | SliceStack,
    spec: DetectorSpec,
    *,
    keep_map: bool = False,
) -> LesionMeasure:
    """The lesion measure of one series: ``pixels`` its native values (slices, rows, cols),
    ``scaled`` the same scaled per series to 0..1 (the head mask; read a slice at a time, so
    config.ScaledSlices can scale each on demand). See the module text."""
    from scipy import ndimage

    pix = np.asarray(pixels)
    if pix.ndim != 3 or pix.shape != tuple(scaled.shape):
        raise ValueError(f"expected matching (slices, rows, cols) arrays, got {pix.shape}")
    none = LesionMeasure(fraction=0.0, logit=math.log10(spec.floor), component=None, zmap=None)
    inner = eroded_head(scaled, spec.erode)
    n_head = int(inner.sum())
    if n_head < 50:
        return none
    # Native values in float32, a slice at a time (a long series is not copied whole): the
    # head's voxels for the statistics, then each slice for the threshold.
    med, mad = median_mad(np.asarray(pix[inner], dtype=np.float32))
    if not (mad > 0 and math.isfinite(mad)):
        return none
    threshold = med + spec.z * mad
    n, rows, cols = pix.shape
    candidate = np.zeros(pix.shape, dtype=bool)
    for k in range(n):
        if inner[k].any():
            candidate[k] = inner[k] & (np.asarray(pix[k], dtype=np.float32) > threshold)
    iterations = round(spec.opening * min(rows, cols))
    if iterations > 0:
        for k in range(n):
            if candidate[k].any():
                candidate[k] = ndimage.binary_opening(candidate[k], iterations=iterations)
    labels, count = ndimage.label(candidate, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return none
    # Component sizes slice by slice (a whole-volume bincount copies the labels as int64).
    sizes = np.zeros(count + 1, dtype=np.intp)
    for k in range(n):
        sizes += np.bincount(labels[k].ravel(), minlength=count + 1)
    sizes = sizes[1:]
    best = int(np.argmax(sizes))
    if spec.measure == "largest":
        fraction = float(sizes[best]) / n_head
    else:
        fraction = float(sizes.sum() - sizes[best]) / n_head
    logit = math.log10(fraction + spec.floor)
    if not keep_map or fraction <= 0.0:
        return LesionMeasure(fraction=fraction, logit=logit, component=None, zmap=None)
    component = labels == best + 1 if spec.measure == "largest" else labels > 0
    if spec.measure != "largest":
        component &= labels != best + 1
    zmap = np.zeros(pix.shape, dtype=np.float32)
    for k in range(n):
        if component[k].any():
            zmap[k] = np.where(
                component[k], (np.asarray(pix[k], dtype=np.float32) - med) / mad, 0.0
            )
    return LesionMeasure(fraction=fraction, logit=logit, component=component, zmap=zmap)


def key_slices(component: npt.NDArray[np.bool_], top_k: int) -> tuple[int, ...]:
    """The slices through the lesion with the largest cross-sections, largest first."""
    area = component.reshape(component.shape[0], -1).sum(axis=1)
    order = np.argsort(-area, kind="stable")[: max(0, top_k)]
    return tuple(int(i) for i in order if area[i] > 0)


def lesion_map(zmap: FloatArray, index: int) -> FloatArray:
    """The shown map of one key slice: the component's z-score scaled to 0..1 (0 outside)."""
    sl = np.asarray(zmap[index], dtype=np.float32)
    top = float(sl.max())
    return (sl / top).astype(np.float32) if top > 0 else np.zeros_like(sl)

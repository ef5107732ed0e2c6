"""Grad-CAM heatmaps as RGB Secondary Capture images in a new series of the source study.

Each image is the source slice (windowed, grey) with the attention map in colour where it is
above CAM_THRESHOLD, and a caption band added below the slice (never over the anatomy) saying
what it is: an attention map, not a localisation (a detector bundle's map: the bright region it
measured), not for diagnostic use.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node import __version__
from node.config import OutputSettings
from node.errors import ReportError
from node.records import Heatmap, SeriesPrediction, StudyResult, TaskFinding
from node.report.codes import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER,
)
from node.report.sources import copy_entity_attributes, quietly, read_header
from node.report.uids import heatmap_uid, model_parts, result_uid

CAM_THRESHOLD: Final = 0.2  # below this the source shows through unchanged


CAM_ALPHA: Final = 0.45


def window_to_unit(image: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Scale a slice to 0..1 from its own 1st..99th percentile, so any modality scale shows."""
    arr = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(arr, [1.0, 99.0]) if arr.size else (0.0, 1.0)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(arr)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def jet(values: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """The jet colour map (blue low, red high) for values in 0..1, as float RGB in 0..1."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # r, g, b peaks at 3/4, 1/2, 1/4
    out: npt.NDArray[np.float32] = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0).astype(
        np.float32
    )
    return out


def overlay_cam(
    image: npt.NDArray[np.floating], cam: npt.NDArray[np.floating]
) -> npt.NDArray[np.uint8]:
    """The windowed slice in grey with the CAM in colour where it exceeds CAM_THRESHOLD."""
    if image.shape != cam.shape:
        raise ValueError(f"cam shape {cam.shape} differs from image shape {image.shape}")
    grey = np.repeat(window_to_unit(image)[..., None], 3, axis=2)
    c = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, 1.0)
    alpha = np.where(c >= CAM_THRESHOLD, CAM_ALPHA, 0.0).astype(np.float32)[..., None]
    rgb = (1.0 - alpha) * grey + alpha * jet(c)
    return np.round(rgb * 255.0).astype(np.uint8)


@dataclass(frozen=True, slots=True)
class _CaptionLayout:
    """How a caption is set below an image `cols` wide: the font, its wrapped lines, the band."""

    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    lines: tuple[str, ...]
    line_h: int
    band_h: int


def _caption_layout(cols: int, lines: Sequence[str]) -> _CaptionLayout:
    font_px = int(np.clip(round(cols / 28), 8, 16))
    font = ImageFont.load_default(size=font_px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    char_w = max(1.0, probe.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    per_line = max(8, int((cols - 4) / char_w))
    wrapped = tuple(part for line in lines for part in textwrap.wrap(line, per_line)) or ("",)
    line_h = round(font_px * 1.25)
    return _CaptionLayout(font=font, lines=wrapped, line_h=line_h, band_h=line_h * len(wrapped) + 4)


def caption_band_rows(cols: int, lines: Sequence[str]) -> int:
    """How many rows the caption band adds below an image `cols` wide (nothing is drawn)."""
    return _caption_layout(cols, lines).band_h


def burn_caption(rgb: npt.NDArray[np.uint8], lines: Sequence[str]) -> npt.NDArray[np.uint8]:
    """The image with a caption band added below it: the anatomy is never covered.

    White text on black, in a band as wide as the image and as tall as the wrapped text needs;
    the image keeps its own resolution (one image pixel is one output pixel).
    """
    cols = rgb.shape[1]
    layout = _caption_layout(cols, lines)
    band = Image.new("RGB", (cols, layout.band_h), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, text in enumerate(layout.lines):
        draw.text((2, 2 + i * layout.line_h), text, fill=(255, 255, 255), font=layout.font)
    out: npt.NDArray[np.uint8] = np.concatenate([rgb, np.asarray(band, dtype=np.uint8)], axis=0)
    return out


def _orientation_letters(cosines: Sequence[float]) -> str:
    """The patient-direction letter of the dominant axis of a direction cosine (LPS)."""
    axis = int(np.argmax(np.abs(cosines)))
    positive, negative = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
    return positive if cosines[axis] > 0 else negative


def _caption(finding: TaskFinding, pred: SeriesPrediction) -> tuple[str, ...]:
    study_p = "n/a" if finding.probability is None else f"{finding.probability:.0%}"
    return (
        f"{finding.task}: {finding.positive_label} {finding.status.value} (p={study_p})",
        f"series p={pred.probability:.0%}  model {pred.model_id} {pred.model_version}",
        "measured bright region, not a diagnosis"
        if pred.map_kind == "lesion"
        else "attention map, not a localisation",
        NOT_FOR_DIAGNOSTIC_USE,
    )


def _select_heatmaps(
    result: StudyResult, per_series: int
) -> tuple[tuple[TaskFinding, SeriesPrediction, Heatmap], ...]:
    """The heatmaps to render: the inference stage's order, at most `per_series` per prediction."""
    chosen: list[tuple[TaskFinding, SeriesPrediction, Heatmap]] = []
    for finding in result.findings:
        for pred in finding.contributions:
            for hm in pred.heatmaps[:per_series]:
                chosen.append((finding, pred, hm))
    return tuple(chosen)


def build_heatmap_images(
    result: StudyResult,
    rules_outputs: OutputSettings,
    *,
    uid_root: str | None,
    render: bool = True,
) -> tuple[Dataset, ...]:
    """RGB Secondary Captures of each chosen Grad-CAM over its source slice, captions burned in.

    With ``render=False`` each image is the same object but for its pixels, which are black:
    what the SR needs to reference the heatmaps (UIDs, size) before they are drawn, so the SR
    can go out first. Such an image is never written.
    """
    if not isinstance(result, StudyResult):
        raise TypeError("result must be a StudyResult")
    chosen = _select_heatmaps(result, rules_outputs.heatmaps_per_series)
    if not chosen:
        return ()
    series_uid = result_uid("sc-series", result.study_uid, *model_parts(result), uid_root=uid_root)
    images: list[Dataset] = []
    headers: dict[Path, Dataset] = {}
    for number, (finding, pred, hm) in enumerate(chosen, start=1):
        src = headers.get(hm.source.path) or read_header(hm.source.path)
        headers[hm.source.path] = src
        if str(src.StudyInstanceUID) != result.study_uid:
            raise ReportError("a heatmap source slice belongs to another study")
        frame = hm.source.frame_number
        sop_uid = heatmap_uid(result.study_uid, pred, hm, uid_root=uid_root)
        caption = _caption(finding, pred)
        if render and not hm.explained:
            raise ReportError("a heatmap is drawn before its map was computed")
        if render:
            pixels = burn_caption(overlay_cam(hm.image, hm.cam), caption)
        else:
            rows, cols = hm.image.shape
            pixels = np.zeros((rows + caption_band_rows(cols, caption), cols, 3), dtype=np.uint8)
        geom = hm.source.geometry
        orientation = (
            _orientation_letters(geom.orientation[:3]),
            _orientation_letters(geom.orientation[3:]),
        )
        try:
            sc = quietly(
                hd.sc.SCImage.from_ref_dataset,
                ref_dataset=src,
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=series_uid,
                series_number=SC_SERIES_NUMBER,
                sop_instance_uid=sop_uid,
                instance_number=number,
                manufacturer=MANUFACTURER,
                pixel_spacing=geom.pixel_spacing,
                patient_orientation=orientation,
                transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ReportError(f"cannot build the heatmap image: {type(exc).__name__}") from exc
        copy_entity_attributes(src, sc)
        sc.SeriesDescription = SC_SERIES_DESCRIPTION
        sc.BurnedInAnnotation = "YES"
        # Type 2C in General Series; dciodvfy cannot tell brain is unpaired, so send it empty.
        sc.Laterality = src.get("Laterality", "")
        sc.ImageComments = f"{' | '.join(caption)}"[:10240]
        sc.DerivationDescription = (
            f"Lesion map of {pred.model_id} {pred.model_version} (robust z-score of the measured"
            " region) over the source slice"
            if pred.map_kind == "lesion"
            else f"Grad-CAM of {pred.model_id} {pred.model_version} over the source slice"
        )
        ref = Dataset()
        ref.ReferencedSOPClassUID = hm.source.sop_class_uid
        ref.ReferencedSOPInstanceUID = hm.source.sop_instance_uid
        if frame is not None:
            ref.ReferencedFrameNumber = frame
        sc.SourceImageSequence = DicomSequence([ref])
        sc.SoftwareVersions = __version__
        images.append(sc)
    return tuple(images)

"""Result objects for the PACS: Grad-CAM Secondary Captures and one TID 1500 SR per study.

Every UID is derived from the source UIDs and model versions (``result_uid``), so a study
pushed twice yields the same objects and the PACS does not collect duplicates.
"""

from __future__ import annotations

import copy
import hashlib
import re
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node import __version__
from node.config import OutputSettings
from node.errors import ReportError
from node.records import FindingStatus, Heatmap, SeriesPrediction, StudyResult, TaskFinding

T = TypeVar("T")
SrClass = Literal["comprehensive3d", "comprehensive", "enhanced"]

SR_SOP_CLASS_UIDS: Final[dict[SrClass, str]] = {
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
}
SR_FALLBACK_ORDER: Final[tuple[SrClass, ...]] = ("comprehensive3d", "comprehensive", "enhanced")
SC_SOP_CLASS_UID: Final = "1.2.840.10008.5.1.4.1.1.7"

NOT_FOR_DIAGNOSTIC_USE: Final = "NOT FOR DIAGNOSTIC USE"
SR_SERIES_DESCRIPTION: Final = "AI results - NOT FOR DIAGNOSTIC USE"
SC_SERIES_DESCRIPTION: Final = "AI attention maps - NOT FOR DIAGNOSTIC USE"
SR_SERIES_NUMBER: Final = 9900
SC_SERIES_NUMBER: Final = 9901
MANUFACTURER: Final = "neuronode"
CAM_THRESHOLD: Final = 0.2  # below this the source shows through unchanged
CAM_ALPHA: Final = 0.45

# Our own coding scheme for concepts SNOMED CT has no code for; declared in every SR.
PRIVATE_SCHEME: Final = "99NEURONODE"
PRIVATE_SCHEME_NAME: Final = "neuronode private codes"

# SNOMED CT where a code exists; everything else in the declared private scheme.
FINDING_CODES: Final[dict[str, Code]] = {
    "glioblastoma": Code("393563007", "SCT", "Glioblastoma multiforme"),
    "tuberous sclerosis": Code("7199000", "SCT", "Tuberous sclerosis syndrome"),
    "primary cns lymphoma": Code("PCNSL", PRIVATE_SCHEME, "Primary CNS lymphoma"),
    "high grade glioma": Code("HGG", PRIVATE_SCHEME, "High grade glioma"),
    "low grade glioma": Code("LGG", PRIVATE_SCHEME, "Low grade glioma"),
    "cortical tubers": Code("TUBERS", PRIVATE_SCHEME, "Cortical tubers"),
}
STATUS_CODES: Final[dict[FindingStatus, Code]] = {
    FindingStatus.PRESENT: Code("52101004", "SCT", "Present"),
    FindingStatus.ABSENT: Code("2667000", "SCT", "Absent"),
    FindingStatus.INDETERMINATE: Code("82334004", "SCT", "Indeterminate"),
    FindingStatus.NOT_ASSESSABLE: Code("NOTASSESSABLE", PRIVATE_SCHEME, "Not assessable"),
}
CERTAINTY_OF_FINDING: Final = Code("111012", "DCM", "Certainty of Finding")
PERCENT: Final = Code("%", "UCUM", "percent")
COMMENT: Final = Code("121106", "DCM", "Comment")
SEQUENCE_CLASS: Final = Code("SEQCLASS", PRIVATE_SCHEME, "MR sequence class")
PROCEDURE_MR_BRAIN: Final = Code("4573000", "SCT", "MR of brain")


def result_uid(kind: str, *parts: str, uid_root: str | None) -> str:
    """A UID fixed by its inputs: 2.25.<128-bit hash> or <root>.<hash digits>, at most 64 chars."""
    if not kind:
        raise ValueError("kind must not be empty")
    digest = hashlib.sha256("\x1f".join((kind, *parts)).encode()).digest()
    if uid_root is None:
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"
    if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", uid_root) or len(uid_root) > 40:
        raise ValueError(f"uid_root {uid_root!r} is not a UID root of at most 40 characters")
    room = 64 - len(uid_root) - 1
    digits = str(int.from_bytes(digest, "big"))[:room].lstrip("0") or "1"
    return f"{uid_root}.{digits}"


def _model_parts(result: StudyResult) -> tuple[str, ...]:
    """Sorted model identities (name, version, weights digest): new weights give new UIDs."""
    return tuple(
        sorted(
            {
                f"{p.model_id}@{p.model_version}#{p.weights_sha256}"
                for f in result.findings
                for p in f.contributions
            }
        )
    )


# Patient- and study-level attributes highdicom does not copy; copied when the source has them
# so dcentvfy finds source and results consistent.
EXTRA_ENTITY_KEYWORDS: Final = (
    "IssuerOfPatientID",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "NameOfPhysiciansReadingStudy",
    "OtherPatientIDs",
    "EthnicGroup",
)


def _copy_entity_attributes(src: Dataset, dst: Dataset) -> None:
    """Copy the patient/study attributes highdicom leaves out, value for value."""
    for keyword in EXTRA_ENTITY_KEYWORDS:
        if keyword in src and keyword not in dst:
            dst[keyword] = copy.deepcopy(src[keyword])
    if "SpecificCharacterSet" in src:
        dst.SpecificCharacterSet = src.SpecificCharacterSet


def _quietly(build: Callable[..., T], /, **kwargs: Any) -> T:
    """Call a highdicom constructor without its person-name warnings: they quote the name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        return build(**kwargs)


def _read_header(path: Path) -> Dataset:
    """A source header without pixels; a file that cannot be read is a ReportError."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ReportError(f"cannot read source {path.name}: {exc}") from exc


# --- heatmaps --------------------------------------------------------------------------------


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


def burn_caption(rgb: npt.NDArray[np.uint8], lines: Sequence[str]) -> npt.NDArray[np.uint8]:
    """Rasterise caption lines (white on a dark band) into the bottom of the image, in place."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = rgb.shape[:2]
    dpi = 100.0
    fig = Figure(figsize=(cols / dpi, rows / dpi), dpi=dpi)
    fig.patch.set_alpha(0.0)
    canvas = FigureCanvasAgg(fig)
    # Largest font (5..14 px) at which the wrapped caption fits the width and ~45 % of the
    # height: small matrices get small text rather than a caption cut off at the edge.
    wrapped: list[str] = list(lines)
    font_px = 5.0
    for size in (14.0, 12.0, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0):
        per_line = max(8, int(0.97 * cols / (0.6 * size)))
        wrapped = [part for line in lines for part in textwrap.wrap(line, per_line)]
        font_px = size
        if len(wrapped) * size * 1.25 <= 0.45 * rows:
            break
    font_pt = font_px * 72.0 / dpi
    fig.text(
        0.01,
        0.01,
        "\n".join(wrapped),
        fontsize=font_pt,
        family="DejaVu Sans",
        color="white",
        va="bottom",
        ha="left",
        linespacing=1.2,
        bbox={"facecolor": "black", "alpha": 0.7, "pad": 1.0, "linewidth": 0},
    )
    canvas.draw()  # type: ignore[no-untyped-call]
    buffer = canvas.buffer_rgba()  # type: ignore[no-untyped-call]
    rgba = np.asarray(buffer)[:rows, :cols].astype(np.float32) / 255.0
    a = rgba[..., 3:4]
    blended = rgba[..., :3] * 255.0 * a + rgb.astype(np.float32) * (1.0 - a)
    out: npt.NDArray[np.uint8] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
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
        "attention map, not a localisation",
        NOT_FOR_DIAGNOSTIC_USE,
    )


def heatmap_uid(
    study_uid: str, pred: SeriesPrediction, hm: Heatmap, *, uid_root: str | None
) -> str:
    """A heatmap image's SOP Instance UID: fixed by its source slice, task and model weights."""
    return result_uid(
        "sc",
        study_uid,
        hm.source.sop_instance_uid,
        str(hm.source.frame_number or 0),
        pred.task,
        pred.model_id,
        pred.model_version,
        pred.weights_sha256,
        uid_root=uid_root,
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
    result: StudyResult, rules_outputs: OutputSettings, *, uid_root: str | None
) -> tuple[Dataset, ...]:
    """RGB Secondary Captures of each chosen Grad-CAM over its source slice, captions burned in."""
    if not isinstance(result, StudyResult):
        raise TypeError("result must be a StudyResult")
    chosen = _select_heatmaps(result, rules_outputs.heatmaps_per_series)
    if not chosen:
        return ()
    series_uid = result_uid("sc-series", result.study_uid, *_model_parts(result), uid_root=uid_root)
    images: list[Dataset] = []
    headers: dict[Path, Dataset] = {}
    for number, (finding, pred, hm) in enumerate(chosen, start=1):
        src = headers.get(hm.source.path) or _read_header(hm.source.path)
        headers[hm.source.path] = src
        if str(src.StudyInstanceUID) != result.study_uid:
            raise ReportError("a heatmap source slice belongs to another study")
        frame = hm.source.frame_number
        sop_uid = heatmap_uid(result.study_uid, pred, hm, uid_root=uid_root)
        pixels = burn_caption(overlay_cam(hm.image, hm.cam), _caption(finding, pred))
        geom = hm.source.geometry
        orientation = (
            _orientation_letters(geom.orientation[:3]),
            _orientation_letters(geom.orientation[3:]),
        )
        try:
            sc = _quietly(
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
            raise ReportError(f"cannot build the heatmap image: {exc}") from exc
        _copy_entity_attributes(src, sc)
        sc.SeriesDescription = SC_SERIES_DESCRIPTION
        sc.BurnedInAnnotation = "YES"
        # Type 2C in General Series; dciodvfy cannot tell brain is unpaired, so send it empty.
        sc.Laterality = src.get("Laterality", "")
        sc.ImageComments = f"{' | '.join(_caption(finding, pred))}"[:10240]
        sc.DerivationDescription = (
            f"Grad-CAM of {pred.model_id} {pred.model_version} over the source slice"
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


# --- structured report -----------------------------------------------------------------------


def finding_code(label: str) -> Code:
    """The coded concept of a finding label: SNOMED CT where known, else the private scheme."""
    key = " ".join(label.lower().split())
    if key in FINDING_CODES:
        return FINDING_CODES[key]
    value = re.sub(r"[^A-Z0-9]", "", key.upper())[:16] or "FINDING"
    return Code(value, PRIVATE_SCHEME, label[:64])


def _scheme_identification() -> DicomSequence:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "neuronode project"
    return DicomSequence([item])


def _text(value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=COMMENT, value=value[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _task_group(
    finding: TaskFinding,
    heatmaps: dict[str, Dataset],
    sources: dict[str, Dataset],
    uid_root: str | None,
    study_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group: finding, status, certainty, algorithm, source slices, heatmap refs."""
    concept = finding_code(finding.positive_label)
    bundles = sorted({p.model_id for p in finding.contributions}) or ["none"]
    versions = sorted({p.model_version for p in finding.contributions}) or ["-"]
    params = [f"method: {finding.method}"[:64]] + [
        f"{p.sequence.value} {p.model_id} p={p.probability:.3f}"[:64] for p in finding.contributions
    ]
    algorithm = hd.sr.AlgorithmIdentification(
        name="+".join(bundles)[:64], version="+".join(versions)[:64], parameters=params
    )
    hm_refs: list[hd.sr.SourceImageForMeasurement] = []
    src_refs: list[hd.sr.SourceImageForMeasurementGroup] = []
    seen_src: set[tuple[str, int | None]] = set()
    for pred in finding.contributions:
        for hm in pred.heatmaps:
            sc_uid = heatmap_uid(study_uid, pred, hm, uid_root=uid_root)
            if sc_uid in heatmaps:
                hm_refs.append(hd.sr.SourceImageForMeasurement.from_source_image(heatmaps[sc_uid]))
            key = (hm.source.sop_instance_uid, hm.source.frame_number)
            src = sources.get(hm.source.sop_instance_uid)
            if src is not None and key not in seen_src:
                seen_src.add(key)
                frames = None if hm.source.frame_number is None else [hm.source.frame_number]
                src_refs.append(hd.sr.SourceImageForMeasurementGroup.from_source_image(src, frames))
    measurements: list[hd.sr.Measurement] = []
    if finding.probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=CERTAINTY_OF_FINDING,
                value=round(float(finding.probability) * 100.0, 2),
                unit=PERCENT,
                algorithm_id=algorithm,
                referenced_images=hm_refs or None,
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("tracking", study_uid, finding.task, uid_root=uid_root),
            identifier=f"task {finding.task}"[:64],
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=STATUS_CODES[finding.status])
        ],
        source_images=src_refs or None,
    )
    alternative = "" if not finding.negative_label else f" versus {finding.negative_label}"
    group[0].ContentSequence.append(
        _text(
            f"{finding.positive_label}{alternative}: {finding.status.value}."
            f" {finding.reason.rstrip('.')}."
            " Heatmaps are attention maps, not a localisation. " + NOT_FOR_DIAGNOSTIC_USE
        )
    )
    return group


def _sequence_group(
    result: StudyResult, series_numbers: dict[str, str], uid_root: str | None
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """One group listing each series' sequence class and the evidence for it."""
    if not result.sequences:
        return None
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=SEQUENCE_CLASS,
            value=Code(d.label.value, PRIVATE_SCHEME, f"MR sequence {d.label.value}"),
        )
        for d in result.sequences
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("tracking", result.study_uid, "sequences", uid_root=uid_root),
            identifier="sequence classification",
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name="neuronode sequence classifier", version=__version__
        ),
        qualitative_evaluations=evaluations,
    )
    for d in result.sequences:
        number = series_numbers.get(d.series_uid, "?")
        group[0].ContentSequence.append(
            _text(
                f"series {number} ({d.series_uid}): {d.label.value}, confidence"
                f" {d.confidence:.2f}, by {d.method.value}; " + "; ".join(d.reasons)
            )
        )
    return group


def _series_numbers(result: StudyResult) -> dict[str, str]:
    """SeriesNumber of each classified series, reading as few headers as needed."""
    wanted = {d.series_uid for d in result.sequences}
    found: dict[str, str] = {}
    for path in result.source_paths:
        if wanted <= found.keys():
            break
        try:
            hdr = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SeriesNumber"]
            )
        except (OSError, pydicom.errors.InvalidDicomError):
            continue  # a source that cannot be read only costs its series number in the text
        found.setdefault(str(hdr.get("SeriesInstanceUID", "")), str(hdr.get("SeriesNumber", "?")))
    return found


def sr_uid(result: StudyResult, sop_class: SrClass, *, uid_root: str | None) -> str:
    """The SR's SOP Instance UID: fixed by study, its series set, model versions and SR class."""
    series = sorted(
        {d.series_uid for d in result.sequences}
        | {p.series_uid for f in result.findings for p in f.contributions}
    )
    return result_uid(
        "sr", result.study_uid, *series, *_model_parts(result), sop_class, uid_root=uid_root
    )


def build_sr(
    result: StudyResult,
    heatmaps: Sequence[Dataset],
    *,
    uid_root: str | None,
    predecessor: Dataset | Path | None = None,
    sop_class: SrClass = "comprehensive3d",
) -> Dataset:
    """The study's TID 1500 Measurement Report in the requested SR SOP class."""
    if not isinstance(result, StudyResult):
        raise TypeError("result must be a StudyResult")
    if sop_class not in SR_SOP_CLASS_UIDS:
        raise ValueError(f"sop_class must be one of {sorted(SR_SOP_CLASS_UIDS)}")
    if not result.source_paths:
        raise ReportError("the study result names no source instance")
    first = _read_header(result.source_paths[0])
    if str(first.StudyInstanceUID) != result.study_uid:
        raise ReportError("the first source instance belongs to another study")
    sources: dict[str, Dataset] = {}
    for f in result.findings:
        for p in f.contributions:
            for hm in p.heatmaps:
                if hm.source.sop_instance_uid not in sources:
                    hdr = _read_header(hm.source.path)
                    if str(hdr.StudyInstanceUID) != result.study_uid:
                        raise ReportError("a heatmap source slice belongs to another study")
                    sources[hm.source.sop_instance_uid] = hdr
    series_numbers = _series_numbers(result)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in heatmaps}
    try:
        groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = [
            _task_group(f, by_uid, sources, uid_root, result.study_uid) for f in result.findings
        ]
        seq_group = _sequence_group(result, series_numbers, uid_root)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ReportError(f"cannot build a measurement group: {exc}") from exc
    if seq_group is not None:
        groups.append(seq_group)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", "neuronode", uid_root=uid_root),
            name="neuronode",
            manufacturer_name=MANUFACTURER,
            model_name=f"neuronode {__version__}",
        ),
    )
    try:
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=PROCEDURE_MR_BRAIN,
            imaging_measurements=groups,
            # The image library; highdicom's descriptors need a top-level PixelSpacing, so
            # enhanced multi-frame sources are referenced by their measurement groups only.
            referenced_images=[d for d in (*sources.values(), *heatmaps) if "PixelSpacing" in d]
            or None,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ReportError(f"cannot build the measurement report: {exc}") from exc
    previous: list[Dataset] = []
    if predecessor is not None:
        prev = _read_header(predecessor) if isinstance(predecessor, Path) else predecessor
        if str(prev.StudyInstanceUID) != result.study_uid:
            raise ReportError("the predecessor SR belongs to another study")
        previous.append(prev)
        report[0].ContentSequence.append(
            _text(
                f"This report supersedes report {prev.SOPInstanceUID}: the study was re-opened"
                " by series that arrived later."
            )
        )
    report[0].ContentSequence.append(
        _text(f"Generated by neuronode {__version__}. {NOT_FOR_DIAGNOSTIC_USE}.")
    )
    evidence = [
        first,
        *[d for uid, d in sources.items() if uid != str(first.SOPInstanceUID)],
        *heatmaps,
    ]
    cls = {
        "comprehensive3d": hd.sr.Comprehensive3DSR,
        "comprehensive": hd.sr.ComprehensiveSR,
        "enhanced": hd.sr.EnhancedSR,
    }[sop_class]
    try:
        sr = _quietly(
            cls,
            evidence=evidence,
            content=report,
            series_instance_uid=result_uid(
                "sr-series", result.study_uid, *_model_parts(result), uid_root=uid_root
            ),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sr_uid(result, sop_class, uid_root=uid_root),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            previous_versions=previous or None,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ReportError(f"cannot build the structured report: {exc}") from exc
    _copy_entity_attributes(first, sr)
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = _scheme_identification()
    sr.SoftwareVersions = __version__
    built: Dataset = sr
    return built


def reencode_sr(sr: Dataset, sop_class: SrClass, *, uid_root: str | None) -> Dataset:
    """The same SR content under another SR SOP class (fallback when a PACS refuses the first).

    Valid because our reports hold no spatial coordinates, the only content that differs
    between Comprehensive 3D, Comprehensive and Enhanced SR. The copy gets its own UID.
    """
    if sop_class not in SR_SOP_CLASS_UIDS:
        raise ValueError(f"sop_class must be one of {sorted(SR_SOP_CLASS_UIDS)}")
    if str(sr.SOPClassUID) not in SR_SOP_CLASS_UIDS.values():
        raise ReportError("only our SR classes can be re-encoded")
    if str(sr.SOPClassUID) == SR_SOP_CLASS_UIDS[sop_class]:
        return sr

    def has_coordinates(items: Sequence[Dataset]) -> bool:
        return any(
            str(i.get("ValueType", "")) in ("SCOORD", "SCOORD3D")
            or has_coordinates(i.get("ContentSequence", ()))
            for i in items
        )

    if has_coordinates(sr.get("ContentSequence", ())):
        raise ReportError("an SR with spatial coordinates cannot be re-encoded")
    out = copy.deepcopy(sr)
    new_uid = result_uid("sr-reencoded", str(sr.SOPInstanceUID), sop_class, uid_root=uid_root)
    out.SOPClassUID = pydicom.uid.UID(SR_SOP_CLASS_UIDS[sop_class])
    out.SOPInstanceUID = pydicom.uid.UID(new_uid)
    if hasattr(out, "file_meta"):
        out.file_meta.MediaStorageSOPClassUID = out.SOPClassUID
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def sr_class_of(sop_class_uid: str) -> SrClass | None:
    """Which of our SR classes a SOP Class UID is, or None for any other class."""
    for name, uid in SR_SOP_CLASS_UIDS.items():
        if uid == sop_class_uid:
            return name
    return None

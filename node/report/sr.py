"""One Comprehensive 3D SR per study (TID 1500 Measurement Report), with fallbacks.

A qualitative evaluation per task (finding, calibrated probability), algorithm identification,
references to the source series and to the heatmaps, and the words NOT FOR DIAGNOSTIC USE.
A re-run whose content differs supersedes the previous SR and references it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node import __version__
from node.errors import ReportError
from node.records import StudyResult, TaskFinding
from node.report.codes import (
    CERTAINTY_OF_FINDING,
    COMMENT,
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    PERCENT,
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    PROCEDURE_MR_BRAIN,
    SEQUENCE_CLASS,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    SR_SOP_CLASS_UIDS,
    STATUS_CODES,
    SrClass,
    finding_code,
)
from node.report.sources import copy_entity_attributes, quietly, read_header
from node.report.uids import heatmap_uid, model_parts, result_uid, sr_uid


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
    """SeriesNumber of each classified series: from the result when the pipeline gave them
    (its headers are read once per job), else reading as few headers as needed."""
    wanted = {d.series_uid for d in result.sequences}
    found: dict[str, str] = dict(result.series_numbers)
    if wanted <= found.keys():
        return found
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
    first = read_header(result.source_paths[0])
    if str(first.StudyInstanceUID) != result.study_uid:
        raise ReportError("the first source instance belongs to another study")
    sources: dict[str, Dataset] = {}
    for f in result.findings:
        for p in f.contributions:
            for hm in p.heatmaps:
                if hm.source.sop_instance_uid not in sources:
                    hdr = read_header(hm.source.path)
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
        raise ReportError(f"cannot build a measurement group: {type(exc).__name__}") from exc
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
        raise ReportError(f"cannot build the measurement report: {type(exc).__name__}") from exc
    previous: list[Dataset] = []
    if predecessor is not None:
        prev = read_header(predecessor) if isinstance(predecessor, Path) else predecessor
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
        sr = _document(
            cls,
            evidence=evidence,
            content=report,
            series_instance_uid=result_uid(
                "sr-series", result.study_uid, *model_parts(result), uid_root=uid_root
            ),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sr_uid(
                result,
                sop_class,
                uid_root=uid_root,
                predecessor_uid=str(previous[0].SOPInstanceUID) if previous else None,
            ),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            previous_versions=previous or None,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ReportError(f"cannot build the structured report: {type(exc).__name__}") from exc
    copy_entity_attributes(first, sr)
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = _scheme_identification()
    sr.SoftwareVersions = __version__
    built: Dataset = sr
    return built


def _document(
    cls: type[hd.sr.sop._SR], *, content: hd.sr.MeasurementReport, **kwargs: Any
) -> Dataset:
    """highdicom's SR document around a content tree highdicom just built, without copying
    and re-reading that tree: the constructor deep-copies its content, parses it back into
    content items and walks it to check that every image it references is in the evidence,
    which was most of the report's time. Here the constructor gets the root container with
    no children (the evidence, the header, the flags: all highdicom's), and the tree goes in
    after. The
    document is the same: the evidence sequence is built from the evidence list either way,
    and everything the tree references is in that list (build_sr puts it there).
    """
    root: Dataset = content[0]
    children = root.ContentSequence
    root.ContentSequence = DicomSequence()
    try:
        sr: Dataset = quietly(cls, content=content, **kwargs)
    finally:
        root.ContentSequence = children
    sr.ContentSequence = children
    return sr


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


def warm_up() -> Dataset:
    """Build one tiny heatmap-like image and SR in memory (returned for a test; thrown away).

    highdicom reads its tables of the standard (JSON) and pydicom its code dictionaries on
    first use: about 1 s that a worker pays here, before it says it is ready, instead of in
    its first study's report.
    """
    ref = Dataset()
    ref.SOPClassUID = pydicom.uid.MRImageStorage
    study = result_uid("warm-up", "study", uid_root=None)
    ref.StudyInstanceUID = study
    ref.SeriesInstanceUID = result_uid("warm-up", "series", uid_root=None)
    ref.SOPInstanceUID = result_uid("warm-up", "image", uid_root=None)
    ref.FrameOfReferenceUID = result_uid("warm-up", "frame", uid_root=None)
    ref.Modality = "MR"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ref, keyword, "")
    for keyword in ("StudyID", "StudyDate", "StudyTime", "AccessionNumber"):
        setattr(ref, keyword, "")
    ref.ReferringPhysicianName = ""
    ref.Rows = ref.Columns = 8
    ref.PixelSpacing = [1.0, 1.0]
    ref.SliceThickness = 1.0
    ref.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ref.ImagePositionPatient = [0.0, 0.0, 0.0]
    sc = quietly(
        hd.sc.SCImage.from_ref_dataset,
        ref_dataset=ref,
        pixel_array=np.zeros((8, 8, 3), dtype=np.uint8),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid("warm-up", "sc-series", uid_root=None),
        series_number=1,
        sop_instance_uid=result_uid("warm-up", "sc", uid_root=None),
        instance_number=1,
        manufacturer=MANUFACTURER,
        pixel_spacing=(1.0, 1.0),
        patient_orientation=("L", "P"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    algorithm = hd.sr.AlgorithmIdentification(name="warm-up", version=__version__)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("warm-up", "tracking", uid_root=None), identifier="warm up"
        ),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=CERTAINTY_OF_FINDING,
                value=1.0,
                unit=PERCENT,
                algorithm_id=algorithm,
                referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(sc)],
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("warm-up", "device", uid_root=None), name="neuronode"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_MR_BRAIN,
        imaging_measurements=[group],
        referenced_images=[ref, sc],
    )
    sr: Dataset = quietly(
        hd.sr.Comprehensive3DSR,
        evidence=[ref, sc],
        content=report,
        series_instance_uid=result_uid("warm-up", "sr-series", uid_root=None),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid("warm-up", "sr", uid_root=None),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
    return sr

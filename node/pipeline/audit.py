"""The audit record of one study job: a typed record tree, written as JSON in one place.

Every run of a study, done, skipped or failed, leaves `<out>/<study_key>/audit.json`: what
arrived, how it decoded, the sequence decisions with their evidence, the routes, predictions,
findings and result objects. It holds UIDs, series descriptions and model figures, never
patient names, IDs or birth dates. `read_audit` gives the same record back (demo, bench, CLI).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError
from pydicom.uid import UID

from node import NOT_FOR_CLINICAL_USE, __version__
from node.dicom.volumes import SeriesId, series_id, volume_id
from node.errors import NodeError
from node.log import uid_key
from node.pipeline.context import AUDIT_FILE, Stage, StudyContext
from node.records import (
    FindingStatus,
    InstanceHeader,
    SeriesLayout,
    SeriesPrediction,
    StudyLoad,
)
from node.store.files import write_json_durable


@dataclass(frozen=True, slots=True, kw_only=True)
class FileProblem:
    """A file that did not decode, and why (no header values are quoted)."""

    file: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StageTiming:
    """How long a stage took: wall time, and the CPU time of the process that ran it (less
    sensitive than wall time to what else the machine is doing)."""

    stage: str
    duration_ms: float
    cpu_ms: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    """The error that failed a run: its type, and the message only for the node's own errors."""

    type: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesEntry:
    """One series as it arrived: instances, encodings, decode errors and, if loaded, geometry."""

    series_key: str
    series_instance_uid: str
    series_number: int | None
    uid_shared_with_other_numbers: bool
    description: str
    modality: str
    n_instances: int
    n_frames: int
    sop_classes: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]
    image_types: tuple[str, ...]
    photometric: tuple[str, ...]
    matrix: tuple[str, ...]
    loaded: bool
    decode_errors: tuple[FileProblem, ...]
    volume_shape: tuple[int, ...] | None = None
    n_slice_positions: int | None = None
    n_time_points: int | None = None
    slice_spacing_mm: float | None = None
    pixel_spacing_mm: tuple[float, ...] | None = None
    slice_thickness_mm: float | None = None
    orientation: tuple[float, ...] | None = None
    first_position_mm: tuple[float, ...] | None = None
    last_position_mm: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceEntry:
    """The sequence label of one series, how it was decided and the evidence."""

    series_instance_uid: str
    series_number: int | None
    description: str
    label: str
    confidence: float
    method: str
    tag_label: str | None
    cnn_label: str | None
    cnn_votes: dict[str, int]
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteEntry:
    task: str
    bundle: str
    series_instance_uid: str
    sequence: str
    weight: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PredictionEntry:
    task: str
    model_id: str
    model_version: str
    series_instance_uid: str
    sequence: str
    probability: float
    slice_indices: tuple[int, ...]
    slice_probabilities: tuple[float, ...]
    heatmap_slices: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class FindingEntry:
    task: str
    positive_label: str
    negative_label: str
    status: str
    probability: float | None
    method: str
    reason: str
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectEntry:
    kind: str  # "sr" or "sc"
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    file: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """Everything one run of one study did (field order is the JSON key order)."""

    not_for_clinical_use: bool
    notice: str
    node_version: str
    status: str  # done, skipped, failed
    failed_stage: str | None
    error: ErrorInfo | None
    job_id: int
    attempt: int
    reopened: bool
    study_key: str
    study_instance_uid: str
    started_at: str
    finished_at: str
    duration_ms: float
    stages: tuple[StageTiming, ...]
    n_files: int
    n_instances: int | None
    n_series: int | None
    n_decode_errors: int | None
    series: tuple[SeriesEntry, ...]
    unreadable_files: tuple[FileProblem, ...]
    own_results_ignored: int
    qualifies: bool | None
    qualify_reason: str
    sequence_cnn: str
    sequences: tuple[SequenceEntry, ...]
    routes: tuple[RouteEntry, ...]
    predictions: tuple[PredictionEntry, ...]
    findings: tuple[FindingEntry, ...]
    n_findings: int
    report_note: str
    objects: tuple[ObjectEntry, ...]
    predecessor_sr: str | None
    destinations: tuple[str, ...]
    deliveries_enqueued: int | None


_ADAPTER: TypeAdapter[AuditRecord] = TypeAdapter(AuditRecord)


def audit_to_json(record: AuditRecord) -> dict[str, Any]:
    """The record as a JSON-ready dict: the one place the audit becomes JSON."""
    return dataclasses.asdict(record)


def read_audit(path: Path) -> AuditRecord:
    """An audit.json read back into its record (NodeError if missing or not an audit)."""
    try:
        return _ADAPTER.validate_json(path.read_bytes())
    except OSError as exc:
        raise NodeError(f"cannot read audit record {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        raise NodeError(f"{path} is not an audit record ({exc.error_count()} problems)") from exc


def audit_path(out_dir: Path, study_uid: str) -> Path:
    """Where the audit record of a study lives: out_dir/<study_key>/audit.json."""
    return out_dir / uid_key(study_uid) / AUDIT_FILE


def write_audit(
    ctx: StudyContext, *, status: str, failed_stage: Stage | None, error: ErrorInfo | None
) -> Path:
    """Write the study's audit record atomically and durably; return its path."""
    path = audit_path(ctx.out_dir, ctx.job.study_uid)
    record = build_audit(ctx, status=status, failed_stage=failed_stage, error=error)
    write_json_durable(path, audit_to_json(record))
    return path


def error_info(exc: BaseException) -> ErrorInfo:
    """The error as the audit keeps it.

    Our own messages are written to be safe; a third-party message could quote header values,
    so only its type is kept.
    """
    message = str(exc) if isinstance(exc, NodeError) else ""
    return ErrorInfo(type=type(exc).__name__, message=message[:500])


def n_findings(ctx: StudyContext) -> int:
    """Tasks with an answer (present, absent or indeterminate; not 'not assessable')."""
    return sum(1 for f in ctx.findings if f.status is not FindingStatus.NOT_ASSESSABLE)


def series_ids(loaded: StudyLoad) -> set[SeriesId]:
    return {series_id(h) for h in loaded.headers}


def build_audit(
    ctx: StudyContext, *, status: str, failed_stage: Stage | None, error: ErrorInfo | None
) -> AuditRecord:
    """The audit record of a run (UIDs and descriptions, never patient data)."""
    loaded = ctx.loaded
    known = {h.path for h in loaded.headers} if loaded is not None else set()
    unreadable = (
        tuple(
            FileProblem(file=str(p.path), reason=p.reason)
            for p in loaded.problems
            if p.series_uid is None and p.path not in known
        )
        if loaded is not None
        else ()
    )
    now = time.time()
    cpu = dict(ctx.stage_cpu_ms)
    numbers = {h.series_uid: h for h in ctx.headers}
    return AuditRecord(
        not_for_clinical_use=True,
        notice=NOT_FOR_CLINICAL_USE,
        node_version=__version__,
        status=status,
        failed_stage=failed_stage.value if failed_stage is not None else None,
        error=error,
        job_id=ctx.job.job_id,
        attempt=ctx.job.attempt,
        reopened=ctx.job.reopened,
        study_key=uid_key(ctx.job.study_uid),
        study_instance_uid=ctx.job.study_uid,
        started_at=_iso(ctx.started_at),
        finished_at=_iso(now),
        duration_ms=round((now - ctx.started_at) * 1000, 1),
        stages=tuple(
            StageTiming(
                stage=name,
                duration_ms=round(ms, 1),
                cpu_ms=round(cpu[name], 1) if name in cpu else None,
            )
            for name, ms in ctx.stage_ms
        ),
        n_files=len(ctx.job.instance_paths),
        n_instances=len(loaded.headers) if loaded is not None else None,
        n_series=len(series_ids(loaded)) if loaded is not None else None,
        n_decode_errors=len(loaded.problems) if loaded is not None else None,
        series=_series_entries(loaded) if loaded is not None else (),
        unreadable_files=unreadable,
        own_results_ignored=ctx.n_own_results,
        qualifies=ctx.qualifies,
        qualify_reason=ctx.qualify_reason,
        sequence_cnn=ctx.sequence_cnn,
        sequences=tuple(
            SequenceEntry(
                series_instance_uid=d.series_uid,
                series_number=h.series_number if (h := numbers.get(d.series_uid)) else None,
                description=h.series_description if h is not None else "",
                label=d.label.value,
                confidence=round(d.confidence, 4),
                method=d.method.value,
                tag_label=d.tag_label.value if d.tag_label is not None else None,
                cnn_label=d.cnn_label.value if d.cnn_label is not None else None,
                cnn_votes={label.value: n for label, n in d.cnn_votes},
                reasons=tuple(d.reasons),
            )
            for d in ctx.decisions
        ),
        routes=tuple(
            RouteEntry(
                task=r.task,
                bundle=r.bundle,
                series_instance_uid=r.series_uid,
                sequence=r.sequence.value,
                weight=r.weight,
            )
            for r in ctx.routes
        ),
        predictions=tuple(_prediction_entry(p) for p in ctx.predictions),
        findings=tuple(
            FindingEntry(
                task=f.task,
                positive_label=f.positive_label,
                negative_label=f.negative_label,
                status=f.status.value,
                probability=f.probability,
                method=f.method,
                reason=f.reason,
                models=tuple(sorted({f"{p.model_id} {p.model_version}" for p in f.contributions})),
            )
            for f in ctx.findings
        ),
        n_findings=n_findings(ctx),
        report_note=ctx.report_note,
        objects=tuple(
            ObjectEntry(
                kind=o.kind,
                sop_class_uid=o.sop_class_uid,
                sop_instance_uid=o.sop_instance_uid,
                series_instance_uid=o.series_instance_uid,
                file=str(o.path),
            )
            for o in ctx.objects
        ),
        predecessor_sr=ctx.predecessor_sr,
        destinations=tuple(ctx.destinations),
        deliveries_enqueued=ctx.n_enqueued,
    )


def _prediction_entry(p: SeriesPrediction) -> PredictionEntry:
    return PredictionEntry(
        task=p.task,
        model_id=p.model_id,
        model_version=p.model_version,
        series_instance_uid=p.series_uid,
        sequence=p.sequence.value,
        probability=p.probability,
        slice_indices=tuple(p.slice_indices),
        slice_probabilities=tuple(round(x, 4) for x in p.slice_probabilities),
        heatmap_slices=tuple(h.slice_index for h in p.heatmaps),
    )


def _uid_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name or uid


def _n_positions(volume: SeriesLayout) -> int:
    """Slice positions per time point: the first run of rising positions along the normal."""
    ori = volume.slices[0].geometry.orientation
    normal = np.cross(ori[:3], ori[3:])
    d = [float(np.dot(normal, s.geometry.position)) for s in volume.slices]
    n = 1
    while n < len(d) and d[n] - d[n - 1] > 1e-3:
        n += 1
    return n


def _series_entries(loaded: StudyLoad) -> tuple[SeriesEntry, ...]:
    """One entry per series: what arrived, how it decoded, its geometry."""
    headers: dict[SeriesId, list[InstanceHeader]] = defaultdict(list)
    for h in loaded.headers:
        headers[series_id(h)].append(h)
    volumes = {volume_id(v): v for v in loaded.layouts}
    header_paths = {h.path: series_id(h) for h in loaded.headers}
    errors: dict[SeriesId, list[FileProblem]] = defaultdict(list)
    for p in loaded.problems:
        sid_of = header_paths.get(p.path)
        if sid_of is None and p.series_uid is not None:
            # The file's pixels failed before its header was recorded: attach it to the first
            # series with its UID (the number is unknown).
            sid_of = next((s for s in headers if s[0] == p.series_uid), None)
        if sid_of is not None:
            errors[sid_of].append(FileProblem(file=str(p.path), reason=p.reason))
    split_uids = {uid for uid, _ in headers if sum(1 for u, _ in headers if u == uid) > 1}
    entries = []
    for sid in sorted(headers, key=lambda s: (s[1] if s[1] is not None else -1, s[0])):
        hs = headers[sid]
        vol: SeriesLayout | None = volumes.get(sid)
        first = hs[0]
        key_text = f"{sid[0]}#{sid[1]}" if sid[0] in split_uids else sid[0]
        geometry: dict[str, Any] = {}
        if vol is not None:
            geom = vol.slices[0].geometry
            n_positions = _n_positions(vol)
            geometry = {
                "volume_shape": tuple(vol.shape),
                "n_slice_positions": n_positions,
                "n_time_points": vol.n_frames // n_positions if n_positions else 0,
                "slice_spacing_mm": vol.slice_spacing_mm,
                "pixel_spacing_mm": tuple(geom.pixel_spacing),
                "slice_thickness_mm": geom.slice_thickness,
                "orientation": tuple(geom.orientation),
                "first_position_mm": tuple(geom.position),
                "last_position_mm": tuple(vol.slices[-1].geometry.position),
            }
        entries.append(
            SeriesEntry(
                series_key=uid_key(key_text),
                series_instance_uid=sid[0],
                series_number=sid[1],
                uid_shared_with_other_numbers=sid[0] in split_uids,
                description=first.series_description,
                modality=first.modality,
                n_instances=len(hs),
                n_frames=sum(h.n_frames for h in hs),
                sop_classes=tuple(sorted({_uid_name(h.sop_class_uid) for h in hs})),
                transfer_syntaxes=tuple(sorted({_uid_name(h.transfer_syntax_uid) for h in hs})),
                image_types=tuple(sorted({"\\".join(h.image_type) for h in hs})),
                photometric=tuple(sorted({h.photometric for h in hs if h.photometric})),
                matrix=tuple(sorted({f"{h.rows}x{h.columns}" for h in hs if h.has_pixels})),
                loaded=vol is not None,
                decode_errors=tuple(errors.get(sid, [])),
                **geometry,
            )
        )
    return tuple(entries)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")

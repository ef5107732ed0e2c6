"""One study job end to end: named stages in order, then an audit record of what happened.

Stages run in the order of ``STAGES``; each takes the frozen ``StudyContext`` and returns a new
one with its own field filled in. Later issues slot classification, routing, inference,
ensemble, report and outbox in between LOAD and AUDIT, each as one more ``(Stage, function)``.

Failure policy: ``process_study`` is the per-job outer guard (the only ``except Exception``
here). When a stage raises, the audit record is still written with ``status: "failed"``, the
failed ``stage`` and the error type, and a ``NodeError`` is raised to the job queue: the
stage's own ``NodeError`` as is, anything else wrapped in ``StageFailed`` (``.stage`` names the
stage). The queue decides retry or dead letter from its attempt count. Files that do not decode
are not a failure: they are listed in the audit and the study goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from node import NOT_FOR_CLINICAL_USE, __version__
from node.config import Rules, load_rules
from node.dicomio import SeriesId, scan_study, series_id, volume_id
from node.errors import NodeError
from node.log import configure, get_logger, uid_key
from node.records import InstanceHeader, SeriesVolume, StudyJob, StudyLoad, StudyOutcome

log = get_logger(__name__)

AUDIT_FILE = "audit.json"
DEFAULT_OUT = Path("neuronode-out")


class Stage(StrEnum):
    """The named steps of the pipeline, in the order they run."""

    LOAD = "load"
    # Later issues: CLASSIFY = "classify", ROUTE = "route", INFER = "infer",
    # ENSEMBLE = "ensemble", REPORT = "report", OUTBOX = "outbox".
    AUDIT = "audit"


class StageFailed(NodeError):
    """A pipeline stage failed with an error that was not already a NodeError."""

    def __init__(self, message: str, *, stage: Stage) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class StudyContext:
    """What the stages know about one study so far; each stage returns a filled-in copy."""

    job: StudyJob
    rules: Rules
    out_dir: Path
    started_at: float
    loaded: StudyLoad | None = None
    stage_ms: tuple[tuple[str, float], ...] = field(default_factory=tuple)


StageFn = Callable[[StudyContext], StudyContext]


def stage_load(ctx: StudyContext) -> StudyContext:
    """Read every instance of the study into ordered series volumes."""
    return replace(ctx, loaded=scan_study(ctx.job.instance_paths))


def stage_audit(ctx: StudyContext) -> StudyContext:
    """Write the audit record of a successful run."""
    write_audit(ctx, status="done", failed_stage=None, error=None)
    return ctx


STAGES: tuple[tuple[Stage, StageFn], ...] = (
    (Stage.LOAD, stage_load),
    (Stage.AUDIT, stage_audit),
)


def audit_path(out_dir: Path, study_uid: str) -> Path:
    """Where the audit record of a study lives: out_dir/<study_key>/audit.json."""
    return out_dir / uid_key(study_uid) / AUDIT_FILE


def _uid_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name or uid


def _n_positions(volume: SeriesVolume) -> int:
    """Slice positions per time point: the first run of rising positions along the normal."""
    ori = volume.slices[0].geometry.orientation
    normal = np.cross(ori[:3], ori[3:])
    d = [float(np.dot(normal, s.geometry.position)) for s in volume.slices]
    n = 1
    while n < len(d) and d[n] - d[n - 1] > 1e-3:
        n += 1
    return n


def _series_entries(loaded: StudyLoad) -> list[dict[str, Any]]:
    """One audit entry per series: what arrived, how it decoded, its geometry."""
    headers: dict[SeriesId, list[InstanceHeader]] = defaultdict(list)
    for h in loaded.headers:
        headers[series_id(h)].append(h)
    volumes = {volume_id(v): v for v in loaded.volumes}
    header_paths = {h.path: series_id(h) for h in loaded.headers}
    errors: dict[SeriesId, list[dict[str, str]]] = defaultdict(list)
    for p in loaded.problems:
        sid_of = header_paths.get(p.path)
        if sid_of is None and p.series_uid is not None:
            # The file's pixels failed before its header was recorded: attach it to the first
            # series with its UID (the number is unknown).
            sid_of = next((s for s in headers if s[0] == p.series_uid), None)
        if sid_of is not None:
            errors[sid_of].append({"file": str(p.path), "reason": p.reason})
    split_uids = {uid for uid, _ in headers if sum(1 for u, _ in headers if u == uid) > 1}
    entries = []
    for sid in sorted(headers, key=lambda s: (s[1] if s[1] is not None else -1, s[0])):
        hs = headers[sid]
        vol: SeriesVolume | None = volumes.get(sid)
        first = hs[0]
        key_text = f"{sid[0]}#{sid[1]}" if sid[0] in split_uids else sid[0]
        entry: dict[str, Any] = {
            "series_key": uid_key(key_text),
            "series_instance_uid": sid[0],
            "series_number": sid[1],
            "uid_shared_with_other_numbers": sid[0] in split_uids,
            "description": first.series_description,
            "modality": first.modality,
            "n_instances": len(hs),
            "n_frames": sum(h.n_frames for h in hs),
            "sop_classes": sorted({_uid_name(h.sop_class_uid) for h in hs}),
            "transfer_syntaxes": sorted({_uid_name(h.transfer_syntax_uid) for h in hs}),
            "image_types": sorted({"\\".join(h.image_type) for h in hs}),
            "photometric": sorted({h.photometric for h in hs if h.photometric}),
            "matrix": sorted({f"{h.rows}x{h.columns}" for h in hs if h.has_pixels}),
            "loaded": vol is not None,
            "decode_errors": errors.get(sid, []),
        }
        if vol is not None:
            geom = vol.slices[0].geometry
            n_positions = _n_positions(vol)
            entry.update(
                {
                    "volume_shape": list(vol.pixels.shape),
                    "n_slice_positions": n_positions,
                    "n_time_points": vol.n_frames // n_positions if n_positions else 0,
                    "slice_spacing_mm": vol.slice_spacing_mm,
                    "pixel_spacing_mm": list(geom.pixel_spacing),
                    "slice_thickness_mm": geom.slice_thickness,
                    "orientation": list(geom.orientation),
                    "first_position_mm": list(geom.position),
                    "last_position_mm": list(vol.slices[-1].geometry.position),
                }
            )
        entries.append(entry)
    return entries


def build_audit(
    ctx: StudyContext, *, status: str, failed_stage: Stage | None, error: dict[str, str] | None
) -> dict[str, Any]:
    """The audit record as a JSON-ready dict (UIDs and descriptions, never patient data)."""
    loaded = ctx.loaded
    known = {h.path for h in loaded.headers} if loaded is not None else set()
    unreadable = (
        [
            {"file": str(p.path), "reason": p.reason}
            for p in loaded.problems
            if p.series_uid is None and p.path not in known
        ]
        if loaded is not None
        else []
    )
    now = time.time()
    return {
        "not_for_clinical_use": True,
        "notice": NOT_FOR_CLINICAL_USE,
        "node_version": __version__,
        "status": status,
        "failed_stage": failed_stage.value if failed_stage is not None else None,
        "error": error,
        "job_id": ctx.job.job_id,
        "attempt": ctx.job.attempt,
        "reopened": ctx.job.reopened,
        "study_key": uid_key(ctx.job.study_uid),
        "study_instance_uid": ctx.job.study_uid,
        "started_at": _iso(ctx.started_at),
        "finished_at": _iso(now),
        "duration_ms": round((now - ctx.started_at) * 1000, 1),
        "stages": [{"stage": name, "duration_ms": round(ms, 1)} for name, ms in ctx.stage_ms],
        "n_files": len(ctx.job.instance_paths),
        "n_instances": len(loaded.headers) if loaded is not None else None,
        "n_series": len(_series_ids(loaded)) if loaded is not None else None,
        "n_decode_errors": len(loaded.problems) if loaded is not None else None,
        "series": _series_entries(loaded) if loaded is not None else [],
        "unreadable_files": unreadable,
    }


def _series_ids(loaded: StudyLoad) -> set[SeriesId]:
    return {series_id(h) for h in loaded.headers}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_audit(
    ctx: StudyContext, *, status: str, failed_stage: Stage | None, error: dict[str, str] | None
) -> Path:
    """Write the study's audit record atomically and return its path."""
    path = audit_path(ctx.out_dir, ctx.job.study_uid)
    write_json_atomic(path, build_audit(ctx, status=status, failed_stage=failed_stage, error=error))
    return path


def _error_record(exc: BaseException) -> dict[str, str]:
    # Our own messages are written to be safe; a third-party message could quote header
    # values, so only its type is kept.
    message = str(exc) if isinstance(exc, NodeError) else ""
    return {"type": type(exc).__name__, "message": message[:500]}


def process_study(job: StudyJob, rules: Rules, *, out_dir: Path) -> StudyOutcome:
    """Run every stage on one study and write its audit record; raise NodeError on failure."""
    started = time.time()
    ctx = StudyContext(job=job, rules=rules, out_dir=out_dir, started_at=started)
    study_key = uid_key(job.study_uid)
    for stage, fn in STAGES:
        t0 = time.perf_counter()
        try:
            ctx = fn(ctx)
        except Exception as exc:  # the per-job outer guard
            ctx = replace(
                ctx, stage_ms=(*ctx.stage_ms, (stage.value, (time.perf_counter() - t0) * 1000))
            )
            log.error(
                "study_failed",
                study_key=study_key,
                job_id=job.job_id,
                attempt=job.attempt,
                stage=stage.value,
                error_type=type(exc).__name__,
                duration_ms=round((time.time() - started) * 1000, 1),
            )
            if stage is not Stage.AUDIT:
                try:
                    write_audit(ctx, status="failed", failed_stage=stage, error=_error_record(exc))
                except OSError:
                    log.error("audit_write_failed", study_key=study_key, stage=stage.value)
            if isinstance(exc, NodeError):
                raise
            raise StageFailed(
                f"stage {stage.value} failed: {type(exc).__name__}", stage=stage
            ) from exc
        ctx = replace(
            ctx, stage_ms=(*ctx.stage_ms, (stage.value, (time.perf_counter() - t0) * 1000))
        )
    loaded = ctx.loaded
    assert loaded is not None  # the LOAD stage always runs first
    outcome = StudyOutcome(
        study_uid=job.study_uid,
        audit_path=audit_path(out_dir, job.study_uid),
        n_series=len(_series_ids(loaded)),
        n_instances=len(loaded.headers),
        n_decode_errors=len(loaded.problems),
    )
    log.info(
        "study_processed",
        study_key=study_key,
        job_id=job.job_id,
        attempt=job.attempt,
        reopened=job.reopened,
        n_series=outcome.n_series,
        n_instances=outcome.n_instances,
        n_errors=outcome.n_decode_errors,
        duration_ms=round((time.time() - started) * 1000, 1),
    )
    return outcome


# --- `neuronode process DIR` ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderScan:
    """DICOM files of a folder grouped by study, and what was skipped."""

    studies: tuple[tuple[str, tuple[Path, ...]], ...]
    n_skipped: int  # not DICOM, DICOMDIR, or without a StudyInstanceUID


def scan_folder(directory: Path) -> FolderScan:
    """Find DICOM files under a folder (recursively) and group them by StudyInstanceUID."""
    by_study: dict[str, list[Path]] = defaultdict(list)
    skipped = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            skipped += 1
            continue
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "MediaStorageSOPClassUID"],
            )
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError, KeyError):
            skipped += 1
            continue
        study_uid = ds.get("StudyInstanceUID")
        media_class = ds.file_meta.get("MediaStorageSOPClassUID") if ds.file_meta else None
        if not study_uid or str(media_class) == "1.2.840.10008.1.3.10":  # Media Storage Directory
            skipped += 1
            continue
        by_study[str(study_uid)].append(path)
    return FolderScan(
        studies=tuple((uid, tuple(paths)) for uid, paths in by_study.items()),
        n_skipped=skipped,
    )


def _summary_table(audit: dict[str, Any]) -> str:
    """A readable table of the series of one audit record."""
    head = ("#", "description", "inst", "frames", "matrix", "SOP class", "transfer syntax", "err")
    rows = [head]
    for s in audit["series"]:
        rows.append(
            (
                "" if s["series_number"] is None else str(s["series_number"]),
                s["description"][:32],
                str(s["n_instances"]),
                str(s["n_frames"]),
                ",".join(s["matrix"]) or "-",
                ", ".join(n.removesuffix(" Storage") for n in s["sop_classes"])[:32],
                ", ".join(s["transfer_syntaxes"])[:40],
                str(len(s["decode_errors"])),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cmd_process(args: argparse.Namespace) -> int:
    """`neuronode process DIR`: run the pipeline on each study of a folder, without network."""
    directory: Path = args.directory
    out_dir: Path = args.out if args.out is not None else DEFAULT_OUT
    rules_path: Path = args.rules
    if rules_path.exists():
        rules = load_rules(rules_path)
        rules_note = f"rules: {rules_path}"
    else:
        rules = Rules()
        rules_note = f"rules: {rules_path} not found, using the built-in defaults"
    configure(fmt=rules.logging.format, level=rules.logging.level)
    if not directory.is_dir():
        print(f"neuronode process: {directory} is not a folder")
        return 2
    scan = scan_folder(directory)
    print(rules_note)
    print(
        f"{directory}: {len(scan.studies)} study(ies), "
        f"{sum(len(p) for _, p in scan.studies)} DICOM file(s), "
        f"{scan.n_skipped} other file(s) skipped"
    )
    print(NOT_FOR_CLINICAL_USE)
    failures = 0
    for study_uid, paths in scan.studies:
        job = StudyJob(job_id=0, study_uid=study_uid, instance_paths=paths, attempt=1)
        print(f"\nstudy {uid_key(study_uid)}  ({len(paths)} files)")
        try:
            outcome = process_study(job, rules, out_dir=out_dir)
        except NodeError as exc:
            failures += 1
            print(f"  FAILED: {exc}  (audit: {audit_path(out_dir, study_uid)})")
            continue
        audit = json.loads(outcome.audit_path.read_text(encoding="utf-8"))
        print(_summary_table(audit))
        if audit["unreadable_files"]:
            print(f"unreadable files: {len(audit['unreadable_files'])}")
        print(
            f"{outcome.n_series} series, {outcome.n_instances} instances, "
            f"{outcome.n_decode_errors} decode error(s), {audit['duration_ms']:.0f} ms"
        )
        print(f"audit: {outcome.audit_path}")
    return 1 if failures else 0

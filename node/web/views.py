"""What the status page shows, read from the spool index, the outbox, the audit records and
one instance's header; and the actions it offers, bound to the node.

Read-only: the index through `Index.query`, the outbox through a read-only SQLite connection,
the audit through `read_audit`. The actions call the functions `neuronode requeue` calls
(`JobQueue.requeue`, `Outbox.requeue`) and, for force-complete, `JobQueue.enqueue` (what the
completion scheduler does when a study is quiet). Patient identifiers are read only here, when
a page is rendered, and are never logged.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from node.deliver.outbox import Outbox
from node.deliver.send import object_kind
from node.errors import NodeError
from node.ingest.spool import PARSE_ERRORS, Spool
from node.log import get_logger, uid_key
from node.pipeline.audit import AuditRecord, FindingEntry, audit_path, read_audit
from node.pipeline.jobs import JobQueue
from node.records import DeliveryState, StudyStatus
from node.store.db import Row
from node.store.retention import results_dir

log = get_logger(__name__)

THUMBNAIL_PX = 256
_LATEST_JOB = "j.job_id = (SELECT MAX(job_id) FROM jobs WHERE study_uid = s.study_uid)"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusHooks:
    """What the page reads beyond the spool, and the actions it may take."""

    results_dir: Path
    last_refusal: Callable[[], tuple[str, ...]]  # problems of the last refused rule file
    requeue_job: Callable[[str], int]  # study UID -> jobs requeued
    requeue_deliveries: Callable[[str, str], int]  # study UID, destination -> rows requeued
    force_complete: Callable[[str], bool]  # study UID -> made ready now

    @classmethod
    def for_spool(
        cls,
        spool: Spool,
        *,
        queue: JobQueue | None = None,
        wake: Callable[[], None] = lambda: None,
        last_refusal: Callable[[], tuple[str, ...]] = tuple,
    ) -> StatusHooks:
        """Hooks over a spool (and the node's queue); `wake` tells the workers there is work."""
        q = queue if queue is not None else JobQueue(spool.index, owner="status-page", lease_s=60)

        def requeue_job(study_uid: str) -> int:
            # A study named on purpose may also be a failed one (as `neuronode requeue --study`).
            n = len(q.requeue(study_uid=study_uid, include_failed=True))
            wake()
            return n

        def requeue_deliveries(study_uid: str, destination: str) -> int:
            with Outbox(spool.root, database_url=spool.index.url_if_shared) as outbox:
                return outbox.requeue(now=time.time(), destination=destination, study_uid=study_uid)

        def force_complete(study_uid: str) -> bool:
            done = q.enqueue(study_uid) is not None
            if done:
                log.info("study_forced_complete", study_key=uid_key(study_uid))
                wake()
            return done

        return cls(
            results_dir=results_dir(spool.root),
            last_refusal=last_refusal,
            requeue_job=requeue_job,
            requeue_deliveries=requeue_deliveries,
            force_complete=force_complete,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyRow:
    """One line of the study list."""

    study_uid: str
    study_key: str
    state: str
    n_instances: int
    first_received_at: float
    last_received_at: float
    ready_at: float | None  # when its latest job was made
    processed_at: float | None  # when its latest job finished with results
    time_to_result_s: float | None  # from the round's first instance to processed_at
    attempts: int
    job_state: str | None
    last_error: str | None
    reopened: bool


def _study_row(r: Row) -> StudyRow:
    uid = str(r["study_uid"])
    processed = float(r["job_updated"]) if r["job_state"] == StudyStatus.DONE else None
    since = r["receiving_since"] if r["receiving_since"] is not None else r["first_received_at"]
    return StudyRow(
        study_uid=uid,
        study_key=uid_key(uid),
        state=str(r["state"]),
        n_instances=int(r["n_instances"]),
        first_received_at=float(r["first_received_at"]),
        last_received_at=float(r["last_received_at"]),
        ready_at=None if r["ready_at"] is None else float(r["ready_at"]),
        processed_at=processed,
        time_to_result_s=None if processed is None else max(0.0, processed - float(since)),
        attempts=int(r["attempts"] or 0),
        job_state=None if r["job_state"] is None else str(r["job_state"]),
        last_error=None if r["last_error"] is None else str(r["last_error"]),
        reopened=bool(r["reopened"]),
    )


_STUDY_SELECT = (
    "SELECT s.study_uid, s.state, s.n_instances, s.first_received_at, s.last_received_at, "
    "s.receiving_since, s.reopened, j.created_at AS ready_at, j.updated_at AS job_updated, "
    "j.state AS job_state, j.attempts, j.last_error FROM studies s "
    f"LEFT JOIN jobs j ON {_LATEST_JOB}"
)


def list_studies(spool: Spool, *, limit: int, offset: int = 0) -> tuple[tuple[StudyRow, ...], int]:
    """Studies newest first (by their last instance), one page; and how many there are."""
    total = int(spool.index.query("SELECT COUNT(*) AS n FROM studies")[0]["n"])
    rows = spool.index.query(
        f"{_STUDY_SELECT} ORDER BY s.last_received_at DESC, s.study_uid LIMIT ? OFFSET ?",
        (limit, offset),
    )
    return tuple(_study_row(r) for r in rows), total


def delivery_states(
    spool_dir: Path, study_uids: list[str], *, database_url: str | None = None
) -> dict[str, dict[str, int]]:
    """Outbox rows per study and state for the listed studies, read-only."""
    from node.deliver.outbox import outbox_reader

    if not study_uids:
        return {}
    with outbox_reader(spool_dir, database_url) as db:
        out: dict[str, dict[str, int]] = {}
        if db is None:
            return out
        marks = ",".join("?" * len(study_uids))
        for uid, state, n in db.query(
            f"SELECT study_uid, state, COUNT(*) FROM deliveries WHERE study_uid IN ({marks})"
            " GROUP BY study_uid, state",
            study_uids,
        ):
            out.setdefault(str(uid), {})[str(state)] = int(n)
        return out


def find_study(spool: Spool, study_key: str) -> StudyRow | None:
    """The study a key names (the keyed hash logs and `neuronode status` show)."""
    for r in spool.index.query("SELECT study_uid FROM studies"):
        if uid_key(str(r["study_uid"])) == study_key:
            rows = spool.index.query(f"{_STUDY_SELECT} WHERE s.study_uid = ?", (r["study_uid"],))
            return _study_row(rows[0]) if rows else None
    return None


def study_counts(spool: Spool) -> dict[str, int]:
    """Studies per state, every state listed."""
    return spool.index.studies_by_state()


@dataclass(frozen=True, slots=True, kw_only=True)
class Patient:
    """Who the study belongs to, read from one stored instance when the page is rendered."""

    name: str
    patient_id: str
    study_date: str
    study_description: str


def read_patient(spool: Spool, study_uid: str) -> Patient | None:
    """Patient name, ID, study date and description from the study's first instance (None when
    its instances are gone or unreadable). Never logged."""
    paths = spool.instance_paths(study_uid)
    if not paths:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote header values
            ds = pydicom.dcmread(
                paths[0],
                stop_before_pixels=True,
                specific_tags=["PatientName", "PatientID", "StudyDate", "StudyDescription"],
            )
            date = str(ds.get("StudyDate", "") or "")
            return Patient(
                name=str(ds.get("PatientName", "") or ""),
                patient_id=str(ds.get("PatientID", "") or ""),
                study_date=f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date,
                study_description=str(ds.get("StudyDescription", "") or ""),
            )
    except PARSE_ERRORS:
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesView:
    """One series: what arrived, its sequence label and how it was decided, where it went."""

    series_number: int | None
    description: str
    modality: str
    n_instances: int | None
    label: str | None
    confidence: float | None
    method: str | None
    reasons: tuple[str, ...]
    routes: tuple[str, ...]  # "task -> bundle (weight w)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Heatmap:
    """A heatmap Secondary Capture of the study, by its position in the audit's objects."""

    index: int
    description: str
    present: bool  # False: the file is gone (purged)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptView:
    """One processing attempt from the job history."""

    job_id: int
    attempt: int
    started_at: float
    finished_at: float | None
    outcome: str | None
    error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRow:
    """One result object bound for one destination."""

    kind: str
    state: str
    attempts: int
    last_error: str | None
    updated_at: float
    delivered_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationView:
    """A destination's rows for one study, counted as `neuronode status` counts them."""

    name: str
    pending: int
    sent: int
    failed: int  # pending again after a failed attempt
    dead: int
    parked: int
    rows: tuple[DeliveryRow, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyDetail:
    """Everything the study page shows."""

    study: StudyRow
    patient: Patient | None
    audit: AuditRecord | None
    audit_problem: str | None  # why there is no audit to show
    series: tuple[SeriesView, ...]
    findings: tuple[FindingEntry, ...]
    heatmaps: tuple[Heatmap, ...]
    attempts: tuple[AttemptView, ...]
    deliveries: tuple[DestinationView, ...]
    can_requeue_job: bool = field(default=False)
    can_force_complete: bool = field(default=False)


def study_detail(spool: Spool, hooks: StatusHooks, study: StudyRow) -> StudyDetail:
    """The study page's content (the audit of its latest run, its history and deliveries)."""
    audit: AuditRecord | None = None
    problem: str | None = None
    path = audit_path(hooks.results_dir, study.study_uid)
    if path.exists():
        try:
            audit = read_audit(path)
        except NodeError as exc:
            problem = str(exc)
    else:
        problem = "no audit record yet (not processed, or purged)"
    return StudyDetail(
        study=study,
        patient=read_patient(spool, study.study_uid),
        audit=audit,
        audit_problem=problem,
        series=_series_views(audit) if audit is not None else (),
        findings=audit.findings if audit is not None else (),
        heatmaps=_heatmaps(audit) if audit is not None else (),
        attempts=_attempts(spool, study.study_uid),
        deliveries=study_deliveries(
            spool.root, study.study_uid, database_url=spool.index.url_if_shared
        ),
        can_requeue_job=study.state in (StudyStatus.DEAD, StudyStatus.FAILED)
        and study.job_state == study.state,
        can_force_complete=study.state == StudyStatus.RECEIVING,
    )


def _series_views(audit: AuditRecord) -> tuple[SeriesView, ...]:
    decisions = {d.series_instance_uid: d for d in audit.sequences}
    routes: dict[str, list[str]] = {}
    for r in audit.routes:
        routes.setdefault(r.series_instance_uid, []).append(
            f"{r.task} -> {r.bundle} (weight {r.weight:g})"
        )
    out: list[SeriesView] = []
    seen: set[str] = set()
    for s in audit.series:
        d = decisions.get(s.series_instance_uid)
        seen.add(s.series_instance_uid)
        out.append(
            SeriesView(
                series_number=s.series_number,
                description=s.description,
                modality=s.modality,
                n_instances=s.n_instances,
                label=d.label if d else None,
                confidence=d.confidence if d else None,
                method=d.method if d else None,
                reasons=d.reasons if d else (),
                routes=tuple(routes.get(s.series_instance_uid, ())),
            )
        )
    for uid, d in decisions.items():
        if uid not in seen:
            out.append(
                SeriesView(
                    series_number=d.series_number,
                    description=d.description,
                    modality="",
                    n_instances=None,
                    label=d.label,
                    confidence=d.confidence,
                    method=d.method,
                    reasons=d.reasons,
                    routes=tuple(routes.get(uid, ())),
                )
            )
    return tuple(out)


def _heatmaps(audit: AuditRecord) -> tuple[Heatmap, ...]:
    out = []
    for i, obj in enumerate(audit.objects):
        if obj.kind != "sc":
            continue
        present = Path(obj.file).is_file()
        description = ""
        if present:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(
                        obj.file,
                        stop_before_pixels=True,
                        specific_tags=["ImageComments", "SeriesDescription"],
                    )
                # The node's heatmaps caption themselves in ImageComments ("task: label status
                # (p) | series p, model | ..."): the first two parts say what the map is.
                comments = str(ds.get("ImageComments", "") or "").split(" | ")
                description = " · ".join(c.strip() for c in comments[:2] if c.strip()) or str(
                    ds.get("SeriesDescription", "") or ""
                )
            except PARSE_ERRORS:
                present = False
        out.append(Heatmap(index=i, description=description, present=present))
    return tuple(out)


def heatmap_file(hooks: StatusHooks, study_uid: str, index: int) -> Path | None:
    """The file of the study's `index`-th result object if it is a heatmap SC, else None (only
    files the audit names are ever served)."""
    path = audit_path(hooks.results_dir, study_uid)
    try:
        audit = read_audit(path)
    except NodeError:
        return None
    if not 0 <= index < len(audit.objects) or audit.objects[index].kind != "sc":
        return None
    return Path(audit.objects[index].file)


def render_png(path: Path, max_px: int = THUMBNAIL_PX) -> bytes:
    """A PNG thumbnail of a Secondary Capture's pixels (RGB as is, grey scaled to 8 bits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        arr = np.asarray(ds.pixel_array)
    if arr.ndim == 4 or (arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1):
        arr = arr[0]  # multi-frame: the first frame
    if arr.ndim == 2:
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr.astype(np.float64) - lo) / (hi - lo) * 255.0 if hi > lo else arr * 0.0
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            scaled = 255.0 - scaled
        img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    else:
        img = Image.fromarray(arr.astype(np.uint8), mode="RGB")
    img.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _attempts(spool: Spool, study_uid: str) -> tuple[AttemptView, ...]:
    rows = spool.index.query(
        "SELECT job_id, attempt, started_at, finished_at, outcome, error FROM job_history "
        "WHERE study_uid = ? ORDER BY id DESC LIMIT 50",
        (study_uid,),
    )
    return tuple(
        AttemptView(
            job_id=int(r["job_id"]),
            attempt=int(r["attempt"]),
            started_at=float(r["started_at"]),
            finished_at=None if r["finished_at"] is None else float(r["finished_at"]),
            outcome=None if r["outcome"] is None else str(r["outcome"]),
            error=None if r["error"] is None else str(r["error"]),
        )
        for r in rows
    )


def study_deliveries(
    spool_dir: Path, study_uid: str, *, database_url: str | None = None
) -> tuple[DestinationView, ...]:
    """The study's outbox rows per destination, read-only (safe while the senders run)."""
    from node.deliver.outbox import outbox_reader

    with outbox_reader(spool_dir, database_url) as db:
        if db is None:
            return ()
        rows = db.query(
            "SELECT destination, sop_class_uid, state, attempts, last_error, updated_at,"
            " delivered_at FROM deliveries WHERE study_uid=? ORDER BY destination, row_id",
            (study_uid,),
        )
    by_dest: dict[str, list[Row]] = {}
    for r in rows:
        by_dest.setdefault(str(r["destination"]), []).append(r)
    out = []
    for name, rs in by_dest.items():
        states = [(str(r["state"]), int(r["attempts"])) for r in rs]
        waiting = (DeliveryState.PENDING, DeliveryState.SENDING)
        out.append(
            DestinationView(
                name=name,
                pending=sum(1 for s, a in states if s in waiting and a == 0),
                failed=sum(1 for s, a in states if s in waiting and a > 0),
                sent=sum(1 for s, _ in states if s == DeliveryState.DELIVERED),
                dead=sum(1 for s, _ in states if s == DeliveryState.DEAD),
                parked=sum(1 for s, _ in states if s == DeliveryState.PARKED),
                rows=tuple(
                    DeliveryRow(
                        kind=object_kind(str(r["sop_class_uid"])),
                        state=str(r["state"]),
                        attempts=int(r["attempts"]),
                        last_error=None if r["last_error"] is None else str(r["last_error"]),
                        updated_at=float(r["updated_at"]),
                        delivered_at=None
                        if r["delivered_at"] is None
                        else float(r["delivered_at"]),
                    )
                    for r in rs
                ),
            )
        )
    return tuple(out)

"""Retention: which studies may leave the spool, and purging them.

A study may go only when nothing more is owed for it: its job is done, and its results were
delivered to every destination they were queued for (or it did not qualify, so there were
none). A study receiving, queued, processing, failed, dead, or with a delivery pending, failing,
dead or parked is never a candidate. Candidates go oldest first (by when their last result was
delivered), for age (`retention.delivered_max_age_h`) and then for the disk-use ceiling
(`retention.max_spool_mb`). The 0xA700 floor of the spool stays the last guard.

What a purge removes: the received instances, the audit folder and the delivered result objects
with their outbox rows, and the study's rows in the index. What it keeps: one row per purged
study in `purged` (study key, when, why, how much), no UID and no patient data.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from node.config import RetentionSettings
from node.deliver.outbox import OUTBOX_DB, Outbox, outbox_rows
from node.errors import NodeError
from node.ingest.spool import Spool
from node.log import get_logger, uid_key
from node.pipeline.audit import audit_path, read_audit
from node.records import DeliveryState, StudyStatus

log = get_logger(__name__)

_MB = 1024 * 1024


class PurgeReason(StrEnum):
    """Why a study left the spool."""

    AGE = "age"  # delivered longer ago than retention.delivered_max_age_h
    DISK = "disk"  # the spool was over retention.max_spool_mb


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A study that owes nothing more: done, and delivered everywhere (or did not qualify)."""

    study_uid: str
    delivered_at: float  # its last delivery, or when its job finished for a skipped study
    n_instances: int
    bytes: int  # instances + result objects on disk


@dataclass(frozen=True, slots=True, kw_only=True)
class PurgeDecision:
    """One study to purge and why (the study as keyed hash only)."""

    study_uid: str
    study_key: str
    reason: PurgeReason
    age_h: float
    n_instances: int
    bytes: int


def results_dir(spool_dir: Path) -> Path:
    """Where the running node writes audit records and result objects."""
    return spool_dir / "results"


def spool_bytes(spool: Spool) -> int:
    """Bytes the spool holds: received instances and outbox objects (what retention frees)."""
    rows = spool.index.query("SELECT COALESCE(SUM(size_bytes), 0) AS n FROM instances")
    total = int(rows[0]["n"])
    objects = spool.root / "outbox" / "objects"
    if objects.is_dir():
        total += sum(p.stat().st_size for p in objects.iterdir() if p.is_file())
    return total


def _outbox_rows(spool: Spool) -> dict[str, list[tuple[str, float | None, str]]]:
    """Per study: (state, delivered_at, path) of each outbox row, read-only."""
    out: dict[str, list[tuple[str, float | None, str]]] = {}
    for study, state, delivered_at, obj in outbox_rows(
        spool.root, database_url=spool.index.url_if_shared
    ):
        out.setdefault(study, []).append((state, delivered_at, obj))
    return out


def _did_not_qualify(spool_dir: Path, study_uid: str) -> bool:
    try:
        return read_audit(audit_path(results_dir(spool_dir), study_uid)).status == "skipped"
    except NodeError:
        return False  # no readable audit: keep the study


def candidates(spool: Spool, *, only: str | None = None) -> tuple[Candidate, ...]:
    """Every study that may be purged (or just `only`, if it may), oldest delivery first."""
    rows = spool.index.query(
        "SELECT s.study_uid AS study_uid, COUNT(i.seq) AS n, COALESCE(SUM(i.size_bytes), 0) AS b,"
        " (SELECT MAX(updated_at) FROM jobs j WHERE j.study_uid = s.study_uid) AS done_at"
        " FROM studies s LEFT JOIN instances i ON i.study_uid = s.study_uid"
        " WHERE s.state = ? AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid"
        " AND j.state IN (?, ?)) AND (CAST(? AS TEXT) IS NULL OR s.study_uid = ?)"
        " GROUP BY s.study_uid",
        (
            StudyStatus.DONE.value,
            StudyStatus.READY.value,
            StudyStatus.PROCESSING.value,
            only,
            only,
        ),
    )
    deliveries = _outbox_rows(spool)
    out = []
    for r in rows:
        study_uid = str(r["study_uid"])
        mine = deliveries.get(study_uid, [])
        if mine:
            if any(state != DeliveryState.DELIVERED for state, _, _ in mine):
                continue
            delivered_at = max(at or 0.0 for _, at, _ in mine)
            extra = sum(_size(Path(p)) for _, _, p in mine)
        else:
            if not _did_not_qualify(spool.root, study_uid):
                continue  # results kept on this machine only (no destination): never purged
            delivered_at = float(r["done_at"] or 0.0)
            extra = 0
        out.append(
            Candidate(
                study_uid=study_uid,
                delivered_at=delivered_at,
                n_instances=int(r["n"]),
                bytes=int(r["b"]) + extra,
            )
        )
    return tuple(sorted(out, key=lambda c: (c.delivered_at, c.study_uid)))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def plan_purge(
    found: tuple[Candidate, ...], *, used_bytes: int, settings: RetentionSettings, now: float
) -> tuple[PurgeDecision, ...]:
    """Which candidates go and why: all older than the age limit, then, oldest first, as many
    as bring the spool under its ceiling. Pure: the candidates come from `candidates`."""
    decisions = []
    used = used_bytes
    max_age_s = (
        settings.delivered_max_age_h * 3600.0 if settings.delivered_max_age_h is not None else None
    )
    ceiling = int(settings.max_spool_mb * _MB) if settings.max_spool_mb is not None else None
    for c in found:  # oldest first
        age_s = max(0.0, now - c.delivered_at)
        if max_age_s is not None and age_s > max_age_s:
            reason = PurgeReason.AGE
        elif ceiling is not None and used > ceiling:
            reason = PurgeReason.DISK
        else:
            continue
        used -= c.bytes
        decisions.append(
            PurgeDecision(
                study_uid=c.study_uid,
                study_key=uid_key(c.study_uid),
                reason=reason,
                age_h=age_s / 3600.0,
                n_instances=c.n_instances,
                bytes=c.bytes,
            )
        )
    return tuple(decisions)


def plan(spool: Spool, settings: RetentionSettings, *, now: float) -> tuple[PurgeDecision, ...]:
    """What retention would purge now (what `neuronode purge --dry-run` prints)."""
    return plan_purge(candidates(spool), used_bytes=spool_bytes(spool), settings=settings, now=now)


def purge(
    spool: Spool, decisions: tuple[PurgeDecision, ...], *, now: float | None = None
) -> tuple[PurgeDecision, ...]:
    """Purge the decided studies; return those purged.

    Each study is checked again inside its own index transaction (a study re-opened by a new
    instance since the plan was made stays), so the running node can purge between jobs.
    """
    done = []
    for d in decisions:
        if _purge_one(spool, d, now=time.time() if now is None else now):
            done.append(d)
            log.info(
                "study_purged",
                study_key=d.study_key,
                reason=d.reason.value,
                n_instances=d.n_instances,
                bytes=d.bytes,
            )
    return tuple(done)


def _purge_one(spool: Spool, d: PurgeDecision, *, now: float) -> bool:
    still = candidates(spool, only=d.study_uid)
    if not still:
        return False  # re-opened, or a delivery came back to life, since the plan was made
    c = still[0]
    with spool.index.transaction() as db:
        st = db.execute(
            "SELECT state FROM studies WHERE study_uid = ? FOR UPDATE", (d.study_uid,)
        ).fetchone()
        if st is None or st["state"] != StudyStatus.DONE:
            return False
        paths = [
            spool.root / str(r["path"])
            for r in db.execute(
                "SELECT path FROM instances WHERE study_uid = ?", (d.study_uid,)
            ).fetchall()
        ]
        for path in paths:
            path.unlink(missing_ok=True)
        for table in ("instances", "job_history", "jobs", "studies"):
            db.execute(f"DELETE FROM {table} WHERE study_uid = ?", (d.study_uid,))
        db.execute(
            "INSERT INTO purged (study_key, purged_at, reason, n_instances, bytes, delivered_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (d.study_key, now, d.reason.value, c.n_instances, c.bytes, c.delivered_at),
        )
    shutil.rmtree(audit_path(results_dir(spool.root), d.study_uid).parent, ignore_errors=True)
    _remove_empty_dirs(spool.root / "instances" / d.study_uid)
    shared = spool.index.url_if_shared
    if shared is not None or (spool.root / OUTBOX_DB).exists():
        with Outbox(spool.root, database_url=shared) as outbox:
            outbox.forget_delivered(d.study_uid)
    return True


def _remove_empty_dirs(study_dir: Path) -> None:
    """Remove a study's folders that are empty (an instance arriving meanwhile keeps its own)."""
    if not study_dir.is_dir():
        return
    for series_dir in study_dir.iterdir():
        if series_dir.is_dir():
            with contextlib.suppress(OSError):  # not empty: a new instance came meanwhile
                series_dir.rmdir()
    with contextlib.suppress(OSError):
        study_dir.rmdir()


@dataclass(frozen=True, slots=True, kw_only=True)
class PurgedStudy:
    """The index's record of one purged study."""

    study_key: str
    purged_at: float
    reason: str
    n_instances: int
    bytes: int


def purged_studies(spool: Spool) -> tuple[PurgedStudy, ...]:
    """Every purged study, newest first."""
    return tuple(
        PurgedStudy(
            study_key=str(r["study_key"]),
            purged_at=float(r["purged_at"]),
            reason=str(r["reason"]),
            n_instances=int(r["n_instances"]),
            bytes=int(r["bytes"]),
        )
        for r in spool.index.query(
            "SELECT study_key, purged_at, reason, n_instances, bytes FROM purged ORDER BY id DESC"
        )
    )

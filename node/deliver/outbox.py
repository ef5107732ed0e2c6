"""The durable delivery outbox: one row per result object x destination, retried until done.

It lives in its own SQLite file (<spool>/outbox.sqlite), apart from the job queue in the spool
index: deliveries have their own life cycle (a destination can be down for days while studies
keep flowing), they are keyed by SOP Instance UID rather than by study, and the sender loop
writes them on its own cadence, so keeping them apart means no writer waits on the other's
locks and neither schema constrains the other. Objects are files under
<spool>/outbox/objects/<sop_uid>.dcm, written atomically, so a restart resends from disk.

Why this module is long: it is every query of the outbox table (queue, claim, back off,
dead-letter, park, requeue, purge, the read-only views) and the sender pass that uses them.
"""

from __future__ import annotations

import contextvars
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final

from pydicom.dataset import Dataset

from node.config import (
    DeliverySettings,
    DicomDestination,
    DicomWebDestination,
    Rules,
)
from node.deliver.send import object_kind, send_dicom, send_stow
from node.errors import SendError, SpoolError
from node.log import get_logger, uid_key
from node.records import Delivery, DeliveryCounts, DeliveryState, SendResult
from node.store.db import OUTBOX, Database, Row, Session, outbox_url
from node.store.files import dicom_bytes, link_files_durable, write_files_durable

log = get_logger(__name__)

OUTBOX_DB: Final = "outbox.sqlite"
OBJECTS_DIR: Final = Path("outbox") / "objects"
ERROR_TEXT_MAX: Final = 500

# A row 'sending' this long belonged to a sender that died mid-attempt (on a shared database,
# where no one sender may reset the others' rows at start): it is due again.
SENDING_STALE_S: Final = 600.0


def backoff_s(attempts: int, settings: DeliverySettings, rng: random.Random) -> float:
    """Wait before the next attempt: doubling from the initial wait, jittered, capped."""
    base = settings.backoff_initial_s * 2.0 ** max(0, attempts - 1)
    spread = 1.0 + settings.jitter_fraction * rng.uniform(-1.0, 1.0)
    return float(min(settings.backoff_max_s, min(base, settings.backoff_max_s) * spread))


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxFile:
    """A result object on disk (durably), queued by its UIDs."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    path: Path


class Outbox:
    """The outbox database and its object folder under one spool directory."""

    def __init__(self, spool_dir: Path, *, database_url: str | None = None) -> None:
        self.spool_dir = spool_dir
        self.objects_dir = spool_dir / OBJECTS_DIR
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = spool_dir / OUTBOX_DB
        self._db = Database(outbox_url(spool_dir, database_url), component=OUTBOX)

    def release_interrupted(self) -> int:
        """Put rows left 'sending' by a sender that died mid-attempt back to pending; return how
        many. Only the node's senders call it, once as they start: opening an outbox (the
        pipeline queuing results, `requeue`, the status page) never touches a row a running
        sender is at. On a shared database nothing is taken back here: another machine's
        sender may still be at it, and its rows come back after SENDING_STALE_S instead."""
        if self._db.postgres:
            return 0
        with self._db.transaction() as db:
            cur = db.execute(
                "UPDATE deliveries SET state=? WHERE state=?",
                (DeliveryState.PENDING, DeliveryState.SENDING),
            )
        return int(cur.rowcount or 0)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._db.transaction() as db:
            yield db

    def enqueue(
        self, datasets: Sequence[Dataset], destinations: Sequence[str], *, now: float
    ) -> int:
        """Queue each object for each destination; an object already queued there is kept.

        Returns the number of new rows (0 when the same study's results come again).
        """
        files = [
            OutboxFile(
                sop_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                study_uid=str(ds.StudyInstanceUID),
                path=self.objects_dir / f"{ds.SOPInstanceUID}.dcm",
            )
            for ds in datasets
        ]
        missing = [(f, ds) for f, ds in zip(files, datasets, strict=True) if not f.path.exists()]
        try:
            write_files_durable([(f.path, dicom_bytes(ds)) for f, ds in missing])
        except (OSError, ValueError, AttributeError) as exc:
            raise SpoolError(f"cannot write outbox object: {type(exc).__name__}") from exc
        return self.enqueue_files(files, destinations, now=now)

    def enqueue_files(
        self, files: Sequence[OutboxFile], destinations: Sequence[str], *, now: float
    ) -> int:
        """Queue durable result files like `enqueue`, each linked into the outbox (nothing is
        encoded or written again; one folder sync), then all rows in one transaction."""
        named = [(f, self.objects_dir / f"{f.sop_uid}.dcm") for f in files]
        try:
            link_files_durable([(f.path, path) for f, path in named if f.path != path])
        except OSError as exc:
            raise SpoolError(f"cannot queue an outbox object: {type(exc).__name__}") from exc
        new = 0
        with self._tx() as db:
            for f, path in named:
                for dest in destinations:
                    row = (f.sop_uid, dest, f.study_uid, f.sop_class_uid, str(path))
                    cur = db.execute(
                        "INSERT INTO deliveries (sop_uid, destination, study_uid,"
                        " sop_class_uid, path, state, next_attempt_at, created_at, updated_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (sop_uid, destination) DO NOTHING",
                        (*row, DeliveryState.PENDING, now, now, now),
                    )
                    new += cur.rowcount
        log.info("outbox_enqueued", n_objects=len(files), count=new)
        return new

    def _rows(
        self,
        where: str,
        params: tuple[object, ...],
        limit: int | None = None,
        *,
        db: Session | None = None,
    ) -> tuple[Delivery, ...]:
        sql = f"SELECT * FROM deliveries WHERE {where} ORDER BY row_id"
        if limit is not None:
            sql += " LIMIT ?"
            params = (*params, limit)
        if db is not None:  # claiming: lock the rows, skipping those another sender holds
            rows: list[Row] = db.execute(sql + " FOR UPDATE SKIP LOCKED", params).fetchall()
        else:
            rows = self._db.query(sql, params)
        return tuple(
            Delivery(
                row_id=r["row_id"],
                sop_uid=r["sop_uid"],
                destination=r["destination"],
                study_uid=r["study_uid"],
                sop_class_uid=r["sop_class_uid"],
                path=Path(r["path"]),
                state=DeliveryState(r["state"]),
                attempts=r["attempts"],
                next_attempt_at=r["next_attempt_at"],
                last_error=r["last_error"],
                last_status_code=r["last_status_code"],
                sent_sop_uid=r["sent_sop_uid"],
            )
            for r in rows
        )

    def all(self) -> tuple[Delivery, ...]:
        """Every row, oldest first (for status and tests)."""
        return self._rows("1=1", ())

    def claim_due(self, destination: str, now: float, limit: int) -> tuple[Delivery, ...]:
        """Mark up to `limit` due rows of one destination as sending and return them."""
        with self._tx() as db:
            rows = self._rows(
                "destination=? AND ((state=? AND next_attempt_at<=?)"
                " OR (state=? AND updated_at<?))",
                (
                    destination,
                    DeliveryState.PENDING,
                    now,
                    DeliveryState.SENDING,
                    now - SENDING_STALE_S,
                ),
                limit,
                db=db,
            )
            db.executemany(
                "UPDATE deliveries SET state=?, updated_at=? WHERE row_id=?",
                [(DeliveryState.SENDING, now, r.row_id) for r in rows],
            )
        return rows

    def destinations_due(self, now: float) -> tuple[str, ...]:
        """Destinations that have at least one row due now."""
        rows = self._db.query(
            "SELECT DISTINCT destination FROM deliveries WHERE (state=? AND next_attempt_at<=?)"
            " OR (state=? AND updated_at<?) ORDER BY destination",
            (DeliveryState.PENDING, now, DeliveryState.SENDING, now - SENDING_STALE_S),
        )
        return tuple(str(r[0]) for r in rows)

    def next_due(self, destination: str) -> float | None:
        """When the earliest pending row of a destination is due (None: nothing pending)."""
        rows = self._db.query(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE destination=? AND state=?",
            (destination, DeliveryState.PENDING),
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    def park_unknown(self, known: Sequence[str], *, now: float) -> dict[str, int]:
        """Park the unsent rows of destinations no longer in the rules (logged once each, shown
        by `neuronode status`); rows parked earlier whose destination is back are pending again.
        Returns the rows parked now, per destination."""
        names = sorted(set(known))
        marks = ",".join("?" * len(names))
        not_known = f"destination NOT IN ({marks})" if names else "1=1"
        with self._tx() as db:
            parked = {
                str(r[0]): int(r[1])
                for r in db.execute(
                    f"SELECT destination, COUNT(*) FROM deliveries WHERE {not_known}"
                    " AND state IN (?, ?) GROUP BY destination",
                    (*names, DeliveryState.PENDING, DeliveryState.SENDING),
                )
            }
            db.execute(
                f"UPDATE deliveries SET state=?, updated_at=? WHERE {not_known}"
                " AND state IN (?, ?)",
                (DeliveryState.PARKED, now, *names, DeliveryState.PENDING, DeliveryState.SENDING),
            )
            if names:
                cur = db.execute(
                    "UPDATE deliveries SET state=?, next_attempt_at=?, updated_at=?"
                    f" WHERE state=? AND destination IN ({marks})",
                    (DeliveryState.PENDING, now, now, DeliveryState.PARKED, *names),
                )
                if cur.rowcount:
                    log.info("outbox_destination_unparked", count=cur.rowcount)
        for name, n in parked.items():
            log.warning(
                "outbox_unknown_destination",
                destination=name,
                count=n,
                state=DeliveryState.PARKED.value,
                reason="destination not in the rules: its deliveries are parked",
            )
        return parked

    def mark_delivered(self, row: Delivery, result: SendResult, *, now: float) -> None:
        """Record an accepted object."""
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state=?, attempts=attempts+1, last_error=NULL,"
                " last_status_code=?, sent_sop_uid=?, updated_at=?, delivered_at=?"
                " WHERE row_id=?",
                (
                    DeliveryState.DELIVERED,
                    result.status_code,
                    result.sent_sop_instance_uid,
                    now,
                    now,
                    row.row_id,
                ),
            )

    def mark_failed(
        self,
        row: Delivery,
        *,
        error: str,
        status_code: int | None,
        retryable: bool,
        settings: DeliverySettings,
        now: float,
        rng: random.Random,
    ) -> DeliveryState:
        """Record a failed attempt: back off, or dead-letter when permanent or out of tries."""
        attempts = row.attempts + 1
        dead = not retryable or attempts >= settings.max_attempts
        state = DeliveryState.DEAD if dead else DeliveryState.PENDING
        next_at = now if dead else now + backoff_s(attempts, settings, rng)
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state=?, attempts=?, next_attempt_at=?, last_error=?,"
                " last_status_code=?, updated_at=? WHERE row_id=?",
                (state, attempts, next_at, error[:ERROR_TEXT_MAX], status_code, now, row.row_id),
            )
        return state

    def requeue(
        self, *, now: float, destination: str | None = None, study_uid: str | None = None
    ) -> int:
        """Give dead-lettered rows (of one destination, of one study) a fresh set of attempts,
        due now."""
        where = "state=?"
        params: tuple[object, ...] = (DeliveryState.DEAD,)
        if destination is not None:
            where += " AND destination=?"
            params += (destination,)
        if study_uid is not None:
            where += " AND study_uid=?"
            params += (study_uid,)
        with self._tx() as db:
            cur = db.execute(
                "UPDATE deliveries SET state=?, attempts=0, next_attempt_at=?, updated_at=?"
                f" WHERE {where}",
                (DeliveryState.PENDING, now, now, *params),
            )
        return cur.rowcount

    def forget_delivered(self, study_uid: str) -> int:
        """Drop a purged study's delivered rows, and their object files once no other row
        needs them (retention). Returns the rows dropped."""
        with self._tx() as db:
            paths = {
                str(r[0])
                for r in db.execute(
                    "SELECT path FROM deliveries WHERE study_uid=? AND state=?",
                    (study_uid, DeliveryState.DELIVERED),
                )
            }
            cur = db.execute(
                "DELETE FROM deliveries WHERE study_uid=? AND state=?",
                (study_uid, DeliveryState.DELIVERED),
            )
            still = {
                str(r[0])
                for r in db.execute(
                    "SELECT DISTINCT path FROM deliveries WHERE study_uid=?", (study_uid,)
                )
            }
        for path in paths - still:
            Path(path).unlink(missing_ok=True)
        return cur.rowcount

    def previous_sr(self, study_uid: str, *, exclude_sop_uid: str) -> Path | None:
        """The newest SR queued earlier for a study (the predecessor of a re-opened study's SR)."""
        rows = self._db.query(
            "SELECT path FROM deliveries WHERE study_uid=? AND sop_uid<>? AND sop_class_uid"
            " LIKE '1.2.840.10008.5.1.4.1.1.88.%' ORDER BY created_at DESC, row_id DESC LIMIT 1",
            (study_uid, exclude_sop_uid),
        )
        return None if not rows else Path(rows[0][0])


@contextmanager
def outbox_reader(spool_dir: Path, database_url: str | None) -> Iterator[Database | None]:
    """The outbox database opened for reading (safe while a node is sending); None when the
    embedded outbox was never made."""
    if database_url is None and not (spool_dir / OUTBOX_DB).exists():
        yield None
        return
    db = Database(outbox_url(spool_dir, database_url, readonly=True), component=OUTBOX, check=False)
    try:
        yield db
    finally:
        db.close()


def delivery_counts(
    spool_dir: Path, *, database_url: str | None = None
) -> dict[str, dict[str, int]]:
    """Rows per destination and state, read-only (safe while a node is sending)."""
    with outbox_reader(spool_dir, database_url) as db:
        out: dict[str, dict[str, int]] = {}
        if db is None:
            return out
        for r in db.query(
            "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"
        ):
            out.setdefault(str(r[0]), {})[str(r[1])] = int(r[2])
        return out


def outbox_study_uids(spool_dir: Path, *, database_url: str | None = None) -> frozenset[str]:
    """The studies that have rows in the outbox, read-only."""
    with outbox_reader(spool_dir, database_url) as db:
        if db is None:
            return frozenset()
        return frozenset(str(r[0]) for r in db.query("SELECT DISTINCT study_uid FROM deliveries"))


def outbox_summary(
    spool_dir: Path, *, database_url: str | None = None
) -> dict[str, dict[str, int]]:
    """Per destination: pending (first try to come), failed (retrying after a failed attempt),
    dead, parked and delivered rows; read-only (safe while a node is sending)."""
    with outbox_reader(spool_dir, database_url) as db:
        out: dict[str, dict[str, int]] = {}
        if db is None:
            return out
        for name, state, attempts, n in db.query(
            "SELECT destination, state, attempts > 0, COUNT(*) FROM deliveries"
            " GROUP BY destination, state, attempts > 0"
        ):
            if state in (DeliveryState.PENDING, DeliveryState.SENDING):
                key = "failed" if attempts else "pending"
            else:
                key = str(state)
            row = out.setdefault(
                str(name), {k: 0 for k in ("pending", "failed", "dead", "parked", "delivered")}
            )
            row[key] = row.get(key, 0) + int(n)
        return out


def outbox_rows(
    spool_dir: Path, *, database_url: str | None = None
) -> tuple[tuple[str, str, float | None, str], ...]:
    """Every row's (study UID, state, delivered_at, object path), read-only (retention)."""
    with outbox_reader(spool_dir, database_url) as db:
        if db is None:
            return ()
        return tuple(
            (str(r[0]), str(r[1]), None if r[2] is None else float(r[2]), str(r[3]))
            for r in db.query("SELECT study_uid, state, delivered_at, path FROM deliveries")
        )


# --- the sender loop -------------------------------------------------------------------------

Destination = DicomDestination | DicomWebDestination
SendFn = Callable[[Destination, Sequence[Path]], tuple[SendResult, ...]]


def default_sender(rules: Rules) -> SendFn:
    """C-STORE or STOW-RS depending on the destination kind, with our AE title and UID root."""
    dicom = partial(send_dicom, calling_ae=rules.node.ae_title, uid_root=rules.outputs.uid_root)

    def send(dest: Destination, paths: Sequence[Path]) -> tuple[SendResult, ...]:
        if isinstance(dest, DicomDestination):
            return dicom(dest, paths)
        return send_stow(dest, paths)

    return send


def deliver_due(
    outbox: Outbox,
    rules: Rules,
    now: float,
    *,
    send: SendFn | None = None,
    rng: random.Random | None = None,
    batch: int = 50,
    destination: str | None = None,
) -> DeliveryCounts:
    """One sender pass: each destination's due rows (only `destination`'s when given).

    Each destination has its own association in its own thread, so one that is down (or
    slow to time out) only backs off its own rows; the database is written here only. The
    running node calls this once per destination, each from its own thread, so a slow one
    never holds up the others' passes. Rows of destinations not in the rules are parked.
    """
    sender = send or default_sender(rules)
    rand = rng or random.Random()
    by_name = {d.name: d for d in rules.destinations}
    delivered = retrying = dead = 0
    unreachable: list[str] = []
    claimed: list[tuple[str, Destination, tuple[Delivery, ...]]] = []
    due = outbox.destinations_due(now)
    if any(name not in by_name for name in due):
        outbox.park_unknown(tuple(by_name), now=now)
    for name in due:
        dest = by_name.get(name)
        if dest is None or (destination is not None and name != destination):
            continue
        rows = outbox.claim_due(name, now, batch)
        if rows:
            claimed.append((name, dest, rows))
    if not claimed:
        return DeliveryCounts()
    with ThreadPoolExecutor(max_workers=len(claimed), thread_name_prefix="sender") as pool:
        futures = [
            (name, pool.submit(contextvars.copy_context().run, _send_batch, sender, dest, rows))
            for name, dest, rows in claimed
        ]
        sent = [(name, future.result()) for name, future in futures]
    for name, outcomes in sent:
        if all(isinstance(o, SendError) and o.retryable for _, o in outcomes):
            unreachable.append(name)
        for row, outcome in outcomes:
            if isinstance(outcome, SendResult) and outcome.delivered:
                outbox.mark_delivered(row, outcome, now=now)
                state = DeliveryState.DELIVERED
                delivered += 1
            else:
                state = outbox.mark_failed(
                    row,
                    error=str(outcome) if isinstance(outcome, SendError) else outcome.message,
                    status_code=None if isinstance(outcome, SendError) else outcome.status_code,
                    retryable=outcome.retryable,
                    settings=rules.delivery,
                    now=now,
                    rng=rand,
                )
                dead += state == DeliveryState.DEAD
                retrying += state == DeliveryState.PENDING
            _log_attempt(
                row, state, None if isinstance(outcome, SendError) else outcome.status_code
            )
    return DeliveryCounts(
        delivered=delivered, retrying=retrying, dead=dead, unreachable=tuple(unreachable)
    )


def _send_batch(
    sender: SendFn, dest: Destination, rows: Sequence[Delivery]
) -> list[tuple[Delivery, SendResult | SendError]]:
    """Send rows together; a permanent batch error (an unreadable file) is retried one by one
    so it dead-letters only the object that caused it."""
    try:
        results = sender(dest, [r.path for r in rows])
    except SendError as exc:
        if exc.retryable or len(rows) == 1:
            return [(row, exc) for row in rows]
        return [pair for row in rows for pair in _send_batch(sender, dest, [row])]
    by_uid = {r.sop_instance_uid: r for r in results}
    missing = SendError("the sender returned no result for this object", retryable=True)
    return [(row, by_uid.get(row.sop_uid, missing)) for row in rows]


def _log_attempt(row: Delivery, state: DeliveryState, status_code: int | None) -> None:
    log.info(
        "delivery_attempt",
        destination=row.destination,
        object_kind=object_kind(row.sop_class_uid),
        status_code=None if status_code is None else f"0x{status_code:04X}",
        attempt=row.attempts + 1,
        state=state.value,
        instance_key=uid_key(row.sop_uid),
    )

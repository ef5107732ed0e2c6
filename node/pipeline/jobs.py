"""The durable study job queue: ready -> processing -> done / failed / dead, with leases.

Every state change is one SQLite transaction in the spool index, so a `kill -9` at any point
leaves each job either before or after a transition. A job caught in `processing` by a crash is
taken up again (its owner is dead); the pipeline writes its audit atomically, so a redo replaces
the earlier partial work and `done` is recorded once. Each attempt is kept in `job_history`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from node.errors import JobError
from node.ingest.spool import Index
from node.log import get_logger, uid_key
from node.records import StudyJob, StudyOutcome, StudyStatus
from node.store.db import Session

log = get_logger(__name__)

RETRY_BACKOFF_MAX_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """A failed or dead job, for `neuronode status` (study as keyed hash only)."""

    job_id: int
    study_key: str
    state: str
    attempts: int
    error: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSummary:
    """Queue depth, jobs in progress and the latest failures."""

    queue_depth: int
    processing: int
    recent_failures: tuple[Failure, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One processing attempt of a job, from the history table."""

    job_id: int
    study_uid: str
    attempt: int
    reopened: bool
    started_at: float
    finished_at: float | None
    outcome: str | None  # done, failed, retry, dead, interrupted, lease-expired, released


class JobQueue:
    """Durable jobs over the spool index; `owner` names this process for its leases."""

    def __init__(
        self,
        index: Index,
        *,
        owner: str,
        lease_s: float,
        max_attempts: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.owner = owner
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self._clock = clock  # the tables are the index's (node.store.db)

    def enqueue(self, study_uid: str) -> int | None:
        """Make a receiving study ready: one new job. None if the study is not receiving."""
        now = self._clock()
        with self.index.transaction() as db:
            st = db.execute(
                "SELECT state, reopened FROM studies WHERE study_uid = ? FOR UPDATE", (study_uid,)
            ).fetchone()
            if st is None or st["state"] != StudyStatus.RECEIVING:
                return None
            cur = db.execute(
                "INSERT INTO jobs (study_uid, state, reopened, max_attempts, available_at, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING job_id",
                (
                    study_uid,
                    StudyStatus.READY.value,
                    st["reopened"],
                    self.max_attempts,
                    now,
                    now,
                    now,
                ),
            )
            db.execute(
                "UPDATE studies SET state = ? WHERE study_uid = ?",
                (StudyStatus.READY.value, study_uid),
            )
            job_id = int(cur.fetchall()[0]["job_id"])
        log.info(
            "study_ready",
            study_key=uid_key(study_uid),
            job_id=job_id,
            reopened=bool(st["reopened"]),
        )
        return job_id

    def claim(self) -> StudyJob | None:
        """Take the oldest ready job under a lease; None when nothing is ready."""
        now = self._clock()
        with self.index.transaction() as db:
            row = db.execute(
                "SELECT job_id, study_uid, attempts, reopened FROM jobs "
                "WHERE state = ? AND available_at <= ? ORDER BY job_id LIMIT 1 "
                "FOR UPDATE SKIP LOCKED",
                (StudyStatus.READY.value, now),
            ).fetchone()
            if row is None:
                return None
            study_uid = str(row["study_uid"])
            attempt = int(row["attempts"]) + 1
            seq_row = db.execute(
                "SELECT last_seq FROM studies WHERE study_uid = ? FOR UPDATE", (study_uid,)
            ).fetchone()
            claimed_seq = int(seq_row["last_seq"]) if seq_row is not None else 0
            db.execute(
                "UPDATE jobs SET state = ?, attempts = ?, owner = ?, lease_expires = ?, "
                "claimed_seq = ?, updated_at = ? WHERE job_id = ?",
                (
                    StudyStatus.PROCESSING.value,
                    attempt,
                    self.owner,
                    now + self.lease_s,
                    claimed_seq,
                    now,
                    row["job_id"],
                ),
            )
            db.execute(
                "UPDATE studies SET state = ? WHERE study_uid = ?",
                (StudyStatus.PROCESSING.value, study_uid),
            )
            db.execute(
                "INSERT INTO job_history (job_id, study_uid, attempt, owner, reopened, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (row["job_id"], study_uid, attempt, self.owner, row["reopened"], now),
            )
            paths = tuple(
                self.index.path.parent / str(r["path"])
                for r in db.execute(
                    "SELECT path FROM instances WHERE study_uid = ? AND seq <= ? ORDER BY seq",
                    (study_uid, claimed_seq),
                )
            )
        return StudyJob(
            job_id=int(row["job_id"]),
            study_uid=study_uid,
            instance_paths=paths,
            attempt=attempt,
            reopened=bool(row["reopened"]),
        )

    def _check_lease(self, db: Session, job: StudyJob) -> None:
        row = db.execute(
            "SELECT state, owner, attempts FROM jobs WHERE job_id = ? FOR UPDATE", (job.job_id,)
        ).fetchone()
        if (
            row is None
            or row["state"] != StudyStatus.PROCESSING
            or row["owner"] != self.owner
            or int(row["attempts"]) != job.attempt
        ):
            raise JobError(f"job {job.job_id}: lease lost")

    def _finish_history(
        self,
        db: Session,
        job: StudyJob,
        *,
        outcome: str,
        now: float,
        audit: str | None,
        error: str | None,
    ) -> None:
        db.execute(
            "UPDATE job_history SET finished_at = ?, outcome = ?, audit_path = ?, error = ? "
            "WHERE job_id = ? AND attempt = ? AND finished_at IS NULL",
            (now, outcome, audit, error, job.job_id, job.attempt),
        )

    def _settle_study(self, db: Session, job: StudyJob, state: StudyStatus) -> StudyStatus:
        """Set the study's state after a job ends; instances that came meanwhile re-open it."""
        st = db.execute(
            "SELECT s.last_seq AS last_seq, j.claimed_seq AS claimed_seq FROM studies s "
            "JOIN jobs j ON j.study_uid = s.study_uid WHERE j.job_id = ?",
            (job.job_id,),
        ).fetchone()
        newer = st is not None and int(st["last_seq"]) > int(st["claimed_seq"] or 0)
        if newer and state in (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.DEAD):
            db.execute(
                "UPDATE studies SET state = ?, reopened = 1, receiving_since = ("
                "SELECT MIN(received_at) FROM instances WHERE study_uid = ? AND seq > ?) "
                "WHERE study_uid = ?",
                (
                    StudyStatus.RECEIVING.value,
                    job.study_uid,
                    int(st["claimed_seq"] or 0),
                    job.study_uid,
                ),
            )
            return StudyStatus.RECEIVING
        db.execute("UPDATE studies SET state = ? WHERE study_uid = ?", (state.value, job.study_uid))
        return state

    def complete(self, job: StudyJob, outcome: StudyOutcome) -> None:
        """Record a job as done (once); raise JobError if this worker no longer holds it."""
        now = self._clock()
        with self.index.transaction() as db:
            self._check_lease(db, job)
            db.execute(
                "UPDATE jobs SET state = ?, owner = NULL, lease_expires = NULL, updated_at = ?, "
                "last_error = NULL WHERE job_id = ?",
                (StudyStatus.DONE.value, now, job.job_id),
            )
            self._finish_history(
                db, job, outcome="done", now=now, audit=str(outcome.audit_path), error=None
            )
            db.execute(
                "UPDATE studies SET times_done = times_done + 1 WHERE study_uid = ?",
                (job.study_uid,),
            )
            self._settle_study(db, job, StudyStatus.DONE)

    def fail(self, job: StudyJob, *, error: str, permanent: bool) -> StudyStatus:
        """Record a failed attempt: retried later, failed for good, or dead after max attempts."""
        now = self._clock()
        with self.index.transaction() as db:
            self._check_lease(db, job)
            row = db.execute(
                "SELECT max_attempts FROM jobs WHERE job_id = ?", (job.job_id,)
            ).fetchone()
            if permanent:
                state, outcome = StudyStatus.FAILED, "failed"
            elif job.attempt >= int(row["max_attempts"]):
                state, outcome = StudyStatus.DEAD, "dead"
            else:
                state, outcome = StudyStatus.READY, "retry"
            backoff = min(RETRY_BACKOFF_MAX_S, 2.0 ** (job.attempt - 1))
            db.execute(
                "UPDATE jobs SET state = ?, owner = NULL, lease_expires = NULL, updated_at = ?, "
                "last_error = ?, available_at = ? WHERE job_id = ?",
                (state.value, now, error, now + backoff, job.job_id),
            )
            self._finish_history(db, job, outcome=outcome, now=now, audit=None, error=error)
            self._settle_study(db, job, state)
        return state

    def release(self, job: StudyJob) -> None:
        """Give a job back unfinished (shutdown): ready again, this attempt not counted."""
        now = self._clock()
        with self.index.transaction() as db:
            self._check_lease(db, job)
            db.execute(
                "UPDATE jobs SET state = ?, owner = NULL, lease_expires = NULL, "
                "attempts = attempts - 1, updated_at = ? WHERE job_id = ?",
                (StudyStatus.READY.value, now, job.job_id),
            )
            self._finish_history(db, job, outcome="released", now=now, audit=None, error=None)
            db.execute(
                "UPDATE studies SET state = ? WHERE study_uid = ?",
                (StudyStatus.READY.value, job.study_uid),
            )

    def renew(self, job: StudyJob) -> None:
        """Extend the lease of a job this worker still holds."""
        now = self._clock()
        with self.index.transaction() as db:
            self._check_lease(db, job)
            db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE job_id = ?",
                (now + self.lease_s, job.job_id),
            )

    def _abandon(
        self, where: str, params: tuple[object, ...], outcome: str, *, counted: bool
    ) -> int:
        """Take back processing jobs matching `where`: ready again, or dead past max attempts.

        An attempt that is not `counted` (the node died under it) is given back: it was not
        the study's fault, so it never moves the job towards the dead letter.
        """
        now = self._clock()
        with self.index.transaction() as db:
            rows = db.execute(
                "SELECT job_id, study_uid, attempts, max_attempts FROM jobs "
                f"WHERE state = ? AND {where} FOR UPDATE SKIP LOCKED",
                (StudyStatus.PROCESSING.value, *params),
            ).fetchall()
            for r in rows:
                attempts = int(r["attempts"]) if counted else max(0, int(r["attempts"]) - 1)
                dead = counted and attempts >= int(r["max_attempts"])
                state = StudyStatus.DEAD if dead else StudyStatus.READY
                db.execute(
                    "UPDATE jobs SET state = ?, owner = NULL, lease_expires = NULL, "
                    "attempts = ?, updated_at = ?, last_error = ? WHERE job_id = ?",
                    (state.value, attempts, now, outcome, r["job_id"]),
                )
                db.execute(
                    "UPDATE job_history SET finished_at = ?, outcome = ? "
                    "WHERE job_id = ? AND finished_at IS NULL",
                    (now, outcome, r["job_id"]),
                )
                db.execute(
                    "UPDATE studies SET state = ? WHERE study_uid = ?",
                    (state.value, r["study_uid"]),
                )
                log.warning(
                    "job_taken_back",
                    job_id=int(r["job_id"]),
                    study_key=uid_key(str(r["study_uid"])),
                    reason=outcome,
                    state=state.value,
                    attempt=int(r["attempts"]),
                )
        return len(rows)

    def release_orphans(self) -> int:
        """At startup: jobs left in processing by a previous (dead) process are taken back.

        A crash of the node is not the study's fault: the interrupted attempt is not counted.
        On a shared PostgreSQL database other owners are other live processes: their jobs
        come back only when their lease expires (`expire_leases`).
        """
        if self.index.postgres:
            return 0
        return self._abandon(
            "(owner IS NULL OR owner != ?)", (self.owner,), "interrupted", counted=False
        )

    def expire_leases(self) -> int:
        """Jobs whose lease ran out are taken back (their worker hung): the attempt counts."""
        return self._abandon("lease_expires < ?", (self._clock(),), "lease-expired", counted=True)

    def summary(self, n_failures: int = 10) -> QueueSummary:
        """Queue depth, jobs processing and the latest failed or dead jobs."""
        counts = {
            str(r["state"]): int(r["n"])
            for r in self.index.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        }
        fails = self.index.query(
            "SELECT job_id, study_uid, state, attempts, last_error, updated_at FROM jobs "
            "WHERE state IN (?, ?) ORDER BY updated_at DESC LIMIT ?",
            (StudyStatus.FAILED.value, StudyStatus.DEAD.value, n_failures),
        )
        return QueueSummary(
            queue_depth=counts.get(StudyStatus.READY.value, 0),
            processing=counts.get(StudyStatus.PROCESSING.value, 0),
            recent_failures=tuple(
                Failure(
                    job_id=int(r["job_id"]),
                    study_key=uid_key(str(r["study_uid"])),
                    state=str(r["state"]),
                    attempts=int(r["attempts"]),
                    error=str(r["last_error"] or ""),
                    at=float(r["updated_at"]),
                )
                for r in fails
            ),
        )

    def requeue(
        self, *, study_uid: str | None = None, include_failed: bool = False
    ) -> tuple[str, ...]:
        """Give given-up jobs a fresh set of attempts, ready now; return their study UIDs.

        Dead jobs always; failed ones (our own error about the input) only with
        `include_failed`, for a study that was fixed. Only a study's latest job, and only while
        the study still stands where its job left it (new instances re-opened it otherwise).
        """
        states = [StudyStatus.DEAD.value]
        if include_failed:
            states.append(StudyStatus.FAILED.value)
        marks = ",".join("?" * len(states))
        where = f"j.state IN ({marks}) AND s.state = j.state"
        params: tuple[object, ...] = tuple(states)
        if study_uid is not None:
            where += " AND j.study_uid = ?"
            params += (study_uid,)
        now = self._clock()
        with self.index.transaction() as db:
            rows = db.execute(
                "SELECT j.job_id, j.study_uid FROM jobs j JOIN studies s ON s.study_uid = "
                f"j.study_uid WHERE {where} AND j.job_id = (SELECT MAX(job_id) FROM jobs "
                "WHERE study_uid = j.study_uid) ORDER BY j.job_id",
                params,
            ).fetchall()
            for r in rows:
                db.execute(
                    "UPDATE jobs SET state = ?, attempts = 0, owner = NULL, lease_expires = NULL, "
                    "available_at = ?, updated_at = ? WHERE job_id = ?",
                    (StudyStatus.READY.value, now, now, r["job_id"]),
                )
                db.execute(
                    "UPDATE studies SET state = ? WHERE study_uid = ?",
                    (StudyStatus.READY.value, r["study_uid"]),
                )
        for r in rows:
            log.info(
                "job_requeued", job_id=int(r["job_id"]), study_key=uid_key(str(r["study_uid"]))
            )
        return tuple(str(r["study_uid"]) for r in rows)

    def given_up(self) -> tuple[Failure, ...]:
        """Every dead or failed job that is its study's latest, newest first (for status)."""
        rows = self.index.query(
            "SELECT job_id, study_uid, state, attempts, last_error, updated_at FROM jobs j "
            "WHERE state IN (?, ?) AND job_id = (SELECT MAX(job_id) FROM jobs "
            "WHERE study_uid = j.study_uid) ORDER BY updated_at DESC",
            (StudyStatus.DEAD.value, StudyStatus.FAILED.value),
        )
        return tuple(
            Failure(
                job_id=int(r["job_id"]),
                study_key=uid_key(str(r["study_uid"])),
                state=str(r["state"]),
                attempts=int(r["attempts"]),
                error=str(r["last_error"] or ""),
                at=float(r["updated_at"]),
            )
            for r in rows
        )

    def job_state(self, job_id: int) -> StudyStatus:
        """The current state of one job."""
        rows = self.index.query("SELECT state FROM jobs WHERE job_id = ?", (job_id,))
        if not rows:
            raise JobError(f"no job {job_id}")
        return StudyStatus(str(rows[0]["state"]))

    def history(self, study_uid: str) -> tuple[Attempt, ...]:
        """Every processing attempt of a study, oldest first (reprocessing of re-opened studies)."""
        rows = self.index.query(
            "SELECT job_id, study_uid, attempt, reopened, started_at, finished_at, outcome "
            "FROM job_history WHERE study_uid = ? ORDER BY id",
            (study_uid,),
        )
        return tuple(
            Attempt(
                job_id=int(r["job_id"]),
                study_uid=str(r["study_uid"]),
                attempt=int(r["attempt"]),
                reopened=bool(r["reopened"]),
                started_at=float(r["started_at"]),
                finished_at=None if r["finished_at"] is None else float(r["finished_at"]),
                outcome=None if r["outcome"] is None else str(r["outcome"]),
            )
            for r in rows
        )

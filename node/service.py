"""`neuronode serve`: the SCP, the completion scheduler, the study workers and the sender in one
process.

SIGTERM/SIGINT stop it cleanly: no new associations, open ones get a grace period, in-flight
jobs finish within the grace period or give their lease back, the sender finishes its current
pass (the outbox keeps whatever it did not send), and the index is closed. `serve` refuses to
start when a bundle an enabled task needs cannot be loaded: the node never runs half its models.

Why this module is long: it is the one place that owns the node's threads (scheduler, workers,
senders, retention, rule-file reload) and what they share (the running rules, the metrics);
each loop is short, and what it calls lives with its stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING

from node.config import Rules
from node.errors import ConfigError, JobError, NodeError, SpoolError
from node.ingest.completion import decide_ready
from node.ingest.receive import Receiver
from node.ingest.spool import Spool
from node.log import get_logger, uid_key
from node.pipeline.jobs import JobQueue
from node.records import StudyJob, StudyOutcome, StudyStatus
from node.reload import RuleFileWatcher
from node.store.db import DatabaseError, SchemaError
from node.web.metrics import NodeMetrics
from node.web.server import HTTP_PORT_ENV, WebServer

if TYPE_CHECKING:
    from node.deliver.outbox import SendFn

log = get_logger(__name__)

Processor = Callable[[StudyJob], StudyOutcome]

SHUTDOWN_GRACE_S = 10.0
RULES_POLL_S = 1.0  # how often the rule file is looked at for a change
SENDER_INTERVAL_S = 1.0  # how often each destination's sender looks for due deliveries
# A loop that keeps failing the same way (disk full) logs once, then once per this period with
# the number of failures in between; it also slows down, up to ERROR_BACKOFF_MAX_S.
ERROR_LOG_PERIOD_S = 60.0
ERROR_BACKOFF_MAX_S = 5.0
# Test hook only: seconds each job sleeps before the pipeline runs, so a test can kill the
# node while a study is processing. Logged loudly when set.
TEST_DELAY_ENV = "NEURONODE_TEST_PROCESS_DELAY_S"


def pipeline_processor(current: Callable[[], Rules]) -> Processor:
    """The real processor: node.pipeline.runner.process_study, imported when first used. Each
    job runs under the rules in force when it starts (a reload swaps them between jobs)."""

    def run(job: StudyJob) -> StudyOutcome:
        from node.pipeline.runner import process_study

        rules = current()
        outcome = process_study(
            job, rules, out_dir=rules.storage.spool_dir / "results", deliver=True
        )
        assert isinstance(outcome, StudyOutcome)
        return outcome

    return run


def _with_test_delay(processor: Processor, delay_s: float) -> Processor:
    def run(job: StudyJob) -> StudyOutcome:
        time.sleep(delay_s)
        return processor(job)

    return run


class Node:
    """Everything `serve` runs, startable and stoppable from a test in the same process."""

    def __init__(
        self,
        rules: Rules,
        *,
        processor: Processor | None = None,
        send: SendFn | None = None,
        rules_path: Path | None = None,
    ) -> None:
        self.rules = rules  # replaced whole by a reload, never changed in place
        self._watcher = RuleFileWatcher(rules_path) if rules_path is not None else None
        self._senders: set[str] = set()
        self._senders_lock = threading.Lock()
        spool_dir = rules.storage.spool_dir
        prepare_spool_dir(spool_dir)
        # On PostgreSQL many nodes share the spool; the database's row locks coordinate them.
        shared = rules.database.shared
        if shared:
            self._lock_file: IO[str] = open(os.devnull, encoding="utf-8")  # noqa: SIM115
        else:
            self._lock_file = lock_spool(spool_dir)
        try:
            self.spool = Spool(
                spool_dir,
                min_free_disk_mb=rules.storage.min_free_disk_mb,
                database_url=rules.database.resolve_url(),
            )
        except (ConfigError, DatabaseError) as exc:  # url_file, schema, PostgreSQL unreachable
            self._lock_file.close()
            if shared or isinstance(exc, (ConfigError, SchemaError)):
                raise ConfigError(str(exc)) from None
            raise ConfigError(
                f"storage.spool_dir: cannot use {spool_dir}: {_os_reason(exc)}"
            ) from None
        except (OSError, sqlite3.Error) as exc:
            self._lock_file.close()
            raise ConfigError(
                f"storage.spool_dir: cannot use {spool_dir}: {_os_reason(exc)}"
            ) from None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queue = JobQueue(
            self.spool.index,
            owner=self.owner,
            lease_s=rules.processing.lease_s,
            max_attempts=rules.processing.max_attempts,
        )
        self.processor = (
            processor if processor is not None else pipeline_processor(lambda: self.rules)
        )
        self._send = send  # None: C-STORE / STOW-RS (tests inject a fake)
        delay = os.environ.get(TEST_DELAY_ENV)
        if delay:
            log.warning("test_delay_active", duration_ms=round(float(delay) * 1000))
            self.processor = _with_test_delay(self.processor, float(delay))
        self.metrics = NodeMetrics()
        self.receiver = Receiver(rules.node, self.spool, on_store=self._count_store)
        self.web: WebServer | None = None
        if rules.http.enabled:
            try:
                self.web = self._make_web()
            except ConfigError:
                self.spool.close()
                self._lock_file.close()
                raise
        self._stop = threading.Event()
        self._work = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inflight: dict[int, StudyJob] = {}
        self._inflight_lock = threading.Lock()
        self._started_at = time.time()

    def _make_web(self) -> WebServer:
        """The HTTP server on http.bind_address:http.port (NEURONODE_HTTP_PORT overrides the
        port); a bind failure is a ConfigError naming the key."""
        http = self.rules.http
        port = int(os.environ.get(HTTP_PORT_ENV) or http.port)
        try:
            return WebServer(
                self.spool,
                port=port,
                host=http.bind_address,
                metrics=self.metrics,
                active_associations=self.receiver.active_associations,
            )
        except OSError as exc:
            raise ConfigError(
                f"http.port: cannot listen on {http.bind_address}:{port}: {_os_reason(exc)}"
                " (another program uses it? set http.port, or http.enabled: false)"
            ) from None

    def _count_store(self, outcome: str, reason: str) -> None:
        m = self.metrics
        if outcome == "received":
            m.instances_received.inc()
        elif outcome == "quarantined":
            m.instances_quarantined.inc()
        else:
            m.instances_rejected.labels(reason=reason or "error").inc()

    def start(self) -> None:
        """Take back orphaned jobs, then start the SCP, the scheduler and the workers."""
        self._started_at = time.time()
        n = self.queue.release_orphans()
        if n:
            log.warning("orphaned_jobs_released", count=n)
        self.receiver.start()
        if self.web is not None:
            self.web.start()
        self._spawn("scheduler", self._schedule_loop)
        self._spawn("retention", self._retention_loop)
        for i in range(self.rules.processing.workers):
            self._spawn(f"worker-{i}", self._work_loop)
        self._park_unknown_deliveries()
        self._start_senders()
        if self._watcher is not None:
            self._spawn("rules", self._reload_loop)
        self._work.set()
        log.info(
            "node_started",
            port=self.receiver.port,
            ae_title=self.rules.node.ae_title,
            workers=self.rules.processing.workers,
        )

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting, let work finish within `grace_s`, release what is left, close."""
        log.info("node_stopping", duration_ms=round(grace_s * 1000))
        deadline = time.monotonic() + grace_s
        self._stop.set()  # the scheduler and the workers take no new work
        self._work.set()
        self.receiver.stop(grace_s)
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._inflight_lock:
            unfinished = tuple(self._inflight.values())
        for job in unfinished:
            with contextlib.suppress(JobError):
                self.queue.release(job)
                log.warning("job_released", job_id=job.job_id, study_key=uid_key(job.study_uid))
        if self.web is not None:
            self.web.stop()
        self.spool.close()
        self._lock_file.close()
        log.info("node_stopped")

    def _schedule_loop(self) -> None:
        """Poll receiving studies; enqueue the complete ones; take back expired leases."""
        errors = RepeatedError("scheduler_error")
        while not self._stop.is_set():
            c = self.rules.completion  # a reload takes effect at the next turn
            try:
                if self.queue.expire_leases():
                    self._work.set()
                now = time.time()
                for study in self.spool.receiving_studies():
                    # After a restart a sender may be about to resume: give it a full quiet
                    # period from our start, not from its last instance before the outage.
                    decision = decide_ready(
                        last_instance_at=max(study.last_received_at, self._started_at),
                        now=now,
                        quiet_period_s=c.quiet_period_s,
                        series=study.series,
                        use_expected_counts=c.use_expected_counts,
                        first_instance_at=max(study.receiving_since, self._started_at),
                        max_wait_s=c.max_wait_s,
                    )
                    if decision.ready and self.queue.enqueue(study.study_uid) is not None:
                        self._work.set()
            except (NodeError, OSError, sqlite3.Error) as exc:
                errors.record(exc)
            else:
                errors.clear()
            self._stop.wait(errors.wait_s(c.poll_interval_s))

    def _start_senders(self) -> None:
        """One sender thread per destination in the rules that has none yet."""
        with self._senders_lock:
            for dest in self.rules.destinations:
                if dest.name not in self._senders:
                    self._senders.add(dest.name)
                    self._spawn(f"sender-{dest.name}", partial(self._send_loop, dest.name))

    def _reload_loop(self) -> None:
        assert self._watcher is not None
        while not self._stop.wait(RULES_POLL_S):
            self.reload_rules()

    def reload_rules(self) -> bool:
        """Look at the rule file once: swap in a changed valid one (True), refuse an invalid
        one with the problems `neuronode check` prints and keep the running rules."""
        if self._watcher is None:
            return False
        outcome = self._watcher.poll(self.rules)
        if outcome is None:
            return False
        if outcome.rules is None:
            self.metrics.rules_reload_refused.inc()
            log.error(
                "rules_refused",
                path=str(self._watcher.path),
                problems=list(outcome.problems),
                count=len(outcome.problems),
                reason="the running rules stay in force",
            )
            return False
        self.apply_rules(outcome.rules)
        self.metrics.rules_reloaded.inc()
        log.info(
            "rules_reloaded",
            path=str(self._watcher.path),
            restart_keys=list(outcome.restart_keys) or None,
            reason="changed keys that wait for a restart keep their running values"
            if outcome.restart_keys
            else None,
        )
        return True

    def apply_rules(self, rules: Rules) -> None:
        """Swap in new rules: jobs already running keep the rules they started with."""
        self.rules = rules
        self.queue.lease_s = rules.processing.lease_s
        self.queue.max_attempts = rules.processing.max_attempts
        self.spool.min_free_bytes = int(rules.storage.min_free_disk_mb * 1024 * 1024)
        self._park_unknown_deliveries()
        self._start_senders()
        self._work.set()

    def _retention_loop(self) -> None:
        """Apply the rule file's retention now and then: purge what owes nothing more."""
        errors = RepeatedError("retention_error")
        while not self._stop.wait(errors.wait_s(self.rules.retention.interval_s)):
            try:
                self.apply_retention()
            except (NodeError, OSError, sqlite3.Error) as exc:
                errors.record(exc)
            else:
                errors.clear()

    def apply_retention(self, now: float | None = None) -> int:
        """Purge the studies retention allows now (between jobs: only done, delivered studies,
        each checked again in its own transaction); return how many went."""
        from node.store.retention import plan, purge

        at = time.time() if now is None else now
        purged = purge(self.spool, plan(self.spool, self.rules.retention, now=at), now=at)
        if purged:
            self.metrics.studies_purged.inc(len(purged))
            log.info("retention_applied", count=len(purged))
        return len(purged)

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.claim()
            except sqlite3.Error as exc:  # index busy or failing: keep the worker alive
                log.error("claim_failed", error_type=type(exc).__name__)
                self._stop.wait(1.0)
                continue
            if job is None:
                self._work.wait(self.rules.completion.poll_interval_s)
                self._work.clear()
                continue
            with self._inflight_lock:
                self._inflight[job.job_id] = job
            try:
                self._run_job(job)
            finally:
                with self._inflight_lock:
                    self._inflight.pop(job.job_id, None)

    def _run_job(self, job: StudyJob) -> None:
        """Run one job under a renewed lease; the per-job guard records any failure."""
        started = time.monotonic()
        done = threading.Event()
        renewer = threading.Thread(target=self._renew_loop, args=(job, done), daemon=True)
        renewer.start()
        log.info(
            "job_started",
            job_id=job.job_id,
            study_key=uid_key(job.study_uid),
            attempt=job.attempt,
            n_instances=len(job.instance_paths),
            reopened=job.reopened,
        )
        round_started = self._round_started(job)
        outcome: StudyOutcome | None = None
        state = StudyStatus.DONE
        error_type = None
        failed_stage = "unknown"
        try:
            outcome = self.processor(job)
        except NodeError as exc:
            # Our own error about this study (bad input) is deterministic: do not retry. A
            # NodeError wrapping a third-party error (I/O, memory) may pass: retry it.
            error_type = type(exc).__name__
            failed_stage = str(getattr(exc, "stage", None) or "unknown")
            cause = exc.__cause__
            transient = cause is not None and not isinstance(cause, NodeError)
            state = StudyStatus.READY if transient else StudyStatus.FAILED
        except Exception as exc:  # the per-job guard: retried, then dead letter
            error_type = type(exc).__name__
            state = StudyStatus.READY
        finally:
            done.set()
        try:
            if outcome is not None:
                self.queue.complete(job, outcome)
            else:
                state = self.queue.fail(
                    job, error=error_type or "error", permanent=state is StudyStatus.FAILED
                )
        except JobError:
            log.warning("job_lease_lost", job_id=job.job_id, study_key=uid_key(job.study_uid))
            return
        except sqlite3.Error as exc:
            # The result could not be recorded: the lease runs out and the job is redone.
            log.error("job_record_failed", job_id=job.job_id, error_type=type(exc).__name__)
            return
        self._count_job(outcome, state, failed_stage, round_started)
        log.info(
            "job_finished",
            job_id=job.job_id,
            study_key=uid_key(job.study_uid),
            attempt=job.attempt,
            reopened=job.reopened,
            status=state.value,
            error_type=error_type,
            n_series=outcome.n_series if outcome else None,
            n_instances=outcome.n_instances if outcome else len(job.instance_paths),
            n_errors=outcome.n_decode_errors if outcome else None,
            duration_ms=round((time.monotonic() - started) * 1000),
        )

    def _round_started(self, job: StudyJob) -> float | None:
        """When the first instance of this round of the study came (for time-to-result)."""
        try:
            rows = self.spool.index.query(
                "SELECT COALESCE(receiving_since, first_received_at) AS t FROM studies "
                "WHERE study_uid = ?",
                (job.study_uid,),
            )
        except sqlite3.Error:
            return None
        return float(rows[0]["t"]) if rows and rows[0]["t"] is not None else None

    def _count_job(
        self,
        outcome: StudyOutcome | None,
        state: StudyStatus,
        failed_stage: str,
        round_started: float | None,
    ) -> None:
        m = self.metrics
        if outcome is None:
            m.studies_failed.labels(stage=failed_stage, state=state.value).inc()
            return
        m.studies_processed.inc()
        now = time.time()
        m.last_study_processed.set(now)
        for stage, ms in outcome.stage_ms:
            m.stage_seconds.labels(stage=stage).observe(ms / 1000.0)
        if round_started is not None:
            m.time_to_result.observe(max(0.0, now - round_started))

    def _park_unknown_deliveries(self) -> None:
        """Park the deliveries of destinations removed from the rules (logged once, shown by
        `status`), and take back the parked rows of destinations that are in the rules again."""
        from node.deliver.outbox import Outbox

        try:
            with Outbox(
                self.rules.storage.spool_dir, database_url=self.spool.index.url_if_shared
            ) as outbox:
                outbox.park_unknown([d.name for d in self.rules.destinations], now=time.time())
        except (sqlite3.Error, OSError) as exc:
            log.error("sender_failed", error_type=type(exc).__name__)

    def _send_loop(self, destination: str) -> None:
        """Deliver one destination's due outbox rows until stopped.

        Each destination has its own thread and its own outbox connection, so one that never
        answers holds up only itself, and each honours its own backoff: it wakes when its
        earliest row is due (at most SENDER_INTERVAL_S later, to see newly queued rows).
        """
        from node.deliver.outbox import Outbox, deliver_due

        try:
            outbox = Outbox(
                self.rules.storage.spool_dir, database_url=self.spool.index.url_if_shared
            )
        except (sqlite3.Error, OSError) as exc:
            log.error("sender_failed", destination=destination, error_type=type(exc).__name__)
            return
        errors = RepeatedError("sender_error")
        try:
            while not self._stop.is_set():
                with self._senders_lock:  # removed by a reload: its rows are parked
                    if destination not in {d.name for d in self.rules.destinations}:
                        self._senders.discard(destination)
                        return
                wait_s = SENDER_INTERVAL_S
                try:
                    counts = deliver_due(
                        outbox, self.rules, time.time(), send=self._send, destination=destination
                    )
                    next_due = outbox.next_due(destination)
                except (NodeError, OSError, sqlite3.Error) as exc:
                    errors.record(exc)
                    wait_s = errors.wait_s(SENDER_INTERVAL_S)
                else:
                    errors.clear()
                    m = self.metrics
                    m.deliveries_sent.labels(destination=destination).inc(counts.delivered)
                    m.deliveries_failed.labels(destination=destination).inc(
                        counts.retrying + counts.dead
                    )
                    m.deliveries_dead.labels(destination=destination).inc(counts.dead)
                    if counts.delivered or counts.dead or counts.retrying:
                        log.info(
                            "sender_pass",
                            destination=destination,
                            count=counts.delivered,
                            n_failed=counts.retrying + counts.dead,
                        )
                    if next_due is not None:
                        wait_s = min(wait_s, max(0.0, next_due - time.time()))
                self._stop.wait(wait_s)
        finally:
            outbox.close()

    def _renew_loop(self, job: StudyJob, done: threading.Event) -> None:
        interval = max(0.5, self.rules.processing.lease_s / 3)
        while not done.wait(interval):
            try:
                self.queue.renew(job)
            except JobError:
                return


class RepeatedError:
    """Logging for a loop that may fail on every turn: the first error of a run is logged,
    the same error again only once per ERROR_LOG_PERIOD_S (with how many there were), and the
    loop's wait doubles up to ERROR_BACKOFF_MAX_S while it keeps failing."""

    def __init__(self, event: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self._clock = clock
        self._failures = 0
        self._suppressed = 0
        self._last_type: str | None = None
        self._logged_at = 0.0

    def record(self, exc: BaseException) -> None:
        now = self._clock()
        kind = type(exc).__name__
        self._failures += 1
        if kind == self._last_type and now - self._logged_at < ERROR_LOG_PERIOD_S:
            self._suppressed += 1
            return
        log.error(self.event, error_type=kind, count=self._suppressed + 1)
        self._last_type, self._logged_at, self._suppressed = kind, now, 0

    def clear(self) -> None:
        if self._failures and self._last_type is not None:
            log.info(f"{self.event}_cleared", count=self._failures)
        self._failures, self._suppressed, self._last_type = 0, 0, None

    def wait_s(self, interval_s: float) -> float:
        if not self._failures:
            return interval_s
        return float(min(ERROR_BACKOFF_MAX_S, interval_s * 2.0 ** min(self._failures, 16)))


def _os_reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or type(exc).__name__)


def prepare_spool_dir(spool_dir: Path) -> None:
    """Create the spool folder; failing that, one ConfigError naming storage.spool_dir."""
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        probe = spool_dir / ".writable"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"storage.spool_dir: cannot create or write {spool_dir}: {_os_reason(exc)}"
        ) from None


def lock_spool(spool_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the spool: one node per spool (released even on kill -9)."""
    fh = open(spool_dir / "node.lock", "a+", encoding="utf-8")  # noqa: SIM115
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise SpoolError(f"{spool_dir} is in use by another running node") from exc
    return fh

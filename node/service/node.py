"""The node: the SCP, the completion scheduler, the study workers and the senders.

`neuronode serve` runs every role in one process by default; `serve --role` runs one (see
docs/deploy.md). The parent process never loads torch: each study worker is a child process
(node/service/workers.py, node/pipeline/worker.py) that loads the models once in the
background while the listener is already open; a study that arrives meanwhile waits in the
queue. If a bundle an enabled task needs cannot load, the node says so (`failure`) and `serve`
stops with the same one-line error it always printed: the node never runs half its models.

The loops are event-driven: a stored instance wakes the completion scheduler, which otherwise
sleeps until the earliest quiet-period deadline; an enqueued job wakes the workers; a job that
queued results (its SR first, then its heatmaps) or finished wakes the senders. Polling
remains only as a slow fallback for what another process does.

SIGTERM/SIGINT stop it cleanly: no new associations, open ones get a grace period, in-flight
jobs finish within the grace period or their worker is stopped and the job given back, the
senders finish their current pass (the outbox keeps whatever they did not send), and the index
is closed.

Why this module is long: it is the one place that owns the node's threads (scheduler, worker
slots, retention, rule-file reload; the senders are in senders.py) and what they share (the
running rules, the metrics, the wake-ups); each loop is short, and what it calls lives with its
stage.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import CompletionSettings, Rules
from node.errors import ConfigError, JobError, NodeError
from node.ingest.completion import (
    EXPECTED_COUNT_SETTLE_S,
    all_series_complete,
    decide_ready,
    speculate_after_s,
)
from node.ingest.processes import ReceiverProcesses
from node.ingest.receive import Receiver
from node.ingest.spool import Spool, StudyProgress
from node.log import get_logger, load_or_create_key, uid_key
from node.pipeline.jobs import JobQueue
from node.pipeline.worker import TEST_DELAY_ENV, JobResult
from node.records import StudyJob, StudyOutcome, StudyStatus
from node.reload import RuleFileWatcher
from node.service.backoff import RepeatedError
from node.service.lock import lock_spool, os_reason, prepare_spool_dir
from node.service.senders import SENDER_IDLE_S, SENDER_INTERVAL_S, Senders
from node.service.workers import KILL_GRACE_S, InProcessWorker, Processor, ProcessWorker, WorkerDied
from node.store.db import DatabaseError, SchemaError
from node.web.metrics import NodeMetrics

if TYPE_CHECKING:
    from node.deliver.outbox import SendFn
    from node.web.server import WebServer

log = get_logger(__name__)

SHUTDOWN_GRACE_S = 10.0
RULES_POLL_S = 1.0  # how often the rule file is looked at for a change
# Fallbacks for what another process does (a `serve --role` beside this one, `requeue`): the
# local events wake each loop at once, these bound how long a loop sleeps without one.
WORK_IDLE_S = 1.0  # an idle worker slot looks for due retries and other processes' jobs
SCHEDULER_IDLE_S = 1.0  # the scheduler beside a local receiver: each instance wakes it
# While instances arrive, the receiving studies are scanned at most this often: a new study's
# deadline is at least min(quiet period, 1 s settle) away, and each scan reads the index that
# the receiver writes to.
SCAN_GAP_S = 0.25
WORKER_RESTART_S = 1.0  # a worker that cannot start is tried again after this (backed off)


class Role(StrEnum):
    """What a node process runs: `serve --role`; every role by default."""

    RECEIVER = "receiver"  # the SCP (every role serves its own HTTP: health, metrics)
    WORKER = "worker"  # the completion scheduler, the study workers, retention
    SENDER = "sender"  # the outbox senders


ALL_ROLES: frozenset[Role] = frozenset(Role)


def pipeline_processor(
    current: Callable[[], Rules], on_queued: Callable[[], None] | None = None
) -> Processor:
    """The pipeline run in the calling thread (`Node(..., in_process=True)`, the demo): each
    job runs under the rules in force when it starts (a reload swaps them between jobs);
    `on_queued` is told when a job has queued results (the SR, before its heatmaps)."""

    def run(job: StudyJob) -> StudyOutcome:
        from node.pipeline.runner import process_study

        rules = current()
        outcome = process_study(
            job,
            rules,
            out_dir=rules.storage.spool_dir / "results",
            deliver=True,
            on_queued=on_queued,
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
    """Everything `serve` runs (or the roles asked for), startable and stoppable from a test.

    Without `processor` every study runs in a worker process (the real path); a test may inject
    a `processor` callable, which then runs in the node's own worker threads, as may the demo
    with `in_process=True` (no timeout there: a thread cannot be killed).
    """

    def __init__(
        self,
        rules: Rules,
        *,
        processor: Processor | None = None,
        send: SendFn | None = None,
        rules_path: Path | None = None,
        roles: Iterable[Role] = ALL_ROLES,
        in_process: bool = False,
        web_after_dicom: bool = False,
    ) -> None:
        self.roles = frozenset(Role(r) for r in roles)
        if not self.roles:
            raise ValueError("roles: at least one role")
        self.rules = rules  # replaced whole by a reload, never changed in place
        self._watcher = RuleFileWatcher(rules_path) if rules_path is not None else None
        spool_dir = rules.storage.spool_dir
        prepare_spool_dir(spool_dir)
        # A whole node excludes every other process on its spool; one role shares it, and so
        # does every node on a PostgreSQL database (its row locks coordinate them).
        shared = rules.database.shared
        self._lock_file = lock_spool(spool_dir, shared=self.roles != ALL_ROLES or shared)
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
                f"storage.spool_dir: cannot use {spool_dir}: {os_reason(exc)}"
            ) from None
        except (OSError, sqlite3.Error) as exc:
            self._lock_file.close()
            raise ConfigError(
                f"storage.spool_dir: cannot use {spool_dir}: {os_reason(exc)}"
            ) from None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queue = JobQueue(
            self.spool.index,
            owner=self.owner,
            lease_s=rules.processing.lease_s,
            max_attempts=rules.processing.max_attempts,
        )
        if processor is None and in_process:
            processor = pipeline_processor(lambda: self.rules, lambda: self.wake_senders())
        self.processor = processor  # None: every job runs in a worker process
        delay = os.environ.get(TEST_DELAY_ENV)
        if delay and self.processor is not None:
            log.warning("test_delay_active", duration_ms=round(float(delay) * 1000))
            self.processor = _with_test_delay(self.processor, float(delay))
        self.metrics = NodeMetrics()
        self.receiver = Receiver(
            rules.node,
            self.spool,
            on_store=self._count_store,
            shared_port=rules.node.receiver_processes > 1,
        )
        self.receivers: ReceiverProcesses | None = None  # the other receiver processes
        self.web: WebServer | None = None
        # Every role serves its own /healthz and /metrics (probes, scrapes). `serve` builds
        # the HTTP server after the DICOM listener opens (`web_after_dicom`): its web stack
        # takes a moment to import, and C-ECHO should not wait for it.
        self._web_later = rules.http.enabled and web_after_dicom
        if rules.http.enabled and not web_after_dicom:
            try:
                self.web = self._make_web()
            except ConfigError:
                self.spool.close()
                self._lock_file.close()
                raise
        self._stop = threading.Event()
        self.senders = Senders(
            lambda: self.rules,
            metrics=self.metrics,
            stop=self._stop,
            spawn=self._spawn,
            send=send,  # None: C-STORE / STOW-RS (tests inject a fake)
            # Beside local workers every finished job wakes a sender; alone it polls.
            idle_s=SENDER_IDLE_S if Role.WORKER in self.roles else SENDER_INTERVAL_S,
        )
        self._stop_deadline = float("inf")  # monotonic: in-flight jobs are stopped after it
        self._stored = threading.Event()  # an instance was stored: the scheduler looks
        self._work = threading.Condition()  # a job was enqueued: idle worker slots look
        self._work_gen = 0
        self._threads: list[threading.Thread] = []
        self._inflight: dict[int, StudyJob] = {}
        self._inflight_lock = threading.Lock()
        self._ready_lock = threading.Lock()
        self._n_ready = 0
        self._started_at = time.time()
        # Receiving studies quiet long enough to process up to REPORT ahead of their job
        # (study UID -> the last_received_at it was asked at), and those already handed to a
        # worker at that time (node.pipeline.speculate).
        self._spec_lock = threading.Lock()
        self._spec_wanted: dict[str, float] = {}
        self._spec_sent: dict[str, float] = {}
        self.failure: tuple[str, ...] = ()  # why the models cannot be served (then `failed`)
        self.failed = threading.Event()

    def _make_web(self) -> WebServer:
        """The HTTP server on http.bind_address:http.port (NEURONODE_HTTP_PORT overrides the
        port); a bind failure is a ConfigError naming the key."""
        from node.web.server import HTTP_PORT_ENV, WebServer
        from node.web.views import StatusHooks

        http = self.rules.http
        port = int(os.environ.get(HTTP_PORT_ENV) or http.port)
        try:
            return WebServer(
                self.spool,
                port=port,
                host=http.bind_address,
                metrics=self.metrics,
                active_associations=self.receiver.active_associations,
                token=http.read_token(),
                hooks=StatusHooks.for_spool(
                    self.spool,
                    queue=self.queue,
                    wake=self._wake_all,
                    last_refusal=lambda: self._watcher.refused if self._watcher else (),
                ),
            )
        except OSError as exc:
            raise ConfigError(
                f"http.port: cannot listen on {http.bind_address}:{port}: {os_reason(exc)}"
                " (another program uses it? set http.port, or http.enabled: false)"
            ) from None

    def _count_store(self, outcome: str, reason: str) -> None:
        m = self.metrics
        if outcome == "received":
            m.instances_received.inc()
            self._stored.set()
        elif outcome == "quarantined":
            m.instances_quarantined.inc()
        else:
            m.instances_rejected.labels(reason=reason or "error").inc()

    def start(self) -> None:
        """Open the listener first, then start the scheduler, the workers and the senders.

        Worker processes load their models in the background: `serve` answers C-ECHO and
        stores studies at once; jobs wait in the queue until a worker is ready.
        """
        self._started_at = time.time()
        if self.roles == ALL_ROLES:
            # The only process on this spool: whatever is `processing` was left by a dead
            # one. A single-role worker leaves others' jobs to lease expiry instead.
            n = self.queue.release_orphans()
            if n:
                log.warning("orphaned_jobs_released", count=n)
        if Role.RECEIVER in self.roles:
            self.receiver.start()  # C-ECHO and C-STORE are answered from here on
            if self.rules.node.receiver_processes > 1:
                self._start_receivers()
        if Role.SENDER in self.roles:
            # The outbox (and the DICOM writers it loads) is ready before the first scrape.
            self.senders.park_unknown(starting=True)
        if self._web_later and self.web is None:
            self.web = self._make_web()  # a bind failure: ConfigError, serve stops
        if self.web is not None:
            self.web.start()
        if Role.WORKER in self.roles:
            self._spawn("scheduler", self._schedule_loop)
            self._spawn("retention", self._retention_loop)
            for i in range(self.rules.processing.workers):
                self._spawn(f"worker-{i}", partial(self._slot_loop, i))
        if Role.SENDER in self.roles:
            self.senders.start()
        if self._watcher is not None:
            self._spawn("rules", self._reload_loop)
        log.info(
            "node_started",
            port=self.receiver.port if Role.RECEIVER in self.roles else None,
            ae_title=self.rules.node.ae_title,
            workers=self.rules.processing.workers if Role.WORKER in self.roles else 0,
            mode="all" if self.roles == ALL_ROLES else ",".join(sorted(self.roles)),
        )

    def _start_receivers(self) -> None:
        """The other receiver processes, on the port the node's own receiver holds."""
        receivers = ReceiverProcesses(
            self.rules, port=self.receiver.port, log_key=self._log_key(), on_store=self._count_store
        )
        try:
            receivers.start()
        except ConfigError:
            self.receiver.stop(0.0)
            raise
        self.receivers = receivers

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting, let work finish within `grace_s`, release what is left, close."""
        log.info("node_stopping", duration_ms=round(grace_s * 1000))
        self._stop_deadline = time.monotonic() + grace_s
        self._stop.set()  # the scheduler and the workers take no new work
        self._wake_all()
        if Role.RECEIVER in self.roles:
            others = None
            if self.receivers is not None:  # they stop side by side with our own receiver
                others = threading.Thread(target=self.receivers.stop, args=(grace_s,))
                others.start()
            self.receiver.stop(grace_s)
            if others is not None:
                others.join()
        # A worker process still busy at the deadline is stopped (SIGTERM, then SIGKILL).
        join_until = self._stop_deadline + KILL_GRACE_S + 1.0
        for t in self._threads:
            t.join(timeout=max(0.0, join_until - time.monotonic()))
        with self._inflight_lock:
            unfinished = tuple(self._inflight.values())
        for job in unfinished:
            self._release(job)
        if self.web is not None:
            self.web.stop()
        self.spool.close()
        self._lock_file.close()
        log.info("node_stopped")

    def _release(self, job: StudyJob) -> None:
        with contextlib.suppress(JobError, sqlite3.Error):
            self.queue.release(job)
            log.warning("job_released", job_id=job.job_id, study_key=uid_key(job.study_uid))

    # --- wake-ups -----------------------------------------------------------------------------

    def _wake_workers(self) -> None:
        with self._work:
            self._work_gen += 1
            self._work.notify_all()

    def wake_senders(self) -> None:
        """Tell every sender to look at the outbox now (results were queued, or requeued)."""
        self.senders.wake()

    def _wake_all(self) -> None:
        self._stored.set()
        self._wake_workers()
        self.wake_senders()

    # --- completion ---------------------------------------------------------------------------

    def _schedule_loop(self) -> None:
        """Enqueue the studies that are complete, then sleep until the earliest deadline of
        the others or until an instance is stored; take back expired leases on the way."""
        errors = RepeatedError("scheduler_error")
        while not self._stop.is_set():
            c = self.rules.completion  # a reload takes effect at the next turn
            # Without a local receiver nothing wakes this loop: poll (another process stores).
            idle_s = SCHEDULER_IDLE_S if Role.RECEIVER in self.roles else c.poll_interval_s
            self._stored.clear()
            next_s: float | None = None
            try:
                if self.queue.expire_leases():
                    self._wake_workers()
                now = time.time()
                receiving = self.spool.receiving_studies()
                self._forget_speculations({s.study_uid for s in receiving})
                for study in receiving:
                    # After a restart a sender may be about to resume: give it a full quiet
                    # period from our start, not from its last instance before the outage.
                    last = max(study.last_received_at, self._started_at)
                    first = max(study.receiving_since, self._started_at)
                    decision = decide_ready(
                        last_instance_at=last,
                        now=now,
                        quiet_period_s=c.quiet_period_s,
                        series=study.series,
                        use_expected_counts=c.use_expected_counts,
                        first_instance_at=first,
                        max_wait_s=c.max_wait_s,
                    )
                    if decision.ready:
                        if self.queue.enqueue(study.study_uid) is not None:
                            self._wake_workers()
                        continue
                    due = _next_check_s(study, last, first, now, c)
                    if c.speculate and self.processor is None:
                        spec_in = last + speculate_after_s(c.quiet_period_s) - now
                        if spec_in <= 0:
                            self._want_speculation(study.study_uid, study.last_received_at)
                        else:
                            due = min(due, spec_in + 0.002)
                    next_s = due if next_s is None else min(next_s, due)
            except (NodeError, OSError, sqlite3.Error) as exc:
                errors.record(exc)
            else:
                errors.clear()
            wait_s = errors.wait_s(idle_s if next_s is None else min(idle_s, next_s))
            if self._stored.wait(wait_s):
                # Instances are arriving: look again soon, but not once per instance.
                self._stop.wait(SCAN_GAP_S)

    def _want_speculation(self, study_uid: str, last_received_at: float) -> None:
        """Ask an idle worker slot to process this study ahead of its job, once per
        instance set (a newer instance asks again)."""
        with self._spec_lock:
            if self._spec_sent.get(study_uid) == last_received_at:
                return
            if self._spec_wanted.get(study_uid) == last_received_at:
                return
            self._spec_wanted[study_uid] = last_received_at
        self._wake_workers()

    def _forget_speculations(self, receiving: set[str]) -> None:
        """Drop what is kept about studies no longer receiving (their jobs came)."""
        with self._spec_lock:
            for kept in (self._spec_wanted, self._spec_sent):
                for uid in [u for u in kept if u not in receiving]:
                    del kept[uid]

    def _take_speculation(self) -> str | None:
        """A study an idle slot should speculate on (marked sent), or None."""
        with self._spec_lock:
            if not self._spec_wanted:
                return None
            study_uid, last = self._spec_wanted.popitem()
            self._spec_sent[study_uid] = last
            return study_uid

    def _speculate(self, worker: ProcessWorker) -> bool:
        """Hand the idle worker a study to process up to REPORT ahead of its job, if one waits."""
        study_uid = self._take_speculation()
        if study_uid is None:
            return False
        try:
            paths = self.spool.instance_paths(study_uid)
        except sqlite3.Error as exc:
            log.warning("speculation_skipped", error_type=type(exc).__name__)
            return False
        if paths:
            log.debug("speculation_sent", study_key=uid_key(study_uid), count=len(paths))
            worker.speculate(study_uid, paths, self.rules)
        return True

    # --- study workers ------------------------------------------------------------------------

    def _slot_loop(self, index: int) -> None:
        """One worker slot: keep a worker (process) ready, feed it jobs one at a time."""
        worker: ProcessWorker | InProcessWorker | None = None
        errors = RepeatedError("worker_error")
        try:
            while not self._stop.is_set():
                if isinstance(worker, ProcessWorker) and worker.proc.poll() is not None:
                    # It died while idle (OOM kill, kill -9): replace it before it is given a
                    # job, so no study is charged an attempt for it.
                    log.error("worker_died", worker=index, reason="while idle")
                    worker.kill()
                    self._retired()
                    worker = None
                if worker is None:
                    worker = self._start_worker(index, errors)
                    if worker is None:
                        continue
                with self._work:
                    gen = self._work_gen
                try:
                    job = self.queue.claim()
                except sqlite3.Error as exc:  # index busy or failing: keep the slot alive
                    log.error("claim_failed", error_type=type(exc).__name__)
                    self._stop.wait(1.0)
                    continue
                if job is None:
                    if isinstance(worker, ProcessWorker) and self._speculate(worker):
                        continue  # another look: a job may have come meanwhile
                    with self._work:
                        if self._work_gen == gen and not self._stop.is_set():
                            self._work.wait(WORK_IDLE_S)
                    continue
                with self._inflight_lock:
                    self._inflight[job.job_id] = job
                try:
                    self._run_job(worker, job)
                finally:
                    with self._inflight_lock:
                        self._inflight.pop(job.job_id, None)
                if isinstance(worker, ProcessWorker) and worker.proc.poll() is not None:
                    self._retired()  # killed at a timeout, or died: a fresh one takes over
                    worker = None
        finally:
            if isinstance(worker, ProcessWorker):
                self._set_ready(-1)
                worker.close()

    def _retired(self) -> None:
        """Count a worker process gone (it is replaced at the slot's next turn)."""
        self._set_ready(-1)
        self.metrics.worker_restarts.inc()

    def _start_worker(
        self, index: int, errors: RepeatedError
    ) -> ProcessWorker | InProcessWorker | None:
        """A ready worker for slot `index`; None if stopping, failed, or to be tried again."""
        if self.processor is not None:
            return InProcessWorker(self.processor, index)
        try:
            worker = ProcessWorker(index, self.rules, self._log_key())
        except OSError as exc:
            errors.record(exc)
            self._stop.wait(errors.wait_s(WORKER_RESTART_S))
            return None
        try:
            problems = worker.wait_ready(self._stop.is_set)
        except WorkerDied as exc:
            if self._stop.is_set():  # stopped with the node (one signal to the process group)
                return None
            log.error("worker_start_failed", worker=index, reason=str(exc))
            errors.record(exc)
            self._stop.wait(errors.wait_s(WORKER_RESTART_S))
            return None
        if problems is None:  # stopping
            worker.kill()
            return None
        if problems:
            worker.close()
            self._fail(problems)
            self._stop.wait()  # `serve` stops the node; no job runs on half the models
            return None
        errors.clear()
        self._set_ready(+1)
        return worker

    def _log_key(self) -> bytes:
        return load_or_create_key(self.rules.storage.spool_dir / "log.key")

    def _set_ready(self, delta: int) -> None:
        with self._ready_lock:
            self._n_ready += delta
            self.metrics.workers_ready.set(self._n_ready)

    def _fail(self, problems: tuple[str, ...]) -> None:
        with self._ready_lock:
            if self.failed.is_set():
                return
            self.failure = problems
            self.failed.set()
        for problem in problems:
            log.error("bundle_unavailable", reason=problem)

    def _abort_job(self) -> bool:
        """A job in flight is stopped once the node is stopping and the grace period is over."""
        return self._stop.is_set() and time.monotonic() >= self._stop_deadline

    def _run_job(self, worker: ProcessWorker | InProcessWorker, job: StudyJob) -> None:
        """Run one job under a renewed lease and record how it ended."""
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
            worker=worker.index,
        )
        round_started = self._round_started(job)
        rules = self.rules  # the job runs under the rules in force when it starts
        try:
            result = worker.run(
                job,
                rules,
                timeout_s=rules.processing.timeout_s,
                abort=self._abort_job,
                on_queued=self.wake_senders,  # the SR is queued before its heatmaps are drawn
            )
        finally:
            done.set()
        if result is None or (result.error_type == "WorkerDied" and self._stop.is_set()):
            # The node is stopping (and its worker may have had the same signal, as systemd
            # sends it to the whole group): the job goes back, this attempt not counted.
            self._release(job)
            return
        try:
            if result.outcome is not None:
                self.queue.complete(job, result.outcome)
                state = StudyStatus.DONE
            else:
                state = self.queue.fail(
                    job, error=result.error or "error", permanent=result.permanent
                )
        except JobError:
            log.warning("job_lease_lost", job_id=job.job_id, study_key=uid_key(job.study_uid))
            return
        except sqlite3.Error as exc:
            # The result could not be recorded: the lease runs out and the job is redone.
            log.error("job_record_failed", job_id=job.job_id, error_type=type(exc).__name__)
            return
        if result.outcome is not None:
            self.wake_senders()  # the worker queued the results in the outbox
        elif state is StudyStatus.READY:
            self._wake_workers()  # a retry (due after its backoff)
        self._count_job(result, state, round_started)
        outcome = result.outcome
        log.info(
            "job_finished",
            job_id=job.job_id,
            study_key=uid_key(job.study_uid),
            attempt=job.attempt,
            reopened=job.reopened,
            status=state.value,
            error_type=result.error_type,
            stage=None if outcome is not None else result.stage,
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
        self, result: JobResult, state: StudyStatus, round_started: float | None
    ) -> None:
        m = self.metrics
        outcome = result.outcome
        if outcome is None:
            m.studies_failed.labels(stage=result.stage, state=state.value).inc()
            if result.error_type == "Timeout":
                m.job_timeouts.inc()
            return
        m.studies_processed.inc()
        now = time.time()
        m.last_study_processed.set(now)
        for stage, ms in outcome.stage_ms:
            m.stage_seconds.labels(stage=stage).observe(ms / 1000.0)
        if round_started is not None:
            m.time_to_result.observe(max(0.0, now - round_started))

    def _renew_loop(self, job: StudyJob, done: threading.Event) -> None:
        interval = max(0.5, self.rules.processing.lease_s / 3)
        while not done.wait(interval):
            try:
                self.queue.renew(job)
            except JobError:
                return

    # --- rules and retention ------------------------------------------------------------------

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
        if Role.SENDER in self.roles:
            self.senders.park_unknown()
            self.senders.start()
        self._wake_all()

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


def _next_check_s(
    study: StudyProgress, last: float, first: float, now: float, c: CompletionSettings
) -> float:
    """Seconds until a waiting study could be ready: its quiet period ends, its max wait runs
    out, or (complete by its expected counts) its settle time passes."""
    due = last + c.quiet_period_s
    due = min(due, first + c.max_wait_s)
    if c.use_expected_counts and all_series_complete(study.series):
        due = min(due, last + min(EXPECTED_COUNT_SETTLE_S, c.quiet_period_s))
    return max(0.0, due - now) + 0.002  # past the deadline, not on it

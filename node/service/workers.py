"""The node's side of its study workers: a worker process it can kill, or (tests) a processor
called in the node's own thread.

A `ProcessWorker` is one long-lived ``python -m node.pipeline.worker`` child. The node sends
it one job at a time and waits for its answer, renewing the job's lease meanwhile; at the
job's timeout it kills the child (SIGTERM, then SIGKILL after KILL_GRACE_S) and records the
failure with the stage the child last reported. A child that dies mid-job answers with its
end of the pipe closing: the attempt is recorded as failed, never lost.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path

from node.childproc import exit_name, spawn
from node.config import Rules
from node.log import get_logger
from node.pipeline.worker import (
    UNKNOWN_STAGE,
    JobResult,
    ResultsQueued,
    RunJob,
    Speculate,
    StageStarted,
    WorkerInit,
    WorkerReady,
    job_result,
)
from node.records import StudyJob, StudyOutcome

log = get_logger(__name__)

Processor = Callable[[StudyJob], StudyOutcome]

KILL_GRACE_S = 3.0  # after SIGTERM, how long a worker has before SIGKILL
TICK_S = 0.5  # how often a waiting node looks for a stop request


class WorkerDied(Exception):
    """The worker process ended (or its pipe broke) outside a job."""


class ProcessWorker:
    """One worker process: started, loads its models, then runs one job at a time."""

    def __init__(self, index: int, rules: Rules, log_key: bytes) -> None:
        self.index = index
        self.proc, self.conn = spawn("node.pipeline.worker")
        self.conn.send(WorkerInit(rules=rules, log_key=log_key, worker=index))
        log.info("worker_started", worker=index, pid=self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, abort: Callable[[], bool]) -> tuple[str, ...] | None:
        """Wait for the models to load: the problems (empty when ready); None if aborted.

        Raises WorkerDied if the worker ended before it said.
        """
        while not abort():
            if not wait([self.conn], timeout=TICK_S):
                continue
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                raise WorkerDied(exit_name(self.proc.wait())) from None
            if isinstance(msg, WorkerReady):
                return msg.problems
        return None

    def speculate(self, study_uid: str, paths: tuple[Path, ...], rules: Rules) -> None:
        """Ask the idle worker to run a receiving study's stages before REPORT ahead of its
        job (no answer; node.pipeline.speculate). A broken pipe is left for the next job to find."""
        with contextlib.suppress(OSError):
            self.conn.send(Speculate(study_uid=study_uid, instance_paths=paths, rules=rules))

    def run(
        self,
        job: StudyJob,
        rules: Rules,
        *,
        timeout_s: float,
        abort: Callable[[], bool],
        on_queued: Callable[[], None] | None = None,
    ) -> JobResult | None:
        """Run one job: its result, a failure (timeout, worker died), or None if `abort` said
        stop first (the worker is then killed and the caller gives the job back). `on_queued`
        is called when the job says it queued result objects (before it ends)."""
        deadline = time.monotonic() + timeout_s
        stage = UNKNOWN_STAGE
        try:
            self.conn.send(RunJob(job=job, rules=rules))
        except OSError:
            return self._died(job, stage)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                log.error(
                    "job_timeout",
                    job_id=job.job_id,
                    worker=self.index,
                    stage=stage,
                    duration_ms=round(timeout_s * 1000),
                )
                return JobResult(
                    job_id=job.job_id,
                    outcome=None,
                    error=f"timeout after {timeout_s:g} s in stage {stage}",
                    error_type="Timeout",
                    stage=stage,
                )
            if abort():
                self.kill()
                return None
            if not wait([self.conn], timeout=min(remaining, TICK_S)):
                continue
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                return self._died(job, stage)
            if isinstance(msg, StageStarted) and msg.job_id == job.job_id:
                stage = msg.stage
            elif isinstance(msg, ResultsQueued) and msg.job_id == job.job_id:
                if on_queued is not None:
                    on_queued()
            elif isinstance(msg, JobResult) and msg.job_id == job.job_id:
                return msg

    def _died(self, job: StudyJob, stage: str) -> JobResult:
        how = exit_name(self.proc.wait())
        log.error("worker_died", job_id=job.job_id, worker=self.index, stage=stage, reason=how)
        return JobResult(
            job_id=job.job_id,
            outcome=None,
            error=f"worker died ({how}) in stage {stage}",
            error_type="WorkerDied",
            stage=stage,
        )

    def kill(self, grace_s: float = KILL_GRACE_S) -> None:
        """SIGTERM, then SIGKILL if it is still there after `grace_s`; reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.conn.close()

    def close(self, grace_s: float = KILL_GRACE_S) -> None:
        """Ask an idle worker to stop (its pipe closes), then make sure it did."""
        with contextlib.suppress(OSError):
            self.conn.close()  # end of file: the worker's loop returns
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill(0.5)


class InProcessWorker:
    """A processor injected by a test, called in the node's worker thread: no timeout (a
    thread cannot be killed) and no isolation; the real `serve` path uses ProcessWorker."""

    def __init__(self, processor: Processor, index: int) -> None:
        self.processor = processor
        self.index = index
        self.pid = os.getpid()

    def speculate(self, study_uid: str, paths: tuple[Path, ...], rules: Rules) -> None:
        """Nothing: an injected processor runs whole jobs only."""
        del study_uid, paths, rules

    def run(
        self,
        job: StudyJob,
        rules: Rules,
        *,
        timeout_s: float,
        abort: Callable[[], bool],
        on_queued: Callable[[], None] | None = None,
    ) -> JobResult | None:
        # A thread can be neither timed out nor stopped; an injected processor queues its
        # results (if any) as it likes, and the finished job wakes the senders.
        del rules, timeout_s, abort, on_queued
        try:
            outcome = self.processor(job)
        except Exception as exc:  # the per-job guard: retried, then dead letter
            return job_result(job, exc)
        return JobResult(job_id=job.job_id, outcome=outcome)

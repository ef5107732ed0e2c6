"""A study worker process: loads the model bundles once, then runs the jobs the node hands it.

`neuronode serve` starts each worker as ``python -m node.pipeline.worker --fd N``; N is its end
of a socket pair carrying pickled messages (multiprocessing's Connection). The node holds the
job leases and the job queue; the worker only runs the pipeline and says, over the pipe, when
its models are ready, which stage each job has reached, when a job has queued results in the
outbox (the SR, before its heatmaps), and how each job ended. Because it is a
process, the node can kill it at the job's timeout, and a worker that dies (segfault, OOM kill)
takes no job with it: the node records the attempt and starts a fresh worker.

Importing this module loads no torch: the node (the parent) imports it for the messages and
for ``job_result``; only ``main`` (the child) loads the models.

Test hooks, each logged loudly when set (never set them on a real node):
``NEURONODE_TEST_PROCESS_DELAY_S`` sleeps when each job's first stage (load) starts;
``NEURONODE_TEST_LOAD_DELAY_S`` sleeps before the models load;
``NEURONODE_TEST_WORKER_FAULT=hang:STAGE[:STUDY_UID]`` sleeps forever when STAGE starts, and
``crash:STAGE[:STUDY_UID]`` kills the worker (SIGKILL) there, for every study or only that one.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from node.childproc import child_main
from node.config import Rules
from node.errors import NodeError
from node.log import configure, get_logger, set_correlation_key, uid_key
from node.records import StudyJob, StudyOutcome

if TYPE_CHECKING:
    from node.pipeline.speculate import Speculation

log = get_logger(__name__)

TEST_DELAY_ENV = "NEURONODE_TEST_PROCESS_DELAY_S"
TEST_LOAD_DELAY_ENV = "NEURONODE_TEST_LOAD_DELAY_S"
TEST_FAULT_ENV = "NEURONODE_TEST_WORKER_FAULT"
UNKNOWN_STAGE = "unknown"


# --- the messages between the node and a worker --------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInit:
    """node -> worker, once: the rules to load models for, and the log settings."""

    rules: Rules
    log_key: bytes
    worker: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReady:
    """worker -> node, once: the models are loaded (problems empty) or why they cannot be."""

    problems: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunJob:
    """node -> worker: run this job under these rules (the rules in force when it started)."""

    job: StudyJob
    rules: Rules


@dataclass(frozen=True, slots=True, kw_only=True)
class Speculate:
    """node -> worker, no answer: run this receiving study's stages before REPORT now, on the
    files it has, and keep them for its job if nothing changes (node.pipeline.speculate)."""

    study_uid: str
    instance_paths: tuple[Path, ...]
    rules: Rules


@dataclass(frozen=True, slots=True, kw_only=True)
class StageStarted:
    """worker -> node: the job has reached this stage."""

    job_id: int
    stage: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultsQueued:
    """worker -> node: the job queued result objects in the outbox (the senders may start)."""

    job_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class JobResult:
    """How one attempt of a job ended: an outcome, or a failure the queue records.

    ``error`` goes into the job queue's error and history columns: types and stage names only,
    never patient data. ``permanent`` failures (our own error about the input) are not retried.
    """

    job_id: int
    outcome: StudyOutcome | None
    error: str | None = None
    error_type: str | None = None
    stage: str = UNKNOWN_STAGE
    permanent: bool = False


def job_result(job: StudyJob, exc: Exception) -> JobResult:
    """The failure record of a job the pipeline raised on (the per-job guard's policy).

    Our own error about this study (bad input) is deterministic: not retried. A NodeError
    wrapping a third-party error (I/O, memory), or any other exception, may pass: retried.
    """
    error_type = type(exc).__name__
    if isinstance(exc, NodeError):
        stage = str(getattr(exc, "stage", None) or UNKNOWN_STAGE)
        cause = exc.__cause__
        transient = cause is not None and not isinstance(cause, NodeError)
        return JobResult(
            job_id=job.job_id,
            outcome=None,
            error=error_type,
            error_type=error_type,
            stage=stage,
            permanent=not transient,
        )
    return JobResult(
        job_id=job.job_id, outcome=None, error=error_type, error_type=error_type, permanent=False
    )


# --- test hooks -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InjectedFault:
    """A fault a test asks a worker to show: hang or crash when a stage starts."""

    action: str  # "hang" or "crash"
    stage: str
    study_uid: str | None


def fault_from_env() -> InjectedFault | None:
    """The fault NEURONODE_TEST_WORKER_FAULT asks for (ValueError if it is malformed)."""
    raw = os.environ.get(TEST_FAULT_ENV, "")
    if not raw:
        return None
    parts = raw.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("hang", "crash"):
        raise ValueError(f"{TEST_FAULT_ENV}: want hang|crash:STAGE[:STUDY_UID], got {raw!r}")
    return InjectedFault(
        action=parts[0], stage=parts[1], study_uid=parts[2] if len(parts) == 3 else None
    )


def _apply_fault(fault: InjectedFault | None, job: StudyJob, stage: str) -> None:
    if fault is None or fault.stage != stage:
        return
    if fault.study_uid is not None and fault.study_uid != job.study_uid:
        return
    log.warning("test_fault_fired", mode=fault.action, stage=stage, job_id=job.job_id)
    if fault.action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang: only the node's timeout ends this
        time.sleep(3600)


# --- the worker process -----------------------------------------------------------------------


def _load_models(rules: Rules) -> tuple[str, ...]:
    """Load and verify every bundle an enabled task needs into this process's cache, then
    warm up what the first study would otherwise pay for."""
    from node.bundles.bundle import set_torch_threads
    from node.pipeline.models import check_bundles, warm_up, worker_model

    set_torch_threads()
    problems = check_bundles(rules, load=worker_model)
    if not problems:
        warm_up(rules)
    _freeze_loaded()
    return problems


def _freeze_loaded() -> None:
    """Take what the worker has loaded for good (torch, MONAI, the bundles, highdicom's tables:
    about 650,000 objects) out of the garbage collector's sight.

    Otherwise the first study's allocations set off a full collection over all of them: 0.6 s
    in the middle of its stages, on the SR's path (measured, docs/benchmarks.md Run 10). Frozen
    objects are never collected; what the jobs allocate afterwards is collected as before."""
    gc.collect()
    gc.freeze()


def _run(
    conn: Connection,
    msg: RunJob,
    fault: InjectedFault | None,
    delay_s: float,
    speculation: Speculation | None = None,
) -> JobResult:
    from node.pipeline.runner import process_study

    job, rules = msg.job, msg.rules

    def on_stage(stage: object) -> None:
        name = str(getattr(stage, "value", stage))
        conn.send(StageStarted(job_id=job.job_id, stage=name))
        if delay_s and name == "load":  # the slow-job hook: the job is in its first stage
            log.warning("test_delay_sleeping", job_id=job.job_id, duration_ms=delay_s * 1000)
            time.sleep(delay_s)
        _apply_fault(fault, job, name)

    def on_queued() -> None:
        conn.send(ResultsQueued(job_id=job.job_id))

    try:
        outcome = process_study(
            job,
            rules,
            out_dir=rules.storage.spool_dir / "results",
            deliver=True,
            on_stage=on_stage,
            on_queued=on_queued,
            speculation=speculation,
        )
    except Exception as exc:  # the per-job guard (process_study logged the stage)
        return job_result(job, exc)
    return JobResult(job_id=job.job_id, outcome=outcome)


def serve(conn: Connection) -> int:
    """Load the models, say so, then run jobs until the node closes the pipe or says stop."""
    init = conn.recv()
    if not isinstance(init, WorkerInit):
        log.error("worker_bad_message", error_type=type(init).__name__)
        return 2
    configure(init.rules.logging.format, init.rules.logging.level)
    set_correlation_key(init.log_key)
    fault = fault_from_env()
    delay_s = float(os.environ.get(TEST_DELAY_ENV) or 0)
    load_delay_s = float(os.environ.get(TEST_LOAD_DELAY_ENV) or 0)
    if fault is not None:
        log.warning("test_fault_active", mode=fault.action, stage=fault.stage)
    if delay_s:
        log.warning("test_delay_active", duration_ms=round(delay_s * 1000))
    if load_delay_s:
        log.warning("test_load_delay_active", duration_ms=round(load_delay_s * 1000))
        time.sleep(load_delay_s)
    started = time.monotonic()
    problems = _load_models(init.rules)
    log.info(
        "worker_ready",
        worker=init.worker,
        pid=os.getpid(),
        count=len(problems),
        duration_ms=round((time.monotonic() - started) * 1000),
    )
    conn.send(WorkerReady(problems=problems))
    speculation: Speculation | None = None  # at most one study's, the latest asked for
    pending: object | None = None  # a message that arrived while a speculation ran
    while True:
        if pending is not None:
            msg, pending = pending, None
        else:
            try:
                msg = conn.recv()
            except EOFError:  # the node is gone
                return 0
        if isinstance(msg, Speculate):
            speculation = None  # the previous one's pixels go first
            speculation, pending = _speculate(conn, msg)
            continue
        if not isinstance(msg, RunJob):
            return 0
        log.debug("worker_job", job_id=msg.job.job_id, study_key=uid_key(msg.job.study_uid))
        # Offered to its own study's job only, and used once: any job ends the speculation.
        spec = (
            speculation if speculation and speculation.key.study_uid == msg.job.study_uid else None
        )
        speculation = None
        conn.send(_run(conn, msg, fault, delay_s, spec))
        del spec


def _speculate(conn: Connection, msg: Speculate) -> tuple[Speculation | None, object | None]:
    """Run a speculation; stop it between its stages if the node sent anything but this
    study's job meanwhile. Returns it (None if stopped or failed) and the message that came."""
    from node.pipeline.speculate import speculate

    came: list[object] = []

    def should_stop() -> bool:
        if came or not conn.poll():
            return False  # nothing came, or this study's job came (nothing follows it)
        try:
            came.append(conn.recv())
        except EOFError:  # the node is gone: the next read says so
            return True
        job = came[-1]
        return not (isinstance(job, RunJob) and job.job.study_uid == msg.study_uid)

    done = speculate(msg.study_uid, msg.instance_paths, msg.rules, should_stop=should_stop)
    return done, (came[0] if came else None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m node.pipeline.worker --fd N``."""
    return child_main("python -m node.pipeline.worker", argv, serve)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the node pickles the messages
    # with node.pipeline.worker's classes, and isinstance must see those.
    from node.pipeline import worker

    sys.exit(worker.main())

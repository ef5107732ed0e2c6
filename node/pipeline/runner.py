"""One study job end to end: the stages in order, the audit record, the per-job outer guard.

Failure policy: ``process_study`` is the per-job outer guard (the only ``except Exception``
here). When a stage raises, the audit record is still written with ``status: "failed"``, the
failed ``stage`` and the error type, and a ``NodeError`` is raised to the job queue: the
stage's own ``NodeError`` as is, anything else wrapped in ``StageFailed`` (``.stage`` names the
stage). The queue decides retry or dead letter from its attempt count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from node.config import Rules
from node.errors import NodeError, StageFailed
from node.log import get_logger, uid_key
from node.pipeline.audit import audit_path, error_info, n_findings, series_ids, write_audit
from node.pipeline.context import Stage, StudyContext
from node.pipeline.speculate import SPECULATED_STAGES, Speculation, adopt, mismatch
from node.pipeline.stages import STAGES
from node.records import StudyJob, StudyOutcome

log = get_logger(__name__)


def _timed(ctx: StudyContext, stage: Stage, t0: float, c0: float) -> StudyContext:
    """The context with a stage's wall and CPU milliseconds added (from perf_counter and
    process_time readings taken as it started)."""
    return replace(
        ctx,
        stage_ms=(*ctx.stage_ms, (stage.value, (time.perf_counter() - t0) * 1000)),
        stage_cpu_ms=(*ctx.stage_cpu_ms, (stage.value, (time.process_time() - c0) * 1000)),
    )


def _take_speculation(ctx: StudyContext, spec: Speculation) -> bool:
    """Whether the job may take the speculation over (logged either way)."""
    why = mismatch(spec, ctx.job, ctx.rules)
    log.info(
        "speculation_discarded" if why else "speculation_reused",
        study_key=uid_key(ctx.job.study_uid),
        job_id=ctx.job.job_id,
        reason=why or None,
        count=len(spec.key.files),
        cpu_ms=round(spec.cpu_ms, 1),
    )
    if why and spec.ctx.volumes is not None:
        spec.ctx.volumes.clear()  # its decoded pixels go before the job decodes its own
    return not why


def process_study(
    job: StudyJob,
    rules: Rules,
    *,
    out_dir: Path,
    deliver: bool = False,
    on_stage: Callable[[Stage], None] | None = None,
    on_queued: Callable[[], None] | None = None,
    speculation: Speculation | None = None,
) -> StudyOutcome:
    """Run every stage on one study and write its audit record; raise NodeError on failure.

    With ``deliver`` (the running node) the result objects are queued in the outbox for every
    destination in the rules; by hand (`neuronode process`) they are only written to out_dir.
    ``on_stage`` is told each stage as it starts (a worker process reports it to the node, so
    a job stopped at its timeout is recorded with the stage it hung in). ``on_queued`` is told
    each time result objects were queued in the outbox (the node wakes its senders then: the SR
    goes out while the heatmaps are still being drawn). ``speculation`` is this study's stages
    before REPORT computed during its quiet period (node.pipeline.speculate): LOAD takes it
    over if it was computed from exactly this job's instance files under these rules (the
    stages up to REPORT then have nothing left to do), and they all run as usual otherwise.
    """
    started = time.time()
    ctx = StudyContext(
        job=job,
        rules=rules,
        out_dir=out_dir,
        started_at=started,
        deliver=deliver,
        on_queued=on_queued,
    )
    study_key = uid_key(job.study_uid)
    adopted = False
    for stage, fn in STAGES:
        if on_stage is not None:
            on_stage(stage)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            if stage is Stage.LOAD and speculation is not None:
                adopted = _take_speculation(ctx, speculation)
            if adopted and stage in SPECULATED_STAGES:
                # LOAD takes every speculated stage's results over; the others have nothing
                # left to do.
                if stage is Stage.LOAD and speculation is not None:
                    ctx = adopt(ctx, speculation)
            else:
                ctx = fn(ctx)
        except Exception as exc:  # the per-job outer guard
            ctx = _timed(ctx, stage, t0, c0)
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
                    write_audit(ctx, status="failed", failed_stage=stage, error=error_info(exc))
                except OSError:
                    log.error("audit_write_failed", study_key=study_key, stage=stage.value)
            if isinstance(exc, NodeError):
                raise
            raise StageFailed(
                f"stage {stage.value} failed: {type(exc).__name__}", stage=stage
            ) from exc
        ctx = _timed(ctx, stage, t0, c0)
    loaded = ctx.loaded
    assert loaded is not None  # the LOAD stage always runs first
    outcome = StudyOutcome(
        study_uid=job.study_uid,
        audit_path=audit_path(out_dir, job.study_uid),
        n_series=len(series_ids(loaded)),
        n_instances=len(loaded.headers),
        n_decode_errors=len(loaded.problems),
        stage_ms=ctx.stage_ms,
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
        n_findings=n_findings(ctx),
        n_objects=len(ctx.objects),
        status="done" if ctx.qualifies is not False else "skipped",
        duration_ms=round((time.time() - started) * 1000, 1),
    )
    return outcome

"""The stages before REPORT run during a study's quiet period, kept only for the same instances.

The quiet period is dead time on the SR's path (issue 15: SR in the PACS <= 2 s after it ends):
the instances are on disk and the worker is idle. So once a receiving study has been idle for a
while (``node.ingest.completion.speculate_after_s``), the node asks an idle worker to run the
study's stages up to REPORT (LOAD, CLASSIFY, QUALIFY, ROUTE, INFER, ENSEMBLE: each a function
of the instance files and the rules, none writes) on the files it has now. When the study's job
comes, the worker takes those results over only if the job's instance set is exactly the one
they were computed from (``InstanceSetKey``: every file's path, in arrival order, with its size
and modification time, read again when the job starts) and the job runs under the same rules;
otherwise they are dropped and the job computes every stage itself, so a late instance is never
left out.

A speculation is memory only: it writes no result, no audit row, no outbox row and sends
nothing (REPORT and the stages after it, which do, never run in one). It is stopped between two
stages when the node sends the worker anything but this study's job, and a failure just drops
it (the job meets the same error and records it as usual). A crash or restart loses it with the
worker's memory, and the job then computes every stage as before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from node.config import Rules
from node.log import get_logger, uid_key
from node.pipeline.context import Stage, StudyContext
from node.pipeline.stages import STAGES
from node.records import StudyJob

log = get_logger(__name__)

# The stages a speculation runs, in order: every stage before REPORT, the first that writes
# (each reads only the instance files, the rules and the worker's models).
SPECULATED_STAGES: tuple[Stage, ...] = (
    Stage.LOAD,
    Stage.CLASSIFY,
    Stage.QUALIFY,
    Stage.ROUTE,
    Stage.INFER,
    Stage.ENSEMBLE,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceSetKey:
    """Exactly which files a study's LOAD read: each path in arrival order with its size and
    modification time in nanoseconds (-1, -1: missing). Spool files are never rewritten in
    place, so equal keys mean equal inputs."""

    study_uid: str
    files: tuple[tuple[str, int, int], ...]


def instance_set_key(study_uid: str, paths: Sequence[Path]) -> InstanceSetKey:
    """The key of a study's instance files as they are on disk now."""
    files = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            files.append((str(path), -1, -1))
        else:
            files.append((str(path), st.st_size, st.st_mtime_ns))
    return InstanceSetKey(study_uid=study_uid, files=tuple(files))


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Speculation:
    """A study's stages before REPORT computed ahead of its job: the context after ENSEMBLE,
    the instance set and rules it was computed from, and what it cost (wall and CPU ms)."""

    key: InstanceSetKey
    rules: Rules
    ctx: StudyContext
    wall_ms: float
    cpu_ms: float


def speculate(
    study_uid: str,
    paths: Sequence[Path],
    rules: Rules,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> Speculation | None:
    """Run the stages before REPORT on a study's current files; None if ``should_stop`` said
    so between two stages or a stage failed (the job will meet and record the failure)."""
    t0, c0 = time.perf_counter(), time.process_time()
    key = instance_set_key(study_uid, paths)
    job = StudyJob(job_id=0, study_uid=study_uid, instance_paths=tuple(paths), attempt=0)
    # out_dir is never written: no stage that writes runs here.
    ctx = StudyContext(job=job, rules=rules, out_dir=Path(os.devnull), started_at=time.time())
    study_key = uid_key(study_uid)
    try:
        for stage, fn in STAGES:
            if stage not in SPECULATED_STAGES:
                continue
            if stage is not Stage.LOAD and should_stop():
                log.info("speculation_stopped", study_key=study_key, stage=stage.value)
                if ctx.volumes is not None:
                    ctx.volumes.clear()
                return None
            ctx = fn(ctx)
    # A third outer guard, beside the C-STORE handler and the per-job wrapper: a speculation
    # owns nothing, so whatever it raises only drops it; the job runs the stages for real and
    # records the failure there.
    except Exception as exc:
        log.warning("speculation_failed", study_key=study_key, error_type=type(exc).__name__)
        return None
    wall_ms = (time.perf_counter() - t0) * 1000
    cpu_ms = (time.process_time() - c0) * 1000
    log.info(
        "speculation_done",
        study_key=study_key,
        count=len(paths),
        duration_ms=round(wall_ms, 1),
        cpu_ms=round(cpu_ms, 1),
    )
    return Speculation(key=key, rules=rules, ctx=ctx, wall_ms=wall_ms, cpu_ms=cpu_ms)


def mismatch(spec: Speculation, job: StudyJob, rules: Rules) -> str:
    """Why a speculation cannot stand for this job's stages before REPORT ("" when it can)."""
    if spec.key.study_uid != job.study_uid:
        return "other study"
    if spec.rules != rules:
        return "rules changed"
    if len(spec.key.files) != len(job.instance_paths):
        return "instance count changed"
    if spec.key != instance_set_key(job.study_uid, job.instance_paths):
        return "instance files changed"
    return ""


def adopt(ctx: StudyContext, spec: Speculation) -> StudyContext:
    """The speculation's context (every field the stages before REPORT fill in) as the job's:
    the job's own identity, rules, output, delivery and stage times put back. Its instance set
    and rules were checked to be the job's."""
    return replace(
        spec.ctx,
        job=ctx.job,
        rules=ctx.rules,
        out_dir=ctx.out_dir,
        started_at=ctx.started_at,
        deliver=ctx.deliver,
        on_queued=ctx.on_queued,
        stage_ms=ctx.stage_ms,
        stage_cpu_ms=ctx.stage_cpu_ms,
    )

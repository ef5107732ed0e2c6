"""LOAD and CLASSIFY run during a study's quiet period, kept only for the same instance set.

The quiet period is dead time on the SR's path (issue 15: SR in the PACS <= 2 s after it ends):
the instances are on disk and the worker is idle. So once a receiving study has been idle for a
while (``node.ingest.completion.speculate_after_s``), the node asks an idle worker to run the
study's LOAD and CLASSIFY on the files it has now. When the study's job comes, the worker takes
those results over only if the job's instance set is exactly the one they were computed from
(``InstanceSetKey``: every file's path, in arrival order, with its size and modification time,
read again when the job starts) and the job runs under the same rules; otherwise they are
dropped and the job computes both stages itself, so a late instance is never left out.

A speculation is memory only: it writes no result, no audit row, no outbox row and sends
nothing (LOAD and CLASSIFY never do; the stages after them are not run). It is stopped between
its two stages when the node sends the worker anything but this study's job, and a failure
just drops it (the job meets the same error and records it as usual). A crash or restart
loses it with the worker's memory, and the job then computes both stages as before.
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
from node.pipeline.stages import stage_classify, stage_load
from node.records import StudyJob

log = get_logger(__name__)

# The stages a speculation runs, in order (each reads only the instance files and the rules).
SPECULATED_STAGES: tuple[Stage, ...] = (Stage.LOAD, Stage.CLASSIFY)


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
    """A study's LOAD and CLASSIFY computed ahead of its job: the context after CLASSIFY, the
    instance set and rules it was computed from, and what it cost (wall and CPU ms)."""

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
    """Run LOAD and CLASSIFY on a study's current files; None if ``should_stop`` said so
    between the two stages or a stage failed (the job will meet and record the failure)."""
    t0, c0 = time.perf_counter(), time.process_time()
    key = instance_set_key(study_uid, paths)
    job = StudyJob(job_id=0, study_uid=study_uid, instance_paths=tuple(paths), attempt=0)
    # out_dir is never written: only LOAD and CLASSIFY run, and neither writes.
    ctx = StudyContext(job=job, rules=rules, out_dir=Path(os.devnull), started_at=time.time())
    study_key = uid_key(study_uid)
    try:
        ctx = stage_load(ctx)
        if should_stop():
            log.info("speculation_stopped", study_key=study_key, stage=Stage.CLASSIFY.value)
            return None
        ctx = stage_classify(ctx)
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
    """Why a speculation cannot stand for this job's LOAD and CLASSIFY ("" when it can)."""
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
    """The job's context with what LOAD and CLASSIFY would have filled in taken from the
    speculation (whose instance set and rules were checked to be the job's)."""
    done = spec.ctx
    return replace(
        ctx,
        loaded=done.loaded,
        volumes=done.volumes,
        n_own_results=done.n_own_results,
        headers=done.headers,
        decisions=done.decisions,
        sequence_cnn=done.sequence_cnn,
    )

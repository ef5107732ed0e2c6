"""What the stages of one study job pass along: the stage names and the study context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from node.config import Rules
from node.pipeline.series_cache import SeriesCache
from node.records import (
    Route,
    SequenceDecision,
    SeriesHeader,
    SeriesPrediction,
    StudyJob,
    StudyLoad,
    TaskFinding,
)

AUDIT_FILE = "audit.json"
LAST_SR_FILE = "last_sr.json"  # the SR of the previous run: the predecessor of the next one
OBJECTS_DIR = "objects"
DEFAULT_OUT = Path("neuronode-out")


class Stage(StrEnum):
    """The named steps of the pipeline, in the order they run."""

    LOAD = "load"
    CLASSIFY = "classify"
    QUALIFY = "qualify"
    ROUTE = "route"
    INFER = "infer"
    ENSEMBLE = "ensemble"
    REPORT = "report"
    OUTBOX = "outbox"
    HEATMAPS = "heatmaps"
    AUDIT = "audit"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultObject:
    """One DICOM object the pipeline made for a study, written under its results folder."""

    kind: str  # "sr" or "sc"
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class PreviousSr:
    """The SR a study's previous run made, and the predecessor that SR itself referenced."""

    sop_instance_uid: str
    series_instance_uid: str
    path: Path
    predecessor_path: Path | None
    content_uid: str = ""  # its UID without the predecessor: equal means the same result


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class StudyContext:
    """What the stages know about one study so far; each stage returns a filled-in copy."""

    job: StudyJob
    rules: Rules
    out_dir: Path
    started_at: float
    deliver: bool = False  # OUTBOX enqueues for rules.destinations (the running node only)
    # Told each time result objects are queued (the node wakes its senders: the SR goes out
    # while the heatmaps are still being drawn).
    on_queued: Callable[[], None] | None = None
    loaded: StudyLoad | None = None
    # The job's decoded series, shared by CLASSIFY, INFER and HEATMAPS (made by LOAD, emptied
    # after HEATMAPS): each series is decoded once per job, within a byte budget.
    volumes: SeriesCache | None = None
    headers: tuple[SeriesHeader, ...] = ()
    decisions: tuple[SequenceDecision, ...] = ()
    sequence_cnn: str = "not run"  # what became of the sequence CNN, in words
    qualifies: bool | None = None
    qualify_reason: str = ""
    routes: tuple[Route, ...] = ()
    predictions: tuple[SeriesPrediction, ...] = ()
    findings: tuple[TaskFinding, ...] = ()
    report_note: str = ""
    objects: tuple[ResultObject, ...] = ()
    predecessor_sr: str | None = None  # SOP Instance UID the new SR supersedes
    destinations: tuple[str, ...] = ()
    n_enqueued: int | None = None
    n_own_results: int = 0  # our own SR/SC instances that came back with the study
    stage_ms: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    # CPU time of the process running the job, per stage (time.process_time).
    stage_cpu_ms: tuple[tuple[str, float], ...] = field(default_factory=tuple)


StageFn = Callable[[StudyContext], StudyContext]

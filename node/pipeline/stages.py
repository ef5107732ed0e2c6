"""One study job end to end: named stages in order, then an audit record of what happened.

Stages run in the order of ``STAGES``; each takes the frozen ``StudyContext`` and returns a new
one with its own field filled in: LOAD (series volumes), CLASSIFY (tag rules + sequence CNN vote,
fused, study context), QUALIFY (``qualify:`` in the rules; a study that does not qualify is
audited as skipped and gets no results), ROUTE, INFER (specialist bundles + Grad-CAM), ENSEMBLE,
REPORT (SC heatmaps + one SR, written under the study's results folder), OUTBOX (only when the
running node delivers: every object x every destination) and AUDIT.

Failure policy: ``process_study`` is the per-job outer guard (the only ``except Exception``
here). When a stage raises, the audit record is still written with ``status: "failed"``, the
failed ``stage`` and the error type, and a ``NodeError`` is raised to the job queue: the
stage's own ``NodeError`` as is, anything else wrapped in ``StageFailed`` (``.stage`` names the
stage). The queue decides retry or dead letter from its attempt count. Files that do not decode
are not a failure: they are listed in the audit and the study goes on. A missing sequence CNN
bundle is not a failure either (tag rules alone, said in the audit); a missing specialist
bundle that a route needs fails INFER with the bundle's reason.

Models: each worker thread loads a bundle once and keeps it (``worker_bundle``, keyed by path and
weights SHA-256); threads never share a network, because Grad-CAM hooks a module.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from node import NOT_FOR_CLINICAL_USE, __version__
from node.config import Rules, TaskSettings
from node.dicom.volumes import SeriesId, scan_study, series_id, volume_id
from node.errors import ModelUnavailable, NodeError, ReportError, StageFailed
from node.log import get_logger, uid_key
from node.records import (
    FindingStatus,
    InstanceHeader,
    Route,
    SequenceDecision,
    SeriesHeader,
    SeriesPrediction,
    SeriesVolume,
    StudyJob,
    StudyLoad,
    StudyOutcome,
    StudyResult,
    TaskFinding,
)

if TYPE_CHECKING:
    from node.bundles.bundle import Bundle

log = get_logger(__name__)

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


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class StudyContext:
    """What the stages know about one study so far; each stage returns a filled-in copy."""

    job: StudyJob
    rules: Rules
    out_dir: Path
    started_at: float
    deliver: bool = False  # OUTBOX enqueues for rules.destinations (the running node only)
    loaded: StudyLoad | None = None
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


StageFn = Callable[[StudyContext], StudyContext]


# --- per-worker model cache ---------------------------------------------------------------------

_worker = threading.local()


def _bundle_key(path: Path) -> tuple[str, str]:
    """(resolved path, weights SHA-256 the metadata declares): a replaced bundle is reloaded."""
    meta = path / "configs" / "metadata.json"
    try:
        sha = str(json.loads(meta.read_text(encoding="utf-8")).get("weights_sha256", ""))
    except (OSError, ValueError, AttributeError):
        sha = ""
    return (str(path.resolve()), sha)


def worker_bundle(path: Path) -> Bundle:
    """This thread's own verified copy of a bundle, loaded on first use (ModelUnavailable if not).

    Never shared between threads: Grad-CAM registers hooks on the network.
    """
    from node.bundles.bundle import load_bundle

    cache: dict[str, tuple[str, Bundle]] | None = getattr(_worker, "bundles", None)
    if cache is None:
        cache = {}
        _worker.bundles = cache
    resolved, sha = _bundle_key(path)
    hit = cache.get(resolved)
    if hit is not None and hit[0] == sha and sha:
        return hit[1]
    bundle = load_bundle(path)
    cache[resolved] = (bundle.metadata.weights_sha256, bundle)
    return bundle


def clear_worker_bundles() -> None:
    """Forget this thread's loaded bundles (tests; a node reloading its rules)."""
    _worker.bundles = {}


def required_bundles(rules: Rules) -> tuple[tuple[str, Path], ...]:
    """(task, bundle folder) of every route of every enabled task, in rule-file order."""
    return tuple(
        (name, rules.models_dir / route.bundle)
        for name, task in rules.tasks.items()
        if task.enabled
        for route in task.models
    )


def check_bundles(rules: Rules, load: Callable[[Path], object] | None = None) -> tuple[str, ...]:
    """Why each bundle an enabled task needs cannot be served (empty: all load and verify).

    ``load`` defaults to a plain load; `neuronode process` passes ``worker_bundle`` so the
    check also warms the cache of the thread that then runs the study.
    """
    from node.bundles.bundle import load_bundle

    loader = load if load is not None else load_bundle
    problems: list[str] = []
    seen: set[Path] = set()
    for task, path in required_bundles(rules):
        if path in seen:
            continue
        seen.add(path)
        try:
            loader(path)
        except ModelUnavailable as exc:
            problems.append(f"task {task}: {exc}")
    return tuple(problems)


@dataclass(frozen=True, slots=True, kw_only=True)
class LeftOutRoute:
    """A route of a task dropped because its bundle cannot be served, and why."""

    task: str
    bundle: str
    reason: str


def loadable_tasks(
    models_dir: Path,
) -> tuple[dict[str, TaskSettings], tuple[LeftOutRoute, ...]]:
    """The built-in tasks cut down to the routes whose bundle loads (demo, bench); a task with
    no loadable route is left out."""
    from node.bundles.bundle import load_bundle

    tasks: dict[str, TaskSettings] = {}
    left_out: list[LeftOutRoute] = []
    for name, task in Rules().tasks.items():
        routes = []
        for route in task.models:
            try:
                load_bundle(models_dir / route.bundle)
            except ModelUnavailable as exc:
                left_out.append(LeftOutRoute(task=name, bundle=route.bundle, reason=str(exc)))
                continue
            routes.append(route)
        if routes:
            tasks[name] = task.model_copy(update={"models": tuple(routes)})
    return tasks, tuple(left_out)


# --- stages ---------------------------------------------------------------------------------------


def is_own_result(header: InstanceHeader) -> bool:
    """An SR or heatmap this node made, come back with the study (a PACS forwarding whole
    studies): it is neither analysed nor allowed to change the result UIDs."""
    from node.report.objects import (
        SC_SERIES_DESCRIPTION,
        SC_SOP_CLASS_UID,
        SR_SERIES_DESCRIPTION,
        SR_SOP_CLASS_UIDS,
    )

    return (
        header.sop_class_uid in SR_SOP_CLASS_UIDS.values()
        and header.series_description == SR_SERIES_DESCRIPTION
    ) or (
        header.sop_class_uid == SC_SOP_CLASS_UID
        and header.series_description == SC_SERIES_DESCRIPTION
    )


def stage_load(ctx: StudyContext) -> StudyContext:
    """Read every instance of the study into ordered series volumes (our own results left out)."""
    loaded = scan_study(ctx.job.instance_paths)
    own = {h.path for h in loaded.headers if is_own_result(h)}
    if not own:
        return replace(ctx, loaded=loaded)
    own_series = {series_id(h) for h in loaded.headers if h.path in own}
    loaded = StudyLoad(
        headers=tuple(h for h in loaded.headers if h.path not in own),
        volumes=tuple(v for v in loaded.volumes if volume_id(v) not in own_series),
        problems=tuple(p for p in loaded.problems if p.path not in own),
    )
    log.info("own_results_ignored", study_key=uid_key(ctx.job.study_uid), count=len(own))
    return replace(ctx, loaded=loaded, n_own_results=len(own))


def _volumes(ctx: StudyContext) -> dict[SeriesId, SeriesVolume]:
    loaded = ctx.loaded
    return {volume_id(v): v for v in loaded.volumes} if loaded is not None else {}


def _image_paths(ctx: StudyContext) -> tuple[Path, ...]:
    """Files of the study that carry pixels (what the header readers and the SR need)."""
    loaded = ctx.loaded
    if loaded is None:
        return ctx.job.instance_paths
    bad = {p.path for p in loaded.problems if p.series_uid is None}
    with_pixels = tuple(h.path for h in loaded.headers if h.has_pixels and h.path not in bad)
    return with_pixels or tuple(h.path for h in loaded.headers)


def stage_classify(ctx: StudyContext) -> StudyContext:
    """Label each series: tag rules, the sequence CNN's slice vote, fusion, study context."""
    from node.classify.commands import policy_from_settings
    from node.classify.sequence import classify_headers
    from node.dicom.headers import read_series_headers

    headers = read_series_headers(_image_paths(ctx))
    settings = ctx.rules.sequence
    volumes = _volumes(ctx)
    cnn: list[Any] | None = None
    note: str
    try:
        from node.bundles.bundle import classify_series

        bundle = worker_bundle(ctx.rules.models_dir / settings.bundle)
    except ModelUnavailable as exc:
        note = f"sequence CNN not available, tag rules alone: {exc}"
        log.warning("sequence_cnn_unavailable", study_key=uid_key(ctx.job.study_uid))
    else:
        cnn = []
        failed = 0
        for h in headers:
            volume = volumes.get((h.series_uid, h.series_number))
            if volume is None or volume.pixels.ndim != 3:
                cnn.append(None)
                continue
            try:
                cnn.append(classify_series(bundle, volume, settings.slices_per_series))
            except NodeError as exc:
                failed += 1
                log.warning(
                    "sequence_cnn_failed",
                    series_key=uid_key(h.series_uid),
                    error_type=type(exc).__name__,
                )
                cnn.append(None)
        ran = sum(v is not None for v in cnn)
        meta = bundle.metadata
        note = f"sequence CNN {meta.name} {meta.version} ran on {ran} of {len(headers)} series"
        if failed:
            note += f" ({failed} failed)"
    decisions = classify_headers(headers, cnn, policy_from_settings(settings))
    return replace(ctx, headers=headers, decisions=decisions, sequence_cnn=note)


def _body_parts(ctx: StudyContext) -> tuple[str, ...] | None:
    """BodyPartExamined of one file per series, only when the rules filter on it."""
    if not ctx.rules.qualify.body_parts or ctx.loaded is None:
        return None
    firsts: dict[SeriesId, Path] = {}
    for h in ctx.loaded.headers:
        firsts.setdefault(series_id(h), h.path)
    parts: set[str] = set()
    for path in firsts.values():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["BodyPartExamined"])
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError):
            continue
        parts.add(str(ds.get("BodyPartExamined", "") or ""))
    return tuple(sorted(parts))


def stage_qualify(ctx: StudyContext) -> StudyContext:
    """Whether the study is processed at all under `qualify:`."""
    from node.routing import study_qualifies

    loaded = ctx.loaded
    modalities = {h.modality for h in loaded.headers} if loaded is not None else set()
    n_series = len(_series_ids(loaded)) if loaded is not None else 0
    ok, why = study_qualifies(modalities, _body_parts(ctx), n_series, ctx.rules.qualify)
    if not ok:
        log.info("study_skipped", study_key=uid_key(ctx.job.study_uid), reason=why)
    return replace(ctx, qualifies=ok, qualify_reason=why)


def stage_route(ctx: StudyContext) -> StudyContext:
    """Which specialist bundles run on which series, from the rules' task routes."""
    if not ctx.qualifies:
        return ctx
    from node.routing import route_study

    return replace(ctx, routes=route_study(ctx.decisions, ctx.rules))


def stage_infer(ctx: StudyContext) -> StudyContext:
    """Run each routed bundle on its series (this worker's own copy) and explain it (Grad-CAM)."""
    if not ctx.qualifies or not ctx.routes:
        return ctx
    from node.bundles.bundle import predict_series
    from node.bundles.gradcam import with_heatmaps

    by_uid: dict[str, SeriesVolume] = {}
    for v in ctx.loaded.volumes if ctx.loaded is not None else ():
        by_uid.setdefault(v.series_uid, v)
    k = ctx.rules.outputs.heatmaps_per_series
    predictions: list[SeriesPrediction] = []
    for route in ctx.routes:
        volume = by_uid.get(route.series_uid)
        if volume is None:
            continue  # the series has headers but no decodable pixels: listed in the audit
        try:
            bundle = worker_bundle(ctx.rules.models_dir / route.bundle)
        except ModelUnavailable as exc:
            raise ModelUnavailable(
                f"task {route.task} needs bundle '{route.bundle}', which cannot be served: {exc}"
            ) from exc
        t0 = time.perf_counter()
        pred = predict_series(bundle, volume, sequence=route.sequence)
        # The ensemble matches on the rule file's task name and bundle folder name.
        pred = replace(pred, task=route.task, model_id=route.bundle)
        if k > 0:
            pred = with_heatmaps(bundle, volume, pred, top_k=k)
        log.info(
            "series_inferred",
            study_key=uid_key(ctx.job.study_uid),
            series_key=uid_key(route.series_uid),
            task=route.task,
            model_id=route.bundle,
            probability=round(pred.probability, 4),
            count=len(pred.heatmaps),
            duration_ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        predictions.append(pred)
    return replace(ctx, predictions=tuple(predictions))


def stage_ensemble(ctx: StudyContext) -> StudyContext:
    """One study-level finding per enabled task."""
    if not ctx.qualifies:
        return ctx
    from node.ensemble import fuse_study

    return replace(ctx, findings=fuse_study(ctx.rules, ctx.predictions))


def results_dir(out_dir: Path, study_uid: str) -> Path:
    """Where a study's audit record and result objects live: out_dir/<study_key>/."""
    return out_dir / uid_key(study_uid)


def read_previous_sr(folder: Path) -> PreviousSr | None:
    """The SR the previous run of this study made (None on the first run or if unreadable)."""
    path = folder / LAST_SR_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        prev = PreviousSr(
            sop_instance_uid=str(data["sop_instance_uid"]),
            series_instance_uid=str(data["series_instance_uid"]),
            path=Path(data["path"]),
            predecessor_path=Path(data["predecessor_path"])
            if data.get("predecessor_path")
            else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return prev if prev.path.is_file() else None


def _save_object(ds: Dataset, folder: Path) -> Path:
    """Write one result object atomically as <SOPInstanceUID>.dcm."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    tmp = folder / f".{path.name}.tmp"
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except (OSError, ValueError, AttributeError) as exc:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write result object: {exc}") from exc
    return path


def stage_report(ctx: StudyContext) -> StudyContext:
    """Heatmap Secondary Captures and the study's SR, written under its results folder.

    Nothing is made when no task could be assessed (no suitable series): the PACS should not
    collect empty reports for studies the models cannot read. A re-run whose SR differs (a late
    series re-opened the study) supersedes the previous SR and names it as predecessor.
    """
    if not ctx.qualifies:
        return ctx
    if not any(f.status is not FindingStatus.NOT_ASSESSABLE for f in ctx.findings):
        return replace(ctx, report_note="no task assessable: no result objects made")
    from node.report.objects import build_heatmap_images, build_sr, sr_uid

    outputs = ctx.rules.outputs
    result = StudyResult(
        study_uid=ctx.job.study_uid,
        source_paths=_image_paths(ctx),
        sequences=ctx.decisions,
        findings=ctx.findings,
        reopened=ctx.job.reopened,
    )
    folder = results_dir(ctx.out_dir, ctx.job.study_uid)
    objects_dir = folder / OBJECTS_DIR
    heatmaps = build_heatmap_images(result, outputs, uid_root=outputs.uid_root)
    objects = [
        ResultObject(
            kind="sc",
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            path=_save_object(ds, objects_dir),
        )
        for ds in heatmaps
    ]
    predecessor_uid: str | None = None
    if outputs.structured_report:
        new_uid = sr_uid(result, "comprehensive3d", uid_root=outputs.uid_root)
        prev = read_previous_sr(folder)
        predecessor: Path | None
        if prev is None:
            predecessor = None
        elif prev.sop_instance_uid == new_uid:
            predecessor = prev.predecessor_path  # the same SR again: same content, same UID
        else:
            predecessor = prev.path
        if predecessor is not None and not predecessor.is_file():
            predecessor = None
        sr = build_sr(result, heatmaps, uid_root=outputs.uid_root, predecessor=predecessor)
        sr_path = _save_object(sr, objects_dir)
        if predecessor is not None:
            predecessor_uid = str(
                pydicom.dcmread(predecessor, stop_before_pixels=True).SOPInstanceUID
            )
        objects.append(
            ResultObject(
                kind="sr",
                sop_class_uid=str(sr.SOPClassUID),
                sop_instance_uid=str(sr.SOPInstanceUID),
                series_instance_uid=str(sr.SeriesInstanceUID),
                path=sr_path,
            )
        )
        write_json_atomic(
            folder / LAST_SR_FILE,
            {
                "sop_instance_uid": str(sr.SOPInstanceUID),
                "series_instance_uid": str(sr.SeriesInstanceUID),
                "path": str(sr_path.resolve()),
                "predecessor_path": str(predecessor.resolve()) if predecessor else None,
            },
        )
    return replace(ctx, objects=tuple(objects), predecessor_sr=predecessor_uid)


def stage_outbox(ctx: StudyContext) -> StudyContext:
    """Queue every result object for every destination (only when the running node delivers)."""
    names = tuple(d.name for d in ctx.rules.destinations)
    if not ctx.deliver or not ctx.objects or not names:
        return replace(ctx, destinations=names if ctx.deliver else ())
    from node.deliver.outbox import Outbox

    datasets = [pydicom.dcmread(o.path) for o in ctx.objects]
    with Outbox(ctx.rules.storage.spool_dir) as outbox:
        n = outbox.enqueue(datasets, names, now=time.time())
    return replace(ctx, destinations=names, n_enqueued=n)


def stage_audit(ctx: StudyContext) -> StudyContext:
    """Write the audit record of a successful run."""
    status = "done" if ctx.qualifies is not False else "skipped"
    write_audit(ctx, status=status, failed_stage=None, error=None)
    return ctx


STAGES: tuple[tuple[Stage, StageFn], ...] = (
    (Stage.LOAD, stage_load),
    (Stage.CLASSIFY, stage_classify),
    (Stage.QUALIFY, stage_qualify),
    (Stage.ROUTE, stage_route),
    (Stage.INFER, stage_infer),
    (Stage.ENSEMBLE, stage_ensemble),
    (Stage.REPORT, stage_report),
    (Stage.OUTBOX, stage_outbox),
    (Stage.AUDIT, stage_audit),
)


def audit_path(out_dir: Path, study_uid: str) -> Path:
    """Where the audit record of a study lives: out_dir/<study_key>/audit.json."""
    return out_dir / uid_key(study_uid) / AUDIT_FILE


def _uid_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name or uid


def _n_positions(volume: SeriesVolume) -> int:
    """Slice positions per time point: the first run of rising positions along the normal."""
    ori = volume.slices[0].geometry.orientation
    normal = np.cross(ori[:3], ori[3:])
    d = [float(np.dot(normal, s.geometry.position)) for s in volume.slices]
    n = 1
    while n < len(d) and d[n] - d[n - 1] > 1e-3:
        n += 1
    return n


def _series_entries(loaded: StudyLoad) -> list[dict[str, Any]]:
    """One audit entry per series: what arrived, how it decoded, its geometry."""
    headers: dict[SeriesId, list[InstanceHeader]] = defaultdict(list)
    for h in loaded.headers:
        headers[series_id(h)].append(h)
    volumes = {volume_id(v): v for v in loaded.volumes}
    header_paths = {h.path: series_id(h) for h in loaded.headers}
    errors: dict[SeriesId, list[dict[str, str]]] = defaultdict(list)
    for p in loaded.problems:
        sid_of = header_paths.get(p.path)
        if sid_of is None and p.series_uid is not None:
            # The file's pixels failed before its header was recorded: attach it to the first
            # series with its UID (the number is unknown).
            sid_of = next((s for s in headers if s[0] == p.series_uid), None)
        if sid_of is not None:
            errors[sid_of].append({"file": str(p.path), "reason": p.reason})
    split_uids = {uid for uid, _ in headers if sum(1 for u, _ in headers if u == uid) > 1}
    entries = []
    for sid in sorted(headers, key=lambda s: (s[1] if s[1] is not None else -1, s[0])):
        hs = headers[sid]
        vol: SeriesVolume | None = volumes.get(sid)
        first = hs[0]
        key_text = f"{sid[0]}#{sid[1]}" if sid[0] in split_uids else sid[0]
        entry: dict[str, Any] = {
            "series_key": uid_key(key_text),
            "series_instance_uid": sid[0],
            "series_number": sid[1],
            "uid_shared_with_other_numbers": sid[0] in split_uids,
            "description": first.series_description,
            "modality": first.modality,
            "n_instances": len(hs),
            "n_frames": sum(h.n_frames for h in hs),
            "sop_classes": sorted({_uid_name(h.sop_class_uid) for h in hs}),
            "transfer_syntaxes": sorted({_uid_name(h.transfer_syntax_uid) for h in hs}),
            "image_types": sorted({"\\".join(h.image_type) for h in hs}),
            "photometric": sorted({h.photometric for h in hs if h.photometric}),
            "matrix": sorted({f"{h.rows}x{h.columns}" for h in hs if h.has_pixels}),
            "loaded": vol is not None,
            "decode_errors": errors.get(sid, []),
        }
        if vol is not None:
            geom = vol.slices[0].geometry
            n_positions = _n_positions(vol)
            entry.update(
                {
                    "volume_shape": list(vol.pixels.shape),
                    "n_slice_positions": n_positions,
                    "n_time_points": vol.n_frames // n_positions if n_positions else 0,
                    "slice_spacing_mm": vol.slice_spacing_mm,
                    "pixel_spacing_mm": list(geom.pixel_spacing),
                    "slice_thickness_mm": geom.slice_thickness,
                    "orientation": list(geom.orientation),
                    "first_position_mm": list(geom.position),
                    "last_position_mm": list(vol.slices[-1].geometry.position),
                }
            )
        entries.append(entry)
    return entries


def build_audit(
    ctx: StudyContext, *, status: str, failed_stage: Stage | None, error: dict[str, str] | None
) -> dict[str, Any]:
    """The audit record as a JSON-ready dict (UIDs and descriptions, never patient data)."""
    loaded = ctx.loaded
    known = {h.path for h in loaded.headers} if loaded is not None else set()
    unreadable = (
        [
            {"file": str(p.path), "reason": p.reason}
            for p in loaded.problems
            if p.series_uid is None and p.path not in known
        ]
        if loaded is not None
        else []
    )
    now = time.time()
    return {
        "not_for_clinical_use": True,
        "notice": NOT_FOR_CLINICAL_USE,
        "node_version": __version__,
        "status": status,
        "failed_stage": failed_stage.value if failed_stage is not None else None,
        "error": error,
        "job_id": ctx.job.job_id,
        "attempt": ctx.job.attempt,
        "reopened": ctx.job.reopened,
        "study_key": uid_key(ctx.job.study_uid),
        "study_instance_uid": ctx.job.study_uid,
        "started_at": _iso(ctx.started_at),
        "finished_at": _iso(now),
        "duration_ms": round((now - ctx.started_at) * 1000, 1),
        "stages": [{"stage": name, "duration_ms": round(ms, 1)} for name, ms in ctx.stage_ms],
        "n_files": len(ctx.job.instance_paths),
        "n_instances": len(loaded.headers) if loaded is not None else None,
        "n_series": len(_series_ids(loaded)) if loaded is not None else None,
        "n_decode_errors": len(loaded.problems) if loaded is not None else None,
        "series": _series_entries(loaded) if loaded is not None else [],
        "unreadable_files": unreadable,
        **_result_entries(ctx),
    }


def _decision_entries(ctx: StudyContext) -> list[dict[str, Any]]:
    """Per series: the sequence label, how it was decided and the evidence."""
    numbers = {h.series_uid: h for h in ctx.headers}
    out = []
    for d in ctx.decisions:
        h = numbers.get(d.series_uid)
        out.append(
            {
                "series_instance_uid": d.series_uid,
                "series_number": h.series_number if h is not None else None,
                "description": h.series_description if h is not None else "",
                "label": d.label.value,
                "confidence": round(d.confidence, 4),
                "method": d.method.value,
                "tag_label": d.tag_label.value if d.tag_label is not None else None,
                "cnn_label": d.cnn_label.value if d.cnn_label is not None else None,
                "cnn_votes": {label.value: n for label, n in d.cnn_votes},
                "reasons": list(d.reasons),
            }
        )
    return out


def _prediction_entry(p: SeriesPrediction) -> dict[str, Any]:
    return {
        "task": p.task,
        "model_id": p.model_id,
        "model_version": p.model_version,
        "series_instance_uid": p.series_uid,
        "sequence": p.sequence.value,
        "probability": p.probability,
        "slice_indices": list(p.slice_indices),
        "slice_probabilities": [round(x, 4) for x in p.slice_probabilities],
        "heatmap_slices": [h.slice_index for h in p.heatmaps],
    }


def _result_entries(ctx: StudyContext) -> dict[str, Any]:
    """The analysis part of the audit: sequences, routes, predictions, findings, objects."""
    return {
        "own_results_ignored": ctx.n_own_results,
        "qualifies": ctx.qualifies,
        "qualify_reason": ctx.qualify_reason,
        "sequence_cnn": ctx.sequence_cnn,
        "sequences": _decision_entries(ctx),
        "routes": [
            {
                "task": r.task,
                "bundle": r.bundle,
                "series_instance_uid": r.series_uid,
                "sequence": r.sequence.value,
                "weight": r.weight,
            }
            for r in ctx.routes
        ],
        "predictions": [_prediction_entry(p) for p in ctx.predictions],
        "findings": [
            {
                "task": f.task,
                "positive_label": f.positive_label,
                "negative_label": f.negative_label,
                "status": f.status.value,
                "probability": f.probability,
                "method": f.method,
                "reason": f.reason,
                "models": sorted({f"{p.model_id} {p.model_version}" for p in f.contributions}),
            }
            for f in ctx.findings
        ],
        "n_findings": _n_findings(ctx),
        "report_note": ctx.report_note,
        "objects": [
            {
                "kind": o.kind,
                "sop_class_uid": o.sop_class_uid,
                "sop_instance_uid": o.sop_instance_uid,
                "series_instance_uid": o.series_instance_uid,
                "file": str(o.path),
            }
            for o in ctx.objects
        ],
        "predecessor_sr": ctx.predecessor_sr,
        "destinations": list(ctx.destinations),
        "deliveries_enqueued": ctx.n_enqueued,
    }


def _n_findings(ctx: StudyContext) -> int:
    """Tasks with an answer (present, absent or indeterminate; not 'not assessable')."""
    return sum(1 for f in ctx.findings if f.status is not FindingStatus.NOT_ASSESSABLE)


def _series_ids(loaded: StudyLoad) -> set[SeriesId]:
    return {series_id(h) for h in loaded.headers}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_audit(
    ctx: StudyContext, *, status: str, failed_stage: Stage | None, error: dict[str, str] | None
) -> Path:
    """Write the study's audit record atomically and return its path."""
    path = audit_path(ctx.out_dir, ctx.job.study_uid)
    write_json_atomic(path, build_audit(ctx, status=status, failed_stage=failed_stage, error=error))
    return path


def _error_record(exc: BaseException) -> dict[str, str]:
    # Our own messages are written to be safe; a third-party message could quote header
    # values, so only its type is kept.
    message = str(exc) if isinstance(exc, NodeError) else ""
    return {"type": type(exc).__name__, "message": message[:500]}


def process_study(
    job: StudyJob, rules: Rules, *, out_dir: Path, deliver: bool = False
) -> StudyOutcome:
    """Run every stage on one study and write its audit record; raise NodeError on failure.

    With ``deliver`` (the running node) the result objects are queued in the outbox for every
    destination in the rules; by hand (`neuronode process`) they are only written to out_dir.
    """
    started = time.time()
    ctx = StudyContext(job=job, rules=rules, out_dir=out_dir, started_at=started, deliver=deliver)
    study_key = uid_key(job.study_uid)
    for stage, fn in STAGES:
        t0 = time.perf_counter()
        try:
            ctx = fn(ctx)
        except Exception as exc:  # the per-job outer guard
            ctx = replace(
                ctx, stage_ms=(*ctx.stage_ms, (stage.value, (time.perf_counter() - t0) * 1000))
            )
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
                    write_audit(ctx, status="failed", failed_stage=stage, error=_error_record(exc))
                except OSError:
                    log.error("audit_write_failed", study_key=study_key, stage=stage.value)
            if isinstance(exc, NodeError):
                raise
            raise StageFailed(
                f"stage {stage.value} failed: {type(exc).__name__}", stage=stage
            ) from exc
        ctx = replace(
            ctx, stage_ms=(*ctx.stage_ms, (stage.value, (time.perf_counter() - t0) * 1000))
        )
    loaded = ctx.loaded
    assert loaded is not None  # the LOAD stage always runs first
    outcome = StudyOutcome(
        study_uid=job.study_uid,
        audit_path=audit_path(out_dir, job.study_uid),
        n_series=len(_series_ids(loaded)),
        n_instances=len(loaded.headers),
        n_decode_errors=len(loaded.problems),
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
        n_findings=_n_findings(ctx),
        n_objects=len(ctx.objects),
        status="done" if ctx.qualifies is not False else "skipped",
        duration_ms=round((time.time() - started) * 1000, 1),
    )
    return outcome


# --- `neuronode process DIR` ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderScan:
    """DICOM files of a folder grouped by study, and what was skipped."""

    studies: tuple[tuple[str, tuple[Path, ...]], ...]
    n_skipped: int  # not DICOM, DICOMDIR, or without a StudyInstanceUID


def scan_folder(directory: Path) -> FolderScan:
    """Find DICOM files under a folder (recursively) and group them by StudyInstanceUID."""
    by_study: dict[str, list[Path]] = defaultdict(list)
    skipped = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            skipped += 1
            continue
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "MediaStorageSOPClassUID"],
            )
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError, KeyError):
            skipped += 1
            continue
        study_uid = ds.get("StudyInstanceUID")
        media_class = ds.file_meta.get("MediaStorageSOPClassUID") if ds.file_meta else None
        if not study_uid or str(media_class) == "1.2.840.10008.1.3.10":  # Media Storage Directory
            skipped += 1
            continue
        by_study[str(study_uid)].append(path)
    return FolderScan(
        studies=tuple((uid, tuple(paths)) for uid, paths in by_study.items()),
        n_skipped=skipped,
    )

"""The stages of one study job, each a function from the study context to a filled-in copy.

Stages run in the order of ``STAGES``: LOAD (one header read per file: series layouts and
header records; pixels are decoded later, one series at a time, where a model reads them),
CLASSIFY (tag rules + sequence CNN vote, fused, study context), QUALIFY (``qualify:`` in the
rules; a study that does not qualify is audited as skipped and gets no results), ROUTE, INFER
(specialist bundles + Grad-CAM), ENSEMBLE, REPORT (one SR, written under the study's results
folder), OUTBOX (only when the running node delivers: the SR x every destination, and the
senders are woken), HEATMAPS (the SC heatmaps the SR references, drawn, written and queued
after the SR, so the SR reaches the PACS without waiting for them) and AUDIT. Files that do
not decode are not a failure: they are listed in the audit and the study goes on. A missing
sequence CNN bundle is not a failure either (tag rules alone, said in the audit); a missing
specialist bundle that a route needs fails INFER with the bundle's reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset

from node.dicom.volumes import SeriesId, read_study, volume_id
from node.errors import ModelUnavailable, ReportError
from node.log import get_logger, uid_key
from node.pipeline.audit import series_ids, write_audit
from node.pipeline.context import (
    LAST_SR_FILE,
    OBJECTS_DIR,
    PreviousSr,
    ResultObject,
    Stage,
    StageFn,
    StudyContext,
)
from node.pipeline.models import worker_bundle, worker_model
from node.pipeline.series_cache import SeriesCache
from node.records import (
    FindingStatus,
    InstanceHeader,
    SeriesPrediction,
    SeriesVolume,
    StudyResult,
)
from node.store.files import dicom_bytes, write_files_durable, write_json_durable

if TYPE_CHECKING:
    from node.bundles.bundle import Bundle

log = get_logger(__name__)


# --- per-worker model cache ---------------------------------------------------------------------


# --- stages ---------------------------------------------------------------------------------------


def is_own_result(header: InstanceHeader) -> bool:
    """An SR or heatmap this node made, come back with the study (a PACS forwarding whole
    studies): it is neither analysed nor allowed to change the result UIDs."""
    from node.report.codes import (
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
    """Read every instance's header once: series layouts and header records, no pixels yet (our
    own results left out). Pixels are decoded series by series where a model reads them."""
    loaded, n_own = read_study(ctx.job.instance_paths, ignore=is_own_result)
    if n_own:
        log.info("own_results_ignored", study_key=uid_key(ctx.job.study_uid), count=n_own)
    return replace(ctx, loaded=loaded, n_own_results=n_own, volumes=SeriesCache(loaded.layouts))


def _volumes(ctx: StudyContext) -> SeriesCache:
    """The job's decoded series (a context made without LOAD gets its own, from its layouts)."""
    if ctx.volumes is not None:
        return ctx.volumes
    return SeriesCache(ctx.loaded.layouts if ctx.loaded is not None else ())


def _series_id_by_uid(ctx: StudyContext) -> dict[str, SeriesId]:
    """The series a route's SeriesInstanceUID reads: its first layout (a UID reused under
    several series numbers reads the first)."""
    by_uid: dict[str, SeriesId] = {}
    for layout in ctx.loaded.layouts if ctx.loaded is not None else ():
        by_uid.setdefault(layout.series_uid, volume_id(layout))
    return by_uid


def _image_paths(ctx: StudyContext) -> tuple[Path, ...]:
    """Files of the study that carry pixels (what the SR copies the study attributes from)."""
    loaded = ctx.loaded
    if loaded is None:
        return ctx.job.instance_paths
    bad = {p.path for p in loaded.problems if p.series_uid is None}
    with_pixels = tuple(h.path for h in loaded.headers if h.has_pixels and h.path not in bad)
    return with_pixels or tuple(h.path for h in loaded.headers)


def _series_numbers(ctx: StudyContext) -> tuple[tuple[str, str], ...]:
    """SeriesNumber of each series as the SR writes it, from the headers LOAD read (the first
    image file of each SeriesInstanceUID, in file order)."""
    loaded = ctx.loaded
    found: dict[str, str] = {}
    bad = {p.path for p in loaded.problems if p.series_uid is None} if loaded else set()
    for h in loaded.headers if loaded is not None else ():
        if h.has_pixels and h.path not in bad:
            number = str(h.series_number) if h.series_number is not None else "?"
            found.setdefault(h.series_uid, number)
    return tuple(found.items())


def _after_decoding(ctx: StudyContext, volumes: SeriesCache) -> StudyContext:
    """The context with the files whose pixels failed added to the load's problems (each once)
    and the layouts of their series replaced by what did decode."""
    loaded = ctx.loaded
    if loaded is None or not volumes.problems:
        return ctx
    known = {(p.path, p.reason) for p in loaded.problems}
    new = tuple(p for p in volumes.problems if (p.path, p.reason) not in known)
    return replace(
        ctx,
        loaded=replace(
            loaded,
            problems=(*loaded.problems, *new),
            layouts=volumes.layouts(loaded.layouts),
        ),
    )


def stage_classify(ctx: StudyContext) -> StudyContext:
    """Label each series: the one classification path (node.classify.study), the series
    decoded one at a time for the sequence CNN and the T1 image comparison."""
    from node.classify.study import classify_study

    loaded = ctx.loaded
    headers = loaded.series_headers if loaded is not None else ()
    settings = ctx.rules.sequence
    bundle: Bundle | None
    try:
        bundle = worker_bundle(ctx.rules.models_dir / settings.bundle)
        unavailable = ""
    except ModelUnavailable as exc:
        bundle = None
        unavailable = f"sequence CNN not available, tag rules alone: {exc}"
        log.warning("sequence_cnn_unavailable", study_key=uid_key(ctx.job.study_uid))
    volumes = _volumes(ctx)
    result = classify_study(headers, volumes, settings, bundle, unavailable=unavailable)
    ctx = _after_decoding(ctx, volumes)
    return replace(ctx, headers=headers, decisions=result.decisions, sequence_cnn=result.cnn_note)


def _body_parts(ctx: StudyContext) -> tuple[str, ...] | None:
    """BodyPartExamined of the study's series (from the headers CLASSIFY read), only when the
    rules filter on it."""
    if not ctx.rules.qualify.body_parts:
        return None
    return tuple(sorted({h.body_part for h in ctx.headers}))


def stage_qualify(ctx: StudyContext) -> StudyContext:
    """Whether the study is processed at all under `qualify:`."""
    from node.routing import study_qualifies

    loaded = ctx.loaded
    modalities = {h.modality for h in loaded.headers} if loaded is not None else set()
    n_series = len(series_ids(loaded)) if loaded is not None else 0
    ok, why = study_qualifies(modalities, _body_parts(ctx), n_series, ctx.rules.qualify)
    if not ok:
        log.info("study_skipped", study_key=uid_key(ctx.job.study_uid), reason=why)
    return replace(ctx, qualifies=ok, qualify_reason=why)


def stage_route(ctx: StudyContext) -> StudyContext:
    """Which specialist bundles run on which series, from the rules' task routes."""
    if not ctx.qualifies:
        if ctx.volumes is not None:
            ctx.volumes.clear()
        return ctx
    from node.routing import route_study

    routes = route_study(ctx.decisions, ctx.rules)
    if ctx.volumes is not None:
        # INFER and HEATMAPS read only the routed series: the others' pixels go now.
        by_uid = _series_id_by_uid(ctx)
        ctx.volumes.keep_only(by_uid[r.series_uid] for r in routes if r.series_uid in by_uid)
    return replace(ctx, routes=routes)


def stage_infer(ctx: StudyContext) -> StudyContext:
    """Run each routed bundle on its series (this worker's own copy) and explain it (Grad-CAM).

    Routed series are read one at a time (each decoded once per job: the job's SeriesCache),
    every route of a series on one read; the predictions keep the order of the routes."""
    if not ctx.qualifies or not ctx.routes:
        return ctx
    from node.bundles.bundle import predict_series
    from node.bundles.detector import Detector, predict_detector
    from node.bundles.gradcam import key_slices, planned_heatmaps, with_heatmaps

    by_uid = _series_id_by_uid(ctx)
    volumes = _volumes(ctx)
    k = ctx.rules.outputs.heatmaps_per_series
    order = sorted(range(len(ctx.routes)), key=lambda i: (ctx.routes[i].series_uid, i))
    predictions: dict[int, SeriesPrediction] = {}
    current: tuple[SeriesId | None, SeriesVolume | None] = (None, None)
    for i in order:
        route = ctx.routes[i]
        sid = by_uid.get(route.series_uid)
        if current[0] != sid:
            current = (None, None)  # the previous series' pixels go before the next read
            current = (sid, volumes.get(sid) if sid is not None else None)
        volume = current[1]
        if volume is None:
            continue  # the series has headers but no decodable pixels: listed in the audit
        try:
            bundle = worker_model(ctx.rules.models_dir / route.bundle)
        except ModelUnavailable as exc:
            raise ModelUnavailable(
                f"task {route.task} needs bundle '{route.bundle}', which cannot be served: {exc}"
            ) from exc
        t0 = time.perf_counter()
        if isinstance(bundle, Detector):
            # One measurement gives the answer and the map of what it measured (its heatmaps):
            # no network pass to defer.
            pred = predict_detector(bundle, volume, sequence=route.sequence, top_k=k)
        else:
            pred = predict_series(bundle, volume, sequence=route.sequence)
        # The ensemble matches on the rule file's task name and bundle folder name.
        pred = replace(pred, task=route.task, model_id=route.bundle)
        if k > 0 and not isinstance(bundle, Detector):
            # Where the key slices are known without the maps (an axial series), the maps wait
            # for HEATMAPS, after the SR has gone out.
            chosen = key_slices(volume, pred, top_k=k)
            if chosen is None:
                pred = with_heatmaps(bundle, volume, pred, top_k=k)
            else:
                pred = replace(pred, heatmaps=planned_heatmaps(volume, chosen))
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
        predictions[i] = pred
    del current, volume
    ctx = _after_decoding(ctx, volumes)
    return replace(ctx, predictions=tuple(predictions[i] for i in sorted(predictions)))


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
            content_uid=str(data.get("content_uid") or data["sop_instance_uid"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return prev if prev.path.is_file() else None


def _result_object(ds: Dataset, kind: str, path: Path) -> ResultObject:
    return ResultObject(
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        path=path,
    )


def _save_objects(datasets: Sequence[Dataset], kind: str, folder: Path) -> list[ResultObject]:
    """Write result objects atomically and durably as <SOPInstanceUID>.dcm (one folder sync)."""
    try:
        encoded = [(folder / f"{ds.SOPInstanceUID}.dcm", dicom_bytes(ds)) for ds in datasets]
        write_files_durable(encoded)
    except (OSError, ValueError, AttributeError) as exc:
        raise ReportError(f"cannot write result object: {type(exc).__name__}") from exc
    return [_result_object(ds, kind, path) for ds, (path, _) in zip(datasets, encoded, strict=True)]


def _study_result(ctx: StudyContext) -> StudyResult:
    return StudyResult(
        study_uid=ctx.job.study_uid,
        source_paths=_image_paths(ctx),
        series_numbers=_series_numbers(ctx),
        sequences=ctx.decisions,
        findings=ctx.findings,
        reopened=ctx.job.reopened,
    )


def _makes_results(ctx: StudyContext) -> bool:
    return bool(ctx.qualifies) and any(
        f.status is not FindingStatus.NOT_ASSESSABLE for f in ctx.findings
    )


def stage_report(ctx: StudyContext) -> StudyContext:
    """The study's SR, written under its results folder (the heatmaps come after it).

    The SR references the heatmap images by UID and size, which are known before they are
    drawn, so the SR is written (and queued by OUTBOX) first; HEATMAPS draws them after.
    Nothing is made when no task could be assessed (no suitable series): the PACS should not
    collect empty reports for studies the models cannot read. A re-run whose SR differs (a late
    series re-opened the study) supersedes the previous SR and names it as predecessor.
    """
    if not ctx.qualifies:
        return ctx
    if not _makes_results(ctx):
        return replace(ctx, report_note="no task assessable: no result objects made")
    outputs = ctx.rules.outputs
    if not outputs.structured_report:
        return ctx
    from node.report.sc import build_heatmap_images
    from node.report.sr import build_sr
    from node.report.uids import sr_uid

    result = _study_result(ctx)
    folder = results_dir(ctx.out_dir, ctx.job.study_uid)
    # What the SR says decides its UID: a changed result gets a new UID that names the
    # previous SR as its predecessor; the same result again keeps its UID (no duplicate).
    content_uid = sr_uid(result, "comprehensive3d", uid_root=outputs.uid_root)
    prev = read_previous_sr(folder)
    predecessor: Path | None
    if prev is None:
        predecessor = None
    elif prev.content_uid == content_uid:
        predecessor = prev.predecessor_path  # the same SR again: same content, same UID
    else:
        predecessor = prev.path
    if predecessor is not None and not predecessor.is_file():
        predecessor = None
    heatmaps = build_heatmap_images(result, outputs, uid_root=outputs.uid_root, render=False)
    sr = build_sr(result, heatmaps, uid_root=outputs.uid_root, predecessor=predecessor)
    (obj,) = _save_objects([sr], "sr", folder / OBJECTS_DIR)
    predecessor_uid: str | None = None
    if predecessor is not None:
        predecessor_uid = str(pydicom.dcmread(predecessor, stop_before_pixels=True).SOPInstanceUID)
    write_json_durable(
        folder / LAST_SR_FILE,
        {
            "sop_instance_uid": obj.sop_instance_uid,
            "series_instance_uid": obj.series_instance_uid,
            "path": str(obj.path.resolve()),
            "predecessor_path": str(predecessor.resolve()) if predecessor else None,
            "content_uid": content_uid,
        },
    )
    return replace(ctx, objects=(obj,), predecessor_sr=predecessor_uid)


def _enqueue(ctx: StudyContext, objects: Sequence[ResultObject]) -> StudyContext:
    """Queue result objects for every destination (only when the running node delivers), and
    say so (the node wakes its senders)."""
    names = tuple(d.name for d in ctx.rules.destinations)
    if not ctx.deliver or not names:
        return replace(ctx, destinations=names if ctx.deliver else ())
    if not objects:
        return replace(ctx, destinations=names, n_enqueued=ctx.n_enqueued or 0)
    from node.deliver.outbox import Outbox, OutboxFile

    files = [
        OutboxFile(
            sop_uid=o.sop_instance_uid,
            sop_class_uid=o.sop_class_uid,
            study_uid=ctx.job.study_uid,
            path=o.path,
        )
        for o in objects
    ]
    url = ctx.rules.database.resolve_url()
    with Outbox(ctx.rules.storage.spool_dir, database_url=url) as outbox:
        n = outbox.enqueue_files(files, names, now=time.time())
    if ctx.on_queued is not None:
        ctx.on_queued()
    return replace(ctx, destinations=names, n_enqueued=(ctx.n_enqueued or 0) + n)


def stage_outbox(ctx: StudyContext) -> StudyContext:
    """Queue the SR for every destination (only when the running node delivers): it is what the
    reader waits for, so it goes out before the heatmaps are drawn."""
    return _enqueue(ctx, ctx.objects)


def _explain_planned(ctx: StudyContext) -> StudyContext:
    """The context with the Grad-CAM maps INFER left for later computed (on the job's decoded
    series: decoded again only if the cache's budget did not hold them), in its predictions and
    in the findings that hold them."""
    from node.bundles.gradcam import explain_series

    def key(p: SeriesPrediction) -> tuple[str, str, str]:
        return (p.task, p.model_id, p.series_uid)

    pending = [p for p in ctx.predictions if any(not h.explained for h in p.heatmaps)]
    if not pending:
        return ctx
    by_uid = _series_id_by_uid(ctx)
    volumes = _volumes(ctx)
    done: dict[tuple[str, str, str], SeriesPrediction] = {}
    for series_uid in dict.fromkeys(p.series_uid for p in pending):
        sid = by_uid.get(series_uid)
        volume = volumes.get(sid) if sid is not None else None
        if volume is None:
            raise ReportError("a series with planned heatmaps no longer decodes")
        for pred in (p for p in pending if p.series_uid == series_uid):
            bundle = worker_bundle(ctx.rules.models_dir / pred.model_id)
            chosen = tuple(h.slice_index for h in pred.heatmaps)
            maps = explain_series(bundle, volume, pred, top_k=len(chosen), chosen=chosen)
            done[key(pred)] = replace(pred, heatmaps=maps)
        del volume
    return replace(
        ctx,
        predictions=tuple(done.get(key(p), p) for p in ctx.predictions),
        findings=tuple(
            replace(f, contributions=tuple(done.get(key(p), p) for p in f.contributions))
            for f in ctx.findings
        ),
    )


def stage_heatmaps(ctx: StudyContext) -> StudyContext:
    """Compute the Grad-CAM maps INFER left for later, draw the heatmap Secondary Captures the
    SR references, write them, and queue them.

    A crash before this ends leaves the SR queued; the retried job makes the same SR (same
    UID: the outbox keeps its one row) and then the heatmaps, so each object arrives once.
    """
    if not _makes_results(ctx):
        if ctx.volumes is not None:
            ctx.volumes.clear()
        return ctx
    from node.report.sc import build_heatmap_images

    ctx = _explain_planned(ctx)
    if ctx.volumes is not None:
        ctx.volumes.clear()  # every map is computed: no stage reads pixels any more

    outputs = ctx.rules.outputs
    heatmaps = build_heatmap_images(_study_result(ctx), outputs, uid_root=outputs.uid_root)
    if not heatmaps:
        return ctx
    folder = results_dir(ctx.out_dir, ctx.job.study_uid) / OBJECTS_DIR
    made = _save_objects(heatmaps, "sc", folder)
    return _enqueue(replace(ctx, objects=(*ctx.objects, *made)), made)


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
    (Stage.HEATMAPS, stage_heatmaps),
    (Stage.AUDIT, stage_audit),
)


# --- `neuronode process DIR` ----------------------------------------------------------------------

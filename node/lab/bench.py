"""`neuronode bench`: speed and memory figures, each against a reference measured in the same run.

Targets (issues 3-5) are checked here, by printed figures, not by timed unit tests that flake on
a shared machine. Every benchmark times the node's own code path and, in the same run, a plain
reference workload of the same size (pydicom writes, a bare network forward, a storage SCP with
no fsync or index), so the ratio says what the node's own work costs whatever the machine load.

Why this module is long: each benchmark is a small function with its reference measured in the
same run; they share the timing, memory and reporting helpers (lab code, never imported by the
node).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from node.config import RECEIVER_PROCESSES_DEFAULT, NodeSettings, Rules, TaskSettings
from node.errors import ConfigError, ModelUnavailable
from node.lab.orthanc import free_port
from node.log import configure
from node.pipeline.audit import AuditRecord, read_audit
from node.records import SequenceLabel, StudyJob

BENCHMARKS = (
    "synth",
    "sequence",
    "specialists",
    "receive",
    "ingest",
    "dicomio",
    "latency",  # launch to first C-ECHO; quiet period to SR in Orthanc (node processes)
    "memory",  # peak of a 200- against a 2,000-instance study job (child processes)
    "scale",  # PostgreSQL/SQLite ingest; 1, 2, 3 worker processes (starts PostgreSQL)
)
_REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
_KB = 1024
_MB = 1024 * 1024

T = TypeVar("T")
Detail = tuple[str, float | str]

if TYPE_CHECKING:
    from node.cli.lab import BenchArgs


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchRecord:
    """One measured figure, its reference from the same run, their ratio and the target."""

    name: str
    figure: float  # what was measured (median over repeats)
    unit: str  # s, images/s, instances/s
    reference: float | None  # the reference workload's figure, same unit
    reference_what: str  # what the reference is, in words
    ratio: float | None  # figure / reference (see ratio_what)
    ratio_what: str
    target: str = ""  # e.g. "< 5 s (issue 3)"; empty: no target
    met: bool | None = None  # None when there is no target
    peak_mb: float | None = None  # peak RSS of the process during the measured call (MiB)
    growth_mb: float | None = None  # how far RSS rose above its level before the call (MiB)
    details: tuple[Detail, ...] = ()
    skipped: str = ""  # why it did not run (figure is then 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchSettings:
    """Sizes and repeats of a run; the defaults are the issues' figures."""

    size: int = 256
    slices: int = 24
    n_instances: int = 100
    repeat: int = 1
    models_dir: Path = _REPO_MODELS
    seed: int = 20261123
    ingest_instances: int = 200  # `ingest`: MR instances sent per run (issue 15 used 600)
    ingest_size: int = 512  # their matrix (512x512, about 0.5 MB each)
    # The stock-sender comparison's instances: 112 KB, the size at which Nagle's algorithm
    # and delayed ACKs cost the most (issue 15).
    nagle_size: int = 236
    receiver_processes: int = RECEIVER_PROCESSES_DEFAULT  # `ingest`: node.receiver_processes


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchStudy:
    """The synthetic study the benchmarks share: its folder, files and true series labels."""

    root: Path
    study_uid: str
    paths: tuple[Path, ...]
    labels: tuple[tuple[str, SequenceLabel], ...]  # (series UID, true label)
    n_series: int


# --- measuring -----------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so a peak can be read per call (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


@dataclass(slots=True)
class _Peak:
    """Resident memory over a block: its peak (VmHWM after a reset) and growth above the start."""

    mb: float | None = None  # peak RSS of the process during the block
    growth_mb: float | None = None  # that peak minus RSS at the start of the block
    max_rss_mb: float = 0.0  # ru_maxrss: the process's lifetime peak


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so RSS shows live memory."""
    gc.collect()
    # Not glibc: the figures then include memory freed earlier but kept by malloc.
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def peak_memory() -> Iterator[_Peak]:
    """Peak resident memory during the block, and how far it rose above the start."""
    out = _Peak()
    _release_free_memory()
    before = _status_kb("VmRSS")
    exact = before is not None and _reset_peak()
    try:
        yield out
    finally:
        out.max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KB
        hwm = _status_kb("VmHWM") if exact else None
        if before is not None and hwm is not None:
            out.mb = hwm / _KB
            out.growth_mb = max(0.0, (hwm - before) / _KB)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with n torch intra-op threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def timed(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """Median wall time of `repeat` calls (at least one) and the last call's result."""
    times = []
    result: T | None = None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result  # type: ignore[return-value]


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _ratio(a: float, b: float | None) -> float | None:
    return round(a / b, 3) if b else None


# --- the shared study ----------------------------------------------------------------------------


def _write_study(study: Any, root: Path) -> tuple[Path, ...]:
    from pydicom.uid import ExplicitVRLittleEndian

    from node.lab.synth.writer import encode, write_dataset

    paths = []
    for j, s in enumerate(study.series):
        for n, ds in enumerate(s.datasets):
            path = root / f"series_{j + 1:03d}" / f"{n + 1}.dcm"
            write_dataset(encode(ds, ExplicitVRLittleEndian), path)
            paths.append(path)
    return tuple(paths)


def _bench_study(study: Any, root: Path, paths: tuple[Path, ...]) -> BenchStudy:
    return BenchStudy(
        root=root,
        study_uid=study.study_uid,
        paths=paths,
        labels=tuple((s.series_uid, SequenceLabel(s.label)) for s in study.series),
        n_series=len(study.series),
    )


def _generate(settings: BenchSettings, seed: int) -> Any:
    from node.lab.synth.study import generate_study

    return generate_study(
        seed,
        phenotype="gbm",
        vendor="siemens",
        size=settings.size,
        slices=settings.slices,
        distractors=False,
    )


def make_study(work: Path, settings: BenchSettings) -> BenchStudy:
    """Write the benchmark study (6 routed series, no distractors) under work/study."""
    study = _generate(settings, settings.seed)
    root = work / "study"
    return _bench_study(study, root, _write_study(study, root))


def _reference_write(n_files: int, rows: int, cols: int, folder: Path) -> None:
    """Plain pydicom: one MR dataset of random pixels per file, written as is."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
        ds.Modality = "MR"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)


def bench_synth(work: Path, settings: BenchSettings) -> tuple[BenchRecord, BenchStudy]:
    """Issue 3: one 6-series study in memory (< 5 s) and on disk, vs plain pydicom writes."""
    seeds = iter(range(settings.seed, settings.seed + 1000))
    t0 = time.perf_counter()
    _generate(settings, next(seeds))  # first call: imports and the template cache
    cold_s = time.perf_counter() - t0
    with peak_memory() as peak:
        gen_s, study = timed(lambda: _generate(settings, next(seeds)), settings.repeat)
    root = work / "study"
    t0 = time.perf_counter()
    paths = _write_study(study, root)
    write_s = time.perf_counter() - t0
    rows = cols = settings.size
    ref_s, _ = timed(
        lambda: _reference_write(len(paths), rows, cols, work / "reference_write"),
        settings.repeat,
    )
    mb = sum(p.stat().st_size for p in paths) / _MB
    record = BenchRecord(
        name="synth",
        figure=round(gen_s, 3),
        unit="s",
        reference=round(ref_s, 3),
        reference_what=f"plain pydicom write of {len(paths)} random-pixel files",
        ratio=_ratio(gen_s + write_s, ref_s),
        ratio_what="(generate + write) / reference write",
        target="< 5 s in memory (issue 3)",
        met=gen_s < 5.0,
        peak_mb=_mb(peak.mb),
        growth_mb=_mb(peak.growth_mb),
        details=(
            ("series", len(study.series)),
            ("files", len(paths)),
            ("matrix", f"{settings.size}x{settings.size}x{settings.slices}"),
            ("write_s", round(write_s, 3)),
            ("total_s", round(gen_s + write_s, 3)),
            ("first_call_s", round(cold_s, 3)),
            ("written_mb", round(mb, 1)),
        ),
    )
    return record, _bench_study(study, root, paths)


# --- sequence classification ---------------------------------------------------------------------


def _rules(models_dir: Path, tasks: dict[str, TaskSettings] | None = None) -> Rules:
    """Default rules on this models folder, no destinations, only the given tasks."""
    return Rules(models_dir=models_dir, tasks=tasks if tasks is not None else {})


def _context(study: BenchStudy, rules: Rules, out_dir: Path) -> Any:
    from node.pipeline.context import StudyContext

    job = StudyJob(job_id=0, study_uid=study.study_uid, instance_paths=study.paths, attempt=1)
    return StudyContext(job=job, rules=rules, out_dir=out_dir, started_at=time.time())


def _pure_forward(bundle: Any, n: int, threads: int | None = None) -> float:
    """Seconds for the bundle's network on a random batch of n prepared-size slices (warmed)."""
    import torch

    from node.bundles.bundle import forward_logits

    meta = bundle.metadata
    x = torch.rand(n, meta.channels, *meta.size, generator=torch.Generator().manual_seed(0))
    with torch_threads(threads if threads is not None else torch.get_num_threads()):
        forward_logits(bundle, x[:1])  # first call of a shape pays for kernel selection
        t0 = time.perf_counter()
        forward_logits(bundle, x)
        return time.perf_counter() - t0


def bench_sequence(study: BenchStudy, work: Path, settings: BenchSettings) -> BenchRecord:
    """Issue 4: headers + tag rules + CNN vote for the study (< 2 s), vs the bare CNN forward."""
    from node.bundles.bundle import classify_series
    from node.classify.sequence import classify_headers
    from node.dicom.headers import read_series_headers
    from node.dicom.volumes import scan_study
    from node.pipeline.models import clear_worker_bundles, worker_bundle
    from node.pipeline.stages import stage_classify, stage_load

    rules = _rules(settings.models_dir)
    path = rules.models_dir / rules.sequence.bundle
    clear_worker_bundles()
    t0 = time.perf_counter()
    try:
        bundle = worker_bundle(path)
    except ModelUnavailable as exc:
        return _skipped("sequence", f"sequence bundle not available: {exc}")
    load_bundle_s = time.perf_counter() - t0
    ctx = stage_load(_context(study, rules, work / "out"))
    stage_classify(ctx)  # warm-up: first-call allocations and kernel selection
    with peak_memory() as peak:
        total_s, done = timed(lambda: stage_classify(ctx), settings.repeat)
    n = rules.sequence.slices_per_series
    volumes = scan_study(study.paths).volumes

    def cnn() -> int:
        return sum(classify_series(bundle, v, n).n_slices for v in volumes)

    cnn_s, n_images = timed(cnn, settings.repeat)
    tags_s, _ = timed(lambda: classify_headers(read_series_headers(study.paths)), settings.repeat)
    ref_s, _ = timed(lambda: _pure_forward(bundle, n_images), settings.repeat)
    ref1_s, _ = timed(lambda: _pure_forward(bundle, n_images, threads=1), settings.repeat)
    with torch_threads(1):
        total1_s, _ = timed(lambda: stage_classify(ctx), settings.repeat)
    truth = dict(study.labels)
    correct = sum(d.label == truth.get(d.series_uid) for d in done.decisions)
    return BenchRecord(
        name="sequence",
        figure=round(total_s, 3),
        unit="s",
        reference=round(ref_s, 3),
        reference_what=f"bare CNN forward on a random batch of {n_images} slices",
        ratio=_ratio(total_s, ref_s),
        ratio_what="classify stage / bare forward",
        target="< 2 s for 6 series incl. CNN (issue 4)",
        met=total_s < 2.0,
        peak_mb=_mb(peak.mb),
        growth_mb=_mb(peak.growth_mb),
        details=(
            ("series", len(done.decisions)),
            ("correct_labels", correct),
            ("cnn_images", n_images),
            ("classify_s_1_thread", round(total1_s, 3)),
            ("cnn_s", round(cnn_s, 3)),
            ("cnn_images_per_s", round(n_images / cnn_s, 1)),
            ("bare_images_per_s", round(n_images / ref_s, 1)),
            ("bare_images_per_s_1_thread", round(n_images / ref1_s, 1)),
            ("headers_and_tags_s", round(tags_s, 3)),
            ("bundle_load_s", round(load_bundle_s, 3)),
            ("max_rss_mb", round(peak.max_rss_mb, 1)),
        ),
    )


# --- specialists and the whole pipeline ---------------------------------------------------------


def available_tasks(models_dir: Path) -> tuple[dict[str, TaskSettings], tuple[str, ...]]:
    """The default tasks cut down to routes whose bundle loads, and why each other one does not.
    Every task is enabled (tubers is off in the default rules): the benchmark is the study
    through all specialists."""
    from node.pipeline.models import loadable_tasks

    tasks, left_out = loadable_tasks(models_dir)
    every = {name: t.model_copy(update={"enabled": True}) for name, t in tasks.items()}
    return every, tuple(f"{r.bundle}: {r.reason}" for r in left_out)


def _skipped(name: str, why: str) -> BenchRecord:
    return BenchRecord(
        name=name,
        figure=0.0,
        unit="",
        reference=None,
        reference_what="",
        ratio=None,
        ratio_what="",
        skipped=why,
    )


def bench_model(
    bundle_dir: Path, study: BenchStudy, settings: BenchSettings, volumes: Sequence[Any]
) -> BenchRecord:
    """One specialist on its series: prediction + Grad-CAM, vs the bare forward of its slices."""
    from node.bundles.bundle import load_bundle, predict_series
    from node.bundles.gradcam import with_heatmaps

    name = f"model:{bundle_dir.name}"
    try:
        bundle = load_bundle(bundle_dir)
    except ModelUnavailable as exc:
        return _skipped(name, str(exc))
    wanted = bundle.metadata.sequences
    uids = {uid for uid, label in study.labels if label in wanted}
    volume = next((v for v in volumes if v.series_uid in uids), None)
    if volume is None:
        return _skipped(name, f"the study has no {'/'.join(wanted)} series")
    predict_series(bundle, volume)  # warm-up
    with peak_memory() as peak:
        pred_s, pred = timed(lambda: predict_series(bundle, volume), settings.repeat)
        cam_s, cam = timed(lambda: with_heatmaps(bundle, volume, pred, top_k=3), settings.repeat)
    n = len(pred.slice_indices)
    ref_s, _ = timed(lambda: _pure_forward(bundle, n), settings.repeat)
    ref1_s, _ = timed(lambda: _pure_forward(bundle, n, threads=1), settings.repeat)
    with torch_threads(1):
        pred1_s, _ = timed(lambda: predict_series(bundle, volume), settings.repeat)
    return BenchRecord(
        name=name,
        figure=round(n / pred_s, 1),
        unit="images/s",
        reference=round(n / ref_s, 1),
        reference_what=f"bare forward on a random batch of {n} slices",
        ratio=_ratio(n / pred_s, n / ref_s),
        ratio_what="prediction images/s / bare images/s",
        peak_mb=_mb(peak.mb),
        growth_mb=_mb(peak.growth_mb),
        details=(
            ("sequence", "/".join(wanted)),
            ("slices", n),
            ("predict_s", round(pred_s, 3)),
            ("gradcam_s", round(cam_s, 3)),
            ("images_per_s_1_thread", round(n / pred1_s, 1)),
            ("bare_images_per_s_1_thread", round(n / ref1_s, 1)),
            ("heatmaps", len(cam.heatmaps)),
            ("probability", round(pred.probability, 3)),
            ("max_rss_mb", round(peak.max_rss_mb, 1)),
        ),
    )


def bench_specialists(
    study: BenchStudy, work: Path, settings: BenchSettings
) -> tuple[BenchRecord, ...]:
    """Issue 5: each specialist present, then the whole pipeline on the study (< 10 s)."""
    from node.bundles.bundle import load_bundle
    from node.dicom.volumes import scan_study
    from node.pipeline.models import clear_worker_bundles
    from node.pipeline.runner import process_study

    tasks, missing = available_tasks(settings.models_dir)
    records: list[BenchRecord] = [_skipped(f"model:{m.split(':')[0]}", m) for m in missing]
    volumes = scan_study(study.paths).volumes
    for task in tasks.values():
        for route in task.models:
            records.append(
                bench_model(settings.models_dir / route.bundle, study, settings, volumes)
            )
    del volumes
    if not tasks:
        records.append(_skipped("pipeline", "no specialist bundle loads"))
        return tuple(records)
    rules = _rules(settings.models_dir, tasks)
    job = StudyJob(job_id=0, study_uid=study.study_uid, instance_paths=study.paths, attempt=1)
    runs = iter(range(1000))

    def run() -> AuditRecord:
        out = work / f"pipeline_{next(runs)}"
        outcome = process_study(job, rules, out_dir=out)
        return read_audit(outcome.audit_path)

    clear_worker_bundles()
    t0 = time.perf_counter()
    run()  # cold: loads and verifies every bundle in this thread
    cold_s = time.perf_counter() - t0
    with peak_memory() as peak:
        warm_s, audit = timed(run, settings.repeat)
    with torch_threads(1):
        warm1_s, _ = timed(run, settings.repeat)
    # Reference: the bare forward of every model that ran, on as many slices as it read.
    ref_s = 0.0
    n_images = 0
    bundles: dict[str, Any] = {}
    for pred in audit.predictions:
        bundle_name = pred.model_id
        if bundle_name not in bundles:
            bundles[bundle_name] = load_bundle(settings.models_dir / bundle_name)
        n = len(pred.slice_indices)
        n_images += n
        ref_s += _pure_forward(bundles[bundle_name], n)
    if ref_s == 0.0:
        ref_s = _pure_forward(load_bundle(settings.models_dir / rules.sequence.bundle), 1)
    stages = tuple((f"stage_{s.stage}_ms", s.duration_ms) for s in audit.stages)
    records.append(
        BenchRecord(
            name="pipeline",
            figure=round(warm_s, 3),
            unit="s",
            reference=round(ref_s, 3),
            reference_what=f"bare forward of the specialists on their {n_images} slices",
            ratio=_ratio(warm_s, ref_s),
            ratio_what="process_study / bare specialist forwards",
            target="< 10 s for the study, all specialists + Grad-CAM (issue 5)",
            met=warm_s < 10.0,
            peak_mb=_mb(peak.mb),
            growth_mb=_mb(peak.growth_mb),
            details=(
                ("bundles", ",".join(sorted(r.bundle for t in tasks.values() for r in t.models))),
                ("predictions", len(audit.predictions)),
                ("status", audit.status),
                ("cold_s", round(cold_s, 3)),
                ("warm_s_1_thread", round(warm1_s, 3)),
                *stages,
                ("max_rss_mb", round(peak.max_rss_mb, 1)),
            ),
        )
    )
    return tuple(records)


# --- receive -------------------------------------------------------------------------------------


def _small_mr(n: int) -> tuple[Any, ...]:
    """n small MR instances (pydicom's MR_small, 64x64) with their own UIDs, one study."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = get_testdata_file("MR_small.dcm")
    if source is None:
        raise ConfigError("pydicom test file MR_small.dcm is not installed")
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        out.append(ds)
    return tuple(out)


def _sender(nodelay: bool) -> Any:
    """A pynetdicom SCU, optionally with Nagle's algorithm off on its socket.

    With Nagle on (pynetdicom's default), each C-STORE waits for the peer's delayed ACK
    (about 40-50 ms on Linux loopback), which hides whatever the receiver does.
    """
    import socket

    from pynetdicom import AE

    class NoDelayAE(AE):
        def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> Any:
            sock = super()._create_socket(assoc, address, tls_args)
            if sock.socket is not None:
                sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

    return NoDelayAE(ae_title="STORESCU") if nodelay else AE(ae_title="STORESCU")


def _send(port: int, called: str, datasets: Sequence[Any], *, nodelay: bool = True) -> int:
    """Send every dataset on one association; the number answered with success."""
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    ae = _sender(nodelay)
    ae.add_requested_context(MRImageStorage, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise ConfigError(f"benchmark: association to 127.0.0.1:{port} not established")
    ok = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            ok += int(getattr(status, "Status", -1) == 0)
    finally:
        assoc.release()
    return ok


def _plain_scp(folder: Path, port: int) -> Any:
    """pynetdicom's storescp pattern: write the received bytes, no fsync, no index."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    folder.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with lock, open(folder / f"{uid}.dcm", "wb") as fh:
            fh.write(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="PLAINSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    return ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )


def _store_rates(work: Path, datasets: Sequence[Any]) -> tuple[float, float]:
    """Instances/s of Spool.store (fsync, rename, index) and of a plain file write, no network."""
    from io import BytesIO

    from node.ingest.spool import Spool

    blobs = []
    for ds in datasets:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    spool = Spool(work / "spool_direct", min_free_disk_mb=0)
    t0 = time.perf_counter()
    for blob in blobs:
        spool.store(blob, calling_ae="STORESCU")
    spool_rate = len(blobs) / (time.perf_counter() - t0)
    folder = work / "plain_direct"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, blob in enumerate(blobs):
        (folder / f"{i}.dcm").write_bytes(blob)
    plain_rate = len(blobs) / (time.perf_counter() - t0)
    return spool_rate, plain_rate


@contextlib.contextmanager
def bench_receiver(root: Path, *, database_url: str | None = None) -> Iterator[tuple[Any, Any]]:
    """A fresh spool under `root` and the node's Receiver on a free port (AE NEURONODE, caller
    STORESCU on loopback), started; yields (receiver, spool), stops the receiver after."""
    with bench_receivers(root, database_url=database_url) as (rx, spool, _pids):
        yield rx, spool


@contextlib.contextmanager
def bench_receivers(
    root: Path, *, database_url: str | None = None, processes: int = 1
) -> Iterator[tuple[Any, Any, tuple[int, ...]]]:
    """`bench_receiver` with `processes` receiver processes on the one port, as `serve` runs
    them (node.receiver_processes); yields (receiver, spool, the other processes' pids)."""
    from node.config import AllowedCaller, LoggingSettings, StorageSettings
    from node.ingest.processes import ReceiverProcesses
    from node.ingest.receive import Receiver
    from node.ingest.spool import Spool

    spool = Spool(root, min_free_disk_mb=0, database_url=database_url)
    settings = NodeSettings(
        ae_title="NEURONODE",
        port=free_port(),
        allowed_callers=(AllowedCaller(ae_title="STORESCU", host="127.0.0.1"),),
        receiver_processes=processes,
    )
    rx = Receiver(settings, spool, shared_port=processes > 1)
    rx.start()
    others = None
    try:
        if processes > 1:
            rules = Rules(
                node=settings,
                storage=StorageSettings(spool_dir=root, min_free_disk_mb=0),
                logging=LoggingSettings(format="json", level="warning"),
                tasks={},
            )
            others = ReceiverProcesses(
                rules, port=rx.port, log_key=b"bench" * 8, on_store=lambda _o, _r: None
            )
            others.start()
        yield rx, spool, others.pids if others is not None else ()
    finally:
        if others is not None:
            others.stop(2.0)
        rx.stop(2.0)


def _rate_into_node(work: Path, n: int, *, nodelay: bool, tag: str) -> tuple[float, int]:
    """Instances/s of one association into a fresh Receiver + Spool, and files in its spool."""
    datasets = _small_mr(n)
    root = work / f"spool_{tag}"
    with bench_receiver(root) as (rx, _spool):
        t0 = time.perf_counter()
        ok = _send(rx.port, "NEURONODE", datasets, nodelay=nodelay)
        rate = n / (time.perf_counter() - t0)
    if ok != n:
        raise ConfigError(f"benchmark: the node acknowledged {ok} of {n} instances")
    return rate, len(list((root / "instances").rglob("*.dcm")))


def _rate_into_plain(work: Path, n: int, *, nodelay: bool, tag: str) -> float:
    """Instances/s of one association into the plain storage SCP."""
    datasets = _small_mr(n)
    port = free_port()
    server = _plain_scp(work / f"plain_{tag}", port)
    try:
        t0 = time.perf_counter()
        ok = _send(port, "PLAINSCP", datasets, nodelay=nodelay)
        rate = n / (time.perf_counter() - t0)
    finally:
        server.shutdown()
    if ok != n:
        raise ConfigError(f"benchmark: the plain SCP acknowledged {ok} of {n} instances")
    return rate


def bench_receive(work: Path, settings: BenchSettings) -> BenchRecord:
    """C-STORE into the node (fsync + rename + SQLite index) vs a plain SCP writing files."""
    n = settings.n_instances
    node_rates: list[float] = []
    plain_rates: list[float] = []
    stored = 0
    for k in range(max(1, settings.repeat)):
        rate, stored = _rate_into_node(work, n, nodelay=True, tag=str(k))
        node_rates.append(rate)
        plain_rates.append(_rate_into_plain(work, n, nodelay=True, tag=str(k)))
    node_rate = statistics.median(node_rates)
    plain_rate = statistics.median(plain_rates)
    # The same with pynetdicom's default sender (Nagle on): the delayed-ACK floor.
    nagle_n = max(1, min(n, 40))
    nagle_node, _ = _rate_into_node(work, nagle_n, nodelay=False, tag="nagle")
    nagle_plain = _rate_into_plain(work, nagle_n, nodelay=False, tag="nagle")
    spool_rate, write_rate = _store_rates(work, _small_mr(n))
    return BenchRecord(
        name="receive",
        figure=round(node_rate, 1),
        unit="instances/s",
        reference=round(plain_rate, 1),
        reference_what="pynetdicom SCP writing files (no fsync, no index)",
        ratio=_ratio(node_rate, plain_rate),
        ratio_what="node / plain SCP (the cost of durability)",
        details=(
            ("instances", n),
            ("files_in_spool", stored),
            ("matrix", "64x64 (pydicom MR_small)"),
            ("sender", "pynetdicom, 1 association, TCP_NODELAY"),
            ("nagle_sender_node_per_s", round(nagle_node, 1)),
            ("nagle_sender_plain_per_s", round(nagle_plain, 1)),
            ("spool_store_per_s", round(spool_rate, 1)),
            ("plain_write_per_s", round(write_rate, 1)),
        ),
    )


# --- ingest: the node beside Orthanc and dcmtk storescp, dcmtk storescu as the sender ---------


def write_ingest_instances(folder: Path, n: int, size: int) -> tuple[Path, ...]:
    """n MR instances of size x size 12-bit random pixels, one series, as Part 10 files."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = get_testdata_file("MR_small.dcm")
    if source is None:
        raise ConfigError("pydicom test file MR_small.dcm is not installed")
    template = pydicom.dcmread(source)
    template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
    template.Rows = template.Columns = size
    template.BitsAllocated, template.BitsStored, template.HighBit = 16, 12, 11
    template.PixelRepresentation = 0
    pixels = np.random.default_rng(0).integers(0, 4096, (size, size), dtype=np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = template.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.PixelData = np.roll(pixels, i).tobytes()
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return tuple(paths)


def storescu_rate(
    port: int, called: str, paths: Sequence[Path], *, associations: int, nodelay: bool
) -> float:
    """Instances/s of dcmtk storescu sending every file over `associations` at once.

    `nodelay`: TCP_NODELAY=1 in storescu's environment (Debian's dcmtk leaves Nagle on
    otherwise: a stock storescu).
    """
    import subprocess

    from node.lab.orthanc import require_dcmtk

    tool = require_dcmtk("storescu")
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    chunks = [paths[i::associations] for i in range(associations)]
    # Start every run with nothing left to write back: storescp (no fsync) leaves hundreds of
    # megabytes of dirty pages that would otherwise be flushed during the next receiver's run.
    os.sync()
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [tool, "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port), *map(str, c)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for c in chunks
    ]
    failed = [p.communicate(timeout=600)[1] for p in procs if p.wait(timeout=600) != 0]
    elapsed = time.perf_counter() - t0
    if failed:
        raise ConfigError(f"benchmark: storescu to {called} failed: {failed[0][-300:]!r}")
    return len(paths) / elapsed


def _process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process or by process `pid` (Linux)."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class _IngestNode:
    """A Receiver + Spool on a fresh spool folder per run (the same instances every run), with
    `processes` receiver processes on its port as `serve` runs them (node.receiver_processes)."""

    work: Path
    processes: int = 1
    runs: int = 0
    # associations -> [group commits, instances they carried], over every run
    grouping: dict[int, list[int]] = field(default_factory=dict)
    cpu_ms: dict[int, list[float]] = field(default_factory=dict)  # per instance, by associations
    sync_order: str = ""  # the spool's SyncOrder (how its syncs overlap on this file system)

    def per_group(self, associations: int) -> float:
        groups, instances = self.grouping.get(associations, [0, 0])
        return round(instances / max(1, groups), 2)

    def rate(self, paths: Sequence[Path], *, associations: int, nodelay: bool) -> float:
        self.runs += 1
        root = self.work / f"spool_{self.runs}"
        with bench_receivers(root, processes=self.processes) as (rx, spool, pids):
            cpu0 = _process_cpu_s() + sum(_process_cpu_s(p) for p in pids)
            rate = storescu_rate(
                rx.port, "NEURONODE", paths, associations=associations, nodelay=nodelay
            )
            cpu1 = _process_cpu_s() + sum(_process_cpu_s(p) for p in pids)
        if nodelay:
            cpu_ms = (cpu1 - cpu0) * 1000 / len(paths)
            self.cpu_ms.setdefault(associations, []).append(cpu_ms)
        n = spool.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
        self.sync_order = spool.sync_order.value
        tally = self.grouping.setdefault(associations, [0, 0])
        # This process's group commits (the other processes' are not seen from here).
        tally[0] += spool.groups.groups
        tally[1] += spool.groups.instances
        spool.close()
        if n != len(paths):
            raise ConfigError(f"benchmark: the node indexed {n} of {len(paths)} instances")
        shutil.rmtree(root, ignore_errors=True)
        return rate


def _orthanc_empty(orthanc: Any) -> None:
    import urllib.request

    for study in orthanc.get("/studies"):
        req = urllib.request.Request(f"{orthanc.url}/studies/{study}", method="DELETE")
        with urllib.request.urlopen(req, timeout=60):
            pass


def _storescp(folder: Path, port: int) -> Any:
    """dcmtk storescp writing files, no fsync, no index (one process per association)."""
    import subprocess

    from node.lab.orthanc import system_tool

    tool = system_tool("storescp")
    if tool is None:
        raise ConfigError("dcmtk storescp is not installed (apt-get install dcmtk)")
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(
        [tool, "--fork", "-od", str(folder), "-aet", "STORESCP", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise ConfigError("benchmark: dcmtk storescp did not listen")


def _spread(values: Sequence[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def bench_ingest(work: Path, settings: BenchSettings) -> tuple[BenchRecord, ...]:
    """Issue 15: durable ingest against Orthanc (SQLite, its fsync) with 1 and 4 storescu
    associations, the stock (Nagle) sender against a TCP_NODELAY one, dcmtk storescp as the
    no-fsync ceiling; receivers interleaved, medians over `repeat` (at least 3) rounds."""
    import signal

    from node.lab.orthanc import OrthancError, OrthancServer, system_tool

    if system_tool("storescu") is None or system_tool("storescp") is None:
        return (_skipped("ingest", "dcmtk (storescu, storescp) is not installed"),)
    paths = write_ingest_instances(
        work / "ingest_instances", settings.ingest_instances, settings.ingest_size
    )
    mb = sum(p.stat().st_size for p in paths) / _MB
    small = write_ingest_instances(
        work / "ingest_small", settings.ingest_instances, settings.nagle_size
    )
    node = _IngestNode(work / "ingest_node", processes=settings.receiver_processes)
    # Orthanc's dcmtk reads TCP_NODELAY too: without it Orthanc answers each C-STORE behind
    # Nagle (about 20 instances/s); the reference is Orthanc at its best.
    before = os.environ.get("TCP_NODELAY")
    os.environ["TCP_NODELAY"] = "1"
    try:
        orthanc = OrthancServer(work / "orthanc", node_port=free_port(), dicomweb=False)
        orthanc.start()
    except OrthancError as exc:
        return (_skipped("ingest", f"Orthanc: {exc}"),)
    finally:
        if before is None:
            os.environ.pop("TCP_NODELAY", None)
        else:
            os.environ["TCP_NODELAY"] = before
    # Orthanc's CPU time per instance: a figure the machine's other load moves much less
    # than the rates (the node's is this process's, where the receiver runs).
    if orthanc._proc is None:
        raise ConfigError("benchmark: Orthanc is not running")
    orthanc_pid = orthanc._proc.pid
    orthanc_cpu_ms: dict[int, list[float]] = {}
    scp_port = free_port()
    scp = _storescp(work / "storescp", scp_port)
    figures: dict[str, list[float]] = {
        k: [] for k in ("node1", "orthanc1", "node4", "orthanc4", "stock1", "nodelay1", "storescp1")
    }
    try:
        for _ in range(max(3, settings.repeat)):
            for assoc in (1, 4):
                figures[f"node{assoc}"].append(node.rate(paths, associations=assoc, nodelay=True))
                cpu0 = _process_cpu_s(orthanc_pid)
                figures[f"orthanc{assoc}"].append(
                    storescu_rate(
                        orthanc.dicom_port, orthanc.aet, paths, associations=assoc, nodelay=True
                    )
                )
                orthanc_cpu_ms.setdefault(assoc, []).append(
                    (_process_cpu_s(orthanc_pid) - cpu0) * 1000 / len(paths)
                )
                _orthanc_empty(orthanc)
            figures["stock1"].append(node.rate(small, associations=1, nodelay=False))
            figures["nodelay1"].append(node.rate(small, associations=1, nodelay=True))
            figures["storescp1"].append(
                storescu_rate(scp_port, "STORESCP", paths, associations=1, nodelay=True)
            )
            for received in (work / "storescp").iterdir():
                received.unlink()
    finally:
        orthanc.stop()
        with suppress(OSError):
            os.killpg(scp.pid, signal.SIGTERM)
        scp.wait(timeout=10)
    med = {k: statistics.median(v) for k, v in figures.items()}
    common = (
        ("instances", len(paths)),
        ("matrix", f"{settings.ingest_size}x{settings.ingest_size}"),
        ("mb", round(mb, 1)),
        ("rounds", len(figures["node1"])),
        ("sender", "dcmtk storescu, TCP_NODELAY=1"),
        ("receiver_processes", settings.receiver_processes),
    )
    records = []
    for assoc in (1, 4):
        n, o = med[f"node{assoc}"], med[f"orthanc{assoc}"]
        records.append(
            BenchRecord(
                name=f"ingest:{assoc}_assoc",
                figure=round(n, 1),
                unit="instances/s",
                reference=round(o, 1),
                reference_what=f"Orthanc {'.'.join(map(str, orthanc.version))} (SQLite, fsync)",
                ratio=_ratio(n, o),
                ratio_what="node / Orthanc, both durable",
                target=">= 1.0x Orthanc (issue 15)",
                met=n >= o,
                details=(
                    *common,
                    ("associations", assoc),
                    ("node_spread", _spread(figures[f"node{assoc}"])),
                    ("orthanc_spread", _spread(figures[f"orthanc{assoc}"])),
                    ("storescp_no_fsync_per_s", round(med["storescp1"], 1)),
                    ("instances_per_group_commit", node.per_group(assoc)),
                    ("sync_order", node.sync_order),
                    ("node_cpu_ms_per_instance", round(statistics.median(node.cpu_ms[assoc]), 2)),
                    (
                        "orthanc_cpu_ms_per_instance",
                        round(statistics.median(orthanc_cpu_ms[assoc]), 2),
                    ),
                ),
            )
        )
    stock, fast = med["stock1"], med["nodelay1"]
    records.append(
        BenchRecord(
            name="ingest:stock_sender",
            figure=round(stock, 1),
            unit="instances/s",
            reference=round(fast, 1),
            reference_what="the same node, storescu with TCP_NODELAY=1",
            ratio=_ratio(stock, fast),
            ratio_what="stock storescu (Nagle on) / TCP_NODELAY storescu",
            target=">= 0.9 (issue 15)",
            met=stock >= 0.9 * fast,
            details=(
                ("instances", len(small)),
                ("matrix", f"{settings.nagle_size}x{settings.nagle_size}"),
                ("kb_each", round(small[0].stat().st_size / _KB)),
                ("rounds", len(figures["stock1"])),
                ("stock_spread", _spread(figures["stock1"])),
                ("nodelay_spread", _spread(figures["nodelay1"])),
            ),
        )
    )
    return tuple(records)


# --- dicomio -------------------------------------------------------------------------------------


def _reference_load(paths: Sequence[Path]) -> int:
    import pydicom

    total = 0
    for path in paths:
        total += int(pydicom.dcmread(path).pixel_array.size)
    return total


def bench_dicomio(study: BenchStudy, settings: BenchSettings) -> BenchRecord:
    """Loading the study into ordered volumes vs pydicom dcmread + pixel_array of the same files."""
    from node.dicom.volumes import scan_study

    _reference_load(study.paths[:2])  # warm the decoders and the page cache of both
    scan_study(study.paths[:2])
    with peak_memory() as peak:
        load_s, loaded = timed(lambda: scan_study(study.paths), settings.repeat)
    ref_s, _ = timed(lambda: _reference_load(study.paths), settings.repeat)
    return BenchRecord(
        name="dicomio",
        figure=round(load_s, 3),
        unit="s",
        reference=round(ref_s, 3),
        reference_what=f"pydicom dcmread + pixel_array of the {len(study.paths)} files",
        ratio=_ratio(load_s, ref_s),
        ratio_what="scan_study / dcmread + pixel_array",
        peak_mb=_mb(peak.mb),
        growth_mb=_mb(peak.growth_mb),
        details=(
            ("files", len(study.paths)),
            ("volumes", len(loaded.volumes)),
            ("problems", len(loaded.problems)),
        ),
    )


# --- running and printing ------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{text} {unit}".strip()


def format_line(r: BenchRecord) -> str:
    """One line per figure: what was measured, the reference, the ratio, the target."""
    if r.skipped:
        return f"{r.name:<28} skipped: {r.skipped}"
    target = f"  target {r.target}: {'met' if r.met else 'NOT met'}" if r.target else ""
    mem = (
        f"  peak RSS {r.peak_mb:.0f} MB (+{r.growth_mb or 0:.0f} MB)"
        if r.peak_mb is not None
        else ""
    )
    extra = ", ".join(f"{k}={v}" for k, v in r.details)
    return (
        f"{r.name:<28} {_fmt(r.figure, r.unit)}  reference {_fmt(r.reference, r.unit)}"
        f" ({r.reference_what})  ratio {_fmt(r.ratio)} [{r.ratio_what}]{mem}{target}\n"
        f"{'':<28} {extra}"
    )


def format_table(records: Sequence[BenchRecord]) -> str:
    """The summary table printed at the end of a run."""
    head = f"{'benchmark':<28} {'figure':>18} {'reference':>18} {'ratio':>8} {'peak MB':>9}  target"
    rows = [head, "-" * len(head)]
    for r in records:
        if r.skipped:
            rows.append(f"{r.name:<28} {'skipped':>18}")
            continue
        target = f"{r.target}: {'met' if r.met else 'NOT met'}" if r.target else ""
        peak = f"{r.peak_mb:.0f} +{r.growth_mb or 0:.0f}" if r.peak_mb is not None else "-"
        rows.append(
            f"{r.name:<28} {_fmt(r.figure, r.unit):>18} {_fmt(r.reference, r.unit):>18}"
            f" {_fmt(r.ratio):>8} {peak:>9}  {target}"
        )
    return "\n".join(rows)


def run_benchmarks(
    names: Sequence[str],
    work: Path,
    settings: BenchSettings,
    emit: Callable[[BenchRecord], None] = lambda r: None,
) -> tuple[BenchRecord, ...]:
    """Run the named benchmarks in the fixed order, sharing one synthetic study."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    records: list[BenchRecord] = []

    def add(*new: BenchRecord) -> None:
        for r in new:
            records.append(r)
            emit(r)

    study: BenchStudy | None = None
    if "synth" in names:
        record, study = bench_synth(work, settings)
        add(record)
    if study is None and any(n in names for n in ("sequence", "specialists", "dicomio")):
        study = make_study(work, settings)
    if "sequence" in names and study is not None:
        add(bench_sequence(study, work, settings))
    if "specialists" in names and study is not None:
        add(*bench_specialists(study, work, settings))
    if "receive" in names:
        add(bench_receive(work, settings))
    if "ingest" in names:
        add(*bench_ingest(work, settings))
    if "dicomio" in names and study is not None:
        add(bench_dicomio(study, settings))
    # The service-level figures start their own node processes, Orthanc and PostgreSQL.
    if "latency" in names:
        (work / "latency").mkdir(parents=True, exist_ok=True)
        from node.lab.bench_latency import bench_latency

        add(*bench_latency(work / "latency", settings))
    if "memory" in names:
        (work / "memory").mkdir(parents=True, exist_ok=True)
        from node.lab.bench_memory import bench_records as memory_records

        add(*memory_records(work / "memory"))
    if "scale" in names:
        (work / "scale").mkdir(parents=True, exist_ok=True)
        from node.lab.bench_scale import bench_records as scale_records

        add(*scale_records(work / "scale"))
    return tuple(records)


def machine() -> dict[str, Any]:
    """Date, CPU count, load and torch threads, printed and stored with the figures."""
    import torch

    load = os.getloadavg()
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in load],
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
    }


def as_json(records: Sequence[BenchRecord], host: dict[str, Any]) -> dict[str, Any]:
    """The --out file: the machine and every record."""
    out = []
    for r in records:
        d = asdict(r)
        d["details"] = dict(r.details)
        out.append(d)
    return {"machine": host, "records": out}


def cmd_bench(args: BenchArgs) -> int:
    """Print each benchmark's figure, reference and ratio, then a summary; 0 if all targets met."""
    import torch

    configure(fmt="json", level="error", stream=sys.stderr)
    only = tuple(args.only or BENCHMARKS)
    repeat = args.repeat
    if repeat < 1:
        raise ConfigError("--repeat must be at least 1")
    if args.ingest_instances < 1:
        raise ConfigError("--ingest-instances must be at least 1")
    settings = replace(BenchSettings(), repeat=repeat, ingest_instances=args.ingest_instances)
    if args.receiver_processes is not None:
        if not 1 <= args.receiver_processes <= 16:
            raise ConfigError("--receiver-processes must be 1 to 16")
        settings = replace(settings, receiver_processes=args.receiver_processes)
    torch.set_num_threads(2)
    host = machine()
    print(
        f"neuronode bench {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC:"
        f" {host['cpu_count']} CPUs, load {host['load_avg_1_5_15']},"
        f" torch {host['torch_version']} threads {host['torch_threads']}, repeat {repeat}"
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="neuronode-bench-") as tmp:
        records = run_benchmarks(
            only, Path(tmp), settings, emit=lambda r: print(format_line(r), flush=True)
        )
    elapsed = time.perf_counter() - t0
    host["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    host["elapsed_s"] = round(elapsed, 1)
    print()
    print(format_table(records))
    print(f"\n{len(records)} figures in {elapsed:.0f} s; load after {host['load_avg_after']}")
    out = args.out
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(as_json(records, host), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    missed = [r.name for r in records if r.met is False]
    return 1 if missed else 0

"""Faults of issue 14, each pinned: broken data acknowledged, a study killed by one file or by
node crashes, a dead study that cannot come back, trickling studies, ENOSPC orphans, a
scheduler that floods its log, and one slow destination stalling the others."""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs

from node.config import Rules
from node.deliver.outbox import Outbox
from node.errors import StoreStatus
from node.ingest.completion import ReadyDecision, ReadyKind, decide_ready
from node.ingest.spool import Spool, instance_relpath, parse_instance
from node.lab.orthanc import free_port
from node.pipeline.jobs import JobQueue
from node.records import DeliveryState, SendResult, StudyJob, StudyOutcome, StudyStatus
from tests.conftest import pydicom_file


def _mr(study: str, series: str, sop: str, *, pixels: bytes | None = None) -> bytes:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    if pixels is not None:
        ds.PixelData = pixels
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", min_free_disk_mb=0)
    yield s
    s.close()


# --- 2: what does not parse to the end gets no success; one file never costs the study ------


def test_short_pixel_data_is_quarantined_with_a_failure_status(spool: Spool) -> None:
    good = _mr("1.2.3", "1.2.3.1", "1.2.3.1.1")
    full = len(pydicom.dcmread(io.BytesIO(good)).PixelData)
    short = _mr("1.2.3", "1.2.3.1", "1.2.3.1.2", pixels=b"\0" * (full - 100))
    assert spool.store(good, calling_ae="A").status == StoreStatus.SUCCESS
    result = spool.store(short, calling_ae="A")
    assert result.status == StoreStatus.CANNOT_UNDERSTAND
    assert result.quarantine_path is not None and result.reason.startswith("unparseable")
    assert spool.instance_paths("1.2.3") == (spool.root / "instances/1.2.3/1.2.3.1/1.2.3.1.1.dcm",)


def test_truncated_instance_is_quarantined(spool: Spool) -> None:
    data = _mr("1.2.3", "1.2.3.1", "1.2.3.1.1")
    result = spool.store(data[: len(data) - 3000], calling_ae="A")
    assert result.status != StoreStatus.SUCCESS and result.quarantine_path is not None


def test_one_file_that_pydicom_cannot_read_costs_only_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.dicom import volumes

    paths = []
    for i in range(1, 4):
        p = tmp_path / f"{i}.dcm"
        p.write_bytes(_mr("1.2.3", "1.2.3.1", f"1.2.3.1.{i}"))
        paths.append(p)
    real = pydicom.dcmread

    def dcmread(path: object, *args: object, **kwargs: object) -> pydicom.Dataset:
        if Path(str(path)).name == "2.dcm":
            raise NotImplementedError("ZZSECRET decoder for this value is missing")
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    loaded = volumes.scan_study(paths)
    assert len(loaded.volumes) == 1 and loaded.volumes[0].n_instances == 2
    (problem,) = loaded.problems
    assert problem.path.name == "2.dcm" and problem.reason == "NotImplementedError"


# --- 3: a node crash is not the study's fault; a re-send brings a dead study back -----------


def test_crashes_of_the_node_never_dead_letter_a_study(spool: Spool) -> None:
    spool.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"), calling_ae="A")
    JobQueue(spool.index, owner="boot0", lease_s=60, max_attempts=3).enqueue("1.2.3")
    for boot in range(1, 6):  # five kill -9 while processing
        assert JobQueue(spool.index, owner=f"boot{boot - 1}", lease_s=60).claim() is not None
        assert JobQueue(spool.index, owner=f"boot{boot}", lease_s=60).release_orphans() == 1
    q = JobQueue(spool.index, owner="last", lease_s=60, max_attempts=3)
    job = q.claim()
    assert job is not None and job.attempt == 1


def test_resending_an_instance_reopens_a_dead_study(spool: Spool) -> None:
    data = _mr("1.2.3", "1.2.3.1", "1.2.3.1.1")
    spool.store(data, calling_ae="A")
    q = JobQueue(spool.index, owner="w", lease_s=60, max_attempts=1)
    q.enqueue("1.2.3")
    job = q.claim()
    assert job is not None
    assert q.fail(job, error="RuntimeError", permanent=False) == StudyStatus.DEAD
    again = spool.store(data, calling_ae="A")
    assert again.instance is not None and again.instance.duplicate
    assert spool.index.query("SELECT state FROM studies")[0]["state"] == "receiving"
    assert q.enqueue("1.2.3") is not None
    retry = q.claim()
    assert retry is not None and retry.reopened and retry.attempt == 1


# --- 8: orphans after ENOSPC are reconciled at start ---------------------------------------


def test_start_up_sweep_indexes_or_quarantines_unknown_spool_files(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool(root, min_free_disk_mb=0).close()
    data = _mr("1.2.3", "1.2.3.1", "1.2.3.1.1")
    orphan = root / instance_relpath(parse_instance(data).ref)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(data)  # renamed into place, then the index write failed
    junk = root / "instances" / "1.2.3" / "1.2.3.1" / "1.2.3.1.9.dcm"
    junk.write_bytes(data[:2000])
    s = Spool(root, min_free_disk_mb=0)
    try:
        assert s.instance_paths("1.2.3") == (orphan,)
        assert not junk.exists()
        (reason,) = s.index.query("SELECT reason FROM quarantine")
        assert str(reason["reason"]).startswith("orphan in the spool")
        assert s.receiving_studies()[0].study_uid == "1.2.3"
    finally:
        s.close()


# --- 9: a study that keeps trickling is processed after max_wait_s ----------------------------


def test_max_wait_ends_a_trickling_study() -> None:
    def decide(max_wait_s: float | None) -> ReadyDecision:
        return decide_ready(
            last_instance_at=995.0,
            now=1000.0,
            first_instance_at=0.0,
            max_wait_s=max_wait_s,
            quiet_period_s=20.0,
            series=(),
            use_expected_counts=False,
        )

    assert not decide(None).ready  # without a maximum: waits for ever
    done = decide(600.0)
    assert done.ready and done.kind is ReadyKind.MAX_WAIT


def _rules(tmp_path: Path, **extra: object) -> Rules:
    doc: dict[str, object] = {
        "node": {"port": free_port(), "accept_unknown_callers": True},
        "http": {"port": 0},
        "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_disk_mb": 0},
        "completion": {"quiet_period_s": 1.0, "poll_interval_s": 0.05, "max_wait_s": 2.0},
        "processing": {"workers": 1, "lease_s": 30},
    }
    doc.update(extra)
    return Rules.model_validate(doc)


def _outcome(job: StudyJob) -> StudyOutcome:
    return StudyOutcome(
        study_uid=job.study_uid,
        audit_path=Path("/dev/null"),
        n_series=1,
        n_instances=1,
        n_decode_errors=0,
    )


def test_node_processes_a_trickling_study_and_reopens_it(tmp_path: Path) -> None:
    from node.service import Node

    calls: list[StudyJob] = []

    def record(job: StudyJob) -> StudyOutcome:
        calls.append(job)
        return _outcome(job)

    node = Node(_rules(tmp_path), processor=record)
    node.start()
    try:
        started = time.monotonic()
        i = 0
        while not calls and time.monotonic() - started < 6:
            i += 1
            node.spool.store(_mr("1.2.3", "1.2.3.1", f"1.2.3.1.{i}"), calling_ae="A")
            time.sleep(0.3)  # always inside the 1 s quiet period
        assert calls, "the trickling study was never processed"
        assert time.monotonic() - started < 4
        n_first = len(calls[0].instance_paths)
        node.spool.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.999"), calling_ae="A")
        deadline = time.monotonic() + 6
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 2 and calls[-1].reopened
        assert len(calls[-1].instance_paths) > n_first
    finally:
        node.stop(grace_s=2)


# --- 7: a scheduler that fails on every turn logs rarely --------------------------------------


def test_scheduler_error_while_the_disk_is_full_is_rate_limited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.service import Node

    node = Node(_rules(tmp_path), processor=_outcome)

    def full() -> tuple[object, ...]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node.spool, "receiving_studies", full)
    with capture_logs() as logs:
        node.start()
        time.sleep(2.0)  # 40 turns at a 0.05 s poll interval
        node.stop(grace_s=1)
    errors = [e for e in logs if e["event"] == "scheduler_error"]
    assert len(errors) == 1 and errors[0]["error_type"] == "OSError"


# --- 6: one slow destination never stalls another; backoff at its own pace -------------------


def test_a_destination_that_never_answers_does_not_stall_another(tmp_path: Path) -> None:
    from node.service import Node

    release = threading.Event()
    attempts: dict[str, list[float]] = {"slow": [], "busy": []}

    def send(dest: object, paths: Sequence[Path]) -> tuple[SendResult, ...]:
        name = str(getattr(dest, "name", ""))
        attempts[name].append(time.monotonic())
        if name == "slow":
            release.wait(30)
        return tuple(
            SendResult(
                sop_instance_uid=p.stem,
                sent_sop_instance_uid=p.stem,
                sent_sop_class_uid="",
                status_code=0xA700,
                delivered=False,
                retryable=True,
                message="out of resources",
            )
            for p in paths
        )

    dests = [
        {"kind": "dicom", "name": n, "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
        for n in ("slow", "busy")
    ]
    rules = _rules(
        tmp_path,
        destinations=dests,
        delivery={"backoff_initial_s": 0.3, "backoff_max_s": 0.6, "max_attempts": 100},
    )
    (tmp_path / "spool").mkdir()
    ds = pydicom.dcmread(io.BytesIO(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1")))
    with Outbox(tmp_path / "spool") as outbox:
        outbox.enqueue([ds], ("slow", "busy"), now=time.time())
    node = Node(rules, processor=_outcome, send=send)
    node.start()
    try:
        time.sleep(4.0)
        busy = attempts["busy"]
        assert len(attempts["slow"]) == 1  # still inside its first send
        assert len(busy) >= 5, busy  # retried at its 0.3-0.6 s backoff meanwhile
        gaps = [b - a for a, b in itertools.pairwise(busy)]
        assert max(gaps) < 1.5
    finally:
        release.set()
        node.stop(grace_s=3)
    with Outbox(tmp_path / "spool") as outbox:
        assert {r.state for r in outbox.all()} == {DeliveryState.PENDING}


# --- 5: no patient data from third-party text; a bad birth date does not cost the SR ----------


def test_a_birth_date_pydicom_cannot_convert_still_gives_results(tmp_path: Path) -> None:
    from node.report.sc import build_heatmap_images
    from node.report.sr import build_sr
    from tests.unit.test_report import OUT, make_result

    with pytest.warns(UserWarning):
        ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
        ds.PatientBirthDate = "ZZDOB0203"
    path = tmp_path / "bad-dob.dcm"
    ds.save_as(path)
    result = make_result(path)
    scs = build_heatmap_images(result, OUT, uid_root=None)
    sr = build_sr(result, scs, uid_root=None)
    for made in (sr, *scs):
        assert "PatientBirthDate" in made and not made.PatientBirthDate
        buf = io.BytesIO()
        made.save_as(buf)
        assert b"ZZDOB" not in buf.getvalue()


def test_python_warnings_go_through_the_log_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import warnings

    from node.log import configure

    stream = io.StringIO()
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    # Earlier tests may have left the warnings logger disabled or detached: start clean.
    py_warnings = logging.getLogger("py.warnings")
    monkeypatch.setattr(py_warnings, "handlers", [])
    monkeypatch.setattr(py_warnings, "propagate", True)
    monkeypatch.setattr(py_warnings, "disabled", False)
    monkeypatch.setattr(py_warnings, "level", logging.NOTSET)
    logging.disable(logging.NOTSET)
    # captureWarnings(True) does nothing when an earlier capture was never switched off, even
    # if showwarning was restored since (pytest does): switch it off first.
    logging.captureWarnings(False)
    try:
        configure("json", "info", stream=stream)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Invalid value for VR DA: 'ZZDOB0203'", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    out = stream.getvalue()
    assert '"logger": "py.warnings"' in out and "third_party_log" in out
    assert "ZZDOB0203" not in out

"""Spool: UID validation, file naming, durable store, duplicates, quarantine, low disk."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import PYDICOM_ROOT_UID, UID

from node.errors import InvalidInstance, SpoolError, StoreStatus
from node.ingest import spool as spool_module
from node.ingest.spool import (
    RECENT_ROWS_S,
    SHARED_LEFTOVER_AGE_S,
    Spool,
    StoreResult,
    SyncOrder,
    _Pending,
    check_instance,
    instance_relpath,
    is_valid_uid,
    parse_instance,
)
from node.records import InstanceRef, StudyStatus
from node.store.db import Row
from node.store.files import fsync_dir, mount_of, write_temp, write_temp_durable
from tests.conftest import pydicom_file

MR = "1.2.840.10008.5.1.4.1.1.4"


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _mr(study: str, series: str, sop: str, **extra: object) -> bytes:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.PatientName = "ZZTESTPHI^SENTINEL"
    for k, v in extra.items():
        setattr(ds, k, v)
    return _bytes(ds)


@pytest.fixture
def spool(tmp_path: Path, database_url: str | None) -> Iterator[Spool]:
    s = Spool(
        tmp_path / "spool",
        min_free_disk_mb=1,
        free_bytes=lambda _p: 10**12,
        database_url=database_url,
    )
    yield s
    s.close()


@pytest.mark.parametrize(
    ("uid", "ok"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", True),
        ("0", True),
        ("1.0.3", True),
        ("2.25.3" + "1" * 58, True),  # exactly 64 characters
        ("2.25.3" + "1" * 59, False),  # 65
        ("1.02.3", False),  # leading zero
        ("1..2", False),
        (".1.2", False),
        ("1.2.", False),
        ("1.2.a", False),
        ("1.2/../3", False),
        ("", False),
        (" 1.2", False),
    ],
)
def test_uid_validation(uid: str, ok: bool) -> None:
    assert is_valid_uid(uid) is ok


def test_spool_naming_uses_only_validated_uids() -> None:
    ref = InstanceRef(
        sop_class_uid=MR,
        sop_instance_uid="1.2.3.4",
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    assert instance_relpath(ref) == Path("instances/1.2.3/1.2.3.1/1.2.3.4.dcm")
    bad = InstanceRef(
        sop_class_uid=MR,
        sop_instance_uid="../../etc/passwd",
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        transfer_syntax_uid="",
    )
    with pytest.raises(InvalidInstance, match="SOPInstanceUID"):
        instance_relpath(bad)


def test_parse_reads_uids_and_hints() -> None:
    p = parse_instance(_mr("1.2.3", "1.2.3.1", "1.2.3.1.7", ImagesInAcquisition=24))
    assert p.ref.study_uid == "1.2.3"
    assert p.ref.series_uid == "1.2.3.1"
    assert p.ref.sop_instance_uid == "1.2.3.1.7"
    assert p.ref.sop_class_uid == MR
    assert p.images_in_acquisition == 24
    assert p.temporal_positions is None


def test_store_writes_bytes_as_received_and_indexes(spool: Spool) -> None:
    data = _mr("1.2.3", "1.2.3.1", "1.2.3.1.1")
    res = spool.store(data, calling_ae="STORESCU", sop_class_uid=MR)
    assert res.status == StoreStatus.SUCCESS
    assert res.instance is not None and not res.instance.duplicate
    path = spool.root / "instances/1.2.3/1.2.3.1/1.2.3.1.1.dcm"
    assert res.instance.path == path
    assert path.read_bytes() == data
    assert list((spool.root / "tmp").iterdir()) == []
    rows = spool.index.query("SELECT state, n_instances FROM studies WHERE study_uid='1.2.3'")
    assert (rows[0]["state"], rows[0]["n_instances"]) == (StudyStatus.RECEIVING, 1)
    assert spool.instance_paths("1.2.3") == (path,)


def test_duplicate_sop_is_stored_once(spool: Spool) -> None:
    data = _mr("1.2.3", "1.2.3.1", "1.2.3.1.1")
    spool.store(data, calling_ae="A")
    mtime = (spool.root / "instances/1.2.3/1.2.3.1/1.2.3.1.1.dcm").stat().st_mtime_ns
    again = spool.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1", SeriesNumber=99), calling_ae="B")
    assert again.status == StoreStatus.SUCCESS
    assert again.instance is not None and again.instance.duplicate
    assert (spool.root / "instances/1.2.3/1.2.3.1/1.2.3.1.1.dcm").stat().st_mtime_ns == mtime
    assert spool.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1
    assert spool.index.query("SELECT n_instances FROM studies")[0]["n_instances"] == 1


def test_concurrent_same_sop_is_stored_once(spool: Spool) -> None:
    data = _mr("1.2.3", "1.2.3.1", "1.2.3.1.1")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(spool.store(data, calling_ae="A")))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.instance.duplicate for r in results if r.instance) == [False] + [True] * 5
    assert spool.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1


def test_invalid_uid_is_quarantined_without_phi(spool: Spool) -> None:
    data = _mr("1.2.3", "1.2.abc", "1.2.3.1.1")
    res = spool.store(data, calling_ae="STORESCU")
    assert res.status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert res.quarantine_path is not None and res.quarantine_path.read_bytes() == data
    reason_file = res.quarantine_path.with_name(res.quarantine_path.stem + ".reason.json")
    reason = json.loads(reason_file.read_text())
    assert reason["reason"] == "invalid SeriesInstanceUID"
    assert reason["calling_ae"] == "STORESCU"
    assert "ZZTESTPHI" not in reason_file.read_text()
    assert list((spool.root / "instances").iterdir()) == []


def test_unparseable_bytes_are_quarantined_cannot_understand(spool: Spool) -> None:
    res = spool.store(b"\x00" * 128 + b"DICM" + b"\xff" * 40, calling_ae="X")
    assert res.status in (
        StoreStatus.CANNOT_UNDERSTAND,
        StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    )
    assert res.quarantine_path is not None and res.quarantine_path.exists()
    assert spool.index.query("SELECT COUNT(*) AS n FROM quarantine")[0]["n"] == 1


def test_missing_study_uid_is_quarantined(spool: Spool) -> None:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    del ds.StudyInstanceUID
    res = spool.store(_bytes(ds), calling_ae="X")
    assert res.status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert res.reason == "missing StudyInstanceUID"


def test_sop_class_mismatch_is_quarantined(spool: Spool) -> None:
    res = spool.store(
        _mr("1.2.3", "1.2.3.1", "1.2.3.1.1"),
        calling_ae="X",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )
    assert res.status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert res.instance is None


def test_low_disk_answers_a700_and_writes_nothing(tmp_path: Path) -> None:
    free = {"bytes": 10**12}
    s = Spool(tmp_path / "s", min_free_disk_mb=100, free_bytes=lambda _p: free["bytes"])
    try:
        free["bytes"] = 100 * 1024 * 1024 + 10  # above the floor, but not after this instance
        res = s.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"), calling_ae="X")
        assert res.status == StoreStatus.OUT_OF_RESOURCES
        assert int(res.status) == 0xA700
        assert list((s.root / "instances").iterdir()) == []
        assert list((s.root / "tmp").iterdir()) == []
        assert s.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
        free["bytes"] = 10**12
        assert s.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"), calling_ae="X").status == 0
    finally:
        s.close()


def test_instance_for_done_study_reopens_it(spool: Spool) -> None:
    spool.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"), calling_ae="A")
    with spool.index.transaction() as db:
        db.execute("UPDATE studies SET state='done'")
    spool.store(_mr("1.2.3", "1.2.3.2", "1.2.3.2.1"), calling_ae="A")
    row = spool.index.query("SELECT state, reopened, n_instances FROM studies")[0]
    assert (row["state"], row["reopened"], row["n_instances"]) == ("receiving", 1, 2)


def test_receiving_studies_reports_counts_and_hints(spool: Spool) -> None:
    for i in range(3):
        spool.store(
            _mr("1.2.3", "1.2.3.1", f"1.2.3.1.{i + 1}", ImagesInAcquisition=4), calling_ae="A"
        )
    spool.store(_mr("1.2.3", "1.2.3.2", "1.2.3.2.1"), calling_ae="A")
    (study,) = spool.receiving_studies()
    counts = {s.series_uid: (s.received, s.expected) for s in study.series}
    assert counts == {"1.2.3.1": (3, 4), "1.2.3.2": (1, None)}


def test_leftover_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    (tmp_path / "s" / "tmp").mkdir(parents=True)
    (tmp_path / "s" / "tmp" / "dead.part").write_bytes(b"x")
    s = Spool(tmp_path / "s", min_free_disk_mb=0)
    s.close()
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_overlong_uid_is_quarantined_not_truncated(spool: Spool) -> None:
    # Exactly 64 characters, the longest valid UID (generate_uid() is sometimes shorter, and
    # then the series UID below would still fit).
    study = PYDICOM_ROOT_UID + "1" * (64 - len(PYDICOM_ROOT_UID))
    ok = spool.store(_mr(study, "1.2.3.1", "1.2.3.1.1"), calling_ae="A")
    assert ok.instance is not None
    assert ok.instance.path.relative_to(spool.root).parts[:2] == ("instances", study)
    res = spool.store(_mr("1.2.3", study + ".1", "1.2.3.1.2"), calling_ae="A")
    assert res.status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert res.reason == "invalid SeriesInstanceUID"


def test_cmd_status_reports_states_queue_and_failures_without_uids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:

    # The command configures process-wide logging onto stderr; keep pytest's streams clean.
    monkeypatch.setattr("node.log.configure", lambda *_a, **_k: None)

    from node.cli.operate import StatusArgs, cmd_status
    from node.pipeline.jobs import JobQueue

    spool_dir = tmp_path / "sp"
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"storage:\n  spool_dir: {spool_dir}\n  min_free_disk_mb: 0\n")
    args = StatusArgs(rules=rules, json=True)
    assert cmd_status(args) == 1  # no index yet
    capsys.readouterr()
    s = Spool(spool_dir, min_free_disk_mb=0)
    q = JobQueue(s.index, owner="t", lease_s=60, max_attempts=1)
    s.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"), calling_ae="A")
    s.store(_mr("1.2.4", "1.2.4.1", "1.2.4.1.1"), calling_ae="A")
    s.store(b"junk", calling_ae="A")
    q.enqueue("1.2.3")
    job = q.claim()
    assert job is not None
    q.fail(job, error="RuntimeError", permanent=False)
    q.enqueue("1.2.4")
    s.close()
    capsys.readouterr()
    assert cmd_status(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["studies"]["dead"] == 1 and doc["studies"]["ready"] == 1
    assert doc["queue_depth"] == 1 and doc["processing"] == 0 and doc["quarantined"] == 1
    (fail,) = doc["recent_failures"]
    assert fail["state"] == "dead" and fail["error"] == "RuntimeError"
    assert "1.2.3" not in json.dumps(doc)
    assert cmd_status(StatusArgs(rules=rules, json=False)) == 0
    text = capsys.readouterr().out
    assert "queue depth: 1 ready" in text and "dead" in text and "1.2.3" not in text


def test_truncated_or_corrupted_bytes_never_raise(spool: Spool) -> None:
    data = _mr("1.2.3", "1.2.3.1", "1.2.3.1.1")
    outcomes = set()
    for cut in (0, 10, 131, 140, 200, 400, 700, len(data) // 2):
        res = spool.store(data[:cut], calling_ae="X")
        outcomes.add(res.status)
        if res.status != StoreStatus.SUCCESS:
            assert res.quarantine_path is not None and res.quarantine_path.exists()
    corrupt = bytearray(data)
    corrupt[300:340] = b"\xff" * 40
    res = spool.store(bytes(corrupt), calling_ae="X")
    assert res.status in set(StoreStatus)
    assert StoreStatus.CANNOT_UNDERSTAND in outcomes or (
        StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS in outcomes
    )


@pytest.mark.parametrize("receiver_process", [False, True])
def test_a_process_opening_a_shared_spool_leaves_other_receivers_writes_alone(
    tmp_path: Path, database_url: str | None, receiver_process: bool
) -> None:
    """A spool on PostgreSQL, or opened by one of several receiver processes (`shared`), is
    written by others right now: only old unindexed files are a crash's leftovers."""
    root = tmp_path / "spool"
    first = Spool(root, min_free_disk_mb=0, database_url=database_url)
    first.close()
    fresh_part = root / "tmp" / "fresh.part"  # a receiver writing right now
    old_part = root / "tmp" / "old.part"  # a crash's leftover
    for part in (fresh_part, old_part):
        part.write_bytes(b"partial")
    orphan = root / "instances" / "1.2.3" / "1.2.3.1" / "1.2.3.1.1.dcm"  # renamed, not indexed
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    long_ago = time.time() - SHARED_LEFTOVER_AGE_S - 60
    os.utime(old_part, (long_ago, long_ago))
    second = Spool(root, min_free_disk_mb=0, database_url=database_url, shared=receiver_process)
    try:
        indexed = second.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
        # One writer: every such file is a crash's leftover.
        if database_url is None and not receiver_process:
            assert not fresh_part.exists() and not old_part.exists() and indexed == 1
        else:  # shared: only old files are; the fresh ones are another receiver's work
            assert fresh_part.exists() and not old_part.exists() and indexed == 0
            os.utime(orphan, (long_ago, long_ago))
            assert second.sweep_orphans() == (1, 0)
    finally:
        second.close()


# --- group commit -----------------------------------------------------------------------------


def _pending(spool: Spool, data: bytes) -> _Pending:
    """An instance as a C-STORE thread hands it to the group: checked, its temp file fsync'ed."""
    parsed = check_instance(data)
    return _Pending(
        parsed=parsed,
        rel=instance_relpath(parsed.ref),
        tmp=write_temp_durable(spool.root / "tmp", data),
        size_bytes=len(data),
        calling_ae="A",
        now=1.0,
    )


def _indexed(spool: Spool) -> set[str]:
    return {str(r[0]) for r in spool.index.query("SELECT sop_instance_uid FROM instances")}


def test_group_commit_a_folder_error_fails_only_its_instance(spool: Spool) -> None:
    good = [_pending(spool, _mr("1.2.3", "1.2.3.1", f"1.2.3.1.{i}")) for i in (1, 2)]
    # A file where the series folder should be: the rename into it fails (ENOTDIR).
    (spool.root / "instances" / "1.2.3").mkdir(parents=True)
    (spool.root / "instances" / "1.2.3" / "1.2.3.9").write_bytes(b"in the way")
    bad = _pending(spool, _mr("1.2.3", "1.2.3.9", "1.2.3.9.1"))
    spool._commit_group([good[0], bad, good[1]])
    assert isinstance(bad.outcome, SpoolError)
    assert not bad.tmp.exists()
    for entry in good:
        assert isinstance(entry.outcome, StoreResult) and entry.outcome.status == 0
        assert (spool.root / entry.rel).read_bytes()[128:132] == b"DICM"
    assert _indexed(spool) == {"1.2.3.1.1", "1.2.3.1.2"}
    assert spool.index.query("SELECT n_instances FROM studies")[0][0] == 2
    assert list((spool.root / "tmp").iterdir()) == []


def test_group_commit_an_index_error_rolls_back_only_its_row(spool: Spool) -> None:
    # A real database failure on one row only (a trigger refusing study 1.2.4).
    with spool.index.transaction() as db:
        if spool.index.postgres:
            db.execute(
                "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                "IF NEW.study_uid = '1.2.4' THEN RAISE EXCEPTION 'refused'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            db.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON instances FOR EACH ROW "
                "EXECUTE FUNCTION refuse()"
            )
        else:
            db.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON instances WHEN NEW.study_uid = '1.2.4' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
    ok1 = _pending(spool, _mr("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    bad = _pending(spool, _mr("1.2.4", "1.2.4.1", "1.2.4.1.1"))
    ok2 = _pending(spool, _mr("1.2.5", "1.2.5.1", "1.2.5.1.1"))
    spool._commit_group([ok1, bad, ok2])
    assert isinstance(bad.outcome, SpoolError) and "index" in str(bad.outcome)
    assert isinstance(ok1.outcome, StoreResult) and isinstance(ok2.outcome, StoreResult)
    assert _indexed(spool) == {"1.2.3.1.1", "1.2.5.1.1"}
    studies = {str(r[0]) for r in spool.index.query("SELECT study_uid FROM studies")}
    assert studies == {"1.2.3", "1.2.5"}  # the refused row's study update was rolled back too


def test_group_commit_a_duplicate_keeps_the_first_copy(spool: Spool) -> None:
    first = spool.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"), calling_ae="A")
    assert first.instance is not None
    again = _pending(spool, _mr("1.2.3", "1.2.3.1", "1.2.3.1.1", SeriesNumber=77))
    new = _pending(spool, _mr("1.2.3", "1.2.3.1", "1.2.3.1.2"))
    spool._commit_group([again, new])
    assert isinstance(again.outcome, StoreResult) and again.outcome.instance is not None
    assert again.outcome.instance.duplicate
    assert pydicom.dcmread(first.instance.path).get("SeriesNumber") != 77
    assert isinstance(new.outcome, StoreResult) and _indexed(spool) == {"1.2.3.1.1", "1.2.3.1.2"}
    assert list((spool.root / "tmp").iterdir()) == []


def test_concurrent_stores_are_each_durable_and_indexed(spool: Spool) -> None:
    """Eight senders at once (the group commit's case): every success is on disk and indexed,
    a bad instance among them is quarantined alone, and re-sent instances are stored once."""
    results: dict[str, StoreResult] = {}
    lock = threading.Lock()

    def sender(k: int) -> None:
        for i in range(20):
            sop = f"1.2.3.{k}.{i}"
            res = spool.store(_mr("1.2.3", f"1.2.3.{k}", sop), calling_ae="A")
            with lock:
                results[sop] = res
        bad = spool.store(b"\x00" * 128 + b"DICM" + b"\xff" * (40 + k), calling_ae="A")
        with lock:
            results[f"bad{k}"] = bad
        again = spool.store(_mr("1.2.3", f"1.2.3.{k}", f"1.2.3.{k}.0"), calling_ae="A")
        with lock:
            results[f"again{k}"] = again

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    indexed = {
        str(r[0]): str(r[1])
        for r in spool.index.query("SELECT sop_instance_uid, path FROM instances")
    }
    assert len(indexed) == 160
    for sop, res in results.items():
        if sop.startswith("bad"):
            assert res.status != 0 and res.quarantine_path is not None and res.instance is None
        elif sop.startswith("again"):
            assert res.status == 0 and res.instance is not None and res.instance.duplicate
        else:
            assert res.status == 0 and res.instance is not None and not res.instance.duplicate
            assert pydicom.dcmread(spool.root / indexed[sop]).SOPInstanceUID == sop
    assert spool.index.query("SELECT n_instances FROM studies")[0][0] == 160
    assert spool.groups.instances == 160 + 8  # the duplicates pass through a group too
    assert 1 <= spool.groups.groups <= spool.groups.instances
    assert list((spool.root / "tmp").iterdir()) == []


def test_check_instance_refuses_short_pixel_data_without_decoding(spool: Spool) -> None:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.PixelData = ds.PixelData[:-200]
    with pytest.raises(InvalidInstance, match="unparseable: ValueError"):
        check_instance(_bytes(ds))
    ds.NumberOfFrames = 0
    with pytest.raises(InvalidInstance):
        check_instance(_bytes(ds))
    res = spool.store(_bytes(ds), calling_ae="A")
    assert res.status == StoreStatus.CANNOT_UNDERSTAND and res.quarantine_path is not None


# --- the order of the syncs (SyncOrder) and what a crash can leave ----------------------------


def _local_spool(root: Path, order: SyncOrder) -> Spool:
    return Spool(root, min_free_disk_mb=0, free_bytes=lambda _p: 10**12, sync_order=order)


def _store_in_thread(spool: Spool, data: bytes) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []

    def run() -> None:
        try:
            got.append(spool.store(data, calling_ae="A"))
        except SpoolError as exc:
            got.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, got


@pytest.mark.parametrize("order", list(SyncOrder))
def test_an_instance_is_not_acknowledged_before_its_index_row_commits(
    tmp_path: Path, order: SyncOrder
) -> None:
    spool = _local_spool(tmp_path / "spool", order)
    try:
        blocker = sqlite3.connect(spool.root / "index.sqlite", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the index
        thread, got = _store_in_thread(spool, _mr("1.2.3", "1.2.3.1", "1.2.3.1.1"))
        thread.join(0.5)
        assert thread.is_alive() and got == []  # no answer while the row cannot commit
        blocker.execute("ROLLBACK")
        blocker.close()
        thread.join(10)
        assert isinstance(got[0], StoreResult) and got[0].status == 0
        check = sqlite3.connect(spool.root / "index.sqlite")
        assert check.execute("SELECT COUNT(*) FROM instances").fetchone() == (1,)
        check.close()
    finally:
        spool.close()


@pytest.mark.parametrize("order", list(SyncOrder))
@pytest.mark.parametrize("blocked", ["data", "folder"])
def test_an_instance_is_not_acknowledged_before_its_file_and_folder_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: SyncOrder, blocked: str
) -> None:
    spool = _local_spool(tmp_path / "spool", order)
    release = threading.Event()
    entered = threading.Event()
    real_datasync, real_dirsync = os.fdatasync, fsync_dir

    def datasync(fd: int) -> None:
        if blocked == "data":
            entered.set()
            release.wait(10)
        real_datasync(fd)

    def dirsync(folder: Path) -> None:
        if blocked == "folder" and folder.name == "1.2.3.1":
            entered.set()
            release.wait(10)
        real_dirsync(folder)

    monkeypatch.setattr(os, "fdatasync", datasync)
    monkeypatch.setattr(spool_module, "fsync_dir", dirsync)
    try:
        thread, got = _store_in_thread(spool, _mr("1.2.3", "1.2.3.1", "1.2.3.1.1"))
        assert entered.wait(5)
        thread.join(0.3)
        assert thread.is_alive() and got == []  # the sync it waits for has not returned
        release.set()
        thread.join(10)
        assert isinstance(got[0], StoreResult) and got[0].status == 0
    finally:
        release.set()
        spool.close()


def test_overlapped_syncs_run_at_once_and_data_first_syncs_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OVERLAPPED: the file's data sync and its folder's sync wait for each other (they would
    time out if run one after the other). DATA_FIRST: the data is synced before the file has
    its final name."""
    real_datasync, real_dirsync = os.fdatasync, fsync_dir
    in_data, in_folder = threading.Event(), threading.Event()
    seen_final: list[bool] = []
    final = tmp_path / "spool" / "instances" / "1.2.3" / "1.2.3.1" / "1.2.3.1.1.dcm"

    def datasync(fd: int) -> None:
        seen_final.append(final.exists())
        in_data.set()
        if order is SyncOrder.OVERLAPPED and not in_folder.wait(5):
            raise OSError(errno.EIO, "the folder sync did not run beside this one")
        real_datasync(fd)

    def dirsync(folder: Path) -> None:
        if folder.name == "1.2.3.1":
            in_folder.set()
            if order is SyncOrder.OVERLAPPED and not in_data.wait(5):
                raise OSError(errno.EIO, "the data sync did not run beside this one")
        real_dirsync(folder)

    monkeypatch.setattr(os, "fdatasync", datasync)
    monkeypatch.setattr(spool_module, "fsync_dir", dirsync)
    for order in (SyncOrder.OVERLAPPED, SyncOrder.DATA_FIRST):
        shutil.rmtree(tmp_path / "spool", ignore_errors=True)
        in_data.clear()
        in_folder.clear()
        seen_final.clear()
        spool = _local_spool(tmp_path / "spool", order)
        try:
            result = spool.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"), calling_ae="A")
        finally:
            spool.close()
        assert result.status == 0 and final.exists()
        # OVERLAPPED links the file into place first; DATA_FIRST syncs it before.
        assert seen_final == [order is SyncOrder.OVERLAPPED]


def test_a_failed_data_sync_takes_back_its_row_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = _local_spool(tmp_path / "spool", SyncOrder.OVERLAPPED)
    try:
        kept = spool.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"), calling_ae="A")

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(SpoolError, match="Input/output error"):
            spool.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.2"), calling_ae="A")
        with pytest.raises(SpoolError):
            spool.store(_mr("1.2.4", "1.2.4.1", "1.2.4.1.1"), calling_ae="A")
        assert _indexed(spool) == {"1.2.3.1.1"} and kept.instance is not None
        assert spool.index.query("SELECT study_uid, n_instances FROM studies")[0][:] == (
            "1.2.3",
            1,
        )
        assert sorted(p.name for p in (spool.root / "instances").rglob("*.dcm")) == [
            "1.2.3.1.1.dcm"
        ]
        assert list((spool.root / "tmp").iterdir()) == []
    finally:
        spool.close()


def test_start_drops_rows_a_crash_left_without_their_file(tmp_path: Path) -> None:
    """After a process that had the spool open did not close it (a crash), rows whose file is
    missing or short (committed beside syncs the crash cut off: never acknowledged) are dropped,
    a short file quarantined; sound rows stay, and so does a row older than the window. After
    a clean stop nothing is checked."""
    root = tmp_path / "spool"
    crashed = _local_spool(root, SyncOrder.OVERLAPPED)  # never closed before the next start
    paths = {}
    for study, sop in (("1.2.3", "1.2.3.1.1"), ("1.2.3", "1.2.3.1.2"), ("1.2.4", "1.2.4.1.1")):
        res = crashed.store(_mr(study, f"{study}.1", sop), calling_ae="A")
        assert res.instance is not None
        paths[sop] = res.instance.path
    old = crashed.store(_mr("1.2.5", "1.2.5.1", "1.2.5.1.1"), calling_ae="A")
    assert old.instance is not None
    with crashed.index.transaction() as db:
        db.execute(
            "UPDATE instances SET received_at = received_at - ? WHERE sop_instance_uid = ?",
            (RECENT_ROWS_S + 60, "1.2.5.1.1"),
        )
    paths["1.2.3.1.2"].unlink()  # its folder entry never reached the disk
    data = paths["1.2.4.1.1"].read_bytes()
    paths["1.2.4.1.1"].write_bytes(data[: len(data) // 2])  # its data did not all reach it
    old.instance.path.unlink()
    again = _local_spool(root, SyncOrder.OVERLAPPED)
    try:
        assert _indexed(again) == {"1.2.3.1.1", "1.2.5.1.1"}
        studies = {
            str(r[0]): int(r[1])
            for r in again.index.query("SELECT study_uid, n_instances FROM studies")
        }
        assert studies == {"1.2.3": 1, "1.2.5": 1}  # 1.2.4 had nothing else: gone
        assert not paths["1.2.4.1.1"].exists()
        reasons = list((root / "quarantine").glob("*.reason.json"))
        assert len(reasons) == 1
        assert json.loads(reasons[0].read_text())["reason"].startswith("incomplete after a crash")
        assert again.reconcile_recent_rows() == 0
    finally:
        again.close()
        crashed.close()
    assert list((root / "open").iterdir()) == []
    paths["1.2.3.1.1"].unlink()
    clean = _local_spool(root, SyncOrder.OVERLAPPED)  # a clean stop before: nothing checked
    try:
        assert _indexed(clean) == {"1.2.3.1.1", "1.2.5.1.1"}
    finally:
        clean.close()
    dead = root / "open" / "999999999-dead.pid"  # a process that is gone left its marker
    dead.touch()
    after_crash = _local_spool(root, SyncOrder.OVERLAPPED)
    try:
        assert _indexed(after_crash) == {"1.2.5.1.1"} and not dead.exists()
    finally:
        after_crash.close()


def test_postgres_index_syncs_serially(spool: Spool) -> None:
    expected = SyncOrder.SERIAL if spool.index.postgres else spool.sync_order
    assert spool.sync_order is expected
    if not spool.index.postgres:
        assert spool.sync_order is not SyncOrder.SERIAL


def test_mount_of_picks_the_longest_mount_holding_the_path() -> None:
    mountinfo = (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n"
        "40 27 0:40 / /srv rw,relatime - xfs /dev/vdb rw\n"
        "41 40 0:41 / /srv/spool\\040x rw - ext4 /dev/vdc rw,data=writeback\n"
        "42 27 0:42 / /srvx rw - tmpfs tmpfs rw\n"
    )
    assert mount_of(Path("/srv/node/spool"), mountinfo) == ("xfs", frozenset({"rw", "relatime"}))
    assert mount_of(Path("/srvx/a"), mountinfo)[0] == "tmpfs"
    assert mount_of(Path("/var"), mountinfo)[0] == "ext4"
    fstype, options = mount_of(Path("/srv/spool x/instances"), mountinfo)
    assert fstype == "ext4" and "data=writeback" in options


def test_a_failed_sync_never_takes_back_another_senders_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two receivers store the same instance at once: the second finds the row made after it
    looked (a duplicate). If its own folder sync then fails, its sender is told so, but the
    first copy's row and file stay: they were acknowledged."""
    root = tmp_path / "spool"
    spool = _local_spool(root, SyncOrder.OVERLAPPED)
    other = Spool(root, min_free_disk_mb=0, shared=True, sync_order=SyncOrder.OVERLAPPED)
    try:
        data = _mr("1.2.3", "1.2.3.1", "1.2.3.1.1")
        parsed = check_instance(data)
        tmp, fd = write_temp(spool.root / "tmp", data)
        entry = _Pending(
            parsed=parsed,
            rel=instance_relpath(parsed.ref),
            tmp=tmp,
            size_bytes=len(data),
            calling_ae="B",
            now=2.0,
            fd=fd,
        )
        first = other.store(data, calling_ae="A")  # indexed after this group looked
        assert first.instance is not None
        real_query = spool.index.query

        def looked_before(sql: str, params: Sequence[object] = ()) -> list[Row]:
            return [] if "sop_instance_uid IN" in sql else real_query(sql, params)

        def failing(folder: Path) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(spool.index, "query", looked_before)
        monkeypatch.setattr(spool_module, "fsync_dir", failing)
        spool._commit_group([entry])
        monkeypatch.undo()
        assert isinstance(entry.outcome, SpoolError)
        assert _indexed(spool) == {"1.2.3.1.1"}
        assert first.instance.path.read_bytes() == data
    finally:
        other.close()
        spool.close()

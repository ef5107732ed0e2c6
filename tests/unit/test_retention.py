"""Retention (issue 16): only studies that owe nothing more leave the spool, oldest first, for
age or the disk ceiling; `neuronode purge --dry-run` says what would go and why; the index keeps
a record of each purge without UIDs; the running node applies it."""

from __future__ import annotations

import contextlib
import copy
import io
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.cli import main
from node.config import DeliverySettings, RetentionSettings, Rules
from node.deliver.outbox import OUTBOX_DB, Outbox
from node.ingest.spool import Spool
from node.lab.orthanc import free_port
from node.log import load_or_create_key, set_correlation_key, uid_key
from node.pipeline.jobs import JobQueue
from node.records import DeliveryState, SendResult, StudyJob, StudyOutcome
from node.store import retention
from node.store.retention import PurgeReason, plan, purge, purged_studies
from tests.conftest import pydicom_file

DESTS = ("pacs", "archive")
STUDIES = tuple(f"1.2.{i}" for i in range(1, 5))
_TEMPLATE = pydicom.dcmread(pydicom_file("MR_small.dcm"))


def _mr(study: str, sop: str) -> bytes:
    ds = copy.deepcopy(_TEMPLATE)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, study + ".1", sop
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ds(study: str, sop: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(_mr(study, sop)))


def _skipped_from(skipped: set[str]) -> Callable[[Path, str], bool]:
    def did_not_qualify(_spool_dir: Path, study_uid: str) -> bool:
        return study_uid in skipped

    return did_not_qualify


def _owed(spool_dir: Path) -> dict[str, bool]:
    """For each study in the index: does it still owe something (read with plain SQL)?"""
    idx = sqlite3.connect(spool_dir / "index.sqlite")
    states = dict(idx.execute("SELECT study_uid, state FROM studies").fetchall())
    busy = {
        r[0]
        for r in idx.execute("SELECT study_uid FROM jobs WHERE state IN ('ready', 'processing')")
    }
    idx.close()
    rows: dict[str, list[str]] = {}
    if (spool_dir / OUTBOX_DB).exists():
        ob = sqlite3.connect(spool_dir / OUTBOX_DB)
        for study, state in ob.execute("SELECT study_uid, state FROM deliveries"):
            rows.setdefault(study, []).append(state)
        ob.close()
    return {
        s: state != "done" or s in busy or any(r != "delivered" for r in rows.get(s, []))
        for s, state in states.items()
    }


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ("receive", "ready", "process", "process", "deliver", "deliver", "requeue")
        ),
        st.integers(0, len(STUDIES) - 1),
        st.integers(0, 5),
    ),
    min_size=15,
    max_size=60,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_purge_never_touches_a_study_that_is_not_delivered(
    ops: list[tuple[str, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    skipped: set[str] = set()
    monkeypatch.setattr(retention, "_did_not_qualify", _skipped_from(skipped))
    clock = [1000.0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "spool"
        spool = Spool(root, min_free_disk_mb=0, clock=lambda: clock[0])
        queue = JobQueue(spool.index, owner="w", lease_s=60, max_attempts=2, clock=lambda: clock[0])
        outbox = Outbox(root)
        rng = random.Random(0)
        n = 0
        try:
            for op, i, extra in ops:
                clock[0] += 10
                n += 1
                study = STUDIES[i]
                if op == "receive":
                    spool.store(_mr(study, f"{study}.1.{n}"), calling_ae="A")
                elif op == "ready":
                    queue.enqueue(study)
                elif op == "process":
                    job = queue.claim()
                    if job is None:
                        continue
                    if extra == 0:
                        queue.fail(job, error="E", permanent=True)
                    elif extra == 1:
                        queue.fail(job, error="E", permanent=False)
                    elif extra == 2:  # did not qualify: no results
                        skipped.add(job.study_uid)
                        queue.complete(job, _outcome(job))
                    elif extra == 3:  # results kept here only (no destination)
                        queue.complete(job, _outcome(job))
                    else:
                        objs = [_ds(job.study_uid, f"9.{n}.{k}") for k in range(extra - 2)]
                        outbox.enqueue(objs, DESTS, now=clock[0])
                        queue.complete(job, _outcome(job))
                elif op == "deliver":
                    rows = [r for r in outbox.all() if r.state == DeliveryState.PENDING]
                    for row in rows[: 2 * extra + 2]:
                        claimed = outbox.claim_due(row.destination, clock[0] + 1e6, 1)
                        for c in claimed:
                            if extra or c.row_id % 2:  # one attempt in about twelve fails
                                outbox.mark_delivered(c, _sent(c.sop_uid), now=clock[0])
                            else:
                                outbox.mark_failed(
                                    c,
                                    error="x",
                                    status_code=None,
                                    retryable=extra % 2 == 0,
                                    settings=DeliverySettings(max_attempts=2),
                                    now=clock[0],
                                    rng=rng,
                                )
                else:
                    outbox.requeue(now=clock[0])
            owed = _owed(root)
            expected = {s for s, o in owed.items() if not o and _purgeable(s, outbox, skipped)}
            files_before = {s: spool.instance_paths(s) for s in owed}
            rows_before = {(r.study_uid, r.sop_uid, r.destination, r.state) for r in outbox.all()}
            everything = RetentionSettings(delivered_max_age_h=1e-6, max_spool_mb=1e-6)
            done = purge(spool, plan(spool, everything, now=clock[0] + 3600), now=clock[0])
            purged = {d.study_uid for d in done}
            assert not any(owed[s] for s in purged), "an undelivered study was purged"
            assert purged == expected
            for s, paths in files_before.items():
                if s in purged:
                    assert not any(p.exists() for p in paths)
                else:
                    assert all(p.exists() for p in paths), "a kept study lost a file"
            kept_rows = {(r.study_uid, r.sop_uid, r.destination, r.state) for r in outbox.all()}
            assert kept_rows == {r for r in rows_before if r[0] not in purged}
            records = purged_studies(spool)
            assert sorted(r.study_key for r in records) == sorted(uid_key(s) for s in purged)
        finally:
            outbox.close()
            spool.close()


def _purgeable(study: str, outbox: Outbox, skipped: set[str]) -> bool:
    """Delivered everywhere it was queued, or queued nowhere because it did not qualify."""
    mine = [r for r in outbox.all() if r.study_uid == study]
    return bool(mine) or study in skipped


def _outcome(job: StudyJob) -> StudyOutcome:
    return StudyOutcome(
        study_uid=job.study_uid,
        audit_path=Path("/dev/null"),
        n_series=1,
        n_instances=len(job.instance_paths),
        n_decode_errors=0,
    )


def _sent(sop: str) -> SendResult:
    return SendResult(
        sop_instance_uid=sop,
        sent_sop_instance_uid=sop,
        sent_sop_class_uid="",
        status_code=0,
        delivered=True,
        retryable=False,
        message="",
    )


# --- oldest first, age then ceiling; dry run; the record; the running node --------------------


def _delivered_site(
    tmp_path: Path, ages_h: Sequence[float], database_url: str | None = None
) -> tuple[Path, list[str]]:
    """A spool whose studies were delivered ages_h hours ago, plus one still pending."""
    root = tmp_path / "spool"
    set_correlation_key(load_or_create_key(root / "log.key"))
    now = time.time()
    spool = Spool(root, min_free_disk_mb=0, database_url=database_url)
    queue = JobQueue(spool.index, owner="w", lease_s=60)
    studies = [f"1.3.{i}" for i in range(len(ages_h) + 1)]
    with Outbox(root, database_url=database_url) as outbox:
        for k, study in enumerate(studies):
            spool.store(_mr(study, f"{study}.1.1"), calling_ae="A")
            queue.enqueue(study)
            job = queue.claim()
            assert job is not None
            outbox.enqueue([_ds(study, f"9.9.{k}")], ["pacs"], now=now)
            queue.complete(job, _outcome(job))
            if k < len(ages_h):
                for row in outbox.claim_due("pacs", now, 10):
                    outbox.mark_delivered(row, _sent(row.sop_uid), now=now - ages_h[k] * 3600)
    spool.close()
    return root, studies


def _rules_file(tmp_path: Path, root: Path, retention_yaml: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(
        f"storage:\n  spool_dir: {root}\n  min_free_disk_mb: 0\nmodels_dir: {tmp_path}\n"
        f"retention:\n{retention_yaml}"
        "destinations:\n"
        "  - {kind: dicom, name: pacs, ae_title: PACS, host: 127.0.0.1, port: 104}\n",
        encoding="utf-8",
    )
    return path


def test_plan_takes_old_ones_for_age_then_oldest_first_for_the_ceiling(
    tmp_path: Path, database_url: str | None
) -> None:
    root, studies = _delivered_site(tmp_path, [50.0, 10.0, 30.0, 1.0], database_url)
    spool = Spool(root, min_free_disk_mb=0, database_url=database_url)
    try:
        one = retention.candidates(spool)[0].bytes
        assert [c.study_uid for c in retention.candidates(spool)] == [
            studies[0],
            studies[2],
            studies[1],
            studies[3],
        ]  # oldest delivery first; the pending one is no candidate
        used = retention.spool_bytes(spool)
        # Older than 24 h: two by age; then the ceiling wants one more study gone.
        ceiling_mb = (used - 3 * one + one / 2) / (1024 * 1024)
        decisions = plan(
            spool,
            RetentionSettings(delivered_max_age_h=24, max_spool_mb=ceiling_mb),
            now=time.time(),
        )
        assert [(d.study_uid, d.reason) for d in decisions] == [
            (studies[0], PurgeReason.AGE),
            (studies[2], PurgeReason.AGE),
            (studies[1], PurgeReason.DISK),
        ]
        assert plan(spool, RetentionSettings(delivered_max_age_h=None), now=time.time()) == ()
    finally:
        spool.close()


def test_purge_removes_the_decided_studies_and_keeps_a_record(
    tmp_path: Path, database_url: str | None
) -> None:
    root, studies = _delivered_site(tmp_path, [50.0, 1.0], database_url)
    spool = Spool(root, min_free_disk_mb=0, database_url=database_url)
    try:
        decisions = plan(spool, RetentionSettings(delivered_max_age_h=24), now=time.time())
        assert [d.study_uid for d in decisions] == [studies[0]]
        assert purge(spool, decisions) == decisions
        assert purge(spool, decisions) == ()  # gone already: nothing twice
        left = {str(r["study_uid"]) for r in spool.index.query("SELECT study_uid FROM studies")}
        assert left == {studies[1], studies[2]}
        [record] = purged_studies(spool)
        assert (record.study_key, record.reason) == (uid_key(studies[0]), "age")
        assert not (root / "instances" / studies[0]).exists()
    finally:
        spool.close()
    with Outbox(root, database_url=database_url) as outbox:
        assert {r.study_uid for r in outbox.all()} == {studies[1], studies[2]}


def test_purge_dry_run_prints_what_would_go_and_why_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, studies = _delivered_site(tmp_path, [50.0, 1.0])
    rules = _rules_file(tmp_path, root, "  delivered_max_age_h: 24\n")
    capsys.readouterr()  # the set-up's own log lines
    assert main(["purge", "--rules", str(rules), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would purge 1 studies" in out
    assert f"study {uid_key(studies[0])}  age   delivered 50.0 h ago; 1 instances" in out
    assert uid_key(studies[1]) not in out and studies[0] not in out
    assert (root / "instances" / studies[0]).is_dir()  # nothing changed

    assert main(["purge", "--rules", str(rules)]) == 0
    assert "purged 1 studies" in capsys.readouterr().out
    assert not (root / "instances" / studies[0]).exists()
    assert (root / "instances" / studies[1]).is_dir() and (root / "instances" / studies[2]).is_dir()
    with Outbox(root) as outbox:
        assert {r.study_uid for r in outbox.all()} == {studies[1], studies[2]}
    assert not (root / "outbox" / "objects" / "9.9.0.dcm").exists()
    spool = Spool(root, min_free_disk_mb=0)
    try:
        [record] = purged_studies(spool)
        assert record.study_key == uid_key(studies[0]) and record.reason == "age"
        assert not spool.index.query("SELECT * FROM studies WHERE study_uid = ?", (studies[0],))
        with contextlib.closing(sqlite3.connect(spool.index.path)) as raw:
            dump = "\n".join(raw.iterdump())
        purged_rows = [line for line in dump.splitlines() if "purged" in line and "INSERT" in line]
        assert purged_rows and not any(studies[0] in line for line in purged_rows)
    finally:
        spool.close()


def test_purge_refuses_while_a_node_runs_on_the_spool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.service import lock_spool

    root, _ = _delivered_site(tmp_path, [50.0])
    rules = _rules_file(tmp_path, root, "  delivered_max_age_h: 24\n")
    lock = lock_spool(root)
    try:
        assert main(["purge", "--rules", str(rules)]) == 1
        assert "a node is running" in capsys.readouterr().err
        assert main(["purge", "--rules", str(rules), "--dry-run"]) == 0
    finally:
        lock.close()


def test_the_running_node_applies_retention(tmp_path: Path) -> None:
    from node.service import Node

    spool_dir = tmp_path / "spool"
    rules = Rules.model_validate(
        {
            "node": {"port": free_port(), "accept_unknown_callers": True},
            "http": {"enabled": False},
            "storage": {"spool_dir": str(spool_dir), "min_free_disk_mb": 0},
            "retention": {"max_spool_mb": 0.001, "interval_s": 1},
            "completion": {"quiet_period_s": 0.5, "poll_interval_s": 0.05},
            "destinations": [
                {"kind": "dicom", "name": "pacs", "ae_title": "P", "host": "127.0.0.1", "port": 1}
            ],
        }
    )

    def process(job: StudyJob) -> StudyOutcome:
        with Outbox(spool_dir) as outbox:
            outbox.enqueue([_ds(job.study_uid, "9.8.1")], ["pacs"], now=time.time())
        return _outcome(job)

    def send(dest: object, paths: Sequence[Path]) -> tuple[SendResult, ...]:
        return tuple(_sent(p.stem) for p in paths)

    node = Node(rules, processor=process, send=send)
    node.start()
    try:
        node.spool.store(_mr("1.4.1", "1.4.1.1.1"), calling_ae="A")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not purged_studies(node.spool):
            time.sleep(0.1)
        [record] = purged_studies(node.spool)
        assert record.reason == "disk" and record.study_key == uid_key("1.4.1")
        assert not (spool_dir / "instances" / "1.4.1").exists()
    finally:
        node.stop(grace_s=2)

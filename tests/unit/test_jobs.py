"""Job queue: state transitions, leases, retries, dead letter, orphan release, re-opening."""

from __future__ import annotations

import io
import json
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from node.cli import main
from node.config import Rules
from node.errors import JobError
from node.ingest.spool import Spool
from node.lab.orthanc import free_port
from node.pipeline.jobs import JobQueue
from node.records import StudyJob, StudyOutcome, StudyStatus
from node.store.db import upgrade_all
from tests.conftest import pydicom_file


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _mr(study: str, series: str, sop: str) -> bytes:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(tmp_path: Path, clock: Clock, database_url: str | None) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", min_free_disk_mb=0, clock=clock, database_url=database_url)
    yield s
    s.close()


def _queue(spool: Spool, clock: Clock, owner: str = "w1", **kw: float) -> JobQueue:
    return JobQueue(
        spool.index,
        owner=owner,
        lease_s=kw.get("lease_s", 60.0),
        max_attempts=int(kw.get("max_attempts", 3)),
        clock=clock,
    )


def _outcome(job: StudyJob) -> StudyOutcome:
    return StudyOutcome(
        study_uid=job.study_uid,
        audit_path=Path("audit.json"),
        n_series=1,
        n_instances=1,
        n_decode_errors=0,
    )


def _study_state(spool: Spool, uid: str = "1.2.3") -> str:
    return str(spool.index.query("SELECT state FROM studies WHERE study_uid=?", (uid,))[0][0])


def _receive(spool: Spool, n: int = 2, study: str = "1.2.3", start: int = 1) -> None:
    for i in range(start, start + n):
        spool.store(_mr(study, study + ".1", f"{study}.1.{i}"), calling_ae="A")


def test_happy_path_states(spool: Spool, clock: Clock) -> None:
    q = _queue(spool, clock)
    _receive(spool)
    assert _study_state(spool) == "receiving"
    job_id = q.enqueue("1.2.3")
    assert job_id is not None
    assert q.enqueue("1.2.3") is None  # already ready: no second job
    assert _study_state(spool) == "ready" and q.job_state(job_id) is StudyStatus.READY
    job = q.claim()
    assert job is not None and job.job_id == job_id and job.attempt == 1 and not job.reopened
    assert len(job.instance_paths) == 2 and all(p.exists() for p in job.instance_paths)
    assert _study_state(spool) == "processing"
    assert q.claim() is None
    q.complete(job, _outcome(job))
    assert q.job_state(job_id) is StudyStatus.DONE and _study_state(spool) == "done"
    (h,) = q.history("1.2.3")
    assert (h.attempt, h.outcome) == (1, "done") and h.finished_at is not None


def test_retry_then_dead_letter(spool: Spool, clock: Clock) -> None:
    q = _queue(spool, clock, max_attempts=2)
    _receive(spool)
    q.enqueue("1.2.3")
    job = q.claim()
    assert job is not None
    assert q.fail(job, error="RuntimeError", permanent=False) is StudyStatus.READY
    assert q.claim() is None  # backoff: not yet available
    clock.t += 5
    job2 = q.claim()
    assert job2 is not None and job2.attempt == 2 and job2.job_id == job.job_id
    assert q.fail(job2, error="RuntimeError", permanent=False) is StudyStatus.DEAD
    assert _study_state(spool) == "dead"
    clock.t += 100
    assert q.claim() is None
    summary = q.summary()
    assert summary.queue_depth == 0
    (f,) = summary.recent_failures
    assert (f.state, f.attempts, f.error) == ("dead", 2, "RuntimeError")
    assert f.study_key != "1.2.3" and len(f.study_key) == 12
    assert [h.outcome for h in q.history("1.2.3")] == ["retry", "dead"]


def test_permanent_failure_is_not_retried(spool: Spool, clock: Clock) -> None:
    q = _queue(spool, clock)
    _receive(spool)
    q.enqueue("1.2.3")
    job = q.claim()
    assert job is not None
    assert q.fail(job, error="LoadError", permanent=True) is StudyStatus.FAILED
    clock.t += 100
    assert q.claim() is None and _study_state(spool) == "failed"


def test_lease_expiry_gives_job_to_another_worker(spool: Spool, clock: Clock) -> None:
    q1 = _queue(spool, clock, "w1", lease_s=10)
    q2 = _queue(spool, clock, "w2", lease_s=10)
    _receive(spool)
    q1.enqueue("1.2.3")
    job = q1.claim()
    assert job is not None
    clock.t += 5
    assert q2.expire_leases() == 0
    q1.renew(job)
    clock.t += 9
    assert q2.expire_leases() == 0  # renewed at +5, expires at +15
    clock.t += 2
    assert q2.expire_leases() == 1
    job2 = q2.claim()
    assert job2 is not None and job2.attempt == 2
    with pytest.raises(JobError, match="lease lost"):
        q1.complete(job, _outcome(job))
    q2.complete(job2, _outcome(job2))
    outcomes = [h.outcome for h in q2.history("1.2.3")]
    assert outcomes == ["lease-expired", "done"]
    assert spool.index.query("SELECT times_done FROM studies")[0][0] == 1


def test_lease_expiry_past_max_attempts_is_dead(spool: Spool, clock: Clock) -> None:
    q = _queue(spool, clock, lease_s=10, max_attempts=1)
    _receive(spool)
    q.enqueue("1.2.3")
    assert q.claim() is not None
    clock.t += 11
    assert q.expire_leases() == 1
    assert _study_state(spool) == "dead"


def test_orphans_of_dead_owner_are_released_on_startup(spool: Spool, clock: Clock) -> None:
    old = _queue(spool, clock, "old-pid")
    _receive(spool)
    old.enqueue("1.2.3")
    assert old.claim() is not None  # then the process is killed
    new = _queue(spool, clock, "new-pid")
    if spool.index.postgres:  # shared: the other owner may be alive; its lease decides
        assert new.release_orphans() == 0 and _study_state(spool) == "processing"
        clock.t += 61.0
        assert new.expire_leases() == 1 and _study_state(spool) == "ready"
        job = new.claim()
        assert job is not None and job.attempt == 2
        return
    assert new.release_orphans() == 1
    assert _study_state(spool) == "ready"
    job = new.claim()
    assert job is not None and job.attempt == 1  # the crash is not the study's attempt
    new.complete(job, _outcome(job))
    assert [h.outcome for h in new.history("1.2.3")] == ["interrupted", "done"]
    assert new.release_orphans() == 0


def test_release_on_shutdown_does_not_count_attempt(spool: Spool, clock: Clock) -> None:
    q = _queue(spool, clock)
    _receive(spool)
    q.enqueue("1.2.3")
    job = q.claim()
    assert job is not None
    q.release(job)
    again = q.claim()
    assert again is not None and again.attempt == 1


def test_instance_after_done_reopens_and_reprocessing_is_recorded(
    spool: Spool, clock: Clock
) -> None:
    q = _queue(spool, clock)
    _receive(spool, 2)
    q.enqueue("1.2.3")
    job = q.claim()
    assert job is not None
    q.complete(job, _outcome(job))
    _receive(spool, 1, start=3)
    assert _study_state(spool) == "receiving"
    job_id = q.enqueue("1.2.3")
    job2 = q.claim()
    assert job2 is not None and job2.job_id == job_id != job.job_id
    assert job2.reopened and len(job2.instance_paths) == 3
    q.complete(job2, _outcome(job2))
    hist = q.history("1.2.3")
    assert [(h.job_id, h.reopened, h.outcome) for h in hist] == [
        (job.job_id, False, "done"),
        (job2.job_id, True, "done"),
    ]
    assert spool.index.query("SELECT times_done FROM studies")[0][0] == 2


def test_instance_during_processing_reopens_after_done(spool: Spool, clock: Clock) -> None:
    q = _queue(spool, clock)
    _receive(spool, 2)
    q.enqueue("1.2.3")
    job = q.claim()
    assert job is not None
    _receive(spool, 1, start=3)  # arrives while the job runs: not in job.instance_paths
    assert len(job.instance_paths) == 2
    q.complete(job, _outcome(job))
    assert _study_state(spool) == "receiving"
    q.enqueue("1.2.3")
    job2 = q.claim()
    assert job2 is not None and job2.reopened and len(job2.instance_paths) == 3


def test_state_survives_reopen_of_index(tmp_path: Path, clock: Clock) -> None:
    s = Spool(tmp_path / "sp", min_free_disk_mb=0, clock=clock)
    q = _queue(s, clock)
    _receive(s)
    q.enqueue("1.2.3")
    s.close()
    s2 = Spool(tmp_path / "sp", min_free_disk_mb=0, clock=clock)
    try:
        q2 = _queue(s2, clock, "w2")
        job = q2.claim()
        assert job is not None and job.study_uid == "1.2.3"
    finally:
        s2.close()


# --- the workers of node.service.Node, with an injected processor ------------------------------


def _node_rules(tmp_path: Path, database_url: str | None = None, **processing: float) -> Rules:
    return Rules.model_validate(
        {
            "database": {"url": database_url},
            "node": {"port": free_port(), "accept_unknown_callers": True},
            "http": {"port": 0},
            "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_disk_mb": 0},
            "completion": {"quiet_period_s": 0.5, "poll_interval_s": 0.05},
            "processing": {"workers": 2, "lease_s": 30, **processing},
        }
    )


def _wait(pred: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met")


def test_node_processes_each_ready_study_once(
    tmp_path: Path, database_url: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.service import Node

    calls: list[StudyJob] = []
    lock = threading.Lock()

    def counting(job: StudyJob) -> StudyOutcome:
        with lock:
            calls.append(job)
        return _outcome(job)

    node = Node(_node_rules(tmp_path, database_url), processor=counting)
    node.start()
    try:
        for study in ("1.2.3", "1.2.4"):
            for i in (1, 2, 3):
                node.spool.store(_mr(study, study + ".1", f"{study}.1.{i}"), calling_ae="A")
        _wait(lambda: len(calls) >= 2 and node.queue.summary().processing == 0)
        time.sleep(0.8)  # more than a quiet period: nothing is processed twice
        assert sorted(j.study_uid for j in calls) == ["1.2.3", "1.2.4"]
        assert all(len(j.instance_paths) == 3 and j.attempt == 1 for j in calls)
        node.spool.store(_mr("1.2.3", "1.2.3.2", "1.2.3.2.1"), calling_ae="A")  # re-opens
        _wait(lambda: len(calls) == 3)
        assert calls[2].study_uid == "1.2.3" and calls[2].reopened
        assert len(calls[2].instance_paths) == 4
    finally:
        node.stop(grace_s=2)
    # `neuronode status` reads the same database (PostgreSQL: nothing embedded was made).
    assert (tmp_path / "spool" / "index.sqlite").exists() == (database_url is None)
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        yaml.safe_dump(
            {
                "database": {"url": database_url},
                "storage": {"spool_dir": str(tmp_path / "spool")},
            }
        )
    )
    capsys.readouterr()
    assert main(["status", "--rules", str(rules_file), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["studies"]["done"] == 2 and doc["queue_depth"] == 0


def test_node_failures_retry_then_dead_and_node_errors_fail_once(tmp_path: Path) -> None:
    from node.errors import LoadError
    from node.service import Node

    calls: dict[str, int] = {}

    def failing(job: StudyJob) -> StudyOutcome:
        calls[job.study_uid] = calls.get(job.study_uid, 0) + 1
        if job.study_uid == "1.2.3":
            raise RuntimeError("transient?")
        raise LoadError("no usable series")

    node = Node(_node_rules(tmp_path, max_attempts=2), processor=failing)
    node.start()
    try:
        node.spool.store(_mr("1.2.3", "1.2.3.1", "1.2.3.1.1"), calling_ae="A")
        node.spool.store(_mr("1.2.4", "1.2.4.1", "1.2.4.1.1"), calling_ae="A")
        _wait(lambda: len(node.queue.summary().recent_failures) == 2, timeout_s=20)
        states = {f.error: f.state for f in node.queue.summary().recent_failures}
        assert states == {"RuntimeError": "dead", "LoadError": "failed"}
        assert calls == {"1.2.3": 2, "1.2.4": 1}
    finally:
        node.stop(grace_s=2)


# --- several processes on one PostgreSQL database --------------------------------------------


def _lease_until_empty(url: str, root: str, owner: str) -> list[int]:
    """In a separate process: lease and complete jobs until none is left; the jobs leased."""
    spool = Spool(Path(root), min_free_disk_mb=0, database_url=url)
    queue = JobQueue(spool.index, owner=owner, lease_s=60.0)
    leased: list[int] = []
    idle = 0
    try:
        while idle < 3:
            job = queue.claim()
            if job is None:
                idle += 1
                time.sleep(0.05)
                continue
            idle = 0
            leased.append(job.job_id)
            time.sleep(0.002)  # hold the lease a moment, as a worker does
            queue.complete(job, _outcome(job))
    finally:
        spool.close()
    return leased


def _store_many(url: str, root: str, sops: list[str]) -> None:
    """In a separate process: store instances of study 1.2.9 as a receiver would."""
    spool = Spool(Path(root), min_free_disk_mb=0, database_url=url)
    try:
        for sop in sops:
            assert spool.store(_mr("1.2.9", "1.2.9.1", sop), calling_ae="A").instance
    finally:
        spool.close()


@pytest.mark.integration
def test_processes_leasing_at_once_never_lease_a_job_twice(tmp_path: Path, pg_server: Any) -> None:
    url = pg_server.new_database()
    upgrade_all(tmp_path, url)
    spool = Spool(tmp_path / "spool", min_free_disk_mb=0, database_url=url)
    queue = JobQueue(spool.index, owner="scheduler", lease_s=60.0)
    n = 120
    with spool.index.transaction() as db:
        db.executemany(
            "INSERT INTO studies (study_uid, state, first_received_at, last_received_at, "
            "last_seq, n_instances) VALUES (?, 'receiving', 0, 0, 0, 0)",
            [(f"1.2.8.{i}",) for i in range(n)],
        )
    for i in range(n):
        assert queue.enqueue(f"1.2.8.{i}") is not None
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(_lease_until_empty, url, str(tmp_path / "spool"), f"p{k}") for k in range(4)
        ]
        leased = [job for f in futures for job in f.result(timeout=300)]
    assert len(leased) == n and len(set(leased)) == n  # every job once, none twice
    assert sum(1 for f in futures if f.result()) >= 2  # the work really was shared
    history = spool.index.query("SELECT outcome, COUNT(*) AS n FROM job_history GROUP BY outcome")
    assert [(r["outcome"], r["n"]) for r in history] == [("done", n)]
    done = spool.index.query("SELECT COUNT(*) AS n FROM studies WHERE times_done = 1")
    assert done[0]["n"] == n
    spool.close()


@pytest.mark.integration
def test_two_receiver_processes_storing_one_study_keep_its_count_and_order(
    tmp_path: Path, pg_server: Any
) -> None:
    url = pg_server.new_database()
    upgrade_all(tmp_path, url)
    sops = [f"1.2.9.1.{i}" for i in range(1, 41)]
    halves = [sops[:25], sops[15:]]  # ten instances are sent to both receivers
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in [pool.submit(_store_many, url, str(tmp_path / "spool"), h) for h in halves]:
            f.result(timeout=300)
    spool = Spool(tmp_path / "spool", min_free_disk_mb=0, database_url=url)
    try:
        [st] = spool.index.query("SELECT n_instances, last_seq, state FROM studies")
        [inst] = spool.index.query("SELECT COUNT(*) AS n, MAX(seq) AS top FROM instances")
        assert (st["n_instances"], inst["n"]) == (40, 40)  # the duplicates counted once
        assert st["last_seq"] == inst["top"] and st["state"] == "receiving"
        assert len(spool.receiving_studies()[0].series) == 1
    finally:
        spool.close()

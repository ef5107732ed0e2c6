"""Speculative stages before REPORT: kept for exactly the same instance set, dropped otherwise,
never writing anything; the worker stops one when another study's job comes; the node asks
once per instance set."""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from node.config import Rules
from node.ingest.completion import speculate_after_s
from node.ingest.spool import Spool
from node.lab.orthanc import free_port
from node.pipeline import stages, worker
from node.pipeline.jobs import JobQueue
from node.pipeline.runner import process_study
from node.pipeline.speculate import instance_set_key, mismatch, speculate
from node.records import StudyJob
from node.service.node import Node
from tests.unit.test_dicomio import write_mr


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", min_free_disk_mb=0, clock=Clock())
    yield s
    s.close()


def _files(folder: Path, n_series: int = 2, n_slices: int = 3) -> tuple[str, list[bytes]]:
    """A study's instances as a sender would push them (series by series, slice by slice)."""
    folder.mkdir(parents=True)
    study = generate_uid()
    out = []
    for s in range(n_series):
        series = generate_uid()
        for k in range(n_slices):
            path = write_mr(
                folder / f"s{s}_{k}.dcm",
                study=study,
                series=series,
                position=(0, 0, 2.0 * k),
                number=s + 1,
                instance=k + 1,
                value=10 * (k + 1),
                shape=(32, 32),
            )
            if s == 1:  # a FLAIR: routed (the tumour detector reads it), so INFER runs
                ds = pydicom.dcmread(path)
                ds.SeriesDescription = "t2_tirm_tra_dark-fluid FLAIR"
                ds.RepetitionTime, ds.EchoTime, ds.InversionTime = 9000.0, 90.0, 2500.0
                ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
                ds.save_as(path)
            out.append(path.read_bytes())
    return study, out


def _rules() -> Rules:
    """The shipped bundles; no SR or heatmaps (the tiny test images make no valid sources)."""
    return Rules.model_validate({"outputs": {"structured_report": False, "heatmaps_per_series": 0}})


def _claim(spool: Spool, study: str) -> StudyJob:
    queue = JobQueue(spool.index, owner="w1", lease_s=60.0, max_attempts=3, clock=Clock())
    assert queue.enqueue(study) is not None
    job = queue.claim()
    assert job is not None and job.study_uid == study
    return job


def _results(audit_file: Path) -> dict[str, Any]:
    """What an audit says about the study, without its times and output folder."""
    audit = json.loads(audit_file.read_text(encoding="utf-8"))
    skip = ("started_at", "finished_at", "duration_ms", "stages", "objects")
    return {k: v for k, v in audit.items() if k not in skip}


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_speculation_is_reused_when_nothing_arrived(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, files = _files(tmp_path / "in")
    for data in files:
        spool.store(data, calling_ae="A")
    rules = _rules()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    spec = speculate(study, spool.instance_paths(study), rules)
    assert spec is not None and len(spec.ctx.decisions) == 2
    # A speculation writes nothing: no result, audit or outbox file, no index row.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    job = _claim(spool, study)
    assert mismatch(spec, job, rules) == ""
    plain = process_study(job, rules, out_dir=tmp_path / "plain")

    # Taken over: the job reads no header again (a LOAD that ran would fail here).
    def no_read(*_a: object, **_kw: object) -> object:
        raise AssertionError("LOAD ran although the speculation matched")

    monkeypatch.setattr(stages, "read_study", no_read)
    with capture_logs() as logs:
        outcome = process_study(job, rules, out_dir=tmp_path / "spec", speculation=spec)
    assert [e["reason"] for e in _events(logs, "speculation_reused")] == [None]
    assert not _events(logs, "speculation_discarded")
    assert (outcome.n_series, outcome.n_instances) == (plain.n_series, plain.n_instances) == (2, 6)
    taken, computed = (_results(p.audit_path) for p in (outcome, plain))
    assert taken == computed
    assert taken["routes"] and taken["predictions"]  # INFER's work was taken over too


def test_speculation_is_discarded_when_one_more_instance_arrived(
    tmp_path: Path, spool: Spool
) -> None:
    study, files = _files(tmp_path / "in")
    for data in files[:-1]:
        spool.store(data, calling_ae="A")
    rules = _rules()
    spec = speculate(study, spool.instance_paths(study), rules)
    assert spec is not None and len(spec.key.files) == 5
    spool.store(files[-1], calling_ae="A")  # late: after the speculation, before the job
    job = _claim(spool, study)
    assert len(job.instance_paths) == 6
    with capture_logs() as logs:
        outcome = process_study(job, rules, out_dir=tmp_path / "out", speculation=spec)
    assert [e["reason"] for e in _events(logs, "speculation_discarded")] == [
        "instance count changed"
    ]
    assert not _events(logs, "speculation_reused")
    # The late instance is in the result.
    assert outcome.n_instances == 6
    audit = json.loads(outcome.audit_path.read_text(encoding="utf-8"))
    assert sorted(s["n_instances"] for s in audit["series"]) == [3, 3]


def test_mismatch_names_each_difference(tmp_path: Path, spool: Spool) -> None:
    study, files = _files(tmp_path / "in", n_series=1)
    for data in files:
        spool.store(data, calling_ae="A")
    rules = Rules()
    paths = spool.instance_paths(study)
    spec = speculate(study, paths, rules)
    assert spec is not None
    job = StudyJob(job_id=1, study_uid=study, instance_paths=paths, attempt=1)
    assert mismatch(spec, job, rules) == ""
    other = StudyJob(job_id=1, study_uid=generate_uid(), instance_paths=paths, attempt=1)
    assert mismatch(spec, other, rules) == "other study"
    changed = Rules.model_validate({"completion": {"quiet_period_s": 3.0}})
    assert mismatch(spec, job, changed) == "rules changed"
    reordered = StudyJob(job_id=1, study_uid=study, instance_paths=paths[::-1], attempt=1)
    assert mismatch(spec, reordered, rules) == "instance files changed"
    # Same paths, one file different on disk: not the same input.
    paths[0].write_bytes(paths[0].read_bytes() + b"\x00\x00")
    assert instance_set_key(study, paths) != spec.key
    assert mismatch(spec, job, rules) == "instance files changed"


def test_speculate_after_is_well_inside_the_quiet_period() -> None:
    assert speculate_after_s(2.0) == pytest.approx(0.3)
    assert speculate_after_s(20.0) == pytest.approx(3.0)
    assert speculate_after_s(60.0) == 5.0
    assert speculate_after_s(1.0) == 0.25
    assert speculate_after_s(0.5) == 0.25
    with pytest.raises(ValueError, match="quiet_period_s"):
        speculate_after_s(0)


def test_worker_stops_a_speculation_for_another_studys_job(tmp_path: Path) -> None:
    node_end, worker_end = Pipe()
    rules = Rules()
    other = StudyJob(job_id=3, study_uid="1.2.9", instance_paths=(), attempt=1)
    node_end.send(worker.RunJob(job=other, rules=rules))
    msg = worker.Speculate(study_uid="1.2.3", instance_paths=(), rules=rules)
    done, pending = worker._speculate(worker_end, msg)
    assert done is None  # stopped between LOAD and CLASSIFY
    assert isinstance(pending, worker.RunJob) and pending.job.study_uid == "1.2.9"

    own = StudyJob(job_id=4, study_uid="1.2.3", instance_paths=(), attempt=1)
    node_end.send(worker.RunJob(job=own, rules=rules))
    done, pending = worker._speculate(worker_end, msg)
    assert done is not None and done.key.study_uid == "1.2.3"  # its own job: finished
    assert isinstance(pending, worker.RunJob) and pending.job.job_id == 4

    done, pending = worker._speculate(worker_end, msg)  # nothing came meanwhile
    assert done is not None and pending is None


def test_node_asks_once_per_instance_set(tmp_path: Path) -> None:
    rules = Rules.model_validate(
        {
            "node": {"port": free_port(), "accept_unknown_callers": True},
            "http": {"enabled": False},
            "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_disk_mb": 0},
        }
    )
    node = Node(rules, processor=lambda job: pytest.fail("nothing runs"))
    try:
        node._want_speculation("1.2.3", 10.0)
        node._want_speculation("1.2.3", 10.0)
        assert node._take_speculation() == "1.2.3"
        assert node._take_speculation() is None
        node._want_speculation("1.2.3", 10.0)  # already sent for this instance set
        assert node._take_speculation() is None
        node._want_speculation("1.2.3", 11.5)  # a later instance: ask again
        assert node._take_speculation() == "1.2.3"
        node._want_speculation("1.2.4", 12.0)
        node._forget_speculations({"1.2.3"})  # 1.2.4 is no longer receiving
        assert node._take_speculation() is None
    finally:
        node.spool.close()
        node._lock_file.close()

"""The node's worker plumbing without a full node: the failure policy of a job's result, the
worker's test-fault switch, the scheduler's next deadline, and the spool lock per role."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.config import CompletionSettings
from node.errors import InvalidInstance, SpoolError, StageFailed
from node.ingest.completion import SeriesCount
from node.ingest.spool import StudyProgress
from node.pipeline.context import Stage
from node.pipeline.worker import TEST_FAULT_ENV, fault_from_env, job_result
from node.records import StudyJob
from node.service import lock_spool
from node.service.node import _next_check_s

JOB = StudyJob(job_id=7, study_uid="1.2.3", instance_paths=(), attempt=1, reopened=False)


def test_our_own_error_about_the_input_is_permanent() -> None:
    result = job_result(JOB, InvalidInstance("no pixel data"))
    assert (result.permanent, result.error, result.outcome) == (True, "InvalidInstance", None)


def test_a_wrapped_third_party_error_is_retried_and_keeps_its_stage() -> None:
    try:
        try:
            raise MemoryError
        except MemoryError as exc:
            raise StageFailed("stage infer failed", stage=Stage.INFER) from exc
    except StageFailed as wrapped:
        result = job_result(JOB, wrapped)
    assert (result.permanent, result.stage, result.error_type) == (False, "infer", "StageFailed")


def test_any_other_exception_is_retried() -> None:
    result = job_result(JOB, RuntimeError("boom"))
    assert (result.permanent, result.stage) == (False, "unknown")


def test_the_fault_switch_parses_and_refuses_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEST_FAULT_ENV, raising=False)
    assert fault_from_env() is None
    monkeypatch.setenv(TEST_FAULT_ENV, "hang:infer:1.2.3")
    fault = fault_from_env()
    assert fault is not None and (fault.action, fault.stage, fault.study_uid) == (
        "hang",
        "infer",
        "1.2.3",
    )
    monkeypatch.setenv(TEST_FAULT_ENV, "crash:load")
    fault = fault_from_env()
    assert fault is not None and fault.study_uid is None
    monkeypatch.setenv(TEST_FAULT_ENV, "explode:load")
    with pytest.raises(ValueError, match=r"want hang\|crash"):
        fault_from_env()


def _study(series: tuple[SeriesCount, ...] = ()) -> StudyProgress:
    now = time.time()
    return StudyProgress(
        study_uid="1.2.3", last_received_at=now, receiving_since=now, series=series
    )


def test_the_scheduler_sleeps_until_the_quiet_period_ends() -> None:
    c = CompletionSettings(quiet_period_s=20, max_wait_s=3600, use_expected_counts=True)
    due = _next_check_s(_study(), last=100.0, first=90.0, now=105.0, c=c)
    assert due == pytest.approx(15.0, abs=0.01)


def test_the_scheduler_wakes_for_max_wait_or_a_complete_study_sooner() -> None:
    c = CompletionSettings(quiet_period_s=20, max_wait_s=12, use_expected_counts=True)
    assert _next_check_s(_study(), last=100.0, first=90.0, now=100.0, c=c) == pytest.approx(
        2.0, abs=0.01
    )
    complete = (SeriesCount(series_uid="1.2.3.1", received=10, expected=10),)
    c = CompletionSettings(quiet_period_s=20, max_wait_s=3600, use_expected_counts=True)
    due = _next_check_s(_study(complete), last=100.0, first=90.0, now=100.2, c=c)
    assert due == pytest.approx(0.8, abs=0.01)  # the 1 s settle time, not the quiet period
    c = CompletionSettings(quiet_period_s=20, max_wait_s=3600, use_expected_counts=False)
    due = _next_check_s(_study(complete), last=100.0, first=90.0, now=100.2, c=c)
    assert due == pytest.approx(19.8, abs=0.01)


def test_roles_share_the_spool_lock_and_a_whole_node_excludes_them(tmp_path: Path) -> None:
    receiver = lock_spool(tmp_path, shared=True)
    worker = lock_spool(tmp_path, shared=True)  # a second role beside the first
    with pytest.raises(SpoolError, match="in use by another running node"):
        lock_spool(tmp_path)
    receiver.close()
    worker.close()
    whole = lock_spool(tmp_path)
    with pytest.raises(SpoolError, match="in use by a node running every role"):
        lock_spool(tmp_path, shared=True)
    whole.close()


def test_processing_timeout_is_validated_and_defaults_to_fifteen_minutes() -> None:
    from pydantic import ValidationError

    from node.config import Rules

    assert Rules().processing.timeout_s == 900.0
    assert Rules.model_validate({"processing": {"timeout_s": 30}}).processing.timeout_s == 30
    for bad in (0, -5, 10**6):
        with pytest.raises(ValidationError, match="timeout_s"):
            Rules.model_validate({"processing": {"timeout_s": bad}})


def test_processes_preparing_one_spool_side_by_side_never_trip_each_other(
    tmp_path: Path,
) -> None:
    """Role processes start together on one spool: each one's writability probe is its own
    (a shared probe name let one process remove the file another was about to remove)."""
    import threading

    from node.service.lock import prepare_spool_dir

    spool = tmp_path / "spool"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def prepare() -> None:
        start.wait()
        for _ in range(300):
            try:
                prepare_spool_dir(spool)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=prepare) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list(spool.iterdir()) == []  # no probe left behind


def test_a_worker_freezes_what_it_loaded_before_it_says_it_is_ready(tmp_path: Path) -> None:
    """Otherwise the first study pays a full garbage collection over everything the worker
    loaded (0.6 s, docs/benchmarks.md Run 10)."""
    import gc

    from node.config import Rules
    from node.pipeline import worker

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        problems = worker._load_models(Rules(models_dir=tmp_path, tasks={}))
        assert problems == ()
        assert gc.get_freeze_count() > 1000  # the modules, torch and the report tables
    finally:
        gc.unfreeze()

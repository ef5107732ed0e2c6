"""The scale benchmark runs end to end on a few instances and reports both rates."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.lab.bench_scale import bench_ingest, bench_workers, format_ingest, format_workers
from tests.pg import skip_reason


@pytest.mark.integration
@pytest.mark.slow
def test_bench_ingest_measures_both_backends(tmp_path: Path) -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    result = bench_ingest(tmp_path, n_instances=6, rounds=1)
    assert len(result.sqlite_per_s) == len(result.postgres_per_s) == 1
    assert min(result.sqlite_per_s + result.postgres_per_s) > 0
    assert min(result.direct_sqlite_per_s + result.direct_postgres_per_s) > 0
    assert result.direct_ratio is not None and result.direct_ratio > 0
    text = format_ingest(result)
    assert "PostgreSQL / SQLite ingest ratio (medians):" in text and "6 instances" in text
    assert "without the network (Spool.store in a loop)" in text


@pytest.mark.integration
@pytest.mark.heavy
def test_bench_workers_measures_each_count_of_worker_processes(tmp_path: Path) -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    rates = bench_workers(tmp_path, n_studies=2, counts=(1, 2))
    assert [(r.workers, r.n_studies) for r in rates] == [(1, 2), (2, 2)]
    assert all(r.seconds > 0 and r.per_minute > 0 for r in rates)
    assert "2 worker process(es)" in format_workers(rates)

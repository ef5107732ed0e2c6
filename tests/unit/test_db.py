"""The database layer (node.store.db): a spool made by an earlier neuronode upgrades in place,
a newer schema is refused, PostgreSQL is upgraded only on request, statements adapt per engine."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node.deliver.outbox import Outbox
from node.ingest.spool import Index, Spool
from node.pipeline.jobs import JobQueue
from node.store.db import (
    INDEX,
    OUTBOX,
    Database,
    SchemaError,
    _adapt,
    latest_version,
    safe_url,
    sqlite_url,
    upgrade_all,
)
from tests.pg import PostgresServer

LEGACY = Path(__file__).parent / "legacy_spool"  # made by main at 30a278f (before versions)
STUDY = "1.2.826.0.1.3680043.10.54321.1"


def _legacy_spool(root: Path) -> Path:
    root.mkdir(parents=True)
    for name in ("index", "outbox"):
        with sqlite3.connect(root / f"{name}.sqlite") as db:
            db.executescript((LEGACY / f"{name}.sql").read_text())
        db.close()
    return root


def test_a_spool_made_before_versions_upgrades_in_place_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    root = _legacy_spool(tmp_path / "spool")
    spool = Spool(root, min_free_disk_mb=0)
    try:
        assert spool.index.schema().version == latest_version(INDEX) == 3
        assert spool.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 2
        [study] = spool.index.query("SELECT state, n_instances FROM studies")
        assert (study["state"], study["n_instances"]) == ("processing", 2)
        names = {
            str(r["name"])
            for r in spool.index.query("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"jobs_study", "jobs_lease", "instances_study", "jobs_state"} <= names
        # The job the old node left processing is taken back and runs again under new code.
        queue = JobQueue(spool.index, owner="new", lease_s=30)
        assert queue.release_orphans() == 1
        job = queue.claim()
        assert job is not None and job.study_uid == STUDY and len(job.instance_paths) == 2
        # New rows continue the old sequence.
        with spool.index.transaction() as db:
            seq = db.execute(
                "INSERT INTO quarantine (sha256, reason, calling_ae, received_at) "
                "VALUES ('x', 'r', 'A', 1.0) ON CONFLICT (sha256) DO NOTHING"
            ).rowcount
        assert seq == 1
    finally:
        spool.close()
    with Outbox(root) as outbox:
        [row] = outbox.all()
        assert row.destination == "pacs" and row.study_uid == STUDY
        assert outbox._db.schema().version == latest_version(OUTBOX)


def test_a_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    Index(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 99 WHERE component = 'index'")
    db.close()
    with pytest.raises(SchemaError, match="version 99, newer than this neuronode knows"):
        Index(path)


def test_statements_adapt_per_engine() -> None:
    sql = "SELECT a FROM t WHERE b = ? AND c LIKE '1.2.%?' LIMIT 1 FOR UPDATE SKIP LOCKED"
    assert _adapt(sql, False, True) == "SELECT a FROM t WHERE b = ? AND c LIKE '1.2.%?' LIMIT 1"
    assert _adapt(sql, True, True) == (
        "SELECT a FROM t WHERE b = %s AND c LIKE '1.2.%%?' LIMIT 1 FOR UPDATE SKIP LOCKED"
    )
    assert _adapt("SELECT '%'", True, False) == "SELECT '%'"  # no parameters: no formatting


def test_the_password_is_masked_wherever_the_url_is_shown() -> None:
    masked = safe_url("postgresql+psycopg://node:s3cret@db.example:5432/neuronode")
    assert "s3cret" not in masked and "db.example:5432/neuronode" in masked


@pytest.mark.integration
def test_postgres_is_upgraded_only_on_request(pg_server: PostgresServer, tmp_path: Path) -> None:
    url = pg_server.new_database()
    with pytest.raises(SchemaError, match="run `neuronode db upgrade"):
        Index(tmp_path / "index.sqlite", url=url)
    states = upgrade_all(tmp_path, url)
    assert [(s.component, s.version) for s in states] == [(INDEX, 3), (OUTBOX, 1)]
    index = Index(tmp_path / "index.sqlite", url=url)
    try:
        assert index.postgres and index.schema().version == 3
        assert not (tmp_path / "index.sqlite").exists()  # nothing embedded was made
    finally:
        index.close()
    # Running it again changes nothing.
    assert upgrade_all(tmp_path, url) == states


def test_a_database_refuses_an_unknown_component(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="component"):
        Database(sqlite_url(tmp_path / "x.sqlite"), component="nope")

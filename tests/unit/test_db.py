"""The database layer (node.store.db): a spool made by an earlier neuronode upgrades in place,
a newer schema is refused, PostgreSQL is upgraded only on request, statements adapt per engine."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml

from node.cli import main
from node.config import Rules, check_files_exist, validate_rules_text
from node.deliver.outbox import Outbox
from node.errors import ConfigError
from node.ingest.spool import Index, Spool
from node.pipeline.jobs import JobQueue
from node.service import Node
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


def _rules_file(tmp_path: Path, database: dict[str, str] | None = None) -> Path:
    doc: dict[str, object] = {"storage": {"spool_dir": str(tmp_path / "spool")}}
    if database is not None:
        doc["database"] = database
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("database", "problem"),
    [
        ({"url": "postgresql+psycopg://node@db:5432/nn"}, None),
        ({"url": "postgresql://node@127.0.0.1/nn"}, None),
        ({"url": "postgresql://node:s3cret@db/nn"}, "database.url: a password in the rule file"),
        ({"url": "mysql://node@db/nn"}, "database.url: not a PostgreSQL URL"),
        ({"url": "postgresql://node@db/nn", "url_file": "/x"}, "url and url_file are both set"),
        ({"uri": "postgresql://node@db/nn"}, "database.uri: unknown key"),
    ],
)
def test_the_database_section_is_validated(
    database: dict[str, str], problem: str | None, tmp_path: Path
) -> None:
    rules, problems = validate_rules_text(yaml.safe_dump({"database": database}))
    if problem is None:
        assert rules is not None and rules.database.shared and not problems
        assert rules.database.resolve_url() == database["url"]
    else:
        assert rules is None
        assert any(problem in p.render(tmp_path / "r.yaml") for p in problems)
        assert not any("s3cret" in p.render(tmp_path / "r.yaml") for p in problems)


def test_url_file_is_read_when_used_and_checked_by_neuronode_check(tmp_path: Path) -> None:
    secret = tmp_path / "db-url"
    rules, _ = validate_rules_text(yaml.safe_dump({"database": {"url_file": str(secret)}}))
    assert rules is not None and rules.database.shared
    [missing] = check_files_exist(rules)
    assert missing.path == "database.url_file" and "database URL" in (missing.fix or "")
    with pytest.raises(ConfigError, match=r"database\.url_file: cannot read"):
        rules.database.resolve_url()
    secret.write_text("not a url s3cret\n")
    with pytest.raises(ConfigError, match="does not hold a PostgreSQL URL") as err:
        rules.database.resolve_url()
    assert "s3cret" not in str(err.value)
    secret.write_text("postgresql+psycopg://node:s3cret@db:5432/nn\n")
    assert rules.database.resolve_url() == "postgresql+psycopg://node:s3cret@db:5432/nn"
    assert not Rules().database.shared and Rules().database.resolve_url() is None


def test_db_upgrade_and_status_on_the_embedded_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _legacy_spool(tmp_path / "spool")
    rules = _rules_file(tmp_path)
    assert main(["db", "status", "--rules", str(rules)]) == 1
    out = capsys.readouterr().out
    assert "index schema: version 0, this neuronode needs 3" in out
    assert main(["db", "upgrade", "--rules", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "index schema: version 3" in out and "outbox schema: version 1" in out
    assert main(["db", "status", "--rules", str(rules)]) == 0


def test_a_node_refuses_to_start_on_a_newer_schema(tmp_path: Path) -> None:
    rules = Rules.model_validate(
        {"storage": {"spool_dir": str(tmp_path / "spool")}, "http": {"enabled": False}}
    )
    Index(tmp_path / "spool" / "index.sqlite").close()
    with sqlite3.connect(tmp_path / "spool" / "index.sqlite") as db:
        db.execute("UPDATE schema_version SET version = 7")
    db.close()
    with pytest.raises(ConfigError, match="newer than this neuronode knows"):
        Node(rules, processor=lambda job: pytest.fail("nothing runs"))


@pytest.mark.integration
def test_db_upgrade_on_postgres_never_prints_the_password(
    pg_server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg_server.new_database().replace("postgres@", "postgres:s3cret@")  # trust: ignored
    secret = tmp_path / "db-url"
    secret.write_text(url + "\n")
    rules = _rules_file(tmp_path, {"url_file": str(secret)})
    assert main(["db", "status", "--rules", str(rules)]) == 1
    assert main(["db", "upgrade", "--rules", str(rules)]) == 0
    assert main(["db", "status", "--rules", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "index schema: version 3 (postgresql+psycopg://postgres:***@127.0.0.1" in out
    assert "s3cret" not in out
    assert not (tmp_path / "spool").exists()  # nothing embedded was made

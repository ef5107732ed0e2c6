"""One schema and one code path for the index, the job queue and the outbox, on SQLite or
PostgreSQL (SQLAlchemy Core 2).

SQLite stays the embedded default: `<spool>/index.sqlite` (instances, studies, quarantine, jobs,
job history, purged studies) and `<spool>/outbox.sqlite` (deliveries), WAL, synchronous=FULL, one
connection per file behind a lock, write transactions `BEGIN IMMEDIATE`. With a `database.url`
in the rules, the same tables live in one PostgreSQL database shared by every node process;
each transaction takes a pooled connection and rows are locked where two processes could meet
(`SELECT ... FOR UPDATE`, job and delivery leasing with `SKIP LOCKED`).

The SQL the stages write is plain text with qmark placeholders, kept portable: `ON CONFLICT`
instead of `INSERT OR ...`, `RETURNING` instead of `lastrowid`, casts where PostgreSQL must
know a parameter's type. `Database` adapts it per engine at one place (`_adapt`): placeholders
for psycopg, and row-lock clauses dropped on SQLite, whose `BEGIN IMMEDIATE` already serialises
every writer. Errors leave as `DatabaseError` with a constant message (a driver's text can quote
a UID); the URL is never logged with its password.

The schema is versioned per component (`index`, `outbox`) in `schema_version`; migrations are
ordered functions. A database older than this code is migrated on open when `migrate` is true
(the embedded SQLite: always); a PostgreSQL database is upgraded only by `neuronode db upgrade`,
one operator step before new code is rolled out to every node (as Orthanc does). A database
newer than this code is refused.

Why this module is long: the schema, its migrations and the one adapter every stage's SQL goes
through are kept together, so what a table looks like and how a statement reaches either engine
are read in one place.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from node.log import get_logger

log = get_logger(__name__)

INDEX: Final = "index"
OUTBOX: Final = "outbox"

# An autoincrementing key: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
_Key = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("component", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("upgraded_at", Float, nullable=False),
)

instances = Table(
    "instances",
    metadata,
    Column("seq", _Key, primary_key=True, autoincrement=True),
    Column("sop_instance_uid", Text, nullable=False, unique=True),
    Column("study_uid", Text, nullable=False),
    Column("series_uid", Text, nullable=False),
    Column("sop_class_uid", Text, nullable=False),
    Column("transfer_syntax_uid", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("calling_ae", Text, nullable=False),
    Column("images_in_acquisition", Integer),
    Column("temporal_positions", Integer),
    Index("instances_study", "study_uid"),
    sqlite_autoincrement=True,
)

studies = Table(
    "studies",
    metadata,
    Column("study_uid", Text, primary_key=True),
    Column("state", Text, nullable=False),
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("n_instances", Integer, nullable=False),
    Column("reopened", Integer, nullable=False, server_default="0"),
    Column("times_done", Integer, nullable=False, server_default="0"),
    Column("receiving_since", Float),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("sha256", Text, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("calling_ae", Text, nullable=False),
    Column("received_at", Float, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", _Key, primary_key=True, autoincrement=True),
    Column("study_uid", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("reopened", Integer, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False),
    Column("owner", Text),
    Column("lease_expires", Float),
    Column("claimed_seq", BigInteger),
    Column("available_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("last_error", Text),
    Index("jobs_state", "state", "available_at"),
    Index("jobs_study", "study_uid"),  # version 2
    Index("jobs_lease", "state", "lease_expires"),  # version 3
    sqlite_autoincrement=True,
)

job_history = Table(
    "job_history",
    metadata,
    Column("id", _Key, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("study_uid", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("owner", Text, nullable=False),
    Column("reopened", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("outcome", Text),
    Column("audit_path", Text),
    Column("error", Text),
    sqlite_autoincrement=True,
)

purged = Table(
    "purged",
    metadata,
    Column("id", _Key, primary_key=True, autoincrement=True),
    Column("study_key", Text, nullable=False),
    Column("purged_at", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("n_instances", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("delivered_at", Float, nullable=False),
    sqlite_autoincrement=True,
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("row_id", _Key, primary_key=True, autoincrement=True),
    Column("sop_uid", Text, nullable=False),
    Column("destination", Text, nullable=False),
    Column("study_uid", Text, nullable=False),
    Column("sop_class_uid", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text),
    Column("last_status_code", Integer),
    Column("sent_sop_uid", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("delivered_at", Float),
    UniqueConstraint("sop_uid", "destination"),
    Index("deliveries_due", "destination", "state", "next_attempt_at"),
    sqlite_autoincrement=True,
)

_TABLES: Final = {
    INDEX: (instances, studies, quarantine, jobs, job_history, purged),
    OUTBOX: (deliveries,),
}


class DatabaseError(sqlite3.Error):
    """The index or outbox database failed (busy, unreachable, a constraint).

    A subclass of `sqlite3.Error` so that every guard written for the embedded index also
    holds on PostgreSQL; the message is constant text and the driver's error class, never the
    driver's message (which can quote a UID).
    """


class SchemaError(DatabaseError):
    """The database's schema is not the one this code knows (newer, or not yet upgraded)."""


# --- migrations --------------------------------------------------------------------------------


def _baseline(component: str) -> Callable[[Connection], None]:
    """Version 1: the tables as neuronode has always made them, created where missing; an
    index made before `max_wait_s` existed gains `studies.receiving_since`."""

    def run(conn: Connection) -> None:
        metadata.create_all(conn, tables=list(_TABLES[component]), checkfirst=True)
        if component == INDEX:
            columns = {c["name"] for c in inspect(conn).get_columns("studies")}
            if "receiving_since" not in columns:
                conn.exec_driver_sql("ALTER TABLE studies ADD COLUMN receiving_since FLOAT")

    return run


def _create_index(name: str) -> Callable[[Connection], None]:
    def run(conn: Connection) -> None:
        (index,) = (i for t in metadata.tables.values() for i in t.indexes if i.name == name)
        index.create(conn, checkfirst=True)

    return run


# Version 2: jobs by study (retention, requeue and status look up a study's latest job).
_index_v2 = _create_index("jobs_study")
# Version 3: expired leases are found without a scan of every processing job.
_index_v3 = _create_index("jobs_lease")


MIGRATIONS: Final[dict[str, tuple[Callable[[Connection], None], ...]]] = {
    INDEX: (_baseline(INDEX), _index_v2, _index_v3),
    OUTBOX: (_baseline(OUTBOX),),
}


def latest_version(component: str) -> int:
    """The schema version this code writes for a component."""
    return len(MIGRATIONS[component])


# --- rows and cursors --------------------------------------------------------------------------


class Row(tuple[Any, ...]):
    """A result row readable by position, by column name (`row["state"]`) and by unpacking."""

    _names: dict[str, int]

    def __new__(cls, values: Iterable[Any], names: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> tuple[str, ...]:
        """The column names, in order."""
        return tuple(self._names)


class Cursor:
    """What `execute` returns: the rows (read at once), `rowcount` and `lastrowid`."""

    def __init__(self, rows: list[Row], rowcount: int, lastrowid: int | None) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def fetchone(self) -> Any:  # Row | None; Any as sqlite3's, so callers index it freely
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Row]:
        rest = self._rows[self._next :]
        self._next = len(self._rows)
        return rest

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())


_LOCK_CLAUSE = re.compile(r"\s+FOR\s+UPDATE(\s+SKIP\s+LOCKED)?", re.IGNORECASE)


@functools.lru_cache(maxsize=512)
def _adapt(sql: str, postgres: bool, with_params: bool) -> str:
    """The statement as this engine's driver takes it.

    PostgreSQL (psycopg, format style): `?` outside string literals becomes `%s`, and `%`
    (LIKE patterns) is doubled when parameters are bound. SQLite: row-lock clauses go, as a
    `BEGIN IMMEDIATE` transaction already holds the only write lock.
    """
    if not postgres:
        return _LOCK_CLAUSE.sub("", sql)
    out: list[str] = []
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            out.append("%s")
        elif ch == "%" and with_params:
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)


def _wrap(exc: SQLAlchemyError, doing: str) -> DatabaseError:
    orig = getattr(exc, "orig", None)
    kind = type(orig).__name__ if orig is not None else type(exc).__name__
    code = getattr(orig, "sqlstate", None)
    return DatabaseError(f"database: cannot {doing}: {kind}" + (f" ({code})" if code else ""))


class Session:
    """One transaction's statements: `execute(sql, params)` as with sqlite3, on either engine."""

    def __init__(self, conn: Connection, *, postgres: bool) -> None:
        self._conn = conn
        self._postgres = postgres

    @property
    def postgres(self) -> bool:
        return self._postgres

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement with qmark parameters; rows are read at once."""
        stmt = _adapt(sql, self._postgres, bool(params))
        try:
            if params:
                result = self._conn.exec_driver_sql(stmt, tuple(params))
            else:
                result = self._conn.exec_driver_sql(stmt)
            rows: list[Row] = []
            if result.returns_rows:
                names = {str(k): i for i, k in enumerate(result.keys())}
                rows = [Row(r, names) for r in result.fetchall()]
            lastrowid = None if self._postgres else result.lastrowid
            return Cursor(rows, result.rowcount, lastrowid)
        except SQLAlchemyError as exc:
            raise _wrap(exc, "run a statement") from None

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Cursor:
        """Run one statement once per parameter tuple."""
        params = [tuple(p) for p in seq]
        if not params:
            return Cursor([], 0, None)
        try:
            result = self._conn.exec_driver_sql(_adapt(sql, self._postgres, True), params)
        except SQLAlchemyError as exc:
            raise _wrap(exc, "run a statement") from None
        return Cursor([], result.rowcount, None)


# --- engines -----------------------------------------------------------------------------------


def is_postgres(url: str) -> bool:
    """True for a PostgreSQL URL (postgresql://, postgresql+psycopg://)."""
    return url.split(":", 1)[0].split("+", 1)[0] == "postgresql"


def safe_url(url: str) -> str:
    """The URL with its password masked, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def sqlite_url(path: Path, *, readonly: bool = False) -> str:
    """The SQLAlchemy URL of an embedded SQLite file."""
    if readonly:
        return f"sqlite:///file:{path}?mode=ro&uri=true"
    return f"sqlite:///{path}"


def _postgres_url(url: str) -> str:
    """psycopg 3 is the driver: a bare postgresql:// URL is given it explicitly."""
    scheme, rest = url.split(":", 1)
    return ("postgresql+psycopg" if scheme == "postgresql" else scheme) + ":" + rest


def make_engine(url: str) -> Engine:
    """An engine for either backend; SQLite with WAL, synchronous=FULL and a 30 s busy wait."""
    if is_postgres(url):
        try:
            return create_engine(
                _postgres_url(url), pool_pre_ping=True, pool_size=4, max_overflow=8
            )
        except (ArgumentError, ImportError) as exc:
            raise DatabaseError(
                f"database: bad URL {safe_url(url)}: {type(exc).__name__}"
            ) from None
    engine = create_engine(
        url,
        poolclass=NullPool,
        connect_args={"timeout": 30.0, "check_same_thread": False, "isolation_level": None},
    )
    readonly = "mode=ro" in url

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        if not readonly:
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=FULL")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")

    return engine


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaState:
    """Where a component's schema stands: its version in the database and the code's."""

    component: str
    version: int
    latest: int


class Database:
    """One database (an SQLite file, or a PostgreSQL database) holding one schema component.

    `transaction()` yields a `Session` inside one atomic write transaction; `query()` reads.
    SQLite: one connection behind a lock (threads share it). PostgreSQL: a connection from the
    pool per call, so receive threads and workers write in parallel. `check` false skips the
    schema check (read-only status readers, `db upgrade` itself).
    """

    def __init__(
        self, url: str, *, component: str, migrate: bool = False, check: bool = True
    ) -> None:
        if component not in MIGRATIONS:
            raise ValueError(f"component: unknown {component!r}")
        self.url = url
        self.component = component
        self.postgres = is_postgres(url)
        self._lock = threading.RLock()
        self._engine = make_engine(url)
        self._conn: Connection | None = None
        self._closed = False
        if not self.postgres:
            try:
                self._conn = self._engine.connect()
            except SQLAlchemyError as exc:
                self._engine.dispose()
                raise _wrap(exc, "open the index") from None
        if check:
            try:
                self._check_schema(migrate=migrate or not self.postgres)
            except BaseException:
                self.close()
                raise

    @property
    def url_if_shared(self) -> str | None:
        """The PostgreSQL URL (the outbox lives there too); None for the embedded SQLite."""
        return self.url if self.postgres else None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        if self._closed:
            raise DatabaseError("database: closed")
        if self._conn is not None:
            with self._lock:
                yield self._conn
            return
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:
            raise _wrap(exc, f"connect to {safe_url(self.url)}") from None
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One atomic write transaction, rolled back on error."""
        with self._connection() as conn:
            try:
                if self.postgres:
                    conn.begin()
                else:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
            except SQLAlchemyError as exc:
                raise _wrap(exc, "begin a transaction") from None
            try:
                yield Session(conn, postgres=self.postgres)
            except BaseException:
                with contextlib.suppress(SQLAlchemyError):
                    if self.postgres:
                        conn.rollback()
                    else:
                        conn.exec_driver_sql("ROLLBACK")
                raise
            try:
                if self.postgres:
                    conn.commit()
                else:
                    conn.exec_driver_sql("COMMIT")
            except SQLAlchemyError as exc:
                raise _wrap(exc, "commit") from None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run a read-only query and return all rows."""
        with self._connection() as conn:
            try:
                return Session(conn, postgres=self.postgres).execute(sql, params).fetchall()
            finally:
                if self.postgres:
                    with contextlib.suppress(SQLAlchemyError):
                        conn.rollback()

    def close(self) -> None:
        """Checkpoint the WAL (SQLite) and release every connection."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                with contextlib.suppress(SQLAlchemyError):
                    self._conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()
                self._conn = None
            self._engine.dispose()

    # --- schema ----------------------------------------------------------------------------

    def schema(self) -> SchemaState:
        """The component's version in the database (0: never made) and this code's."""
        with self._connection() as conn:
            try:
                version = _read_version(conn, self.component)
            except SQLAlchemyError as exc:
                raise _wrap(exc, "read the schema version") from None
            finally:
                if self.postgres:
                    conn.rollback()
        return SchemaState(
            component=self.component, version=version, latest=latest_version(self.component)
        )

    def upgrade(self) -> SchemaState:
        """Apply the migrations this database lacks, in order, in one transaction."""
        latest = latest_version(self.component)
        with self.transaction() as session:
            conn = session._conn
            try:
                if self.postgres:  # two nodes upgrading at once: one waits for the other
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727001)")
                schema_version.create(conn, checkfirst=True)
                version = _read_version(conn, self.component)
                if version > latest:
                    raise SchemaError(_newer(self.component, version, latest))
                for number in range(version + 1, latest + 1):
                    MIGRATIONS[self.component][number - 1](conn)
                    _write_version(conn, self.component, number)
            except SQLAlchemyError as exc:
                raise _wrap(exc, "upgrade the schema") from None
        if version < latest:
            log.info(
                "database_upgraded",
                component=self.component,
                from_version=version,
                to_version=latest,
            )
        return SchemaState(component=self.component, version=latest, latest=latest)

    def _check_schema(self, *, migrate: bool) -> None:
        state = self.schema()
        if state.version > state.latest:
            raise SchemaError(_newer(self.component, state.version, state.latest))
        if state.version < state.latest:
            if not migrate:
                raise SchemaError(
                    f"database: the {self.component} schema of {safe_url(self.url)} is at "
                    f"version {state.version}, this neuronode needs {state.latest}: run "
                    "`neuronode db upgrade --rules RULES` first"
                )
            self.upgrade()


def _newer(component: str, version: int, latest: int) -> str:
    return (
        f"database: the {component} schema is at version {version}, newer than this neuronode "
        f"knows ({latest}): run the neuronode that upgraded it, or a newer one"
    )


def _read_version(conn: Connection, component: str) -> int:
    """0 when nothing is recorded (a new database, or one made before versions existed)."""
    if not inspect(conn).has_table("schema_version"):
        return 0
    row = conn.exec_driver_sql(
        _adapt("SELECT version FROM schema_version WHERE component = ?", _pg(conn), True),
        (component,),
    ).fetchone()
    return 0 if row is None else int(row[0])


def _write_version(conn: Connection, component: str, version: int) -> None:
    conn.exec_driver_sql(
        _adapt(
            "INSERT INTO schema_version (component, version, upgraded_at) VALUES (?, ?, ?) "
            "ON CONFLICT (component) DO UPDATE SET version = excluded.version, "
            "upgraded_at = excluded.upgraded_at",
            _pg(conn),
            True,
        ),
        (component, version, time.time()),
    )


def _pg(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def index_url(spool_dir: Path, url: str | None) -> str:
    """The index's database: the configured PostgreSQL URL, else `<spool>/index.sqlite`."""
    return url if url else sqlite_url(spool_dir / "index.sqlite")


def outbox_url(spool_dir: Path, url: str | None, *, readonly: bool = False) -> str:
    """The outbox's database: the configured PostgreSQL URL, else `<spool>/outbox.sqlite`."""
    return url if url else sqlite_url(spool_dir / "outbox.sqlite", readonly=readonly)


def upgrade_all(spool_dir: Path, url: str | None) -> tuple[SchemaState, ...]:
    """Create or migrate every component (what `neuronode db upgrade` does)."""
    out = []
    for component, where in ((INDEX, index_url), (OUTBOX, outbox_url)):
        db = Database(where(spool_dir, url), component=component, check=False)
        try:
            out.append(db.upgrade())
        finally:
            db.close()
    return tuple(out)

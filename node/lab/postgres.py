"""A throwaway PostgreSQL for the tests and the scale benchmark: Debian's server in a temporary
data directory, run as a non-root user, on a free loopback port, trust for 127.0.0.1 only.

`PostgresServer` starts and stops one cluster; `new_database()` gives each test its own empty
database (made fresh, upgraded by the caller), so tests never see each other's rows. When the
suite runs as root (CI), the server runs as the `postgres` system user through `setpriv`
(postgres refuses to run as root). Missing binaries or user: `skip_reason()` says why.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from node.errors import NodeError
from node.lab.orthanc import free_port

PG_BIN = Path(os.environ.get("NEURONODE_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"  # the system user the server runs as when the tests run as root


class PostgresUnavailable(NodeError):
    """PostgreSQL cannot run here (binaries, psycopg or the user to run it as are missing)."""


def skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None."""
    if not (PG_BIN / "postgres").exists() or not (PG_BIN / "initdb").exists():
        return f"PostgreSQL server binaries not found in {PG_BIN} (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no '{PG_USER}' user to run PostgreSQL as"
        if shutil.which("setpriv") is None:
            return "running as root and setpriv (util-linux) is missing"
    return None


class PostgresServer:
    """One throwaway PostgreSQL cluster; `url` is its maintenance database's URL."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.port = free_port()
        self._fsync = fsync
        self._tmp = Path(tempfile.mkdtemp(prefix="neuronode-pg-"))
        self.data_dir = self._tmp / "data"
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self.log_path = self._tmp / "postgres.log"

    def _as_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["setpriv", "--reuid", PG_USER, "--regid", PG_USER, "--init-groups", *argv]

    def start(self) -> None:
        reason = skip_reason()
        if reason is not None:
            raise PostgresUnavailable(reason)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_USER)
            os.chown(self._tmp, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            self._as_user(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "--encoding=UTF8",
                    "--locale=C",
                ]
            ),
            check=True,
            capture_output=True,
        )
        # Only loopback TCP, trust for 127.0.0.1 alone; no Unix socket.
        (self.data_dir / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            self._as_user(
                [
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    f"fsync={'on' if self._fsync else 'off'}",
                    "-c",
                    f"synchronous_commit={'on' if self._fsync else 'off'}",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        import psycopg

        while True:
            if self._proc.poll() is not None:
                raise PostgresUnavailable(f"postgres exited: {self.log_path.read_text()[-2000:]}")
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of one database of this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Make a new empty database; return its URL."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._tmp)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

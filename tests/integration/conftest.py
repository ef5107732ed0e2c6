"""Fixtures that run a real `neuronode serve` subprocess on a free loopback port.

Each node gets its own temp rule file and spool; its stdout and stderr go to files so tests
can read every log line (the PHI test) and the node is always stopped in teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.lab.orthanc import free_port
from tests.conftest import REPO

CALLERS = ("STORESCU", "SENDER2", "PYSCU")


@dataclass
class NodeProc:
    """A `neuronode serve` subprocess with its rule file, spool and captured output."""

    workdir: Path
    port: int
    ae_title: str = "NEURONODE"
    settings: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    @property
    def rules_path(self) -> Path:
        return self.workdir / "rules.yaml"

    def write_rules(self) -> None:
        doc: dict[str, Any] = {
            "node": {
                "ae_title": self.ae_title,
                "bind_address": "127.0.0.1",
                "port": self.port,
                "allowed_callers": [{"ae_title": a, "host": "127.0.0.1"} for a in CALLERS],
            },
            "http": {"port": 0},  # several nodes may run at once: no fixed HTTP port
            "storage": {"spool_dir": str(self.spool), "min_free_disk_mb": 1},
            "completion": {"quiet_period_s": 0.5, "poll_interval_s": 0.1},
            "processing": {"workers": 1, "lease_s": 30, "max_attempts": 3},
            "logging": {"format": "json", "level": "info"},
            # No specialist tasks unless a test asks for them: `serve` refuses to start when a
            # bundle an enabled task needs is missing, and these tests are about receiving.
            "tasks": {},
        }
        for section, values in self.settings.items():
            doc.setdefault(section, {}).update(values)
        self.rules_path.write_text(yaml.safe_dump(doc), encoding="utf-8")

    def start(self, env: dict[str, str] | None = None, timeout_s: float = 30.0) -> None:
        """Start the node and wait until its port accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "node already running"
        self.write_rules()
        self.runs += 1
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("NEURONODE_LOG_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--rules", str(self.rules_path)],
            cwd=REPO,
            env=full_env,
            stdout=open(self.workdir / f"stdout.{self.runs}.log", "wb"),  # noqa: SIM115
            stderr=open(self.workdir / f"stderr.{self.runs}.log", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"node did not listen on {self.port}:\n{self.logs()}")

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def logs(self) -> str:
        """Everything the node wrote to stdout and stderr, over all its runs."""
        return "".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(self.workdir.glob("std*.log"))
        )

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the spool index (a separate connection; WAL lets it read while the node writes)."""
        conn = sqlite3.connect(self.spool / "index.sqlite", timeout=10)
        try:
            return list(conn.execute(sql, params).fetchall())
        finally:
            conn.close()

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Poll until `predicate()` holds; fail with the node's logs otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (sqlite3.OperationalError, IndexError):  # table or row not there yet
                pass
            time.sleep(0.1)
        raise AssertionError(
            f"condition not met in {timeout_s} s; node logs:\n{self.logs()[-4000:]}"
        )


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProc]]:
    """Make nodes (each on its own port and spool); every one is stopped at teardown."""
    made: list[NodeProc] = []

    def make(name: str = "node", **settings: dict[str, Any]) -> NodeProc:
        workdir = tmp_path / name
        workdir.mkdir()
        node = NodeProc(workdir=workdir, port=free_port(), settings=dict(settings))
        made.append(node)
        return node

    yield make
    for node in made:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=5)


@pytest.fixture
def node(node_factory: Callable[..., NodeProc]) -> NodeProc:
    """One started node with the default test rules."""
    n = node_factory()
    n.start()
    return n

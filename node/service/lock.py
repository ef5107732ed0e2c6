"""The spool folder and its lock: which node processes may share one spool.

A node running every role (`serve`, the default) holds an exclusive lock: one node per spool.
A process running one role (`serve --role receiver|worker|sender`) holds a shared lock: the
roles of one node share the spool, while a whole node cannot start beside them (nor they
beside it). The lock is released by the kernel even after kill -9.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from pathlib import Path
from typing import IO

from node.errors import ConfigError, SpoolError

LOCK_FILE = "node.lock"


def os_reason(exc: BaseException) -> str:
    """The operating system's words for an OSError (else the exception's type)."""
    return str(getattr(exc, "strerror", None) or type(exc).__name__)


def prepare_spool_dir(spool_dir: Path) -> None:
    """Create the spool folder; failing that, one ConfigError naming storage.spool_dir."""
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        # A probe of this process's own: processes starting side by side on a shared spool
        # (roles, several machines) must not remove each other's.
        probe = (
            spool_dir / f".writable.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}"
        )
        probe.touch()
        probe.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"storage.spool_dir: cannot create or write {spool_dir}: {os_reason(exc)}"
        ) from None


def lock_spool(spool_dir: Path, *, shared: bool = False) -> IO[str]:
    """Lock the spool: exclusive (a whole node) or shared (one role of a node)."""
    fh = open(spool_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115
    try:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        what = "a node running every role" if shared else "another running node (or its roles)"
        raise SpoolError(f"{spool_dir} is in use by {what}") from exc
    return fh

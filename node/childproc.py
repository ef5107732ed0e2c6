"""The node's child processes (worker processes, extra receiver processes): how the node starts
one with a pipe, and how the child's entry point runs.

A child is ``python -m MODULE --fd N``: N is its end of a socket pair over which the node and the
child exchange pickled messages (multiprocessing.connection.Connection). The child asks Linux to
kill it when the node dies, even by kill -9, so it never outlives the node; it ignores Ctrl-C
(which reaches the whole process group), because the node decides when its children stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def spawn(module: str) -> tuple[subprocess.Popen[bytes], Connection]:
    """Start ``python -m module --fd N`` with its end of a new socket pair; the node's end."""
    import socket

    parent, child = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--fd", str(child.fileno())],
            pass_fds=(child.fileno(),),
            close_fds=True,
        )
    except OSError:
        parent.close()
        child.close()
        raise
    child.close()
    return proc, Connection(parent.detach())


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the node dies (even by kill -9): a child never
    outlives its node, so a restarted node never races an orphan (on a job, on the port)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe's end-of-file stops it instead
        pass
    if os.getppid() == 1:  # the node died before the request took effect
        sys.exit(0)


def child_main(prog: str, argv: Sequence[str] | None, serve: Callable[[Connection], int]) -> int:
    """A child's ``main``: parse ``--fd``, tie its life to the node's, run ``serve`` on the pipe."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--fd", type=int, required=True, help="this process's end of the pipe")
    args = parser.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(args.fd)
    try:
        return serve(conn)
    except (EOFError, BrokenPipeError):  # the node went away mid-message
        return 0
    finally:
        conn.close()


def exit_name(returncode: int | None) -> str:
    """How a child ended, for logs and errors: 'SIGKILL', 'exit 1', or 'running'."""
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"

"""More receiver processes on the node's DICOM port: C-STORE beyond one interpreter's GIL.

With `node.receiver_processes: N` (N > 1) the node's own receiver listens with SO_REUSEPORT and
N - 1 children ``python -m node.ingest.processes --fd F`` listen on the same port; Linux hands
each new connection to one of them. Each child is a whole receiver: the same rules (allowed
callers, TLS, PDU limits), its own `Spool` on the same spool folder and index (SQLite in WAL
with a busy wait: every write is one BEGIN IMMEDIATE transaction, so processes take turns;
each process group-commits its own associations), the same quarantine and free-disk floor, so
a C-STORE success still means the file and its index row are durable. A study whose instances
arrive on several processes is one row in the one index: the node's completion scheduler
enqueues it once.

Each child tells the node, over its pipe, what became of every C-STORE: the node counts it in
its metrics (one sum over every process) and wakes its scheduler, as for its own receiver.
A child that dies is started again; when the node stops it asks every child to stop (open
associations get the same grace period), then kills what is left. A child dies with the node
(PR_SET_PDEATHSIG, and the pipe's end-of-file).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from node.childproc import child_main, exit_name, spawn
from node.config import Rules
from node.errors import ConfigError, NodeError
from node.log import configure, get_logger, set_correlation_key

log = get_logger(__name__)

READY_TIMEOUT_S = 60.0  # a child must listen within this (it imports pynetdicom, opens the index)
RESTART_S = 1.0  # a child that died is started again after this
KILL_GRACE_S = 3.0  # after its grace period, how long a child has before SIGKILL
SIGNAL_GRACE_S = 10.0  # a child sent SIGTERM itself (systemd signals the whole group) stops so


# --- the messages between the node and a receiver process -----------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiverInit:
    """node -> child, once: the rules, the log key, and the port the node's receiver holds."""

    rules: Rules
    log_key: bytes
    index: int
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiverReady:
    """child -> node, once: listening (problem empty), or why it cannot."""

    problem: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreCounted:
    """child -> node: what became of one C-STORE (receive.StoreCounter's arguments)."""

    outcome: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StopReceiving:
    """node -> child: stop; open associations have `grace_s` to finish."""

    grace_s: float


# --- the node's side --------------------------------------------------------------------------


class _Child:
    """One receiver process and its pipe."""

    def __init__(self, index: int, init: ReceiverInit) -> None:
        self.index = index
        self.proc, self.conn = spawn("node.ingest.processes")
        self.conn.send(init)

    def wait_ready(self, timeout_s: float) -> str:
        """Wait until it listens: "" when it does, else the reason it cannot."""
        if not self.conn.poll(timeout_s):
            self.kill()
            return "a receiver process did not start listening in time"
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            return f"a receiver process ended at start ({exit_name(self.proc.wait())})"
        if not isinstance(msg, ReceiverReady):
            self.kill()
            return "a receiver process answered out of turn"
        return msg.problem

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()


StoreCounter = Callable[[str, str], None]


class ReceiverProcesses:
    """The node's extra receiver processes (`node.receiver_processes` - 1 of them)."""

    def __init__(self, rules: Rules, *, port: int, log_key: bytes, on_store: StoreCounter) -> None:
        self.rules = rules
        self.port = port
        self.log_key = log_key
        self._on_store = on_store
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pids(self) -> tuple[int, ...]:
        """The children's process ids (for a test, or `ps`)."""
        with self._lock:
            return tuple(c.proc.pid for c in self._children.values())

    def _init(self, index: int) -> ReceiverInit:
        return ReceiverInit(rules=self.rules, log_key=self.log_key, index=index, port=self.port)

    def start(self) -> None:
        """Start every child and wait until each listens; a ConfigError if one cannot."""
        n = self.rules.node.receiver_processes - 1
        for index in range(1, n + 1):
            try:
                child = _Child(index, self._init(index))
            except OSError as exc:
                self.stop(0.0)
                raise ConfigError(
                    f"node.receiver_processes: cannot start a receiver process: {exc.strerror}"
                ) from None
            problem = child.wait_ready(READY_TIMEOUT_S)
            if problem:
                child.kill()
                self.stop(0.0)
                raise ConfigError(problem)
            with self._lock:
                self._children[index] = child
            log.info("receiver_process_started", worker=index, pid=child.proc.pid)
        self._thread = threading.Thread(target=self._listen, name="receiver-processes", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        """Count what the children report; start a dead child again."""
        while not self._stopping.is_set():
            with self._lock:
                by_conn = {c.conn: c for c in self._children.values() if not c.conn.closed}
            if not by_conn:
                self._stopping.wait(RESTART_S)
                continue
            try:
                ready = wait(list(by_conn), timeout=0.5)
            except (OSError, ValueError):  # a pipe closed meanwhile (stopping, or replaced)
                continue
            for conn in ready:
                child = by_conn[conn]  # type: ignore[index]
                try:
                    msg = child.conn.recv()
                except (EOFError, OSError):
                    self._died(child)
                    continue
                if isinstance(msg, StoreCounted):
                    self._on_store(msg.outcome, msg.reason)

    def _died(self, child: _Child) -> None:
        child.kill()
        if self._stopping.is_set():
            return
        log.error(
            "receiver_process_died", worker=child.index, reason=exit_name(child.proc.returncode)
        )
        while not self._stopping.wait(RESTART_S):
            try:
                fresh = _Child(child.index, self._init(child.index))
            except OSError as exc:
                log.error("receiver_process_start_failed", error_type=type(exc).__name__)
                continue
            problem = fresh.wait_ready(READY_TIMEOUT_S)
            if not problem:
                with self._lock:
                    self._children[child.index] = fresh
                log.info("receiver_process_started", worker=child.index, pid=fresh.proc.pid)
                return
            fresh.kill()
            log.error("receiver_process_start_failed", reason=problem)

    def stop(self, grace_s: float) -> None:
        """Ask every child to stop (open associations get `grace_s`), then kill the rest."""
        self._stopping.set()
        with self._lock:
            children = list(self._children.values())
            self._children.clear()
        for child in children:
            with contextlib.suppress(OSError):
                child.conn.send(StopReceiving(grace_s=grace_s))
        deadline = time.monotonic() + grace_s + KILL_GRACE_S
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("receiver_process_killed", worker=child.index)
            child.kill()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


# --- the child process ------------------------------------------------------------------------


def serve(conn: Connection) -> int:
    """Listen beside the node until it says stop (or goes away), reporting every C-STORE."""
    from node.ingest.receive import Receiver
    from node.ingest.spool import Spool
    from node.store.db import DatabaseError

    init = conn.recv()
    if not isinstance(init, ReceiverInit):
        return 2
    rules = init.rules
    configure(rules.logging.format, rules.logging.level)
    set_correlation_key(init.log_key)
    send_lock = threading.Lock()

    def report(outcome: str, reason: str) -> None:
        with send_lock:
            conn.send(StoreCounted(outcome=outcome, reason=reason))

    try:
        spool = Spool(
            rules.storage.spool_dir,
            min_free_disk_mb=rules.storage.min_free_disk_mb,
            database_url=rules.database.resolve_url(),
            shared=True,
        )
    except (NodeError, DatabaseError, OSError) as exc:
        conn.send(ReceiverReady(problem=f"storage.spool_dir: cannot open the spool: {exc}"))
        return 1
    settings = rules.node.model_copy(update={"port": init.port})
    receiver = Receiver(settings, spool, on_store=report, shared_port=True)
    try:
        receiver.start()
    except ConfigError as exc:
        spool.close()
        conn.send(ReceiverReady(problem=str(exc)))
        return 1
    with send_lock:
        conn.send(ReceiverReady())
    log.info("receiver_process_listening", worker=init.index, port=receiver.port)
    grace_s = SIGNAL_GRACE_S
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set():
        if not conn.poll(0.5):
            continue
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the node is gone
            break
        if isinstance(msg, StopReceiving):
            grace_s = msg.grace_s
            break
    receiver.stop(grace_s)
    spool.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m node.ingest.processes --fd N``."""
    return child_main("python -m node.ingest.processes", argv, serve)


if __name__ == "__main__":
    # Run the imported module's main: the node pickles the messages with
    # node.ingest.processes' classes, and isinstance must see those.
    from node.ingest import processes

    sys.exit(processes.main())

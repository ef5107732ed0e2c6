"""The outbox senders: one thread per destination, each woken when results are queued.

Each destination has its own thread and its own outbox connection, so one that never answers
holds up only itself, and each honours its own backoff: it sleeps until its earliest row is
due, or until `wake` (a finished job, a requeue, a reload), or at most `idle_s` (what another
process queued).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from node.config import Rules
from node.errors import NodeError
from node.log import get_logger
from node.service.backoff import RepeatedError
from node.web.metrics import NodeMetrics

if TYPE_CHECKING:
    from node.deliver.outbox import SendFn

log = get_logger(__name__)

SENDER_INTERVAL_S = 1.0  # a sender with no local worker (role sender) polls its outbox
SENDER_IDLE_S = 5.0  # a sender beside local workers: each finished job wakes it


class Senders:
    """The sender threads of one node process, by destination."""

    def __init__(
        self,
        rules: Callable[[], Rules],
        *,
        metrics: NodeMetrics,
        stop: threading.Event,
        spawn: Callable[[str, Callable[[], None]], None],
        send: SendFn | None,
        idle_s: float,
    ) -> None:
        self._rules = rules  # the running rules (a reload replaces them)
        self._metrics = metrics
        self._stop = stop
        self._spawn = spawn
        self._send = send
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._wake: dict[str, threading.Event] = {}  # one per destination with a thread

    def start(self) -> None:
        """One sender thread per destination in the rules that has none yet."""
        with self._lock:
            for dest in self._rules().destinations:
                if dest.name not in self._wake:
                    self._wake[dest.name] = threading.Event()
                    self._spawn(f"sender-{dest.name}", partial(self._loop, dest.name))

    def wake(self) -> None:
        """Every sender looks at the outbox now (also how `stop` reaches them)."""
        with self._lock:
            events = tuple(self._wake.values())
        for ev in events:
            ev.set()

    def park_unknown(self, *, starting: bool = False) -> None:
        """Park the deliveries of destinations removed from the rules (logged once, shown by
        `status`), and take back the parked rows of destinations that are in the rules again.
        `starting`: also take back the rows a sender that died mid-attempt left 'sending'
        (the embedded outbox: no other sender runs on this spool then)."""
        from node.deliver.outbox import Outbox

        rules = self._rules()
        try:
            with Outbox(
                rules.storage.spool_dir, database_url=rules.database.resolve_url()
            ) as outbox:
                if starting:
                    n = outbox.release_interrupted()
                    if n:
                        log.warning("deliveries_released", count=n)
                outbox.park_unknown([d.name for d in rules.destinations], now=time.time())
        except (sqlite3.Error, OSError) as exc:
            log.error("sender_failed", error_type=type(exc).__name__)

    def _loop(self, destination: str) -> None:
        """Deliver one destination's due outbox rows until stopped or removed by a reload."""
        from node.deliver.outbox import Outbox, deliver_due

        with self._lock:
            wake = self._wake[destination]
        try:
            rules = self._rules()
            outbox = Outbox(rules.storage.spool_dir, database_url=rules.database.resolve_url())
        except (sqlite3.Error, OSError) as exc:
            log.error("sender_failed", destination=destination, error_type=type(exc).__name__)
            return
        errors = RepeatedError("sender_error")
        try:
            while not self._stop.is_set():
                wake.clear()
                rules = self._rules()
                with self._lock:  # removed by a reload: its rows are parked
                    if destination not in {d.name for d in rules.destinations}:
                        self._wake.pop(destination, None)
                        return
                wait_s = self._idle_s
                try:
                    counts = deliver_due(
                        outbox, rules, time.time(), send=self._send, destination=destination
                    )
                    next_due = outbox.next_due(destination)
                except (NodeError, OSError, sqlite3.Error) as exc:
                    errors.record(exc)
                    wait_s = errors.wait_s(SENDER_INTERVAL_S)
                else:
                    errors.clear()
                    m = self._metrics
                    m.deliveries_sent.labels(destination=destination).inc(counts.delivered)
                    m.deliveries_failed.labels(destination=destination).inc(
                        counts.retrying + counts.dead
                    )
                    m.deliveries_dead.labels(destination=destination).inc(counts.dead)
                    if counts.delivered or counts.dead or counts.retrying:
                        log.info(
                            "sender_pass",
                            destination=destination,
                            count=counts.delivered,
                            n_failed=counts.retrying + counts.dead,
                        )
                    if next_due is not None:
                        wait_s = min(wait_s, max(0.0, next_due - time.time()))
                wake.wait(wait_s)
        finally:
            outbox.close()

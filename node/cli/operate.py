"""Running and operating the node: `serve`, `status`, `requeue`."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from node.cli.command import Command, rules_option
from node.config import load_rules
from node.deliver.outbox import OUTBOX_DB, Outbox, delivery_counts
from node.errors import ConfigError, NodeError
from node.ingest.spool import Index
from node.log import configure, get_logger, load_or_create_key, set_correlation_key
from node.pipeline.jobs import JobQueue
from node.pipeline.models import check_bundles
from node.records import StudyStatus
from node.service import Node, prepare_spool_dir

log = get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeArgs:
    rules: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusArgs:
    rules: Path
    json: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RequeueArgs:
    rules: Path
    destination: str | None


def cmd_serve(args: ServeArgs) -> int:
    """`neuronode serve --rules R`: run until SIGTERM/SIGINT, then stop cleanly and exit 0."""
    rules = load_rules(args.rules)
    configure(rules.logging.format, rules.logging.level)
    from node.bundles.bundle import set_torch_threads  # torch: only once serving is certain

    set_torch_threads()

    problems = check_bundles(rules)
    if problems:
        for problem in problems:
            log.error("bundle_unavailable", reason=problem)
        raise ConfigError(
            "refusing to start: a bundle an enabled task needs cannot be served\n  "
            + "\n  ".join(problems)
            + f"\n(fix models_dir or the bundle, or set enabled: false on the task; "
            f"`neuronode check {args.rules}` lists what is missing)"
        )
    prepare_spool_dir(rules.storage.spool_dir)
    set_correlation_key(load_or_create_key(rules.storage.spool_dir / "log.key"))
    node = Node(rules)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal_received", status=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node.start()
    except NodeError:
        node.stop(grace_s=0)
        raise
    while not stop.wait(0.5):
        pass
    node.stop()
    return 0


def cmd_status(args: StatusArgs) -> int:
    """`neuronode status`: studies by state, queue depth and recent failures, from the index."""
    rules = load_rules(args.rules)
    configure(rules.logging.format, "warning")  # stderr: stdout is the report (maybe JSON)
    spool_dir = rules.storage.spool_dir
    index_path = spool_dir / "index.sqlite"
    if not index_path.exists():
        print(f"no spool index at {index_path} (has the node run yet?)")
        return 1
    set_correlation_key(load_or_create_key(spool_dir / "log.key"))
    index = Index(index_path)
    try:
        queue = JobQueue(index, owner="status", lease_s=rules.processing.lease_s)
        summary = queue.summary()
        by_state = {
            str(r["state"]): int(r["n"])
            for r in index.query("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")
        }
        n_quarantined = int(index.query("SELECT COUNT(*) AS n FROM quarantine")[0]["n"])
    finally:
        index.close()
    deliveries = delivery_counts(spool_dir)
    known = {d.name for d in rules.destinations}
    doc: dict[str, Any] = {
        "spool": str(spool_dir),
        "studies": {s.value: by_state.get(s.value, 0) for s in StudyStatus},
        "queue_depth": summary.queue_depth,
        "processing": summary.processing,
        "quarantined": n_quarantined,
        "deliveries": deliveries,
        "recent_failures": [
            {
                "study_key": f.study_key,
                "job_id": f.job_id,
                "state": f.state,
                "attempts": f.attempts,
                "error": f.error,
                "at": f.at,
            }
            for f in summary.recent_failures
        ],
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"spool: {spool_dir}")
    print("studies: " + ", ".join(f"{k}={v}" for k, v in doc["studies"].items()))
    print(f"queue depth: {summary.queue_depth} ready, {summary.processing} processing")
    print(f"quarantined instances: {n_quarantined}")
    for name, states in sorted(deliveries.items()):
        note = "" if name in known else " (not in the rules: parked)"
        print(
            f"deliveries to {name}{note}: "
            + ", ".join(f"{k}={v}" for k, v in sorted(states.items()))
        )
    if summary.recent_failures:
        print("recent failures:")
        for f in summary.recent_failures:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f.at))
            print(
                f"  {when}Z study {f.study_key} job {f.job_id} {f.state} "
                f"attempts={f.attempts} {f.error}"
            )
    else:
        print("recent failures: none")
    return 0


def cmd_requeue(args: RequeueArgs) -> int:
    """`neuronode requeue`: send dead-lettered deliveries again."""
    rules = load_rules(args.rules)
    spool: Path = rules.storage.spool_dir
    destination = args.destination
    names = [d.name for d in rules.destinations]
    if destination is not None and destination not in names:
        raise ConfigError(
            f"no destination '{destination}' in {args.rules}"
            f" (destinations: {', '.join(names) or 'none'})"
        )
    if not (spool / OUTBOX_DB).exists():
        print("0 deliveries requeued (no outbox yet)")
        return 0
    with Outbox(spool) as outbox:
        n = outbox.requeue(now=time.time(), destination=destination)
    where = f" for {destination}" if destination else ""
    print(f"{n} deliveries requeued{where}")
    return 0


def _status_arguments(p: argparse.ArgumentParser) -> None:
    rules_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _requeue_arguments(p: argparse.ArgumentParser) -> None:
    rules_option(p)
    p.add_argument("--destination", default=None, help="only this destination (default: all)")


COMMANDS = (
    Command(
        name="serve",
        help="run the DICOM node (SCP, workers, sender)",
        arguments=rules_option,
        args=ServeArgs,
        run=cmd_serve,
    ),
    Command(
        name="status",
        help="studies by state, queue depth, recent failures",
        arguments=_status_arguments,
        args=StatusArgs,
        run=cmd_status,
    ),
    Command(
        name="requeue",
        help="send dead-lettered deliveries again",
        arguments=_requeue_arguments,
        args=RequeueArgs,
        run=cmd_requeue,
    ),
)

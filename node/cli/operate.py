"""Running and operating the node: `serve`, `status`, `requeue`, `purge`.

`serve` must open its listener within a second of launch, so this module imports only what
the listener needs; the outbox (and the DICOM writing libraries behind it) load inside the
commands that use them, and in the node's sender threads once it listens.
"""

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
from node.config import Rules, load_rules
from node.errors import ConfigError, NodeError, SpoolError
from node.ingest.spool import Index, Spool, is_valid_uid
from node.log import configure, get_logger, load_or_create_key, set_correlation_key, uid_key
from node.pipeline.jobs import JobQueue
from node.pipeline.models import required_bundles
from node.service import ALL_ROLES, Node, Role, lock_spool, prepare_spool_dir

log = get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeArgs:
    rules: Path
    role: str = "all"  # or one Role


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusArgs:
    rules: Path
    json: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RequeueArgs:
    rules: Path
    destination: str | None
    study: str | None
    only: str | None  # "jobs", "deliveries" or None (both)


def _refusal(problems: tuple[str, ...], rules_path: Path) -> ConfigError:
    """The one error `serve` stops with when a bundle an enabled task needs cannot be served."""
    return ConfigError(
        "refusing to start: a bundle an enabled task needs cannot be served\n  "
        + "\n  ".join(problems)
        + f"\n(fix models_dir or the bundle, or set enabled: false on the task; "
        f"`neuronode check {rules_path}` lists what is missing)"
    )


def missing_bundles(rules: Rules) -> tuple[str, ...]:
    """The cheap check before the listener opens: every bundle an enabled task needs has its
    folder and metadata (loading and verifying them is the worker processes' job)."""
    problems: list[str] = []
    seen: set[Path] = set()
    for task, path in required_bundles(rules):
        if path in seen:
            continue
        seen.add(path)
        if not (path / "configs" / "metadata.json").is_file():
            problems.append(f"task {task}: no bundle at {path} (configs/metadata.json missing)")
    return tuple(problems)


def cmd_serve(args: ServeArgs) -> int:
    """`neuronode serve --rules R [--role R]`: run until SIGTERM/SIGINT, then stop cleanly and
    exit 0.

    The listener opens before any model loads (this process never imports torch); the worker
    processes load and verify the bundles in the background. If one cannot be served, `serve`
    stops with one error naming it, as it did when it checked before opening: studies stored
    meanwhile stay in the spool and are processed once the bundle is fixed.
    """
    rules = load_rules(args.rules)
    configure(rules.logging.format, rules.logging.level)
    roles = ALL_ROLES if args.role == "all" else frozenset({Role(args.role)})
    if Role.WORKER in roles:
        problems = missing_bundles(rules)
        if problems:
            for problem in problems:
                log.error("bundle_unavailable", reason=problem)
            raise _refusal(problems, args.rules)
    prepare_spool_dir(rules.storage.spool_dir)
    set_correlation_key(load_or_create_key(rules.storage.spool_dir / "log.key"))
    # A changed rule file is reloaded; HTTP opens right after the DICOM listener.
    node = Node(rules, rules_path=args.rules, roles=roles, web_after_dicom=True)
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
    while not stop.wait(0.2):
        if node.failed.is_set():
            node.stop(grace_s=0)
            raise _refusal(node.failure, args.rules)
    node.stop()
    return 0


def cmd_status(args: StatusArgs) -> int:
    """`neuronode status`: studies by state, queue depth, the outbox per destination (pending,
    failed, dead, parked), dead and failed jobs, and recent failures."""
    rules = load_rules(args.rules)
    configure(rules.logging.format, "warning")  # stderr: stdout is the report (maybe JSON)
    spool_dir = rules.storage.spool_dir
    index_path = spool_dir / "index.sqlite"
    url = rules.database.resolve_url()
    if url is None and not index_path.exists():
        print(f"no spool index at {index_path} (has the node run yet?)")
        return 1
    set_correlation_key(load_or_create_key(spool_dir / "log.key"))
    index = Index(index_path, url=url)
    try:
        queue = JobQueue(index, owner="status", lease_s=rules.processing.lease_s)
        summary = queue.summary()
        given_up = queue.given_up()
        by_state = index.studies_by_state()
        n_quarantined = int(index.query("SELECT COUNT(*) AS n FROM quarantine")[0]["n"])
    finally:
        index.close()
    from node.deliver.outbox import outbox_summary

    deliveries = outbox_summary(spool_dir, database_url=url)
    known = {d.name for d in rules.destinations}
    doc: dict[str, Any] = {
        "spool": str(spool_dir),
        "studies": by_state,
        "queue_depth": summary.queue_depth,
        "processing": summary.processing,
        "quarantined": n_quarantined,
        "outbox": deliveries,
        "given_up_jobs": [
            {
                "study_key": f.study_key,
                "job_id": f.job_id,
                "state": f.state,
                "attempts": f.attempts,
                "error": f.error,
                "at": f.at,
            }
            for f in given_up
        ],
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
    if deliveries:
        print("outbox:")
        print(f"  {'destination':<20} pending  failed    dead  parked  delivered")
        for name, n in sorted(deliveries.items()):
            note = "" if name in known else "  (not in the rules: parked)"
            print(
                f"  {name:<20} {n['pending']:>7} {n['failed']:>7} {n['dead']:>7}"
                f" {n['parked']:>7} {n['delivered']:>10}{note}"
            )
        if any(n["dead"] for n in deliveries.values()):
            print("  dead deliveries: neuronode requeue [--destination NAME] [--study KEY]")
    else:
        print("outbox: empty")
    if given_up:
        print("dead and failed jobs (neuronode requeue --study KEY):")
        for f in given_up:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f.at))
            print(
                f"  study {f.study_key} job {f.job_id} {f.state} attempts={f.attempts}"
                f" {f.error} ({when}Z)"
            )
    else:
        print("dead and failed jobs: none")
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
    """`neuronode requeue`: take up dead study jobs and send dead-lettered deliveries again;
    all of them, or one study's (by study key or UID), or one destination's deliveries."""
    rules = load_rules(args.rules)
    configure(rules.logging.format, "warning")
    spool: Path = rules.storage.spool_dir
    destination = args.destination
    names = [d.name for d in rules.destinations]
    if destination is not None and destination not in names:
        raise ConfigError(
            f"no destination '{destination}' in {args.rules}"
            f" (destinations: {', '.join(names) or 'none'})"
        )
    set_correlation_key(load_or_create_key(spool / "log.key"))
    index_path = spool / "index.sqlite"
    url = rules.database.resolve_url()
    study_uid = None
    if args.study is not None:
        study_uid = find_study(spool, args.study, database_url=url)
    do_jobs = args.only != "deliveries" and destination is None
    do_deliveries = args.only != "jobs"
    n_jobs = 0
    if do_jobs and (url is not None or index_path.exists()):
        index = Index(index_path, url=url)
        try:
            queue = JobQueue(index, owner="requeue", lease_s=rules.processing.lease_s)
            # A study named on purpose may also be a failed one (its input was fixed).
            n_jobs = len(queue.requeue(study_uid=study_uid, include_failed=study_uid is not None))
        finally:
            index.close()
    from node.deliver.outbox import OUTBOX_DB, Outbox

    n_deliveries = 0
    if do_deliveries and (url is not None or (spool / OUTBOX_DB).exists()):
        with Outbox(spool, database_url=url) as outbox:
            n_deliveries = outbox.requeue(
                now=time.time(), destination=destination, study_uid=study_uid
            )
    where = "".join(
        (
            f" for {destination}" if destination else "",
            f" of study {uid_key(study_uid)}" if study_uid else "",
        )
    )
    if do_jobs:
        print(f"{n_jobs} study jobs requeued{where}")
    if do_deliveries:
        print(f"{n_deliveries} deliveries requeued{where}")
    return 0


def find_study(spool_dir: Path, key_or_uid: str, *, database_url: str | None = None) -> str:
    """The Study Instance UID a study key (as logs and `status` show it) or a UID names, from
    the spool index or the outbox; ConfigError when no study matches."""
    uids: set[str] = set()
    index_path = spool_dir / "index.sqlite"
    if database_url is not None or index_path.exists():
        index = Index(index_path, url=database_url)
        try:
            uids.update(str(r["study_uid"]) for r in index.query("SELECT study_uid FROM studies"))
        finally:
            index.close()
    from node.deliver.outbox import outbox_study_uids

    uids.update(outbox_study_uids(spool_dir, database_url=database_url))
    if is_valid_uid(key_or_uid) and key_or_uid in uids:
        return key_or_uid
    matches = sorted(u for u in uids if uid_key(u) == key_or_uid.lower())
    if not matches:
        raise ConfigError(f"no study '{key_or_uid}' in {spool_dir} (a study key or a UID)")
    return matches[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class PurgeArgs:
    rules: Path
    dry_run: bool


def cmd_purge(args: PurgeArgs) -> int:
    """`neuronode purge`: apply the rule file's retention once (a running node does it
    itself); with --dry-run, print what would go and why, and change nothing."""
    from node.store.retention import plan, purge

    rules = load_rules(args.rules)
    configure(rules.logging.format, "warning")
    spool_dir = rules.storage.spool_dir
    if not (spool_dir / "index.sqlite").exists():
        print(f"no spool index at {spool_dir / 'index.sqlite'} (has the node run yet?)")
        return 1
    set_correlation_key(load_or_create_key(spool_dir / "log.key"))
    lock = None
    if not args.dry_run:
        try:
            lock = lock_spool(spool_dir)
        except SpoolError:
            raise ConfigError(
                f"a node is running on {spool_dir}: it applies retention itself every"
                f" {rules.retention.interval_s:g} s (--dry-run shows what it would purge)"
            ) from None
    spool = Spool(spool_dir, min_free_disk_mb=rules.storage.min_free_disk_mb)
    try:
        now = time.time()
        decisions = plan(spool, rules.retention, now=now)
        done = decisions if args.dry_run else purge(spool, decisions, now=now)
    finally:
        spool.close()
        if lock is not None:
            lock.close()
    r = rules.retention
    limits = ", ".join(
        (
            f"delivered_max_age_h={r.delivered_max_age_h:g}"
            if r.delivered_max_age_h is not None
            else "no age limit",
            f"max_spool_mb={r.max_spool_mb:g}" if r.max_spool_mb is not None else "no ceiling",
        )
    )
    verb = "would purge" if args.dry_run else "purged"
    print(f"retention ({limits}): {verb} {len(done)} studies")
    for d in done:
        why = (
            f"delivered {d.age_h:.1f} h ago"
            if d.reason == "age"
            else f"spool over {r.max_spool_mb:g} MB"
        )
        print(
            f"  study {d.study_key}  {d.reason.value:<4}  {why};"
            f" {d.n_instances} instances, {d.bytes / 1e6:.1f} MB"
        )
    return 0


def _purge_arguments(p: argparse.ArgumentParser) -> None:
    rules_option(p)
    p.add_argument("--dry-run", action="store_true", help="print what would go and why")


def _status_arguments(p: argparse.ArgumentParser) -> None:
    rules_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _requeue_arguments(p: argparse.ArgumentParser) -> None:
    rules_option(p)
    p.add_argument(
        "--destination", default=None, help="only deliveries to this destination (no jobs)"
    )
    p.add_argument(
        "--study", default=None, help="only this study: its key (as status shows it) or its UID"
    )
    p.add_argument(
        "--only", choices=("jobs", "deliveries"), default=None, help="only one kind (default: both)"
    )


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    rules_option(p)
    p.add_argument(
        "--role",
        choices=("all", *(r.value for r in Role)),
        default="all",
        help="run one role of the node (receiver: the SCP; worker: completion, study"
        " workers, retention; sender: outbox senders; each serves its own HTTP) beside the"
        " others on the same spool (default: %(default)s)",
    )


COMMANDS = (
    Command(
        name="serve",
        help="run the DICOM node (SCP, workers, sender)",
        arguments=_serve_arguments,
        args=ServeArgs,
        run=cmd_serve,
    ),
    Command(
        name="status",
        help="studies by state, queue depth, the outbox per destination, dead jobs",
        arguments=_status_arguments,
        args=StatusArgs,
        run=cmd_status,
    ),
    Command(
        name="requeue",
        help="take up dead study jobs and send dead-lettered deliveries again",
        arguments=_requeue_arguments,
        args=RequeueArgs,
        run=cmd_requeue,
    ),
    Command(
        name="purge",
        help="apply retention once; --dry-run prints what would go and why",
        arguments=_purge_arguments,
        args=PurgeArgs,
        run=cmd_purge,
    ),
)

"""`neuronode db upgrade|status`: create or migrate the database schema, and show where it is.

The embedded SQLite index migrates itself when a node opens it; a shared PostgreSQL database
is upgraded only here, once, before a new neuronode is rolled out to every node (a node refuses
a schema older or newer than it knows).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from node.cli.command import Command, rules_option
from node.config import load_rules
from node.log import configure
from node.store.db import (
    INDEX,
    OUTBOX,
    Database,
    index_url,
    latest_version,
    outbox_url,
    safe_url,
    upgrade_all,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DbArgs:
    rules: Path
    action: str  # "upgrade" or "status"


def cmd_db(args: DbArgs) -> int:
    """`neuronode db upgrade`: bring every schema to this code's version and print it;
    `neuronode db status`: print each schema's version, exit 1 when one needs an upgrade."""
    rules = load_rules(args.rules)
    configure(rules.logging.format, "warning")
    url = rules.database.resolve_url()
    spool_dir = rules.storage.spool_dir
    where = safe_url(url) if url else f"SQLite in {spool_dir}"
    if url is None:
        spool_dir.mkdir(parents=True, exist_ok=True)
    if args.action == "upgrade":
        for state in upgrade_all(spool_dir, url):
            print(f"{state.component} schema: version {state.version} ({where})")
        return 0
    behind = False
    for component, at in ((INDEX, index_url), (OUTBOX, outbox_url)):
        db = Database(at(spool_dir, url), component=component, check=False)
        try:
            state = db.schema()
        finally:
            db.close()
        need = "" if state.version == state.latest else f", this neuronode needs {state.latest}"
        behind = behind or state.version != latest_version(component)
        print(f"{component} schema: version {state.version}{need} ({where})")
    return 1 if behind else 0


def _db_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("upgrade", "status"))
    rules_option(p)


COMMANDS = (
    Command(
        name="db",
        help="create or migrate the index/queue/outbox schema (upgrade), or show its version",
        arguments=_db_arguments,
        args=DbArgs,
        run=cmd_db,
    ),
)

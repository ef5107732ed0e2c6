"""The `neuronode` command: argument parsing and dispatch, and nothing else.

Every subcommand is a `Command` record: its name, its arguments, a frozen dataclass that holds
them once parsed (so each handler is typed), and the handler. Handlers live in this package, one
module per group; stages never parse arguments or print. The lab commands (synth, train,
evaluate, fit-ensemble, demo, bench) are declared in `node.cli.lab`, which imports the lab only
inside each handler, so `neuronode status` loads neither torch nor the lab.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from node import NOT_FOR_CLINICAL_USE, __version__
from node.cli import db, lab, operate, rules, study
from node.cli.command import Command
from node.errors import NodeError

COMMANDS: tuple[Command, ...] = (
    *operate.COMMANDS,
    *db.COMMANDS,
    *study.COMMANDS,
    *rules.COMMANDS,
    *lab.COMMANDS,
)


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options."""
    parser = argparse.ArgumentParser(
        prog="neuronode",
        description=f"DICOM AI node for brain MRI. {NOT_FOR_CLINICAL_USE}",
    )
    parser.add_argument("--version", action="version", version=f"neuronode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(p)
        p.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    namespace = build_parser().parse_args(argv)
    command: Command = namespace._command
    fields = dataclasses.fields(command.args)
    args = command.args(**{f.name: getattr(namespace, f.name) for f in fields})
    try:
        return int(command.run(args))
    except NodeError as exc:
        print(f"neuronode {command.name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

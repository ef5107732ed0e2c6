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
from node.cli.command import Command
from node.errors import NodeError


def all_commands() -> tuple[Command, ...]:
    """Every subcommand, in the order `neuronode --help` lists them."""
    from node.cli import db, lab, operate, rules, study

    return (
        *operate.COMMANDS,
        *db.COMMANDS,
        *study.COMMANDS,
        *rules.COMMANDS,
        *lab.COMMANDS,
    )


def _commands_for(argv: Sequence[str]) -> tuple[Command, ...]:
    """The commands to parse `argv` with: `serve` alone loads only its own module, so the
    node's listener opens without waiting for the other commands' libraries (the sequence
    classifier's, the report writers')."""
    if argv[:1] == ["serve"]:
        from node.cli import operate

        return operate.COMMANDS
    return all_commands()


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """All subcommands (or the given ones) and their options."""
    parser = argparse.ArgumentParser(
        prog="neuronode",
        description=f"DICOM AI node for brain MRI. {NOT_FOR_CLINICAL_USE}",
    )
    parser.add_argument("--version", action="version", version=f"neuronode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in all_commands() if commands is None else commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(p)
        p.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    namespace = build_parser(_commands_for(args_list)).parse_args(args_list)
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

"""The record every subcommand is declared with."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_RULES = Path("routing_rules/default.yaml")


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """One subcommand: its parser setup, its typed arguments and its handler."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    args: type[Any]  # a frozen dataclass whose fields are the parser's destinations
    run: Callable[[Any], int]


def rules_option(p: argparse.ArgumentParser) -> None:
    """The --rules option most commands share."""
    p.add_argument(
        "--rules", type=Path, default=DEFAULT_RULES, help="rule file (default: %(default)s)"
    )

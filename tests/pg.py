"""The suite's PostgreSQL: node.lab.postgres (shared with the scale benchmark)."""

from node.lab.postgres import PostgresServer, PostgresUnavailable, skip_reason

__all__ = ["PostgresServer", "PostgresUnavailable", "skip_reason"]

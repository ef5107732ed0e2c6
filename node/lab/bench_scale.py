"""The scale-out benchmark: ingest into the node with its tables in PostgreSQL versus the
embedded SQLite, the same instances sent by dcmtk's storescu (`python -m node.lab.bench_scale`).

Each round sends the same files on one association into a fresh spool: a Receiver whose index is
SQLite (WAL, synchronous=FULL) or a throwaway PostgreSQL started here (fsync on, so both commit
durably), alternating the backends so drift in the machine's load falls on both. The figure is
the ratio of the two rates measured in the same run, not an absolute number.

Studies per minute with 1, 2 and 3 worker processes needs `neuronode serve --role worker`,
which this branch does not have yet: it is reported as not measured. On this 2-core machine
such a figure would show the coordination overhead of the shared queue, not linear speed-up.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from node.config import AllowedCaller, NodeSettings
from node.errors import ConfigError
from node.ingest.receive import Receiver
from node.ingest.spool import Spool
from node.lab.bench import _small_mr
from node.lab.orthanc import SYSTEM_BIN, free_port
from node.lab.postgres import PostgresServer
from node.store.db import upgrade_all


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestRatio:
    """Instances per second into each backend, each round's figures and their ratio."""

    n_instances: int
    sqlite_per_s: tuple[float, ...]
    postgres_per_s: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """PostgreSQL's median rate over SQLite's (above 1: PostgreSQL ingests faster)."""
        return statistics.median(self.postgres_per_s) / statistics.median(self.sqlite_per_s)


def _storescu() -> str:
    path = shutil.which("storescu", path=SYSTEM_BIN)
    if path is None:
        raise ConfigError("benchmark: dcmtk's storescu is not installed (apt-get install dcmtk)")
    return path


def _write_files(folder: Path, n: int) -> tuple[Path, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(_small_mr(n)):
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return tuple(paths)


def _ingest_rate(root: Path, files: tuple[Path, ...], database_url: str | None) -> float:
    """Instances/s of one storescu association into a fresh receiver and spool."""
    spool = Spool(root, min_free_disk_mb=0, database_url=database_url)
    settings = NodeSettings(
        ae_title="NEURONODE",
        port=free_port(),
        allowed_callers=(AllowedCaller(ae_title="STORESCU", host="127.0.0.1"),),
    )
    rx = Receiver(settings, spool)
    rx.start()
    try:
        cmd = [_storescu(), "-nh", "-aet", "STORESCU", "-aec", "NEURONODE", "127.0.0.1"]
        t0 = time.perf_counter()
        out = subprocess.run(
            [*cmd, str(rx.port), *map(str, files)], capture_output=True, text=True, timeout=600
        )
        seconds = time.perf_counter() - t0
    finally:
        rx.stop(2.0)
    try:
        n = int(spool.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
    finally:
        spool.close()
    if out.returncode != 0 or n != len(files):
        raise ConfigError(
            f"benchmark: storescu exited {out.returncode}, {n} of {len(files)} indexed"
        )
    return len(files) / seconds


def bench_ingest(work: Path, *, n_instances: int = 300, rounds: int = 2) -> IngestRatio:
    """The PostgreSQL-versus-SQLite ingest ratio over the same files, rounds alternating."""
    files = _write_files(work / "files", n_instances)
    sqlite_rates: list[float] = []
    postgres_rates: list[float] = []
    with PostgresServer(fsync=True) as pg:
        for k in range(rounds):
            sqlite_rates.append(_ingest_rate(work / f"sqlite{k}", files, None))
            url = pg.new_database()
            upgrade_all(work / f"pg{k}", url)
            postgres_rates.append(_ingest_rate(work / f"pg{k}", files, url))
    return IngestRatio(
        n_instances=n_instances,
        sqlite_per_s=tuple(sqlite_rates),
        postgres_per_s=tuple(postgres_rates),
    )


def format_ingest(r: IngestRatio) -> str:
    """The figures as printed."""
    rates = "; ".join(
        f"round {k + 1}: SQLite {s:.0f}/s, PostgreSQL {p:.0f}/s"
        for k, (s, p) in enumerate(zip(r.sqlite_per_s, r.postgres_per_s, strict=True))
    )
    return (
        f"ingest, storescu, {r.n_instances} instances per round ({rates})\n"
        f"PostgreSQL / SQLite ingest ratio (medians): {r.ratio:.2f}\n"
        "studies per minute with 1, 2, 3 worker processes: not measured "
        "(needs `neuronode serve --role worker`; on 2 cores it would show coordination "
        "overhead, not linear speed-up)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.lab.bench_scale")
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="neuronode-bench-scale-") as tmp:
        result = bench_ingest(Path(tmp), n_instances=args.instances, rounds=args.rounds)
    print(format_ingest(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The scale-out benchmark: ingest into the node with its tables in PostgreSQL versus the
embedded SQLite, the same instances sent by dcmtk's storescu (`python -m node.lab.bench_scale`).

Each round sends the same files on one association into a fresh spool: a Receiver whose index is
SQLite (WAL, synchronous=FULL) or a throwaway PostgreSQL started here (fsync on, so both commit
durably), alternating the backends so drift in the machine's load falls on both. The figure is
the ratio of the two rates measured in the same run, not an absolute number.

Then studies per minute with 1, 2 and 3 worker processes (`neuronode serve --role worker`, each
one study at a time) on the same synthetic studies and one PostgreSQL database: the workers are
started and have loaded their models, the studies are stored at once, and the rate is the
studies over the time from the first job made ready to the last one done. On this 2-core
machine the figure shows the coordination overhead of the shared queue, not linear speed-up:
three workers share two cores.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from node.errors import ConfigError
from node.ingest.spool import Spool
from node.lab.bench import _small_mr, bench_receiver
from node.lab.orthanc import require_dcmtk
from node.lab.postgres import PostgresServer
from node.store.db import INDEX, Database, upgrade_all

_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestRatio:
    """Instances per second into each backend, each round's figures and their ratio; the
    same without the network (Spool.store in a loop), where the index's cost shows most."""

    n_instances: int
    sqlite_per_s: tuple[float, ...]
    postgres_per_s: tuple[float, ...]
    direct_sqlite_per_s: tuple[float, ...] = ()
    direct_postgres_per_s: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        """PostgreSQL's median rate over SQLite's (above 1: PostgreSQL ingests faster)."""
        return statistics.median(self.postgres_per_s) / statistics.median(self.sqlite_per_s)

    @property
    def direct_ratio(self) -> float | None:
        """The same ratio for Spool.store without the network (None when not measured)."""
        if not self.direct_sqlite_per_s or not self.direct_postgres_per_s:
            return None
        return statistics.median(self.direct_postgres_per_s) / statistics.median(
            self.direct_sqlite_per_s
        )


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
    with bench_receiver(root, database_url=database_url) as (rx, spool):
        cmd = [
            require_dcmtk("storescu"),
            "-nh",
            "-aet",
            "STORESCU",
            "-aec",
            "NEURONODE",
            "127.0.0.1",
        ]
        t0 = time.perf_counter()
        out = subprocess.run(
            [*cmd, str(rx.port), *map(str, files)], capture_output=True, text=True, timeout=600
        )
        seconds = time.perf_counter() - t0
    try:
        n = int(spool.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
    finally:
        spool.close()
    if out.returncode != 0 or n != len(files):
        raise ConfigError(
            f"benchmark: storescu exited {out.returncode}, {n} of {len(files)} indexed"
        )
    return len(files) / seconds


def _direct_rate(root: Path, files: tuple[Path, ...], database_url: str | None) -> float:
    """Instances/s of Spool.store (fsync, rename, index) in a loop: no network."""
    blobs = [f.read_bytes() for f in files]
    spool = Spool(root, min_free_disk_mb=0, database_url=database_url)
    try:
        t0 = time.perf_counter()
        for blob in blobs:
            spool.store(blob, calling_ae="BENCH")
        return len(blobs) / (time.perf_counter() - t0)
    finally:
        spool.close()


def bench_ingest(work: Path, *, n_instances: int = 300, rounds: int = 2) -> IngestRatio:
    """The PostgreSQL-versus-SQLite ingest ratio over the same files, rounds alternating."""
    files = _write_files(work / "files", n_instances)
    rates: dict[str, list[float]] = {"sqlite": [], "pg": [], "dsqlite": [], "dpg": []}
    with PostgresServer(fsync=True) as pg:
        for k in range(rounds):
            rates["sqlite"].append(_ingest_rate(work / f"sqlite{k}", files, None))
            url = pg.new_database()
            upgrade_all(work / f"pg{k}", url)
            rates["pg"].append(_ingest_rate(work / f"pg{k}", files, url))
            rates["dsqlite"].append(_direct_rate(work / f"dsqlite{k}", files, None))
            url = pg.new_database()
            upgrade_all(work / f"dpg{k}", url)
            rates["dpg"].append(_direct_rate(work / f"dpg{k}", files, url))
    return IngestRatio(
        n_instances=n_instances,
        sqlite_per_s=tuple(rates["sqlite"]),
        postgres_per_s=tuple(rates["pg"]),
        direct_sqlite_per_s=tuple(rates["dsqlite"]),
        direct_postgres_per_s=tuple(rates["dpg"]),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRate:
    """Studies per minute with a number of worker processes."""

    workers: int
    n_studies: int
    seconds: float

    @property
    def per_minute(self) -> float:
        return 60.0 * self.n_studies / self.seconds


def _tubers_task() -> dict[str, Any]:
    """The tubers task on the shipped FLAIR bundle alone: one real model per study."""
    from node.config import Rules

    task = Rules().tasks["tubers"]
    routes = [r.model_dump(mode="json") for r in task.models if r.bundle == "tubers_flair"]
    if not routes:
        raise ConfigError("benchmark: the default tubers task has no tubers_flair route")
    return {
        "tubers": {
            **task.model_dump(mode="json"),
            "models": routes,
            "enabled": True,
            "requires_lesion": None,
        }
    }


def _worker_round(work: Path, url: str, studies: tuple[Path, ...], k: int) -> WorkerRate:
    spool_dir = work / "spool"
    rules = work / "rules.yaml"
    doc = {
        "database": {"url": url},
        "storage": {"spool_dir": str(spool_dir), "min_free_disk_mb": 0},
        "http": {"enabled": False},
        "completion": {"quiet_period_s": 1.0, "poll_interval_s": 0.2},
        "processing": {"workers": 1, "lease_s": 60},
        "logging": {"format": "json", "level": "info"},
        "models_dir": str(_REPO / "models"),
        "tasks": _tubers_task(),
    }
    work.mkdir(parents=True, exist_ok=True)
    rules.write_text(yaml.safe_dump(doc))
    upgrade_all(spool_dir, url)
    logs = [work / f"worker{i}.log" for i in range(k)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--rules", str(rules), "--role", "worker"],
            cwd=_REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=open(log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        for log in logs
    ]
    db = Database(url, component=INDEX, check=False)
    try:
        deadline = time.monotonic() + 300
        while not all('"worker_ready"' in log.read_text(errors="replace") for log in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise ConfigError(f"benchmark: {k} workers did not get ready; see {work}")
            time.sleep(0.2)
        spool = Spool(spool_dir, min_free_disk_mb=0, database_url=url)
        try:
            for path in studies:
                spool.store(path.read_bytes(), calling_ae="BENCH")
        finally:
            spool.close()
        n = len({path.parent.parent for path in studies})
        while db.query("SELECT COUNT(*) FROM jobs WHERE state = 'done'")[0][0] < n:
            if time.monotonic() > deadline + 600:
                raise ConfigError(f"benchmark: {k} workers did not finish; see {work}")
            time.sleep(0.2)
        first, last = db.query("SELECT MIN(created_at), MAX(updated_at) FROM jobs")[0]
    finally:
        db.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return WorkerRate(workers=k, n_studies=n, seconds=float(last) - float(first))


def bench_workers(
    work: Path, *, n_studies: int = 12, counts: tuple[int, ...] = (1, 2, 3)
) -> tuple[WorkerRate, ...]:
    """Studies per minute with each number of worker processes, the same studies each time."""
    from node.lab.synth import write_studies

    write_studies(
        work / "studies",
        studies=n_studies,
        seed=4242,
        phenotypes=["tsc"],
        vendors=["siemens"],
        size=64,
        slices=8,
        distractors=False,
    )
    files = tuple(sorted((work / "studies").rglob("*.dcm")))
    out = []
    with PostgresServer(fsync=True) as pg:
        for k in counts:
            out.append(_worker_round(work / f"workers{k}", pg.new_database(), files, k))
    return tuple(out)


def format_workers(rates: tuple[WorkerRate, ...]) -> str:
    """The worker figures as printed, with what they mean on this machine."""
    one = rates[0].per_minute if rates else 0.0
    lines = [
        f"{r.workers} worker process(es): {r.per_minute:.1f} studies/min"
        f" ({r.n_studies} studies in {r.seconds:.1f} s; x{r.per_minute / one:.2f} of one)"
        for r in rates
    ]
    lines.append(
        f"({os.cpu_count()} cores: more workers than cores shows the coordination overhead of"
        " the shared queue, not linear speed-up)"
    )
    return "\n".join(lines)


def format_ingest(r: IngestRatio) -> str:
    """The figures as printed."""
    rates = "; ".join(
        f"round {k + 1}: SQLite {s:.0f}/s, PostgreSQL {p:.0f}/s"
        for k, (s, p) in enumerate(zip(r.sqlite_per_s, r.postgres_per_s, strict=True))
    )
    return (
        f"ingest, storescu, {r.n_instances} instances per round ({rates})\n"
        f"PostgreSQL / SQLite ingest ratio (medians): {r.ratio:.2f}"
        + (
            f"\nwithout the network (Spool.store in a loop): SQLite"
            f" {statistics.median(r.direct_sqlite_per_s):.0f}/s, PostgreSQL"
            f" {statistics.median(r.direct_postgres_per_s):.0f}/s, ratio {r.direct_ratio:.2f}"
            if r.direct_ratio is not None
            else ""
        )
    )


def bench_records(work: Path, *, n_instances: int = 300, n_studies: int = 12) -> Any:
    """The scale-out figures for `neuronode bench`: the PostgreSQL/SQLite ingest ratio, and
    studies per minute with 1, 2 and 3 worker processes against one worker in the same run."""
    from node.lab.bench import BenchRecord

    r = bench_ingest(work / "ingest", n_instances=n_instances)
    records = [
        BenchRecord(
            name="scale: ingest on PostgreSQL (storescu)",
            figure=round(statistics.median(r.postgres_per_s), 1),
            unit="instances/s",
            reference=round(statistics.median(r.sqlite_per_s), 1),
            reference_what="the same instances into the embedded SQLite index",
            ratio=round(r.ratio, 2),
            ratio_what="PostgreSQL / SQLite",
            details=(("direct_ratio", round(r.direct_ratio or 0.0, 2)),),
        )
    ]
    rates = bench_workers(work / "workers", n_studies=n_studies)
    one = rates[0].per_minute if rates else 0.0
    for w in rates:
        records.append(
            BenchRecord(
                name=f"scale: {w.workers} worker process(es)",
                figure=round(w.per_minute, 1),
                unit="studies/min",
                reference=round(one, 1),
                reference_what=f"one worker on the same {w.n_studies} studies",
                ratio=round(w.per_minute / one, 2) if one else None,
                ratio_what=f"x of one worker ({os.cpu_count()} cores: overhead, not speed-up)",
            )
        )
    return tuple(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.lab.bench_scale")
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--studies", type=int, default=12, help="for the worker rounds")
    parser.add_argument("--skip-workers", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="neuronode-bench-scale-") as tmp:
        result = bench_ingest(Path(tmp) / "ingest", n_instances=args.instances, rounds=args.rounds)
        print(format_ingest(result), flush=True)
        if not args.skip_workers:
            print(format_workers(bench_workers(Path(tmp) / "workers", n_studies=args.studies)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

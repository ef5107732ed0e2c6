"""Latency benchmarks of a running node (issue 15): launch to first C-ECHO answered, and a
study's SR in the PACS after its quiet period ends.

Both run the real thing: `neuronode serve` as a subprocess with the shipped bundles, dcmtk's
echoscu and storescu, and a throwaway Orthanc (node/lab/orthanc.py) as the PACS and as the
reference. Each figure is printed with its reference measured in the same run:

- launch to first C-ECHO: `serve` spawned, echoscu looped until it answers; reference: Orthanc
  launched and echoed the same way (target: the node <= 1 s).
- quiet period to SR in the PACS: a synthetic study of about 200 instances sent with storescu;
  from the end of its quiet period (last instance + quiet_period_s, by the node's own index)
  to the SR being in Orthanc; reference: the job's processing time (the SR goes out mid-job,
  before the heatmaps are drawn, so the figure can be below it) (target: <= 2 s). The details
  give each stage's milliseconds up to the SR, wall and the worker's CPU (from the job's audit
  record; CPU moves much less than wall time with the machine's load).

`python -m node.lab.bench_latency [--work DIR] [--repeat N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from node.errors import NodeError
from node.lab.bench import BenchRecord, BenchSettings, Detail, format_line, make_study
from node.lab.orthanc import OrthancServer, free_port, require_dcmtk

NODE_AET = "NEURONODE"
SCU_AET = "BENCHSCU"
QUIET_PERIOD_S = 2.0
ECHO_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 600.0
LAUNCH_TARGET_S = 1.0
SR_TARGET_S = 2.0


class BenchError(NodeError):
    """A latency benchmark could not run (the message says why)."""


def _storescu() -> tuple[str, ...]:
    """dcmtk storescu sending a folder, recursively, without its Nagle-on default mattering
    here (one association; the figure is the node's latency after the last instance)."""
    return (require_dcmtk("storescu"), "-aet", SCU_AET, "-aec", NODE_AET, "+sd", "+r", "-nh")


def _echo(port: int, aet: str) -> bool:
    done = subprocess.run(
        [
            require_dcmtk("echoscu"),
            "-to",
            "1",
            "-aet",
            SCU_AET,
            "-aec",
            aet,
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def _until_echo(proc: subprocess.Popen[bytes], port: int, aet: str, started: float) -> float:
    """Seconds from `started` to the first C-ECHO answered."""
    deadline = started + ECHO_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with {proc.returncode} before answering")
        if _echo(port, aet):
            return time.monotonic() - started
        time.sleep(0.01)
    raise BenchError(f"no C-ECHO answer within {ECHO_TIMEOUT_S:g} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_node_rules(
    run: Path, *, port: int, models_dir: Path, destination: dict[str, Any] | None = None
) -> Path:
    """A rule file for a benchmark node: the shipped bundles that load, quiet period 2 s."""
    from node.lab.demo import available_tasks

    tasks, _ = available_tasks(models_dir)
    doc: dict[str, Any] = {
        "version": 1,
        "node": {
            "ae_title": NODE_AET,
            "bind_address": "127.0.0.1",
            "port": port,
            "allowed_callers": [{"ae_title": SCU_AET, "host": "127.0.0.1"}],
        },
        "storage": {"spool_dir": str(run / "spool"), "min_free_disk_mb": 64},
        "http": {"port": 0},
        "completion": {"quiet_period_s": QUIET_PERIOD_S, "use_expected_counts": False},
        "processing": {"workers": 1},
        "logging": {"format": "json", "level": "info"},
        "models_dir": str(models_dir),
        "tasks": tasks,
        "destinations": [destination] if destination else [],
    }
    run.mkdir(parents=True, exist_ok=True)
    path = run / "rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _serve(rules: Path, log: Path, node_path: Path | None = None) -> subprocess.Popen[bytes]:
    """`neuronode serve` of this checkout, or of the `node` package under `node_path` (an
    older checkout, to compare against)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if node_path is not None:
        env["PYTHONPATH"] = str(node_path)
    with open(log, "ab") as out:  # the process keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--rules", str(rules)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=node_path,  # `python -m` puts the working folder first on the path
        )


def bench_launch(work: Path, settings: BenchSettings, node_path: Path | None = None) -> BenchRecord:
    """Launch to first C-ECHO answered: the node against Orthanc, medians of `repeat` runs."""
    repeat = max(3, settings.repeat)
    node_s: list[float] = []
    orthanc_s: list[float] = []
    for i in range(repeat):
        run = work / f"launch-{i}"
        port = free_port()
        rules = write_node_rules(run, port=port, models_dir=settings.models_dir)
        started = time.monotonic()
        proc = _serve(rules, run / "node.log", node_path)
        try:
            node_s.append(_until_echo(proc, port, NODE_AET, started))
        finally:
            _stop(proc)
        orthanc = OrthancServer(run / "orthanc", node_port=port, dicomweb=False)
        started = time.monotonic()
        with open(orthanc.log_path, "ab") as log:
            oproc = subprocess.Popen(
                [str(orthanc.binary), str(orthanc.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=orthanc.workdir,
            )
        try:
            orthanc_s.append(_until_echo(oproc, orthanc.dicom_port, orthanc.aet, started))
        finally:
            _stop(oproc)
    figure = statistics.median(node_s)
    reference = statistics.median(orthanc_s)
    return BenchRecord(
        name="launch to first C-ECHO",
        figure=figure,
        unit="s",
        reference=reference,
        reference_what="Orthanc launched and echoed the same way",
        ratio=figure / reference if reference else None,
        ratio_what="node / Orthanc",
        target=f"<= {LAUNCH_TARGET_S:g} s (issue 15)",
        met=figure <= LAUNCH_TARGET_S,
    )


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _wait_log(log: Path, events: tuple[str, ...], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(e.get("event") in events for e in _events(log)):
            return
        time.sleep(0.05)
    raise BenchError(f"no {' or '.join(events)} in the node's log within {timeout_s:g} s")


def _index_row(spool: Path, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
    conn = sqlite3.connect(spool / "index.sqlite", timeout=10)
    try:
        row = conn.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def bench_quiet_to_pacs(
    work: Path, settings: BenchSettings, n_slices: int = 33, node_path: Path | None = None
) -> BenchRecord:
    """A ~200-instance study's SR in Orthanc, counted from the end of its quiet period."""
    study_settings = BenchSettings(
        size=settings.size, slices=n_slices, models_dir=settings.models_dir, seed=settings.seed
    )
    study = make_study(work / "latency-study", study_settings)
    figures: list[float] = []
    processing: list[float] = []
    scheduling: list[float] = []  # quiet period end -> job started
    to_sr: list[float] = []  # job started -> SR in Orthanc (the SR goes out mid-job)
    after_sr: list[float] = []  # SR in Orthanc -> job finished (the heatmaps, the audit)
    stage_wall: list[dict[str, float]] = []  # each run's stage milliseconds (the audit)
    stage_cpu: list[dict[str, float]] = []  # and the worker's CPU milliseconds per stage
    # The stages before REPORT run during the quiet period (a node with speculation): their
    # CPU, and when they were done counted from the quiet period's end (the job waits for them).
    spec_cpu: list[float] = []
    spec_done: list[float] = []
    for i in range(max(1, settings.repeat)):
        run = work / f"latency-{i}"
        port = free_port()
        orthanc = OrthancServer(run / "orthanc", node_port=port, node_aet=NODE_AET)
        orthanc.start()
        proc: subprocess.Popen[bytes] | None = None
        try:
            destination = {
                "kind": "dicom",
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
            rules = write_node_rules(
                run, port=port, models_dir=settings.models_dir, destination=destination
            )
            log = run / "node.log"
            proc = _serve(rules, log, node_path)
            # Models loaded: a worker says so (a node older than its worker processes loaded
            # them before it started).
            has_workers = node_path is None or (node_path / "node/pipeline/worker.py").exists()
            _wait_log(log, ("worker_ready",) if has_workers else ("node_started",), 300)
            sent = subprocess.run(
                [*_storescu(), "127.0.0.1", str(port), str(study.root)],
                capture_output=True,
                check=False,
            )
            if sent.returncode != 0:
                raise BenchError(f"storescu failed: {sent.stderr.decode(errors='replace')[-300:]}")
            spool = run / "spool"
            sr_at = _wait_for_sr(orthanc, study.study_uid)
            row = _index_row(
                spool,
                "SELECT last_received_at FROM studies WHERE study_uid = ?",
                (study.study_uid,),
            )
            job = _wait_job_done(spool, study.study_uid)
            if row is None or job is None:
                raise BenchError("the node's index has no record of the study or its job")
            quiet_end = float(row[0]) + QUIET_PERIOD_S
            figures.append(sr_at - quiet_end)
            processing.append(float(job[1]) - float(job[0]))
            scheduling.append(float(job[0]) - quiet_end)
            to_sr.append(sr_at - float(job[0]))
            after_sr.append(float(job[1]) - sr_at)
            wall, cpu = _stage_times(spool)
            stage_wall.append(wall)
            stage_cpu.append(cpu)
            spec = _speculation(log, quiet_end)
            if spec is not None:
                spec_cpu.append(spec[0])
                spec_done.append(spec[1])
        finally:
            if proc is not None:
                _stop(proc)
            orthanc.stop()
    figure = statistics.median(figures)
    reference = statistics.median(processing)
    return BenchRecord(
        name=f"quiet period to SR in PACS ({len(study.paths)} instances)",
        figure=figure,
        unit="s",
        reference=reference,
        reference_what="the job's whole processing time (the SR goes out before its end)",
        ratio=figure / reference if reference else None,
        ratio_what="latency / processing",
        target=f"<= {SR_TARGET_S:g} s (issue 15)",
        met=figure <= SR_TARGET_S,
        details=(
            ("quiet_end_to_job_start_s", round(statistics.median(scheduling), 3)),
            ("job_start_to_sr_in_pacs_s", round(statistics.median(to_sr), 3)),
            ("sr_in_pacs_to_job_end_s", round(statistics.median(after_sr), 3)),
            ("processing_s", round(reference, 3)),
            ("stages_to_sr_ms", _stage_line(stage_wall)),
            ("stages_to_sr_cpu_ms", _stage_line(stage_cpu)),
            ("to_sr_cpu_s", _to_sr_total(stage_cpu)),
            ("heatmaps_ms", _stage_line(stage_wall, ("heatmaps",))),
            *_speculation_details(spec_cpu, spec_done, len(figures)),
        ),
    )


def _speculation(log: Path, quiet_end: float) -> tuple[float, float] | None:
    """The CPU ms of the speculation the job took over, and when it was done in seconds after
    the quiet period's end (negative: before it); None when no job took one over."""
    done: dict[str, dict[str, Any]] = {}
    for event in _events(log):
        if event.get("event") == "speculation_done":
            done[str(event.get("study_key"))] = event
        elif event.get("event") == "speculation_reused":
            used = done.get(str(event.get("study_key")))
            if used is not None:
                at = datetime.fromisoformat(str(used["timestamp"])).timestamp()
                return float(used["cpu_ms"]), at - quiet_end
    return None


def _speculation_details(cpu: list[float], done: list[float], runs: int) -> tuple[Detail, ...]:
    if not cpu:
        return ()
    return (
        ("speculations_reused", f"{len(cpu)}/{runs}"),
        ("speculation_cpu_ms", round(statistics.median(cpu))),
        ("speculation_done_after_quiet_end_s", round(statistics.median(done), 3)),
    )


# The stages that run before the SR is queued (the SR's path inside the job).
TO_SR_STAGES = ("load", "classify", "qualify", "route", "infer", "ensemble", "report", "outbox")


def _stage_times(spool: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Wall and CPU milliseconds of each stage of the study's job, from its audit record (CPU
    is absent in the audit of a node older than issue 15's fourth round)."""
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for path in (spool / "results").glob("*/audit.json"):
        for entry in json.loads(path.read_text(encoding="utf-8")).get("stages", ()):
            wall[entry["stage"]] = float(entry["duration_ms"])
            if entry.get("cpu_ms") is not None:
                cpu[entry["stage"]] = float(entry["cpu_ms"])
    return wall, cpu


def _stage_line(runs: list[dict[str, float]], stages: tuple[str, ...] = TO_SR_STAGES) -> str:
    """Median milliseconds of each stage over the runs, e.g. 'load 480 classify 870 ...'."""
    parts = []
    for stage in stages:
        values = [r[stage] for r in runs if stage in r]
        if values:
            parts.append(f"{stage} {statistics.median(values):.0f}")
    return " ".join(parts) or "-"


def _to_sr_total(runs: list[dict[str, float]]) -> float:
    """Median over the runs of the stages' total to the SR, in seconds (0: not recorded)."""
    totals = [sum(r.get(s, 0.0) for s in TO_SR_STAGES) / 1000 for r in runs if r]
    return round(statistics.median(totals), 3) if totals else 0.0


def _wait_job_done(spool: Path, study_uid: str) -> tuple[Any, ...] | None:
    """(started_at, finished_at) of the study's finished job: the SR is in the PACS before
    the job ends (its heatmaps are drawn after it), so this may wait a moment."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while True:
        job = _index_row(
            spool,
            "SELECT started_at, finished_at FROM job_history WHERE study_uid = ? "
            "AND outcome = 'done' ORDER BY id DESC LIMIT 1",
            (study_uid,),
        )
        if job is not None or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def _wait_for_sr(orthanc: OrthancServer, study_uid: str) -> float:
    """Wall-clock time at which Orthanc first lists an SR series of the study."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    query = {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
    while time.monotonic() < deadline:
        if orthanc.post("/tools/find", query):
            return time.time()
        time.sleep(0.02)
    raise BenchError(f"no SR in Orthanc within {RESULT_TIMEOUT_S:g} s")


def bench_latency(work: Path, settings: BenchSettings) -> tuple[BenchRecord, ...]:
    """Both latency figures, launch first (it needs no study)."""
    return (bench_launch(work, settings), bench_quiet_to_pacs(work, settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.lab.bench_latency", description=__doc__)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument(
        "--only", choices=("launch", "sr"), default=None, help="one figure (default: both)"
    )
    parser.add_argument(
        "--node-path",
        type=Path,
        default=None,
        help="measure the node package under this folder instead (an older checkout)",
    )
    args = parser.parse_args(argv)
    settings = BenchSettings(repeat=args.repeat)
    with tempfile.TemporaryDirectory(prefix="neuronode-latency-") as tmp:
        work = args.work if args.work is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            if args.only != "sr":
                print(format_line(bench_launch(work, settings, args.node_path)), flush=True)
            if args.only != "launch":
                record = bench_quiet_to_pacs(work, settings, node_path=args.node_path)
                print(format_line(record), flush=True)
        except NodeError as exc:
            print(f"bench_latency: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

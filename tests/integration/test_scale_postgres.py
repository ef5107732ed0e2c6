"""The scaled layout, for real: one PostgreSQL, two receiver and three worker processes and a
sender (`neuronode serve --role ...`) sharing one spool folder, a real Orthanc as the PACS.

20 studies are sent with dcmtk's storescu, the instances of each split across both receivers;
one worker is killed (-9) while it holds a job, one receiver while a study is arriving (what it
had not acknowledged is sent again to the other receiver, as a scanner would). Then: every
acknowledged instance is indexed, every study was processed exactly once (job history and the
index's count), every result was delivered once, and Orthanc holds one report per study.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from node.cli import main
from node.lab.orthanc import OrthancServer, free_port
from node.pipeline.worker import TEST_DELAY_ENV
from node.store.db import INDEX, Database
from tests.conftest import REPO, system_tool
from tests.integration.orthanc import orthanc, orthanc_factory  # noqa: F401
from tests.pg import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_STUDIES = 20
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _write_studies(folder: Path) -> dict[str, list[Path]]:
    """N_STUDIES small synthetic brain MR studies (6 series each), their files by study UID."""
    from node.lab.synth import write_studies

    manifest = write_studies(
        folder,
        studies=N_STUDIES,
        seed=1717,
        phenotypes=["tsc"],
        vendors=["siemens"],
        size=64,
        slices=8,
        distractors=False,
    )
    out: dict[str, list[Path]] = {}
    for study in manifest.studies:
        out[str(study["study_uid"])] = sorted((folder / str(study["folder"])).rglob("*.dcm"))
    return out


def _tasks() -> dict[str, Any]:
    """The tubers task on the shipped FLAIR bundle only (skip when it cannot load)."""
    from node.bundles.bundle import load_bundle
    from node.config import Rules
    from node.errors import ModelUnavailable

    task = Rules().tasks["tubers"]
    routes = [r for r in task.models if r.bundle == "tubers_flair"]
    try:
        load_bundle(REPO / "models" / "tubers_flair")
    except ModelUnavailable as exc:
        pytest.skip(f"the shipped tubers_flair bundle does not load: {exc}")
    return {
        "tubers": {
            **task.model_dump(mode="json"),
            "models": [r.model_dump(mode="json") for r in routes],
            "enabled": True,
            "requires_lesion": None,
        }
    }


class Serve:
    """One `neuronode serve --role ROLE` process with its own log files."""

    def __init__(
        self, workdir: Path, rules: Path, role: str, env: dict[str, str], port: int
    ) -> None:
        self.workdir, self.rules, self.role, self.env = workdir, rules, role, env
        self.port = port  # its DICOM listener (receivers)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "serve",
                "--rules",
                str(self.rules),
                "--role",
                self.role,
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            stdout=open(self.workdir / f"stdout.{self.runs}.log", "wb"),  # noqa: SIM115
            stderr=open(self.workdir / f"stderr.{self.runs}.log", "wb"),  # noqa: SIM115
        )

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("std*.log")))


def _wait(pred: Callable[[], bool], what: str, timeout_s: float, procs: Sequence[Serve]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    tail = "\n".join(f"--- {p.role} {p.workdir.name}\n{p.logs()[-1500:]}" for p in procs)
    raise AssertionError(f"{what}: not within {timeout_s:g} s\n{tail}")


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _storescu(tool: str, port: int, files: Sequence[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [tool, "-v", "-nh", "-aet", "STORESCU", "-aec", "NEURONODE", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _acked(output: str) -> set[Path]:
    """The files storescu got a success response for."""
    done: set[Path] = set()
    current: Path | None = None
    for line in output.splitlines():
        sending = re.match(r"I: Sending file: (.*)$", line)
        if sending:
            current = Path(sending.group(1))
        elif current is not None and "Received Store Response (Success)" in line:
            done.add(current)
            current = None
    return done


@pytest.fixture
def site(
    tmp_path: Path,
    pg_server: PostgresServer,
    orthanc: OrthancServer,  # noqa: F811
) -> Iterator[dict[str, Any]]:
    storescu = system_tool("storescu")
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed (apt-get install dcmtk)")
    url = pg_server.new_database()
    spool = tmp_path / "spool"  # the shared spool every process mounts
    base: dict[str, Any] = {
        "database": {"url": url},
        "storage": {"spool_dir": str(spool), "min_free_disk_mb": 1},
        "http": {"enabled": False},
        "completion": {"quiet_period_s": 4.0, "poll_interval_s": 0.2},
        "processing": {"workers": 1, "lease_s": 6, "max_attempts": 3},
        "logging": {"format": "json", "level": "info"},
        "models_dir": str(REPO / "models"),
        "tasks": _tasks(),
        "destinations": [
            {
                "kind": "dicom",
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
    }
    procs: list[Serve] = []

    def serve(name: str, role: str, env: dict[str, str] | None = None) -> Serve:
        workdir = tmp_path / name
        workdir.mkdir()
        port = free_port()
        doc = {
            **base,
            "node": {
                "ae_title": "NEURONODE",
                "bind_address": "127.0.0.1",
                "port": port,
                "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
            },
        }
        rules = workdir / "rules.yaml"
        rules.write_text(yaml.safe_dump(doc))
        proc = Serve(workdir, rules, role, env or {}, port)
        procs.append(proc)
        return proc

    try:
        yield {"serve": serve, "url": url, "procs": procs, "storescu": storescu, "spool": spool}
    finally:
        for p in procs:
            p.stop()


def test_two_receivers_three_workers_and_a_sender_on_postgres(
    site: dict[str, Any],
    orthanc: OrthancServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    serve, procs, storescu = site["serve"], site["procs"], site["storescu"]
    rx_a, rx_b = serve("rx_a", "receiver"), serve("rx_b", "receiver")
    # The first worker is slow (each job waits before it loads), so it surely dies mid-job.
    workers = [serve("w1", "worker", {TEST_DELAY_ENV: "4"})]
    workers += [serve(f"w{i}", "worker") for i in (2, 3)]
    serve("sender", "sender")
    assert main(["db", "upgrade", "--rules", str(rx_a.rules)]) == 0
    for p in procs:
        p.start()
    _wait(lambda: _listening(rx_a.port) and _listening(rx_b.port), "receivers up", 60, procs)
    db = Database(site["url"], component=INDEX, check=False)

    def q(sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return db.query(sql, params)

    files = _write_studies(tmp_path / "studies")
    big = sorted(files)[N_STUDIES // 2]  # the study receiver B dies under
    acked: set[Path] = set()
    for study, paths in sorted(files.items()):
        # Every other file to each receiver: each series of the study arrives at both.
        to_a, to_b = paths[0::2], paths[1::2]
        send_a = _storescu(storescu, rx_a.port, to_a)
        send_b = _storescu(storescu, rx_b.port, to_b)
        if study == big:  # kill -9 receiver B once a few of its instances are in
            b_sops = tuple(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in to_b)
            marks = ",".join("?" * len(b_sops))
            in_b = f"SELECT COUNT(*) FROM instances WHERE sop_instance_uid IN ({marks})"

            def b_stored(sql: str = in_b, sops: tuple[str, ...] = b_sops) -> bool:
                return int(q(sql, sops)[0][0]) >= 4

            _wait(b_stored, "receiver B storing the big study", 30, procs)
            rx_b.kill9()
        out_a, _ = send_a.communicate(timeout=300)
        out_b, _ = send_b.communicate(timeout=300)
        acked |= _acked(out_a) | _acked(out_b)
        if study == big:
            missing = [f for f in to_b if f not in acked]
            assert 0 < len(missing) < len(to_b), "receiver B was not killed mid-study"
            # The scanner sends what was not acknowledged again, to the receiver that answers.
            resend = _storescu(storescu, rx_a.port, missing)
            out, _ = resend.communicate(timeout=300)
            acked |= _acked(out)
            rx_b.start()  # and the receiver comes back
            _wait(lambda: _listening(rx_b.port), "receiver B back", 60, procs)
    assert acked == {f for paths in files.values() for f in paths}  # all sent, all acked

    # Kill the slow worker while it holds a job (its worker process dies with it).
    w1 = workers[0]
    assert w1.proc is not None
    mine = f"%:{w1.proc.pid}:%"
    _wait(
        lambda: bool(q("SELECT 1 FROM jobs WHERE state = 'processing' AND owner LIKE ?", (mine,))),
        "the slow worker leasing a job",
        120,
        procs,
    )
    [killed_job] = q("SELECT job_id FROM jobs WHERE state = 'processing' AND owner LIKE ?", (mine,))
    w1.kill9()

    _wait(
        lambda: q("SELECT COUNT(*) FROM studies WHERE state = 'done'")[0][0] == N_STUDIES,
        "every study done",
        300,
        procs,
    )
    _wait(
        lambda: (
            bool(q("SELECT COUNT(*) FROM deliveries")[0][0])
            and not q("SELECT 1 FROM deliveries WHERE state <> 'delivered'")
        ),
        "every result delivered",
        120,
        procs,
    )

    # Every acknowledged instance is indexed, once.
    sops = {str(r[0]) for r in q("SELECT sop_instance_uid FROM instances")}
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in acked}
    assert sops == sent
    # Every study processed exactly once, the one the dead worker held included.
    studies = q("SELECT study_uid, times_done, n_instances, reopened FROM studies")
    assert len(studies) == N_STUDIES
    assert all(r[1] == 1 and r[3] == 0 for r in studies), studies
    assert {str(r[0]): int(r[2]) for r in studies} == {u: len(p) for u, p in files.items()}
    done = Counter(str(r[0]) for r in q("SELECT study_uid FROM job_history WHERE outcome = 'done'"))
    assert len(done) == N_STUDIES and set(done.values()) == {1}
    outcomes = [
        str(r[0]) for r in q("SELECT outcome FROM job_history WHERE job_id = ?", killed_job)
    ]
    assert outcomes == ["lease-expired", "done"]
    # Every result delivered once: one outbox row per object, and Orthanc holds exactly those,
    # one report per study.
    rows = q("SELECT sop_uid, study_uid, sop_class_uid FROM deliveries")
    assert len({r[0] for r in rows}) == len(rows)
    in_orthanc = orthanc.by_sop_uid()
    assert set(in_orthanc) == {str(r[0]) for r in rows}
    reports = Counter(
        str(tags["StudyInstanceUID"])
        for tags in in_orthanc.values()
        if str(tags.get("SOPClassUID", "")).startswith(SR_PREFIX)
    )
    assert len(reports) == N_STUDIES and set(reports.values()) == {1}
    db.close()
    shutil.rmtree(tmp_path / "studies", ignore_errors=True)

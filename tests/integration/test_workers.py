"""Study workers are processes `serve` can kill: a hung job is stopped at processing.timeout_s
and recorded with its stage, a worker killed mid-job loses nothing, a study that kills its
worker every time ends dead-lettered, and C-ECHO is answered while the models still load.

Every node here is a real `neuronode serve` process with real worker processes; the faults
come from the worker's test hooks (node/pipeline/worker.py), which it logs loudly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from node.pipeline.worker import TEST_DELAY_ENV, TEST_FAULT_ENV, TEST_LOAD_DELAY_ENV
from tests.conftest import REPO, pydicom_file, small_mr_series
from tests.integration.conftest import NodeProc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDY_A = "1.2.826.0.1.3680043.9.7777.21"
STUDY_B = "1.2.826.0.1.3680043.9.7777.22"
SERVE = (sys.executable, "-m", "node.cli", "serve", "--rules")


def _send(node: NodeProc, study_uid: str, n: int = 3) -> None:
    """Store a small MR study of `n` instances on one association; every one acknowledged."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        for ds in small_mr_series(study_uid, n):
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
    finally:
        assoc.release()


def _events(node: NodeProc) -> list[dict[str, Any]]:
    out = []
    for line in node.logs().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _history(node: NodeProc, study_uid: str) -> list[tuple[Any, ...]]:
    return node.query(
        "SELECT attempt, outcome, error FROM job_history WHERE study_uid = ? ORDER BY id",
        (study_uid,),
    )


def _state(node: NodeProc, study_uid: str) -> str:
    return str(node.query("SELECT state FROM jobs WHERE study_uid = ?", (study_uid,))[0][0])


def test_a_hung_job_is_stopped_at_the_timeout_and_the_next_study_is_processed(
    node_factory: Callable[..., NodeProc],
) -> None:
    node = node_factory(processing={"workers": 1, "timeout_s": 3, "max_attempts": 1})
    node.start(env={TEST_FAULT_ENV: f"hang:classify:{STUDY_A}"})
    _send(node, STUDY_A)
    node.wait_for(lambda: _state(node, STUDY_A) == "dead", timeout_s=60)
    [(attempt, outcome, error)] = _history(node, STUDY_A)
    assert (attempt, outcome) == (1, "dead")
    assert error == "timeout after 3 s in stage classify"
    # The next study is processed by a fresh worker.
    _send(node, STUDY_B)
    node.wait_for(lambda: _state(node, STUDY_B) == "done", timeout_s=60)
    events = _events(node)
    timeouts = [e for e in events if e["event"] == "job_timeout"]
    assert [(e["stage"], e["duration_ms"]) for e in timeouts] == [("classify", 3000)]
    assert any(e["event"] == "test_fault_active" for e in events)  # said loudly
    started = [e["pid"] for e in events if e["event"] == "worker_started"]
    assert len(started) == 2 and started[0] != started[1]
    assert node.stop() == 0


def test_kill_9_of_a_worker_mid_job_loses_nothing(node_factory: Callable[..., NodeProc]) -> None:
    node = node_factory(processing={"workers": 1, "timeout_s": 120, "max_attempts": 3})
    node.start(env={TEST_DELAY_ENV: "3"})
    _send(node, STUDY_A)
    node.wait_for(lambda: any(e["event"] == "test_delay_sleeping" for e in _events(node)))
    [pid] = [e["pid"] for e in _events(node) if e["event"] == "worker_started"]
    os.kill(pid, signal.SIGKILL)
    node.wait_for(lambda: _state(node, STUDY_A) == "done", timeout_s=60)
    history = _history(node, STUDY_A)
    assert [(h[0], h[1]) for h in history] == [(1, "retry"), (2, "done")], history
    assert history[0][2] == "worker died (SIGKILL) in stage load"
    audits = list((node.spool / "results").rglob("audit.json"))
    assert len(audits) == 1
    audit = json.loads(audits[0].read_text())
    assert audit["status"] == "done" and audit["attempt"] == 2 and audit["n_instances"] == 3
    assert any(e["event"] == "worker_died" and e["reason"] == "SIGKILL" for e in _events(node))
    assert node.stop() == 0


def test_a_study_that_kills_its_worker_every_time_ends_dead_lettered(
    node_factory: Callable[..., NodeProc],
) -> None:
    node = node_factory(processing={"workers": 1, "timeout_s": 60, "max_attempts": 2})
    node.start(env={TEST_FAULT_ENV: f"crash:load:{STUDY_A}"})
    _send(node, STUDY_A)
    node.wait_for(lambda: _state(node, STUDY_A) == "dead", timeout_s=90)
    history = _history(node, STUDY_A)
    assert [(h[0], h[1]) for h in history] == [(1, "retry"), (2, "dead")], history
    assert {h[2] for h in history} == {"worker died (SIGKILL) in stage load"}
    assert node.query("SELECT state FROM studies WHERE study_uid = ?", (STUDY_A,)) == [("dead",)]
    # The node keeps working: another study goes through a fresh worker.
    _send(node, STUDY_B)
    node.wait_for(lambda: _state(node, STUDY_B) == "done", timeout_s=60)
    assert node.stop() == 0


def test_c_echo_is_answered_while_the_models_load(node_factory: Callable[..., NodeProc]) -> None:
    echoscu = shutil.which("echoscu")
    assert echoscu is not None, "dcmtk's echoscu is needed"
    node = node_factory()
    node.start(env={TEST_LOAD_DELAY_ENV: "10"})
    node.wait_for(lambda: any(e["event"] == "test_load_delay_active" for e in _events(node)))
    echo = subprocess.run(
        [echoscu, "-aet", "PYSCU", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert echo.returncode == 0, echo.stderr
    _send(node, STUDY_A)  # stored now, queued until a worker is ready
    loading = [e["event"] for e in _events(node)]
    assert "worker_ready" not in loading, "the models loaded before the echo: no test"
    node.wait_for(lambda: _state(node, STUDY_A) == "done", timeout_s=90)
    order = [e["event"] for e in _events(node)]
    assert order.index("worker_ready") < order.index("job_started")
    # The node process itself never loaded torch: only its worker processes do.
    assert node.proc is not None
    maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps
    [worker] = [e["pid"] for e in _events(node) if e["event"] == "worker_started"]
    assert "libtorch" in Path(f"/proc/{worker}/maps").read_text()  # the check can fail
    assert node.stop() == 0


def test_roles_share_a_spool_that_a_whole_node_cannot(
    node_factory: Callable[..., NodeProc], tmp_path: Path
) -> None:
    from node.deliver.outbox import Outbox
    from node.lab.demo import LocalPacs

    pacs = LocalPacs(tmp_path / "pacs")
    destination = {
        "kind": "dicom",
        "name": "pacs",
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.port,
    }
    node = node_factory()
    node.write_rules()
    doc = yaml.safe_load(node.rules_path.read_text())
    doc["destinations"] = [destination]
    node.rules_path.write_text(yaml.safe_dump(doc))
    # A result waiting in the outbox, for the sender role to deliver.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    result.SOPInstanceUID = f"{STUDY_B}.9.1"
    node.spool.mkdir(parents=True)
    with Outbox(node.spool) as outbox:
        assert outbox.enqueue([result], ("pacs",), now=0.0) == 1
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NEURONODE_LOG_KEY", None)

    def serve(role: str, log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*SERVE, str(node.rules_path), "--role", role],
            cwd=REPO,
            env=env,
            stdout=open(node.workdir / f"stdout.{log}.log", "wb"),
            stderr=open(node.workdir / f"stderr.{log}.log", "wb"),
        )

    procs = [serve("receiver", "r"), serve("worker", "w"), serve("sender", "s")]
    try:
        node.proc = procs[0]
        node.wait_for(lambda: _listening(node.port))
        # A whole node on the same spool is refused while the roles run.
        whole = subprocess.run(
            [*SERVE, str(node.rules_path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert whole.returncode == 1
        assert b"in use by another running node" in whole.stderr
        _send(node, STUDY_A)  # received by one process, processed by the other
        node.wait_for(lambda: _state(node, STUDY_A) == "done", timeout_s=60)
        # The index says done before the worker's log line reaches its file: wait for the line.
        node.wait_for(lambda: '"job_finished"' in _log(node, "w"), timeout_s=10)
        assert _log(node, "w").count('"job_finished"') == 1
        assert '"job_finished"' not in _log(node, "r")
        assert '"association_summary"' in _log(node, "r")
        assert '"association_summary"' not in _log(node, "w")
        node.wait_for(lambda: f"{STUDY_B}.9.1" in pacs.received)  # the sender delivered it
        assert '"sender_pass"' in _log(node, "s")
        assert '"sender_pass"' not in _log(node, "r") + _log(node, "w")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=30) for p in procs]
        pacs.stop()
    assert codes == [0, 0, 0]


def _log(node: NodeProc, name: str) -> str:
    return "".join(
        (node.workdir / f"{kind}.{name}.log").read_text(errors="replace")
        for kind in ("stdout", "stderr")
    )


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_a_bundle_that_fails_to_load_in_the_workers_stops_serve(
    node_factory: Callable[..., NodeProc], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "glioma_grade_flair", models / "broken_flair")
    (models / "broken_flair" / "models" / "model.pt").write_bytes(b"not a checkpoint")
    task = {
        "enabled": True,
        "positive_label": "brain tumour",
        "negative_label": "no brain tumour",
        "models": [{"bundle": "broken_flair", "sequences": ["FLAIR"], "weight": 1.0}],
    }
    node = node_factory(tasks={"tumour": task})
    node.write_rules()
    doc = yaml.safe_load(node.rules_path.read_text())
    doc["models_dir"] = str(models)
    node.rules_path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [*SERVE, str(node.rules_path)], cwd=REPO, env=env, capture_output=True, timeout=180
    )
    assert done.returncode == 1
    err = done.stderr.decode(errors="replace")
    assert "neuronode serve: refusing to start: a bundle an enabled task needs" in err
    assert "task tumour:" in err and "weights" in err
    logs = done.stdout.decode(errors="replace") + err
    assert '"bundle_unavailable"' in logs and '"node_started"' in logs  # it had listened


def test_a_worker_that_dies_idle_is_replaced_before_it_gets_a_job(
    node_factory: Callable[..., NodeProc],
) -> None:
    node = node_factory()
    node.start()
    node.wait_for(lambda: any(e["event"] == "worker_ready" for e in _events(node)))
    [pid] = [e["pid"] for e in _events(node) if e["event"] == "worker_started"]
    os.kill(pid, signal.SIGKILL)
    node.wait_for(
        lambda: len([e for e in _events(node) if e["event"] == "worker_ready"]) == 2,
        timeout_s=60,
    )
    _send(node, STUDY_A)
    node.wait_for(lambda: _state(node, STUDY_A) == "done", timeout_s=60)
    assert [(h[0], h[1]) for h in _history(node, STUDY_A)] == [(1, "done")]
    died = [e for e in _events(node) if e["event"] == "worker_died"]
    assert [e["reason"] for e in died] == ["while idle"]
    assert node.stop() == 0

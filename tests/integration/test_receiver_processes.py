"""`node.receiver_processes: 2` on a real `neuronode serve`: two processes on one port.

A study sent over many associations lands on both processes (SO_REUSEPORT spreads the
connections); it is indexed whole, completes once (one job), the metrics count every instance
whichever process took it, and the node's stop ends both processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import small_mr_series
from tests.integration.conftest import NodeProc

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.77001"
N_INSTANCES = 24
N_ASSOCIATIONS = 12  # all on one process: 2 in 2**12; the test says so if it happens


def _log_lines(node: NodeProc) -> list[dict[str, object]]:
    out = []
    for line in node.logs().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _http_port(node: NodeProc) -> int:
    for rec in _log_lines(node):
        if rec.get("event") == "http_started":
            return int(str(rec["port"]))
    raise AssertionError("no http_started line")


def _received_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    for line in text.splitlines():
        if line.startswith("neuronode_instances_received_total "):
            return float(line.split()[1])
    raise AssertionError("no neuronode_instances_received_total")


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out.update(int(k) for k in kids)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def test_study_split_across_receiver_processes_completes_once(
    node_factory: Callable[..., NodeProc], dcmtk: Callable[[str], str], tmp_path: Path
) -> None:
    node = node_factory(
        node={"receiver_processes": 2}, completion={"quiet_period_s": 1.0, "poll_interval_s": 0.1}
    )
    node.start()
    assert node.proc is not None
    node.wait_for(lambda: "receiver_process_listening" in node.logs())
    receivers = [p for p in _children(node.proc.pid) if "node.ingest.processes" in _cmdline(p)]
    assert len(receivers) == 1, "one receiver process beside the node's own receiver"
    folder = tmp_path / "study"
    folder.mkdir()
    paths = []
    for i, ds in enumerate(small_mr_series(STUDY, N_INSTANCES)):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    storescu = dcmtk("storescu")
    senders = [
        subprocess.Popen(
            [storescu, "-aet", "STORESCU", "-aec", "NEURONODE", "127.0.0.1", str(node.port)]
            + [str(p) for p in paths[k::N_ASSOCIATIONS]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for k in range(N_ASSOCIATIONS)
    ]
    for sender in senders:
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err.decode(errors="replace")[-500:]
    # Every instance indexed, once, whichever process took it.
    rows = node.query("SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM instances")
    assert rows == [(N_INSTANCES, N_INSTANCES)]
    pids = {
        rec["pid"]
        for rec in _log_lines(node)
        if rec.get("event") == "association_summary" and int(str(rec["n_stored"])) > 0
    }
    assert len(pids) == 2, f"every association went to one process ({pids})"
    # The study completes once: one job, whichever process stored its last instance.
    node.wait_for(lambda: node.query("SELECT state FROM studies")[0][0] != "receiving")
    node.wait_for(lambda: node.query("SELECT COUNT(*) FROM jobs")[0][0] >= 1)
    assert node.query("SELECT COUNT(*) FROM jobs WHERE study_uid = ?", (STUDY,)) == [(1,)]
    assert _received_total(_http_port(node)) == N_INSTANCES
    # A receiver process that dies is started again.
    os.kill(receivers[0], signal.SIGKILL)

    def replaced() -> bool:
        assert node.proc is not None
        now = [p for p in _children(node.proc.pid) if "node.ingest.processes" in _cmdline(p)]
        return len(now) == 1 and now[0] != receivers[0]

    node.wait_for(replaced)
    node.wait_for(lambda: node.logs().count("receiver_process_listening") == 2)
    assert "receiver_process_died" in node.logs()
    receivers = [p for p in _children(node.proc.pid) if "node.ingest.processes" in _cmdline(p)]
    # The node's stop ends its receiver processes too.
    assert node.stop() == 0
    for pid in receivers:
        assert (
            _cmdline(pid) == ""
            or not os.path.exists(f"/proc/{pid}/status")
            or ("Z" in Path(f"/proc/{pid}/status").read_text().split("State:")[1][:4])
        ), "a receiver process outlived the node"


def test_a_receiver_process_that_cannot_listen_is_a_clear_error(tmp_path: Path) -> None:
    """A port another program holds (without SO_REUSEPORT): the child says why, start() raises
    the ConfigError naming node.port, and no child is left running."""
    import socket

    from node.config import LoggingSettings, NodeSettings, Rules, StorageSettings
    from node.errors import ConfigError
    from node.ingest.processes import ReceiverProcesses
    from node.lab.orthanc import free_port

    port = free_port()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        rules = Rules(
            node=NodeSettings(port=port, receiver_processes=2),
            storage=StorageSettings(spool_dir=tmp_path / "spool", min_free_disk_mb=0),
            logging=LoggingSettings(format="json", level="warning"),
            tasks={},
        )
        counted: list[tuple[str, str]] = []
        procs = ReceiverProcesses(
            rules, port=port, log_key=b"k" * 32, on_store=lambda o, r: counted.append((o, r))
        )
        with pytest.raises(ConfigError, match=f"node.port: port {port} is already in use"):
            procs.start()
        assert procs.pids == ()
    assert counted == []

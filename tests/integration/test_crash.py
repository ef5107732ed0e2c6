"""kill -9 the node mid-transfer and again mid-processing: nothing acknowledged is lost and the
study is processed (recorded done) exactly once after restart."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from node.service import TEST_DELAY_ENV
from tests.conftest import small_mr_series
from tests.integration.conftest import NodeProc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDY = "1.2.826.0.1.3680043.9.7777.1"
N = 40


def _study() -> list[pydicom.Dataset]:
    return small_mr_series(STUDY, N)


def _send(node: NodeProc, datasets: list[pydicom.Dataset], acked: list[str]) -> None:
    """Send one by one on one association; record each SOP UID the node acknowledged."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        return
    for ds in datasets:
        if not assoc.is_established:
            break
        try:
            status = assoc.send_c_store(ds)
        except (RuntimeError, OSError):
            break
        if status and getattr(status, "Status", None) == 0x0000:
            acked.append(str(ds.SOPInstanceUID))
    if assoc.is_established:
        assoc.release()


def test_kill_9_mid_transfer_and_mid_processing(node_factory: Callable[..., NodeProc]) -> None:
    node = node_factory(completion={"quiet_period_s": 2.0, "poll_interval_s": 0.1})
    study = _study()

    # 1. kill -9 while the study is arriving.
    node.start()
    acked: list[str] = []
    sender = threading.Thread(target=_send, args=(node, study, acked))
    sender.start()
    deadline = time.monotonic() + 60
    while len(acked) < 15 and time.monotonic() < deadline:
        time.sleep(0.005)
    node.kill()
    sender.join(timeout=60)
    assert 15 <= len(acked) < N, len(acked)

    # 2. restart (processing made slow): every acknowledged instance is there.
    node.start(env={TEST_DELAY_ENV: "60"})
    indexed = {r[0]: r[1] for r in node.query("SELECT sop_instance_uid, path FROM instances")}
    for sop in acked:
        assert sop in indexed, f"acknowledged {sop} lost"
        assert pydicom.dcmread(node.spool / indexed[sop]).SOPInstanceUID == sop
    assert list((node.spool / "tmp").iterdir()) == []
    acked2: list[str] = []
    _send(node, study, acked2)  # the sender retries everything; duplicates are stored once
    assert len(acked2) == N
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == N

    # 3. kill -9 while the study is processing.
    node.wait_for(lambda: node.query("SELECT state FROM jobs")[0][0] == "processing")
    node.kill()

    # 4. restart normally: the interrupted job is redone and recorded done once.
    node.start()
    node.wait_for(lambda: node.query("SELECT state FROM studies")[0][0] == "done")
    history = node.query(
        "SELECT job_id, attempt, outcome FROM job_history WHERE study_uid = ? ORDER BY id",
        (STUDY,),
    )
    assert [h[2] for h in history] == ["interrupted", "done"], history
    assert len({h[0] for h in history}) == 1  # one job, run twice
    assert node.query("SELECT COUNT(*) FROM jobs")[0][0] == 1
    assert node.query("SELECT times_done FROM studies")[0][0] == 1
    audits = list((node.spool / "results").rglob("audit.json"))
    assert len(audits) == 1
    audit = json.loads(audits[0].read_text())
    # The node's crash is not the study's fault: it is not counted as a failed attempt.
    assert audit["status"] == "done" and audit["n_instances"] == N and audit["attempt"] == 1
    assert node.stop() == 0
    # Nothing else was processed after a clean stop and the index is consistent.
    assert node.query("SELECT state, COUNT(*) FROM jobs GROUP BY state") == [("done", 1)]


def test_sigterm_releases_in_flight_job(node_factory: Callable[..., NodeProc]) -> None:
    node = node_factory()
    node.start(env={TEST_DELAY_ENV: "60"})
    acked: list[str] = []
    _send(node, _study()[:3], acked)
    assert len(acked) == 3
    node.wait_for(lambda: node.query("SELECT state FROM jobs")[0][0] == "processing")
    t0 = time.monotonic()
    assert node.stop(timeout_s=30) == 0
    assert time.monotonic() - t0 < 20  # grace period, not the 60 s job
    assert node.query("SELECT state, attempts FROM jobs") == [("ready", 0)]
    outcomes = [r[0] for r in node.query("SELECT outcome FROM job_history")]
    assert outcomes == ["released"]
    assert "node_stopped" in node.logs()

"""/healthz and /metrics on loopback: counts from the index, no UIDs."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

from node.ingest.spool import Spool
from node.pipeline.jobs import JobQueue
from node.web.server import WebServer
from tests.conftest import pydicom_file


def _mr(sop: str) -> bytes:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.1", sop
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_healthz_and_metrics(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "sp", min_free_disk_mb=1)
    queue = JobQueue(spool.index, owner="t", lease_s=60)
    for i in (1, 2, 3):
        spool.store(_mr(f"1.2.3.1.{i}"), calling_ae="A")
    spool.store(b"junk", calling_ae="A")
    queue.enqueue("1.2.3")
    web = WebServer(spool, port=0, active_associations=lambda: 2)
    web.start()
    base = f"http://127.0.0.1:{web.port}"
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            text = r.read().decode()
        metrics = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert metrics["neuronode_spool_instances"] == 3
        assert metrics["neuronode_quarantine_files"] == 1
        assert metrics["neuronode_queue_depth"] == 1
        assert metrics['neuronode_studies{state="ready"}'] == 1
        assert metrics['neuronode_jobs{state="ready"}'] == 1
        assert metrics["neuronode_active_associations"] == 2
        assert metrics["neuronode_spool_min_free_bytes"] == 1024 * 1024
        assert "1.2.3" not in text
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/nope", timeout=5)
        assert err.value.code == 404
        spool.close()  # a closed index is unhealthy
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert err.value.code == 503
    finally:
        web.stop()

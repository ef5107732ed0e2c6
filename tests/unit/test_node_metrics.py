"""/metrics of a running node: a study pushed over C-STORE, processed and delivered moves the
counters, the histograms and the gauges (issue 16)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from node.config import Rules
from node.deliver.outbox import Outbox
from node.lab.orthanc import free_port
from node.records import SendResult, StudyJob, StudyOutcome
from tests.conftest import pydicom_file

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of /metrics, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _dataset(sop: str, series: str = "1.2.3.1") -> pydicom.Dataset:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    return ds


def _wait(pred: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met")


def _rules(tmp_path: Path) -> Rules:
    dest = {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    return Rules.model_validate(
        {
            "node": {"port": free_port(), "accept_unknown_callers": True},
            "http": {"port": 0},
            "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_disk_mb": 0},
            "completion": {"quiet_period_s": 0.5, "poll_interval_s": 0.05},
            "processing": {"workers": 1, "lease_s": 30},
            "destinations": [{**dest, "name": "pacs"}, {**dest, "name": "refuses"}],
            "delivery": {"max_attempts": 1},
        }
    )


def test_a_scrape_after_a_study_shows_the_counters_moved(tmp_path: Path) -> None:
    from node.service import Node

    rules = _rules(tmp_path)
    result = _dataset("1.2.3.9.1", series="1.2.3.9")  # stands in for the SR

    def process(job: StudyJob) -> StudyOutcome:
        with Outbox(rules.storage.spool_dir) as outbox:
            outbox.enqueue([result], ("pacs", "refuses"), now=time.time())
        return StudyOutcome(
            study_uid=job.study_uid,
            audit_path=Path("/dev/null"),
            n_series=1,
            n_instances=len(job.instance_paths),
            n_decode_errors=0,
            stage_ms=(("load", 12.0), ("infer", 340.0)),
        )

    def send(dest: object, paths: Sequence[Path]) -> tuple[SendResult, ...]:
        ok = getattr(dest, "name", "") == "pacs"
        return tuple(
            SendResult(
                sop_instance_uid=p.stem,
                sent_sop_instance_uid=p.stem,
                sent_sop_class_uid="",
                status_code=0x0000 if ok else 0xA900,
                delivered=ok,
                retryable=False,
                message="" if ok else "refused",
            )
            for p in paths
        )

    node = Node(rules, processor=process, send=send)
    assert node.web is not None
    node.start()
    try:
        before = scrape(node.web.port)
        assert before[("neuronode_instances_received_total", ())] == 0
        assert before[("neuronode_studies_processed_total", ())] == 0
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="NEURONODE")
        assert assoc.is_established
        statuses = [
            assoc.send_c_store(_dataset("1.2.3.1.1")).Status,
            assoc.send_c_store(_dataset("1.2.3.1.2")).Status,
            assoc.send_c_store(_dataset("1.2.3.1.3", series="1.2.x")).Status,  # quarantined
        ]
        node.spool._free_bytes = lambda _path: 0  # the disk is full now: refused, not kept
        statuses.append(assoc.send_c_store(_dataset("1.2.3.1.4")).Status)
        assoc.release()
        assert statuses[:2] == [0, 0] and statuses[2] != 0 and statuses[3] == 0xA700

        def delivered() -> bool:
            m = scrape(node.web.port)  # type: ignore[union-attr]
            return (
                m.get(("neuronode_deliveries_sent_total", (("destination", "pacs"),)), 0) == 1
                and m.get(
                    ("neuronode_deliveries_dead_lettered_total", (("destination", "refuses"),)),
                    0,
                )
                == 1
            )

        _wait(delivered)
        after = scrape(node.web.port)
    finally:
        node.stop(grace_s=2)
    assert after[("neuronode_instances_received_total", ())] == 2
    assert after[("neuronode_instances_quarantined_total", ())] == 1
    assert after[("neuronode_instances_rejected_total", (("reason", "low_disk"),))] == 1
    assert after[("neuronode_studies_processed_total", ())] == 1
    assert after[("neuronode_last_study_processed_timestamp_seconds", ())] > 0
    assert after[("neuronode_stage_seconds_count", (("stage", "infer"),))] == 1
    assert after[("neuronode_stage_seconds_sum", (("stage", "infer"),))] == 0.34
    # 0.34 s falls in the 0.5 s bucket, not in the 0.25 s one
    infer_le = {
        dict(labels)["le"]: v
        for (name, labels), v in after.items()
        if name == "neuronode_stage_seconds_bucket" and dict(labels)["stage"] == "infer"
    }
    assert infer_le["0.25"] == 0 and infer_le["0.5"] == 1
    assert after[("neuronode_study_time_to_result_seconds_count", ())] == 1
    assert after[("neuronode_deliveries_failed_total", (("destination", "refuses"),))] == 1
    assert after[("neuronode_deliveries_failed_total", (("destination", "pacs"),))] == 0
    assert after[("neuronode_queue_depth", ())] == 0
    assert after[("neuronode_outbox_depth", (("destination", "pacs"),))] == 0
    assert after[("neuronode_outbox", (("destination", "refuses"), ("state", "dead")))] == 1
    assert after[("neuronode_studies", (("state", "done"),))] == 1
    assert after[("neuronode_spool_free_bytes", ())] > 0

"""Hot reload (issue 16): a rule file edited to invalid and then valid is refused (with the
problems `neuronode check` prints, a metric, the old rules kept) and then applied, with no
study lost in between; keys that need a restart are named and keep their running values."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import yaml
from structlog.testing import capture_logs

from node.config import load_rules
from node.lab.orthanc import free_port
from node.records import StudyJob, StudyOutcome
from tests.conftest import pydicom_file


def _mr(study: str, sop: str) -> bytes:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, study + ".1", sop
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _wait(pred: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met")


def test_invalid_then_valid_rule_file_is_refused_then_applied_and_no_study_is_lost(
    tmp_path: Path,
) -> None:
    from node.service import Node

    port = free_port()
    node_doc = {"port": port, "accept_unknown_callers": True}
    doc: dict[str, object] = {
        "node": node_doc,
        "http": {"enabled": False},
        "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_disk_mb": 0},
        "completion": {"quiet_period_s": 0.5, "poll_interval_s": 0.05},
        "delivery": {"max_attempts": 8},
        "models_dir": str(tmp_path),
        "tasks": {},
    }
    (tmp_path / "sequence").mkdir()  # the sequence bundle folder check looks for
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    rules = load_rules(path)
    done: list[str] = []
    lock = threading.Lock()

    def process(job: StudyJob) -> StudyOutcome:
        with lock:
            done.append(job.study_uid)
        return StudyOutcome(
            study_uid=job.study_uid,
            audit_path=Path("/dev/null"),
            n_series=1,
            n_instances=len(job.instance_paths),
            n_decode_errors=0,
        )

    node = Node(rules, processor=process, rules_path=path)
    refused = node.metrics.rules_reload_refused
    applied = node.metrics.rules_reloaded
    with capture_logs() as logs:
        node.start()
        try:
            node.spool.store(_mr("1.5.1", "1.5.1.1.1"), calling_ae="A")
            # Invalid: a negative quiet period and a misspelt key, on known lines.
            invalid = yaml.safe_dump(
                {**doc, "completion": {"quiet_period_s": -1, "poll_interval_s": 0.05}}
            ).replace("max_attempts: 8", "max_atempts: 8")
            path.write_text(invalid, encoding="utf-8")
            _wait(lambda: refused._value.get() == 1)
            assert node.rules is rules  # the old rules stay in force
            node.spool.store(_mr("1.5.2", "1.5.2.1.1"), calling_ae="A")
            _wait(lambda: sorted(done) == ["1.5.1", "1.5.2"])
            # Valid again, with a changed delivery policy and a changed port (needs a restart).
            path.write_text(
                yaml.safe_dump(
                    {
                        **doc,
                        "node": {**node_doc, "port": port + 1},
                        "delivery": {"max_attempts": 3},
                    }
                ),
                encoding="utf-8",
            )
            _wait(lambda: applied._value.get() == 1)
            assert node.rules.delivery.max_attempts == 3
            assert node.rules.node.port == port  # kept until a restart
            node.spool.store(_mr("1.5.3", "1.5.3.1.1"), calling_ae="A")
            _wait(lambda: len(done) == 3)
        finally:
            node.stop(grace_s=2)
    assert sorted(done) == ["1.5.1", "1.5.2", "1.5.3"]  # each study once, none lost
    assert refused._value.get() == 1 and applied._value.get() == 1
    [refusal] = [e for e in logs if e["event"] == "rules_refused"]
    lines = invalid.splitlines()
    quiet = 1 + next(i for i, line in enumerate(lines) if "quiet_period_s: -1" in line)
    typo = 1 + next(i for i, line in enumerate(lines) if "max_atempts" in line)
    assert refusal["count"] == 2
    problems = refusal["problems"]
    assert any(p.startswith(f"{path}:{quiet}: completion.quiet_period_s:") for p in problems)
    assert any(
        p.startswith(f"{path}:{typo}: delivery.max_atempts:") and "did you mean 'max_attempts'" in p
        for p in problems
    )
    [reloaded] = [e for e in logs if e["event"] == "rules_reloaded"]
    assert reloaded["restart_keys"] == ["node.port"]

"""Requeue anything: dead study jobs as well as deliveries, by study (key or UID) or by
destination; `neuronode status` shows the outbox per destination and the dead jobs (issue 16)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pydicom
import pytest

from node.cli import main
from node.config import DeliverySettings, load_rules
from node.deliver.outbox import Outbox, outbox_summary
from node.ingest.spool import Spool
from node.log import load_or_create_key, set_correlation_key, uid_key
from node.pipeline.jobs import JobQueue
from node.records import DeliveryState, StudyStatus
from tests.conftest import pydicom_file

DEAD, OK = "1.2.3", "1.2.4"


def _mr(study: str, sop: str) -> bytes:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, study + ".1", sop
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _result(study: str, sop: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(_mr(study, sop)))


@pytest.fixture
def site(tmp_path: Path, database_url: str | None) -> Path:
    """A spool with one dead study job (DEAD), one done study (OK), and deliveries: DEAD's and
    OK's dead at `pacs`, OK's dead at `archive`, one pending and one retrying at `archive`."""
    spool_dir = tmp_path / "spool"
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"storage:\n  spool_dir: {spool_dir}\n  min_free_disk_mb: 0\nmodels_dir: {tmp_path}\n"
        + (f"database:\n  url: {database_url}\n" if database_url else "")
        + "destinations:\n"
        "  - {kind: dicom, name: pacs, ae_title: PACS, host: 127.0.0.1, port: 104}\n"
        "  - {kind: dicom, name: archive, ae_title: ARCH, host: 127.0.0.1, port: 105}\n",
        encoding="utf-8",
    )
    set_correlation_key(load_or_create_key(spool_dir / "log.key"))
    spool = Spool(spool_dir, min_free_disk_mb=0, database_url=database_url)
    queue = JobQueue(spool.index, owner="w", lease_s=60, max_attempts=1)
    for study in (DEAD, OK):
        spool.store(_mr(study, study + ".1.1"), calling_ae="A")
        queue.enqueue(study)
    job = queue.claim()
    assert job is not None and job.study_uid == DEAD
    assert queue.fail(job, error="RuntimeError", permanent=False) is StudyStatus.DEAD
    spool.close()
    settings = DeliverySettings(max_attempts=1)
    with Outbox(spool_dir, database_url=database_url) as outbox:
        outbox.enqueue([_result(DEAD, "9.1"), _result(OK, "9.2")], ["pacs"], now=0)
        outbox.enqueue([_result(OK, "9.3")], ["archive"], now=0)
        outbox.enqueue([_result(OK, "9.4"), _result(OK, "9.5")], ["archive"], now=0)
        for name, limit in (("pacs", 10), ("archive", 1)):
            for row in outbox.claim_due(name, 0, limit):
                outbox.mark_failed(
                    row,
                    error="refused",
                    status_code=0xA900,
                    retryable=False,
                    settings=settings,
                    now=0,
                    rng=random.Random(0),
                )
        retrying = outbox.claim_due("archive", 0, 1)[0]
        outbox.mark_failed(
            retrying,
            error="timeout",
            status_code=None,
            retryable=True,
            settings=DeliverySettings(max_attempts=5),
            now=0,
            rng=random.Random(0),
        )
    return rules


def _url(rules: Path) -> str | None:
    """The database the site's rule file names (None: the embedded SQLite)."""
    return load_rules(rules).database.resolve_url()


def _states(rules: Path) -> dict[tuple[str, str], DeliveryState]:
    with Outbox(rules.parent / "spool", database_url=_url(rules)) as outbox:
        return {(r.sop_uid, r.destination): r.state for r in outbox.all()}


def test_status_shows_the_outbox_per_destination_and_the_dead_jobs(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool_dir = site.parent / "spool"
    assert outbox_summary(spool_dir, database_url=_url(site)) == {
        "pacs": {"pending": 0, "failed": 0, "dead": 2, "parked": 0, "delivered": 0},
        "archive": {"pending": 1, "failed": 1, "dead": 1, "parked": 0, "delivered": 0},
    }
    assert main(["status", "--rules", str(site), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["outbox"]["archive"]["failed"] == 1
    assert [(j["study_key"], j["state"]) for j in doc["given_up_jobs"]] == [(uid_key(DEAD), "dead")]
    assert main(["status", "--rules", str(site)]) == 0
    text = capsys.readouterr().out
    assert f"study {uid_key(DEAD)} job 1 dead attempts=1 RuntimeError" in text
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line[:2] == "  "}
    assert lines["pacs"] == ["0", "0", "2", "0", "0"]
    assert lines["archive"] == ["1", "1", "1", "0", "0"]
    assert DEAD not in text  # keys, never UIDs


def test_requeue_one_study_by_its_key_takes_up_its_job_and_its_deliveries_only(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool_dir = site.parent / "spool"
    assert main(["requeue", "--rules", str(site), "--study", uid_key(DEAD)]) == 0
    out = capsys.readouterr().out
    assert "1 study jobs requeued" in out and "1 deliveries requeued" in out
    states = _states(site)
    assert states[("9.1", "pacs")] is DeliveryState.PENDING
    assert states[("9.2", "pacs")] is DeliveryState.DEAD  # another study's: untouched
    spool = Spool(spool_dir, min_free_disk_mb=0, database_url=_url(site))
    try:
        queue = JobQueue(spool.index, owner="w2", lease_s=60, max_attempts=1)
        job = queue.claim()
        assert job is not None and job.study_uid == DEAD and job.attempt == 1
        assert queue.given_up() == ()
    finally:
        spool.close()


def test_requeue_by_destination_touches_deliveries_only(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["requeue", "--rules", str(site), "--destination", "archive"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == "1 deliveries requeued for archive"
    states = _states(site)
    assert states[("9.3", "archive")] is DeliveryState.PENDING
    assert states[("9.1", "pacs")] is DeliveryState.DEAD
    assert main(["status", "--rules", str(site), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["given_up_jobs"]  # the dead job is still dead


def test_requeue_everything_and_by_uid_and_unknown_study(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["requeue", "--rules", str(site), "--only", "jobs", "--study", DEAD]) == 0
    assert capsys.readouterr().out.strip() == f"1 study jobs requeued of study {uid_key(DEAD)}"
    assert main(["requeue", "--rules", str(site)]) == 0
    out = capsys.readouterr().out
    assert "0 study jobs requeued" in out and "3 deliveries requeued" in out
    assert DeliveryState.DEAD not in set(_states(site).values())
    assert main(["requeue", "--rules", str(site), "--study", "9.9.9"]) == 1
    assert "no study '9.9.9'" in capsys.readouterr().err

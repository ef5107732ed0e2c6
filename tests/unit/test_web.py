"""The node's HTTP server: /healthz and /metrics on loopback (counts from the index, no UIDs),
and the status page with Starlette's TestClient: pages, heatmap thumbnails, actions, access
control (token, login cookie, CSRF, loopback host check) and the reload-refusal banner."""

from __future__ import annotations

import io
import json
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from node import NOT_FOR_CLINICAL_USE
from node.config import (
    DeliverySettings,
    Rules,
    check_files_exist,
    load_rules,
    validate_rules_text,
)
from node.deliver.outbox import Outbox
from node.errors import ConfigError
from node.ingest.spool import Spool
from node.lab.orthanc import free_port
from node.log import uid_key
from node.pipeline.audit import (
    AuditRecord,
    FindingEntry,
    ObjectEntry,
    RouteEntry,
    SequenceEntry,
    SeriesEntry,
    audit_path,
    audit_to_json,
)
from node.pipeline.jobs import JobQueue
from node.records import DeliveryState, StudyJob, StudyOutcome, StudyStatus
from node.service import Node
from node.store.files import write_json_durable
from node.web.metrics import NodeMetrics
from node.web.server import Access, StatusApp, WebServer
from node.web.views import StatusHooks
from tests.conftest import REPO, pydicom_file

PATIENT = "CompressedSamples^MR1"  # MR_small's patient name
TOKEN = "s3cret-token-0123456789"
STUDY_A, STUDY_B = "1.2.3", "1.2.4"


def _mr(sop: str, study: str = STUDY_A, patient: str | None = None) -> bytes:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, f"{study}.1", sop
    if patient is not None:
        ds.PatientName = patient
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


def test_stop_before_start_frees_the_port_and_a_stopped_server_stops_listening(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "sp", min_free_disk_mb=0)
    try:
        web = WebServer(spool, port=0, active_associations=lambda: 0)
        port = web.port
        web.stop()  # never started: the socket is closed, nothing waits
        again = WebServer(spool, port=port, active_associations=lambda: 0)
        again.start()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
        t0 = time.monotonic()
        again.stop()
        assert time.monotonic() - t0 < 5
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        spool.close()


def test_a_port_in_use_fails_at_construction(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "sp", min_free_disk_mb=0)
    first = WebServer(spool, port=0, active_associations=lambda: 0)
    try:
        with pytest.raises(OSError):
            WebServer(spool, port=first.port, active_associations=lambda: 0)
    finally:
        first.stop()
        spool.close()


# --- the status page -------------------------------------------------------------------------


def _sc(path: Path, study_uid: str, rgb: tuple[int, int, int]) -> str:
    """A small RGB Secondary Capture with a bright square, as the heatmap writer makes them."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesDescription = "OT", "AI attention maps"
    ds.ImageComments = (
        "gbm_pcnsl: PCNSL present (p=81%) | series p=80%  model gbm_pcnsl_t1c 1.0"
        " | attention map, not a localisation | NOT FOR DIAGNOSTIC USE"
    )
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[100:200, 100:200] = rgb
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 300, 400, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop


def _audit(results: Path, study_uid: str, sc_file: Path, sc_uid: str) -> None:
    series_uid = f"{study_uid}.1"
    record = AuditRecord(
        not_for_clinical_use=True,
        notice=NOT_FOR_CLINICAL_USE,
        node_version="test",
        status="done",
        failed_stage=None,
        error=None,
        job_id=1,
        attempt=1,
        reopened=False,
        study_key=uid_key(study_uid),
        study_instance_uid=study_uid,
        started_at="2026-01-01T00:00:00.000+00:00",
        finished_at="2026-01-01T00:00:05.000+00:00",
        duration_ms=5000.0,
        stages=(),
        n_files=2,
        n_instances=2,
        n_series=1,
        n_decode_errors=0,
        series=(
            SeriesEntry(
                series_key=uid_key(series_uid),
                series_instance_uid=series_uid,
                series_number=7,
                uid_shared_with_other_numbers=False,
                description="AX T1 POST GD",
                modality="MR",
                n_instances=2,
                n_frames=2,
                sop_classes=("MR Image Storage",),
                transfer_syntaxes=("Explicit VR Little Endian",),
                image_types=("ORIGINAL\\PRIMARY",),
                photometric=("MONOCHROME2",),
                matrix=("64x64",),
                loaded=True,
                decode_errors=(),
            ),
        ),
        unreadable_files=(),
        own_results_ignored=0,
        qualifies=True,
        qualify_reason="",
        sequence_cnn="seq",
        sequences=(
            SequenceEntry(
                series_instance_uid=series_uid,
                series_number=7,
                description="AX T1 POST GD",
                label="T1C",
                confidence=0.97,
                method="tags",
                tag_label="T1C",
                cnn_label=None,
                cnn_votes={},
                reasons=("description says post-contrast",),
            ),
        ),
        routes=(
            RouteEntry(
                task="gbm_pcnsl",
                bundle="gbm_pcnsl_t1c",
                series_instance_uid=series_uid,
                sequence="T1C",
                weight=1.0,
            ),
        ),
        predictions=(),
        findings=(
            FindingEntry(
                task="gbm_pcnsl",
                positive_label="PCNSL",
                negative_label="GBM",
                status="present",
                probability=0.8123,
                method="weighted_mean",
                reason="above the band",
                models=("gbm_pcnsl_t1c 1.0",),
            ),
        ),
        n_findings=1,
        report_note="",
        objects=(
            ObjectEntry(
                kind="sr",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                sop_instance_uid="1.9.9",
                series_instance_uid="1.9",
                file=str(results / "sr.dcm"),
            ),
            ObjectEntry(
                kind="sc",
                sop_class_uid=SecondaryCaptureImageStorage,
                sop_instance_uid=sc_uid,
                series_instance_uid="1.8",
                file=str(sc_file),
            ),
        ),
        predecessor_sr=None,
        destinations=("pacs",),
        deliveries_enqueued=1,
    )
    write_json_durable(audit_path(results, study_uid), audit_to_json(record))


class Env:
    """A spool with a processed study A (audit, heatmap, a dead delivery) and a receiving B."""

    def __init__(self, tmp_path: Path, *, token: str | None = None, loopback: bool = True):
        self.spool = Spool(tmp_path / "spool", min_free_disk_mb=0)
        self.queue = JobQueue(self.spool.index, owner="t", lease_s=60, max_attempts=1)
        for i in (1, 2):
            self.spool.store(_mr(f"{STUDY_A}.1.{i}"), calling_ae="A")
        self.queue.enqueue(STUDY_A)
        job = self.queue.claim()
        assert job is not None
        self.results = tmp_path / "spool" / "results"
        sc_file = self.results / uid_key(STUDY_A) / "sc1.dcm"
        sc_uid = _sc(sc_file, STUDY_A, (255, 64, 0))
        _audit(self.results, STUDY_A, sc_file, sc_uid)
        self.queue.complete(
            job,
            StudyOutcome(
                study_uid=STUDY_A,
                audit_path=audit_path(self.results, STUDY_A),
                n_series=1,
                n_instances=2,
                n_decode_errors=0,
            ),
        )
        with Outbox(self.spool.root) as outbox:
            outbox.enqueue([pydicom.dcmread(sc_file)], ["pacs"], now=time.time())
            (row,) = outbox.all()
            outbox.mark_failed(
                row,
                error="association rejected",
                status_code=None,
                retryable=False,
                settings=DeliverySettings(),
                now=time.time(),
                rng=random.Random(0),
            )
        time.sleep(0.01)
        self.spool.store(_mr(f"{STUDY_B}.1.1", study=STUDY_B), calling_ae="A")  # newest
        self.refusal: tuple[str, ...] = ()
        self.woken = 0

        def wake() -> None:
            self.woken += 1

        hooks = StatusHooks.for_spool(
            self.spool, queue=self.queue, wake=wake, last_refusal=lambda: self.refusal
        )
        self.access = Access(token, loopback=loopback)
        app = StatusApp(self.spool, metrics=NodeMetrics(), hooks=hooks, access=self.access)
        self.client = TestClient(app.app, base_url="http://127.0.0.1:8080")

    def delivery_states(self) -> list[str]:
        with Outbox(self.spool.root) as outbox:
            return [d.state.value for d in outbox.all()]

    def close(self) -> None:
        self.client.close()
        self.spool.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


def test_study_list_newest_first_with_state_timings_and_notice(env: Env) -> None:
    r = env.client.get("/")
    assert r.status_code == 200
    html = r.text
    assert "NOT FOR CLINICAL USE" in html
    key_a, key_b = uid_key(STUDY_A), uid_key(STUDY_B)
    assert html.index(key_b) < html.index(key_a)  # B came last: listed first
    row_a = html[html.index(f'data-study-key="{key_a}"') :].split("</tr>", 1)[0]
    assert "state-done" in row_a and '<td class="num">2</td>' in row_a
    assert " s</td>" in row_a  # a time to result
    assert "1 dead" in row_a  # its delivery is in the dead letter
    row_b = html[html.index(f'data-study-key="{key_b}"') :].split("</tr>", 1)[0]
    assert "state-receiving" in row_b
    assert STUDY_A not in html and PATIENT not in html  # the list shows keys, not identifiers
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-frame-options"] == "DENY"


def test_study_page_shows_patient_series_findings_heatmap_and_deliveries(env: Env) -> None:
    with capture_logs() as logs:
        r = env.client.get(f"/studies/{uid_key(STUDY_A)}")
    assert r.status_code == 200
    html = r.text
    assert "NOT FOR CLINICAL USE" in html
    assert PATIENT in html and "4MR1" in html and "2004-08-26" in html
    assert "AX T1 POST GD" in html and "T1C" in html and "description says post-contrast" in html
    assert "gbm_pcnsl -&gt; gbm_pcnsl_t1c (weight 1)" in html
    assert 'data-task="gbm_pcnsl"' in html and "0.812" in html and "present" in html
    assert "gbm_pcnsl: PCNSL present (p=81%) · series p=80%  model gbm_pcnsl_t1c 1.0" in html
    assert f'src="/studies/{uid_key(STUDY_A)}/heatmaps/1.png"' in html
    assert 'data-destination="pacs"' in html and "dead 1" in html
    assert "association rejected" in html and "Requeue dead deliveries to pacs" in html
    assert not any(PATIENT in repr(e) or "4MR1" in repr(e) for e in logs)
    png = env.client.get(f"/studies/{uid_key(STUDY_A)}/heatmaps/1.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png.content))
    assert img.size == (256, 192)  # 400x300 fitted into 256 px
    centre = np.asarray(img.convert("RGB"))[96, 96]
    assert centre[0] > 200 and centre[2] < 40  # the orange square, colours kept
    # Only heatmap SCs the audit names are served: the SR (index 0) and others are not.
    assert env.client.get(f"/studies/{uid_key(STUDY_A)}/heatmaps/0.png").status_code == 404
    assert env.client.get(f"/studies/{uid_key(STUDY_A)}/heatmaps/9.png").status_code == 404
    assert env.client.get("/studies/ffffffffffff").status_code == 404


def test_requeue_a_dead_delivery_needs_csrf_and_redirects(env: Env) -> None:
    url = f"/studies/{uid_key(STUDY_A)}/requeue-deliveries"
    r = env.client.post(url, data={"destination": "pacs"}, follow_redirects=False)
    assert r.status_code == 403 and env.delivery_states() == ["dead"]
    r = env.client.post(url, data={"destination": "pacs", "csrf": "0" * 64}, follow_redirects=False)
    assert r.status_code == 403 and env.delivery_states() == ["dead"]
    r = env.client.post(
        url, data={"destination": "pacs", "csrf": env.access.csrf}, follow_redirects=False
    )
    assert r.status_code == 303
    assert r.headers["location"] == f"/studies/{uid_key(STUDY_A)}?done=deliveries-requeued"
    assert env.delivery_states() == [DeliveryState.PENDING.value]
    page = env.client.get(r.headers["location"])
    assert "dead deliveries were requeued" in page.text and "dead 0" in page.text
    again = env.client.post(
        url, data={"destination": "pacs", "csrf": env.access.csrf}, follow_redirects=False
    )
    assert again.headers["location"].endswith("done=deliveries-not-requeued")


def test_force_complete_a_receiving_study(env: Env) -> None:
    page = env.client.get(f"/studies/{uid_key(STUDY_B)}")
    assert 'id="force-complete"' in page.text and 'id="requeue-job"' not in page.text
    r = env.client.post(
        f"/studies/{uid_key(STUDY_B)}/force-complete",
        data={"csrf": env.access.csrf},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"].endswith("done=forced")
    states = env.spool.index.query("SELECT state FROM studies WHERE study_uid = ?", (STUDY_B,))
    assert states[0]["state"] == StudyStatus.READY and env.woken == 1
    job = env.queue.claim()
    assert job is not None and job.study_uid == STUDY_B
    r = env.client.post(
        f"/studies/{uid_key(STUDY_B)}/force-complete",
        data={"csrf": env.access.csrf},
        follow_redirects=False,
    )
    assert r.headers["location"].endswith("done=not-forced")


def test_requeue_a_dead_study_job(env: Env) -> None:
    env.client.post(f"/studies/{uid_key(STUDY_B)}/force-complete", data={"csrf": env.access.csrf})
    job = env.queue.claim()
    assert job is not None
    assert env.queue.fail(job, error="InferenceError", permanent=False) == StudyStatus.DEAD
    page = env.client.get(f"/studies/{uid_key(STUDY_B)}")
    assert 'id="requeue-job"' in page.text and "InferenceError" in page.text
    r = env.client.post(
        f"/studies/{uid_key(STUDY_B)}/requeue-job",
        data={"csrf": env.access.csrf},
        follow_redirects=False,
    )
    assert r.headers["location"].endswith("done=job-requeued")
    assert env.queue.job_state(job.job_id) == StudyStatus.READY


def test_reload_refusal_banner_on_every_page(env: Env) -> None:
    assert 'id="reload-refused"' not in env.client.get("/").text
    env.refusal = ("rules.yaml:12: completion.quiet_period_s: must be greater than 0",)
    for path in ("/", f"/studies/{uid_key(STUDY_A)}"):
        html = env.client.get(path).text
        assert 'id="reload-refused"' in html and "rules.yaml:12: completion.quiet_period_s" in html


def test_header_values_are_escaped(env: Env) -> None:
    """Patient attributes come from outside: they are shown as text, never as markup."""
    env.spool.store(_mr("1.2.5.1.1", study="1.2.5", patient="<script>x()</script>"), calling_ae="A")
    html = env.client.get(f"/studies/{uid_key('1.2.5')}").text
    assert "&lt;script&gt;x()&lt;/script&gt;" in html and "<script>" not in html


def test_loopback_server_refuses_a_foreign_host_name(env: Env) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 gets nothing."""
    r = env.client.get("/", headers={"host": "evil.example:8080"})
    assert r.status_code == 421 and "CompressedSamples" not in r.text
    assert env.client.get("/", headers={"host": "localhost:8080"}).status_code == 200
    assert env.client.get("/healthz", headers={"host": "evil.example"}).status_code == 200


def test_token_required_off_loopback(tmp_path: Path) -> None:
    e = Env(tmp_path, token=TOKEN, loopback=False)
    try:
        c = e.client
        study = f"/studies/{uid_key(STUDY_A)}"
        assert c.get("/healthz").status_code == 200  # the supervisor's probe stays open
        for path in ("/", study, f"{study}/heatmaps/1.png", "/metrics"):
            r = c.get(path)
            assert r.status_code == 401 and PATIENT not in r.text, path
            assert r.headers["www-authenticate"].startswith("Bearer")
        r = c.get(study, headers={"accept": "text/html"})
        assert r.status_code == 401 and 'action="/login"' in r.text and PATIENT not in r.text
        assert c.get("/", headers={"authorization": "Bearer wrong-token-000000"}).status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert c.get(study, headers=auth).status_code == 200
        assert c.get("/metrics", headers=auth).status_code == 200
        # An action with the bearer token needs no CSRF token (a browser never adds the header)
        r = c.post(
            f"{study}/requeue-deliveries",
            data={"destination": "pacs"},
            headers=auth,
            follow_redirects=False,
        )
        assert r.status_code == 303 and e.delivery_states() == ["pending"]
        # The login form: a wrong token is refused, the right one sets the session cookie.
        r = c.post("/login", data={"token": "nope", "next": study}, follow_redirects=False)
        assert r.status_code == 401 and 'id="login-failed"' in r.text
        r = c.post("/login", data={"token": TOKEN, "next": study}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == study
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        page = c.get(study)
        assert page.status_code == 200 and PATIENT in page.text
        # A session cookie does not spare the CSRF token.
        r = c.post(f"{study}/requeue-deliveries", data={"destination": "pacs"})
        assert r.status_code == 403
        # An open redirect through `next` is not possible.
        r = c.post(
            "/login", data={"token": TOKEN, "next": "//evil.example/"}, follow_redirects=False
        )
        assert r.headers["location"] == "/"
        c.post("/logout")
        c.cookies.clear()
        assert c.get(study).status_code == 401
    finally:
        e.close()


def test_webserver_off_loopback_serves_any_host_name_with_the_token(tmp_path: Path) -> None:
    """A real server bound beyond loopback (all interfaces) answers only with the token."""
    spool = Spool(tmp_path / "sp", min_free_disk_mb=0)
    with pytest.raises(ValueError, match="beyond loopback needs a token"):
        WebServer(spool, port=0, host="0.0.0.0", active_associations=lambda: 0)
    web = WebServer(spool, port=0, host="0.0.0.0", token=TOKEN, active_associations=lambda: 0)
    web.start()
    try:
        url = f"http://localhost:{web.port}/"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        assert err.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200 and "NOT FOR CLINICAL USE" in r.read().decode()
    finally:
        web.stop()
        spool.close()


# --- the http section of the rule file -------------------------------------------------------


def test_check_refuses_a_non_loopback_bind_without_a_token(tmp_path: Path) -> None:
    text = "node:\n  port: 11112\nhttp:\n  port: 8080\n  bind_address: 0.0.0.0\n"
    rules, problems = validate_rules_text(text)
    assert rules is None
    (p,) = problems
    assert p.render(Path("r.yaml")).startswith("r.yaml:5: http.bind_address: the status page")
    assert p.fix is not None and "token_file" in p.fix
    rules, problems = validate_rules_text(text + f"  token: {TOKEN}\n")
    assert rules is not None and problems == () and rules.http.read_token() == TOKEN
    _, problems = validate_rules_text(text + "  token: short\n")
    assert [(p.path, p.line) for p in problems] == [("http.token", 6)]
    assert "short" not in problems[0].message  # a secret is never echoed
    _, problems = validate_rules_text(text + f"  token: {TOKEN}\n  token_file: /x\n")
    assert [p.path for p in problems] == ["http.token"]
    # Loopback needs no token.
    rules, problems = validate_rules_text("http:\n  bind_address: 127.0.0.1\n")
    assert rules is not None and rules.http.read_token() is None


def test_neuronode_check_refuses_the_default_rules_bound_to_every_interface(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`neuronode check` on routing_rules/default.yaml with bind_address 0.0.0.0: refused with
    the line, OK again once token_file names a readable file."""
    from node.cli import main

    text = (REPO / "routing_rules" / "default.yaml").read_text()
    text = text.replace("models_dir: ../models", f"models_dir: {REPO / 'models'}")
    old = "  bind_address: 127.0.0.1      # loopback: only this machine"
    assert old in text
    line = text[: text.index(old)].count("\n") + 1
    path = tmp_path / "rules.yaml"
    path.write_text(text.replace(old, old.replace("127.0.0.1", "0.0.0.0  ")))
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:{line}: http.bind_address: the status page shows patient identifiers" in out
    secret = tmp_path / "http.token"
    path.write_text(
        text.replace(old, f"  token_file: {secret}\n" + old.replace("127.0.0.1", "0.0.0.0  "))
    )
    assert main(["check", str(path)]) == 1  # the file is missing
    assert (
        f"{path}:{line}: http.token_file: file {secret} does not exist" in capsys.readouterr().out
    )
    secret.write_text(TOKEN)
    assert main(["check", str(path)]) == 0, capsys.readouterr().out


def test_token_file(tmp_path: Path) -> None:
    secret = tmp_path / "http.token"
    text = f"http:\n  bind_address: 0.0.0.0\n  token_file: {secret}\n"
    rules, problems = validate_rules_text(text)
    assert rules is not None and problems == ()
    (missing,) = check_files_exist(rules, text)
    assert (missing.path, missing.line) == ("http.token_file", 3)
    assert missing.fix is not None and "token file" in missing.fix
    with pytest.raises(ConfigError, match=r"http\.token_file: cannot read"):
        rules.http.read_token()
    secret.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        rules.http.read_token()
    secret.write_text(f"{TOKEN}\n")
    assert check_files_exist(rules, text) == ()
    assert rules.http.read_token() == TOKEN
    assert not Rules().http.token and Rules().http.loopback
    off = replace_http(rules, bind_address="::1")
    assert off.http.loopback


def replace_http(rules: Rules, **values: object) -> Rules:
    return rules.model_copy(update={"http": rules.http.model_copy(update=values)})


def test_node_shows_a_refused_rule_file(tmp_path: Path) -> None:
    """The Node keeps the last refusal (its watcher) and the page shows it until fixed."""

    def never(job: StudyJob) -> StudyOutcome:
        raise AssertionError("no study is sent in this test")

    path = tmp_path / "rules.yaml"
    good = (
        f"node:\n  port: {free_port()}\nhttp:\n  port: 0\nstorage:\n"
        f"  spool_dir: {tmp_path / 'spool'}\n  min_free_disk_mb: 0\ntasks: {{}}\n"
        f"models_dir: {REPO / 'models'}\n"
    )
    path.write_text(good)
    node = Node(load_rules(path), rules_path=path, processor=never)
    try:
        assert node.web is not None
        node.web.start()
        url = f"http://127.0.0.1:{node.web.port}/"

        def page() -> str:
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())

        assert 'id="reload-refused"' not in page()
        path.write_text(good.replace("min_free_disk_mb: 0", "min_free_disk_mb: -5"))
        assert node.reload_rules() is False
        html = page()
        assert 'id="reload-refused"' in html and "storage.min_free_disk_mb" in html
        assert f"{path}:7:" in html
        path.write_text(good + "\n")
        assert node.reload_rules() is True
        assert 'id="reload-refused"' not in page()
    finally:
        node.stop(grace_s=0)

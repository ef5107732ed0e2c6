"""Results into a real Orthanc: C-STORE and STOW-RS, read back over REST; SR fallback; outage."""

# ruff: noqa: F811  (the Orthanc fixtures are imported by name and used as arguments)

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from structlog.testing import capture_logs

from node.config import DeliverySettings, DicomDestination, DicomWebDestination, Rules
from node.deliver.outbox import Outbox, deliver_due
from node.deliver.send import send_dicom, send_stow
from node.errors import SendError
from node.lab.orthanc import free_port
from node.records import DeliveryState
from node.report.codes import SC_SOP_CLASS_UID, SR_SOP_CLASS_UIDS
from node.report.sc import build_heatmap_images
from node.report.sr import build_sr
from tests.integration.orthanc import (  # noqa: F401 - fixtures
    OrthancServer,
    make_test_pki,
    orthanc,
    orthanc_factory,
)
from tests.unit.test_report import OUT, make_result, mr_small

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

SOURCE_PATIENT_NAME = str(pydicom.dcmread(mr_small(), stop_before_pixels=True).PatientName)


def results_for_study() -> tuple[Dataset, tuple[Dataset, ...]]:
    """The SR and heatmaps for the classic MR test study."""
    result = make_result(mr_small())
    scs = build_heatmap_images(result, OUT, uid_root=None)
    return build_sr(result, scs, uid_root=None), scs


def dicom_dest(server: OrthancServer, name: str = "pacs") -> DicomDestination:
    return DicomDestination(
        name=name, ae_title=server.aet, host="127.0.0.1", port=server.dicom_port
    )


def flat_json(value: Any) -> str:
    return json.dumps(value)


def check_in_orthanc(server: OrthancServer, sr: Dataset, scs: tuple[Dataset, ...]) -> None:
    """Read the results back over REST and check what a viewer would show."""
    src = pydicom.dcmread(mr_small(), stop_before_pixels=True)
    stored = server.by_sop_uid()
    sr_tags = stored[str(sr.SOPInstanceUID)]
    assert sr_tags["SOPClassUID"] == str(sr.SOPClassUID)
    assert sr_tags["PatientID"] == str(src.PatientID)
    assert sr_tags["StudyInstanceUID"] == str(src.StudyInstanceUID)
    assert sr_tags["SeriesDescription"] == "AI results - NOT FOR DIAGNOSTIC USE"
    content = flat_json(sr_tags["ContentSequence"])
    assert "Glioblastoma multiforme" in content and "393563007" in content
    assert "Certainty of Finding" in content and '"87' in content  # 87 % as NumericValue
    assert "NOT FOR DIAGNOSTIC USE" in content
    for sc in scs:
        assert str(sc.SOPInstanceUID) in content  # the SR references each heatmap
        sc_tags = stored[str(sc.SOPInstanceUID)]
        assert sc_tags["SOPClassUID"] == SC_SOP_CLASS_UID
        assert sc_tags["BurnedInAnnotation"] == "YES"
        assert sc_tags["PatientID"] == str(src.PatientID)
        ref = sc_tags["SourceImageSequence"][0]
        assert ref["ReferencedSOPInstanceUID"] == str(src.SOPInstanceUID)
    study = server.get(f"/instances/{sr_tags['_id']}/study")
    assert study["MainDicomTags"]["StudyInstanceUID"] == str(src.StudyInstanceUID)


def test_cstore_sr_and_sc_into_orthanc(orthanc: OrthancServer) -> None:
    orthanc.upload(mr_small())
    sr, scs = results_for_study()
    with capture_logs() as logs:
        results = send_dicom(dicom_dest(orthanc), [sr, *scs], calling_ae="NEURONODE")
    assert [r.delivered for r in results] == [True] * (1 + len(scs))
    assert all(r.status_code == 0 for r in results)
    assert results[0].sent_sop_class_uid == SR_SOP_CLASS_UIDS["comprehensive3d"]
    check_in_orthanc(orthanc, sr, scs)
    assert len(orthanc.instances()) == 2 + len(scs)  # source + SR + heatmaps
    # pushed twice (same study, same models): the same UIDs, so nothing new in the PACS
    sr2, scs2 = results_for_study()
    send_dicom(dicom_dest(orthanc), [sr2, *scs2], calling_ae="NEURONODE")
    assert len(orthanc.instances()) == 2 + len(scs)
    assert SOURCE_PATIENT_NAME.split("^")[0] not in repr(logs)


def test_stow_into_orthanc(orthanc: OrthancServer) -> None:
    sr, scs = results_for_study()
    web = DicomWebDestination(name="web", url=orthanc.dicomweb_url)
    results = send_stow(web, [sr, *scs])
    assert [r.delivered for r in results] == [True] * (1 + len(scs))
    check_in_orthanc(orthanc, sr, scs)


class StrictPacs:
    """A C-STORE SCP that refuses Comprehensive 3D SR at negotiation and files the rest in Orthanc.

    Stands in for a PACS without 3D SR support when the installed Orthanc is too old for
    its AcceptedSopClasses option.
    """

    def __init__(
        self,
        orthanc: OrthancServer,
        accepted: tuple[str, ...],
        statuses: dict[str, int] | None = None,
    ) -> None:
        from pynetdicom import AE, evt

        self.port = free_port()
        self.orthanc = orthanc
        self.statuses = statuses or {}  # by SOP class; 0x0000 when absent
        self.ae = AE(ae_title="STRICTPACS")
        for uid in accepted:
            self.ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        self.lock = threading.Lock()

    def _on_store(self, event: Any) -> int:
        status = self.statuses.get(str(event.request.AffectedSOPClassUID), 0x0000)
        if status in (0x0000, 0xB000, 0xB006, 0xB007):  # kept: file it in Orthanc
            with self.lock:
                self.orthanc.post("/instances", event.encoded_dataset())
        return status

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def strict_pacs(orthanc: OrthancServer) -> Iterator[StrictPacs]:
    pacs = StrictPacs(
        orthanc,
        (SR_SOP_CLASS_UIDS["comprehensive"], SR_SOP_CLASS_UIDS["enhanced"], SC_SOP_CLASS_UID),
    )
    yield pacs
    pacs.close()


def test_refused_3d_sr_falls_back_to_comprehensive(
    orthanc: OrthancServer, strict_pacs: StrictPacs
) -> None:
    sr, scs = results_for_study()
    dest = DicomDestination(
        name="strict", ae_title="STRICTPACS", host="127.0.0.1", port=strict_pacs.port
    )
    results = send_dicom(dest, [sr, *scs], calling_ae="NEURONODE")
    assert all(r.delivered for r in results)
    assert results[0].sent_sop_class_uid == SR_SOP_CLASS_UIDS["comprehensive"]
    stored = orthanc.by_sop_uid()
    fallback = stored[results[0].sent_sop_instance_uid]
    assert fallback["SOPClassUID"] == SR_SOP_CLASS_UIDS["comprehensive"]
    assert "Glioblastoma multiforme" in flat_json(fallback["ContentSequence"])
    assert str(sr.SOPInstanceUID) not in stored  # the 3D SR itself never reached the PACS


def test_orthanc_accepted_sop_classes_fallback(orthanc_factory: Any) -> None:
    """Same, with Orthanc itself refusing 3D SR (skipped where Orthanc lacks the option)."""
    server: OrthancServer = orthanc_factory(
        accepted_sop_classes=[SR_SOP_CLASS_UIDS["comprehensive"], SC_SOP_CLASS_UID]
    )
    sr, scs = results_for_study()
    results = send_dicom(dicom_dest(server), [sr, *scs], calling_ae="NEURONODE")
    assert all(r.delivered for r in results)
    assert results[0].sent_sop_class_uid == SR_SOP_CLASS_UIDS["comprehensive"]
    assert (
        server.by_sop_uid()[results[0].sent_sop_instance_uid]["SOPClassUID"]
        == (SR_SOP_CLASS_UIDS["comprehensive"])
    )


def test_failure_and_warning_statuses_over_a_real_association(orthanc: OrthancServer) -> None:
    """A PACS answering 0xA700 for the SR and 0xB000 for the heatmaps: only the latter count.

    (Orthanc 1.10 answers success even for instances its Lua filter drops, so a pynetdicom
    SCP gives the statuses here.)
    """
    pacs = StrictPacs(
        orthanc,
        (*SR_SOP_CLASS_UIDS.values(), SC_SOP_CLASS_UID),
        statuses={SR_SOP_CLASS_UIDS["comprehensive3d"]: 0xA700, SC_SOP_CLASS_UID: 0xB000},
    )
    try:
        sr, scs = results_for_study()
        dest = DicomDestination(
            name="strict", ae_title="STRICTPACS", host="127.0.0.1", port=pacs.port
        )
        results = send_dicom(dest, [sr, *scs], calling_ae="NEURONODE")
    finally:
        pacs.close()
    assert not results[0].delivered and results[0].retryable
    assert results[0].status_code == 0xA700
    assert all(r.delivered and r.status_code == 0xB000 for r in results[1:])
    stored = orthanc.by_sop_uid()
    assert str(sr.SOPInstanceUID) not in stored
    assert all(str(sc.SOPInstanceUID) in stored for sc in scs)


@pytest.mark.slow
def test_outage_then_delivery_without_duplicates(orthanc: OrthancServer, tmp_path: Path) -> None:
    sr, scs = results_for_study()
    web = DicomWebDestination(name="web", url=orthanc.dicomweb_url)
    rules = Rules(
        destinations=(dicom_dest(orthanc), web),
        delivery=DeliverySettings(
            max_attempts=5, backoff_initial_s=30, backoff_max_s=300, jitter_fraction=0.2
        ),
    )
    rng = random.Random(0)
    with Outbox(tmp_path / "spool") as outbox:
        assert outbox.enqueue([sr, *scs], ["pacs"], now=0) == 1 + len(scs)
        orthanc.stop()
        counts = deliver_due(outbox, rules, 0.0, rng=rng)
        assert counts.unreachable == ("pacs",) and counts.delivered == 0
        rows = outbox.all()
        assert {r.state for r in rows} == {DeliveryState.PENDING}
        assert all(r.attempts == 1 and 24 <= r.next_attempt_at <= 36 for r in rows)
        assert deliver_due(outbox, rules, 10.0, rng=rng).unreachable == ()  # not due: not tried

    orthanc.start()  # same ports, same storage
    with Outbox(tmp_path / "spool") as outbox:  # a restarted node
        counts = deliver_due(outbox, rules, 40.0, rng=rng)
        assert counts.delivered == 1 + len(scs)
        assert {r.state for r in outbox.all()} == {DeliveryState.DELIVERED}
        assert outbox.enqueue([sr, *scs], ["pacs"], now=50) == 0  # the study pushed again
        assert deliver_due(outbox, rules, 60.0, rng=rng).delivered == 0
        # the DICOMweb destination added later gets the same objects, once
        assert outbox.enqueue([sr, *scs], ["web"], now=70) == 1 + len(scs)
        assert deliver_due(outbox, rules, 70.0, rng=rng).delivered == 1 + len(scs)
    assert len(orthanc.instances()) == 1 + len(scs)
    check_in_orthanc_without_source(orthanc, sr)


def check_in_orthanc_without_source(server: OrthancServer, sr: Dataset) -> None:
    tags = server.by_sop_uid()[str(sr.SOPInstanceUID)]
    assert "Glioblastoma multiforme" in flat_json(tags["ContentSequence"])


def test_unreachable_orthanc_port_raises_retryable(orthanc: OrthancServer) -> None:
    orthanc.stop()
    sr, _ = results_for_study()
    with pytest.raises(SendError) as info:
        send_dicom(dicom_dest(orthanc), [sr], calling_ae="NEURONODE")
    assert info.value.retryable
    with pytest.raises(SendError):
        send_stow(DicomWebDestination(name="w", url=orthanc.dicomweb_url), [sr])


@pytest.mark.slow
def test_cstore_over_tls(orthanc_factory: Any, tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    server: OrthancServer = orthanc_factory(
        tls=(pki["server.crt"], pki["server.key"], pki["ca.crt"])
    )
    sr, scs = results_for_study()
    dest = DicomDestination(
        name="pacs_tls",
        ae_title=server.aet,
        host="127.0.0.1",
        port=server.dicom_port,
        tls=True,
        tls_ca_file=pki["ca.crt"],
        tls_cert_file=pki["client.crt"],
        tls_key_file=pki["client.key"],
    )
    results = send_dicom(dest, [sr, *scs], calling_ae="NEURONODE")
    assert all(r.delivered for r in results)
    assert str(sr.SOPInstanceUID) in server.by_sop_uid()
    # Without TLS the same port does not talk DICOM; with an unknown CA the handshake fails.
    plain = dest.model_copy(update={"tls": False})
    with pytest.raises(SendError) as info:
        send_dicom(plain, [sr], calling_ae="NEURONODE")
    assert info.value.retryable
    other = make_test_pki(tmp_path / "other")
    wrong_ca = dest.model_copy(update={"tls_ca_file": other["ca.crt"]})
    with pytest.raises(SendError):
        send_dicom(wrong_ca, [sr], calling_ae="NEURONODE")

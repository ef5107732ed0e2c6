"""Delivery logic without a network (status judgement, SR fallback, error translation), and the
real association's socket options on loopback."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import AE
from structlog.testing import capture_logs

from node.config import DicomDestination, DicomWebDestination
from node.deliver.send import (
    BASE_SOP_CLASSES,
    StowError,
    pynetdicom_connect,
    send_dicom,
    send_stow,
    store_status_delivered,
    store_status_retryable,
)
from node.errors import SendError
from node.lab.orthanc import free_port
from node.report.codes import SC_SOP_CLASS_UID, SR_SOP_CLASS_UIDS

DEST = DicomDestination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
WEB = DicomWebDestination(name="web", url="http://127.0.0.1:8042/dicom-web")
SR3D = SR_SOP_CLASS_UIDS["comprehensive3d"]


def obj(sop_class: str, uid: str) -> Dataset:
    """A minimal object with file meta, like the ones the outbox stores."""
    ds = Dataset()
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(uid)
    ds.PatientName = "Secret^Patient"
    ds.ContentSequence = []
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    return ds


@dataclass
class FakeAssociation:
    accepted: frozenset[str]
    statuses: dict[str, int] = field(default_factory=dict)  # by SOP class
    break_after: int | None = None
    stored: list[Dataset] = field(default_factory=list)
    released: bool = False

    @property
    def accepted_sop_classes(self) -> frozenset[str]:
        return self.accepted

    def store(self, dataset: Dataset) -> int:
        if self.break_after is not None and len(self.stored) >= self.break_after:
            raise SendError("no C-STORE response (association aborted)", retryable=True)
        self.stored.append(dataset)
        return self.statuses.get(str(dataset.SOPClassUID), 0x0000)

    def release(self) -> None:
        self.released = True


def connector(assoc: FakeAssociation, seen: list[tuple[str, ...]] | None = None):  # type: ignore[no-untyped-def]
    def connect(
        dest: DicomDestination, calling_ae: str, classes: tuple[str, ...]
    ) -> FakeAssociation:
        assert dest is DEST and calling_ae == "NEURONODE"
        if seen is not None:
            seen.append(classes)
        return assoc

    return connect


def test_status_classes() -> None:
    assert store_status_delivered(0x0000)
    for warning in (0xB000, 0xB006, 0xB007):
        assert store_status_delivered(warning)
    for failure in (0xA700, 0xA900, 0xC000, 0x0122, 0x0110, 0xB001):
        assert not store_status_delivered(failure)
    assert store_status_retryable(0xA700) and store_status_retryable(0xA7FF)
    assert store_status_retryable(0x0110)
    assert not store_status_retryable(0xA900) and not store_status_retryable(0x0122)


def test_every_status_is_checked() -> None:
    assoc = FakeAssociation(
        accepted=frozenset(BASE_SOP_CLASSES), statuses={SC_SOP_CLASS_UID: 0xA700}
    )
    seen: list[tuple[str, ...]] = []
    with capture_logs() as logs:
        results = send_dicom(
            DEST,
            [obj(SR3D, "1.2.3"), obj(SC_SOP_CLASS_UID, "1.2.4")],
            calling_ae="NEURONODE",
            connect=connector(assoc, seen),
        )
    assert set(BASE_SOP_CLASSES) <= set(seen[0])
    sr, sc = results
    assert sr.delivered and sr.status_code == 0 and sr.sent_sop_class_uid == SR3D
    assert not sc.delivered and sc.status_code == 0xA700 and sc.retryable
    assert assoc.released
    assert "Secret" not in repr(logs)
    store_lines = [e for e in logs if e["event"] == "c_store"]
    assert [e["status_code"] for e in store_lines] == ["0x0000", "0xA700"]
    assert {e["object_kind"] for e in store_lines} == {"sr", "sc"}


def test_warning_counts_as_delivered_and_permanent_failure() -> None:
    assoc = FakeAssociation(
        accepted=frozenset(BASE_SOP_CLASSES), statuses={SR3D: 0xB007, SC_SOP_CLASS_UID: 0xA900}
    )
    sr, sc = send_dicom(
        DEST,
        [obj(SR3D, "1.2.3"), obj(SC_SOP_CLASS_UID, "1.2.4")],
        calling_ae="NEURONODE",
        connect=connector(assoc),
    )
    assert sr.delivered and sr.status_code == 0xB007
    assert not sc.delivered and not sc.retryable


@pytest.mark.parametrize(
    ("accepted", "expected"),
    [
        ({SR_SOP_CLASS_UIDS["comprehensive"], SR_SOP_CLASS_UIDS["enhanced"]}, "comprehensive"),
        ({SR_SOP_CLASS_UIDS["enhanced"]}, "enhanced"),
    ],
)
def test_sr_fallback(accepted: set[str], expected: str) -> None:
    assoc = FakeAssociation(accepted=frozenset(accepted | {SC_SOP_CLASS_UID}))
    (result,) = send_dicom(
        DEST, [obj(SR3D, "1.2.3")], calling_ae="NEURONODE", connect=connector(assoc)
    )
    assert result.delivered
    assert result.sent_sop_class_uid == SR_SOP_CLASS_UIDS[expected]  # type: ignore[index]
    assert result.sop_instance_uid == "1.2.3" and result.sent_sop_instance_uid != "1.2.3"
    assert str(assoc.stored[0].SOPClassUID) == SR_SOP_CLASS_UIDS[expected]  # type: ignore[index]


def test_no_context_at_all_is_permanent() -> None:
    assoc = FakeAssociation(accepted=frozenset({SC_SOP_CLASS_UID}))
    (result,) = send_dicom(
        DEST, [obj(SR3D, "1.2.3")], calling_ae="NEURONODE", connect=connector(assoc)
    )
    assert not result.delivered and not result.retryable and result.status_code is None
    assert assoc.stored == []


def test_broken_association_fails_the_rest_retryably() -> None:
    assoc = FakeAssociation(accepted=frozenset(BASE_SOP_CLASSES), break_after=1)
    results = send_dicom(
        DEST,
        [obj(SC_SOP_CLASS_UID, f"1.2.{i}") for i in range(4)],
        calling_ae="NEURONODE",
        connect=connector(assoc),
    )
    assert [r.delivered for r in results] == [True, False, False, False]
    assert all(r.retryable for r in results[1:])
    assert len(assoc.stored) == 1  # nothing tried after the break


def test_unreachable_raises_retryable() -> None:
    def refuse(
        dest: DicomDestination, calling_ae: str, classes: tuple[str, ...]
    ) -> FakeAssociation:
        raise SendError("destination pacs cannot be reached", retryable=True)

    with pytest.raises(SendError) as info:
        send_dicom(DEST, [obj(SR3D, "1.2.3")], calling_ae="NEURONODE", connect=refuse)
    assert info.value.retryable


def test_real_connect_refused_on_closed_port() -> None:
    dest = DicomDestination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    with pytest.raises(SendError, match="cannot be reached") as info:
        send_dicom(dest, [obj(SR3D, "1.2.3")], calling_ae="NEURONODE")
    assert info.value.retryable


def test_unreadable_path_is_permanent(tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(SendError) as info:
        send_dicom(
            DEST, [bad], calling_ae="NEURONODE", connect=connector(FakeAssociation(frozenset()))
        )
    assert not info.value.retryable


def test_stow_verdicts() -> None:
    def post(url: str, ds: Dataset) -> Dataset:
        assert url == WEB.url
        uid = str(ds.SOPInstanceUID)
        if uid == "1.1":
            ok = Dataset()
            ok.ReferencedSOPInstanceUID = uid
            resp = Dataset()
            resp.ReferencedSOPSequence = [ok]
            return resp
        if uid == "1.2":
            bad = Dataset()
            bad.ReferencedSOPInstanceUID = uid
            bad.FailureReason = 0xA700
            resp = Dataset()
            resp.FailedSOPSequence = [bad]
            return resp
        if uid == "1.3":
            raise StowError("HTTP 409", http_status=409)
        if uid == "1.4":
            raise StowError("HTTP 503", http_status=503)
        return Dataset()  # lists nothing

    results = send_stow(WEB, [obj(SC_SOP_CLASS_UID, f"1.{i}") for i in range(1, 6)], post=post)
    assert [r.delivered for r in results] == [True, False, False, False, False]
    assert [r.retryable for r in results[1:]] == [True, False, True, True]
    assert [r.status_code for r in results] == [200, 0xA700, 409, 503, None]


def test_stow_unreachable_raises() -> None:
    def post(url: str, ds: Dataset) -> Dataset:
        raise StowError("ConnectionError", http_status=None)

    with pytest.raises(SendError) as info:
        send_stow(WEB, [obj(SC_SOP_CLASS_UID, "1.1")], post=post)
    assert info.value.retryable


def test_real_stow_connection_refused() -> None:
    web = DicomWebDestination(name="w", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(SendError, match="cannot be reached"):
        send_stow(web, [obj(SC_SOP_CLASS_UID, "1.1")])


def test_real_association_has_nagle_off() -> None:
    """Results leave with TCP_NODELAY: with Nagle on each object waits for the peer's delayed
    ACK (40 ms and more per object)."""
    scp = AE(ae_title="PACS")
    for uid in BASE_SOP_CLASSES:
        scp.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        dest = DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        assoc = pynetdicom_connect(dest, "NEURONODE", BASE_SOP_CLASSES, timeout_s=5)
        try:
            sock = assoc._assoc.dul.socket.socket  # type: ignore[attr-defined]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert SR3D in assoc.accepted_sop_classes
        finally:
            assoc.release()
    finally:
        server.shutdown()

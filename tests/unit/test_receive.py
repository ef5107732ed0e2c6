"""Association policy, accepted contexts, and the C-STORE handler over loopback."""

from __future__ import annotations

import copy
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import uid as dcm_uid
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from node.config import AllowedCaller, NodeSettings
from node.errors import ConfigError, StoreStatus
from node.ingest.receive import (
    TRANSFER_SYNTAXES,
    Receiver,
    check_association,
    part10_bytes,
    storage_sop_classes,
)
from node.ingest.spool import Spool, StoreResult
from node.ingest.transport import TCP_QUICKACK, GuardedSocket, PduLimits
from node.lab.orthanc import free_port
from tests.conftest import pydicom_file


def _settings(**kw: object) -> NodeSettings:
    base: dict[str, object] = {
        "ae_title": "NEURONODE",
        "allowed_callers": (
            AllowedCaller(ae_title="STORESCU", host="127.0.0.1"),
            AllowedCaller(ae_title="ANYHOST"),
        ),
    }
    base.update(kw)
    return NodeSettings.model_validate(base)


@pytest.mark.parametrize(
    ("calling", "called", "host", "reason"),
    [
        ("STORESCU", "NEURONODE", "127.0.0.1", None),
        ("STORESCU", "NEURONODE", "10.0.0.5", "calling AE title not recognised"),
        ("ANYHOST", "NEURONODE", "10.0.0.5", None),
        ("INTRUDER", "NEURONODE", "127.0.0.1", "calling AE title not recognised"),
        ("STORESCU", "OTHERNODE", "127.0.0.1", "called AE title not recognised"),
    ],
)
def test_association_policy(calling: str, called: str, host: str, reason: str | None) -> None:
    got = check_association(_settings(), calling_ae=calling, called_ae=called, peer_host=host)
    assert got == reason


def test_accept_unknown_callers_still_checks_called_ae() -> None:
    s = _settings(accept_unknown_callers=True)
    assert check_association(s, calling_ae="X", called_ae="NEURONODE", peer_host="h") is None
    assert check_association(s, calling_ae="X", called_ae="NOPE", peer_host="h") is not None


def test_contexts_cover_brain_mr_and_transfer_syntaxes() -> None:
    classes = set(storage_sop_classes())
    for uid in (
        "1.2.840.10008.5.1.4.1.1.4",  # MR
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy converted enhanced MR
        "1.2.840.10008.5.1.4.1.1.4.2",  # MR spectroscopy
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary capture
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.11.1",  # GSPS
        "1.2.840.10008.5.1.4.1.1.66",  # Raw data
        "1.2.840.10008.5.1.4.1.1.2",  # CT
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    ):
        assert uid in classes
    for ts in (
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    ):
        assert ts in TRANSFER_SYNTAXES


class _ExplodingSpool:
    """Raises on the first store, then behaves: the association must go on."""

    def __init__(self, real: Spool) -> None:
        self.real = real
        self.calls = 0

    def store(self, data: bytes, **kw: str) -> StoreResult:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        return self.real.store(data, **kw)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[Receiver, Spool]]:
    spool = Spool(tmp_path / "spool", min_free_disk_mb=0)
    rx = Receiver(_settings(port=free_port()), spool)
    rx.start()
    yield rx, spool
    rx.stop(1.0)
    spool.close()


def _dataset(sop: str, series: str = "1.2.3.1") -> pydicom.Dataset:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", series, sop
    return ds


def _scu(calling: str = "STORESCU") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(MRImageStorage, dcm_uid.ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def test_store_over_loopback_and_bad_caller(receiver: tuple[Receiver, Spool]) -> None:
    rx, spool = receiver
    assoc = _scu().associate("127.0.0.1", rx.port, ae_title="NEURONODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    st = assoc.send_c_store(_dataset("1.2.3.1.1"))
    bad = assoc.send_c_store(_dataset("1.2.3.1.2", series="1.2.x"))
    dup = assoc.send_c_store(_dataset("1.2.3.1.1"))
    assoc.release()
    assert st.Status == StoreStatus.SUCCESS
    assert bad.Status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert dup.Status == StoreStatus.SUCCESS
    stored = spool.root / "instances/1.2.3/1.2.3.1/1.2.3.1.1.dcm"
    assert pydicom.dcmread(stored).SOPInstanceUID == "1.2.3.1.1"
    assert len(list((spool.root / "quarantine").glob("*.dcm"))) == 1

    rejected = _scu("INTRUDER").associate("127.0.0.1", rx.port, ae_title="NEURONODE")
    assert rejected.is_rejected and not rejected.is_established
    wrong_called = _scu().associate("127.0.0.1", rx.port, ae_title="OTHER")
    assert wrong_called.is_rejected


def test_handler_guard_turns_error_into_failure_and_goes_on(
    receiver: tuple[Receiver, Spool],
) -> None:
    rx, spool = receiver
    rx.spool = _ExplodingSpool(spool)  # type: ignore[assignment]
    assoc = _scu().associate("127.0.0.1", rx.port, ae_title="NEURONODE")
    first = assoc.send_c_store(_dataset("1.2.3.1.5"))
    second = assoc.send_c_store(_dataset("1.2.3.1.6"))
    assoc.release()
    assert first.Status == StoreStatus.PROCESSING_FAILURE
    assert second.Status == StoreStatus.SUCCESS
    assert (spool.root / "instances/1.2.3/1.2.3.1/1.2.3.1.6.dcm").exists()


def test_bytes_are_stored_as_received_big_endian(receiver: tuple[Receiver, Spool]) -> None:
    rx, spool = receiver
    src = pydicom_file("MR_small_bigendian.dcm")
    ds = pydicom.dcmread(src)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(MRImageStorage, dcm_uid.ExplicitVRBigEndian)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="NEURONODE")
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    (path,) = spool.instance_paths(str(ds.StudyInstanceUID))
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == dcm_uid.ExplicitVRBigEndian
    assert (stored.pixel_array == ds.pixel_array).all()


def test_max_associations_rejects_and_logs(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    spool = Spool(tmp_path / "spool", min_free_disk_mb=0)
    rx = Receiver(_settings(port=free_port(), max_associations=1), spool)
    rx.start()
    try:
        first = _scu().associate("127.0.0.1", rx.port, ae_title="NEURONODE")
        assert first.is_established
        with capture_logs() as logs:
            second = _scu().associate("127.0.0.1", rx.port, ae_title="NEURONODE")
            for _ in range(100):  # the handler logs in the association thread
                if logs:
                    break
                time.sleep(0.02)
        assert second.is_rejected
        first.release()
        assert any(
            e["event"] == "association_rejected" and e["reason"] == "too many associations"
            for e in logs
        ), logs
    finally:
        rx.stop(1.0)
        spool.close()


# --- the accepted connection: quick ACKs, reading a PDU body in large pieces -------------------


def _accepted_pair(limits: PduLimits) -> tuple[socket.socket, GuardedSocket]:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cli = socket.create_connection(srv.getsockname())
        raw, _ = srv.accept()
    guarded = GuardedSocket(fileno=raw.detach())
    guarded.init_reader(limits, "127.0.0.1")
    return cli, guarded


@pytest.mark.skipif(TCP_QUICKACK is None, reason="the platform has no TCP_QUICKACK (Linux only)")
def test_quickack_is_rearmed_before_each_pdu() -> None:
    assert TCP_QUICKACK is not None
    cli, guarded = _accepted_pair(PduLimits(network_timeout_s=5, max_pdu_bytes=0))
    with cli, guarded:
        for _ in range(2):
            # Delayed-ACK mode, as the kernel enters it on its own on a busy connection.
            guarded.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 0)
            assert guarded.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK) == 0
            cli.sendall(bytes((0x04, 0, 0, 0, 0, 2, 0xAB, 0xCD)))
            assert guarded.recv(6) == bytes((0x04, 0, 0, 0, 0, 2))
            assert guarded.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK) == 1
            assert guarded.recv(4096) == bytes((0xAB, 0xCD))


def test_pdu_body_is_read_ahead_but_never_past_its_pdu() -> None:
    cli, guarded = _accepted_pair(PduLimits(network_timeout_s=5, max_pdu_bytes=0))
    body = bytes(range(256)) * 1200  # 300 KiB: more than one read-ahead piece
    first = struct.pack(">BBL", 0x04, 0, len(body)) + body
    second = struct.pack(">BBL", 0x04, 0, 3) + b"xyz"
    with cli, guarded:
        cli.sendall(first + second)
        assert guarded.recv(6) == first[:6]
        got = bytearray()
        while len(got) < len(body):  # pynetdicom's way: 4 KiB at a time
            got += guarded.recv(min(4096, len(body) - len(got)))
        assert bytes(got) == body
        # The next PDU is still in the socket (select() sees it), not in the reader.
        assert select.select([guarded], [], [], 5)[0] == [guarded]
        assert guarded.recv(6) == second[:6]
        assert guarded.recv(4096) == b"xyz"


def test_receiver_connections_are_guarded(receiver: tuple[Receiver, Spool]) -> None:
    rx, _ = receiver
    assoc = _scu().associate("127.0.0.1", rx.port, ae_title="NEURONODE")
    assert assoc.is_established
    try:
        sockets = [
            a.dul.socket.socket for a in rx.ae.active_associations if a.dul.socket is not None
        ]
        assert sockets and all(isinstance(s, GuardedSocket) for s in sockets)
    finally:
        assoc.release()


def _echo(port: int) -> int:
    assoc = _scu().associate("127.0.0.1", port, ae_title="NEURONODE")
    assert assoc.is_established
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return status


def test_receivers_share_a_port_only_when_asked(tmp_path: Path) -> None:
    """node.receiver_processes: two listeners with SO_REUSEPORT on one port both start and
    answer; a listener without it still gets "in use"; once both stop, the port is free."""
    port = free_port()
    spools = [Spool(tmp_path / "spool", min_free_disk_mb=0) for _ in range(2)]
    first = Receiver(_settings(port=port), spools[0], shared_port=True)
    second = Receiver(_settings(port=port), spools[1], shared_port=True)
    first.start()
    try:
        second.start()
        try:
            alone = Receiver(_settings(port=port), spools[0])
            with pytest.raises(ConfigError, match="already in use"):
                alone.start()
            assert [_echo(port) for _ in range(6)] == [0] * 6
        finally:
            second.stop(1.0)
        assert _echo(port) == 0  # the first still answers on its own
    finally:
        first.stop(1.0)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT only
        probe.bind(("127.0.0.1", port))  # nothing listens there any more
    for spool in spools:
        spool.close()


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        (MRImageStorage, "1.2.3.4", dcm_uid.ExplicitVRLittleEndian),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.3.45", dcm_uid.ImplicitVRLittleEndian),  # odd
        (MRImageStorage, "1.2." + "9" * 60, dcm_uid.JPEG2000Lossless),  # 64 characters
    ],
)
def test_part10_bytes_are_pynetdicoms_file_meta_and_the_data_set(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    """The File Meta Information encoded directly is byte for byte what pynetdicom's
    `event.encoded_dataset()` writes (pydicom's writer), followed by the data set as sent."""
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    data = b"\x08\x00\x16\x00UI\x04\x001.2\x00"
    expected = b"".join(
        (
            b"\x00" * 128,
            b"DICM",
            encode_file_meta(
                create_file_meta(
                    sop_class_uid=dcm_uid.UID(sop_class),
                    sop_instance_uid=dcm_uid.UID(sop_instance),
                    transfer_syntax=dcm_uid.UID(syntax),
                )
            ),
            data,
        )
    )
    got = part10_bytes(
        memoryview(data),
        sop_class_uid=str(sop_class),
        sop_instance_uid=sop_instance,
        transfer_syntax_uid=str(syntax),
    )
    assert got == expected
    meta = pydicom.dcmread(pydicom.filebase.DicomBytesIO(got), force=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == sop_instance
    assert meta.TransferSyntaxUID == syntax


def test_pynetdicom_reads_a_pdu_body_in_few_calls_and_stops_at_its_end() -> None:
    """The connection wrapper asks for the rest of the PDU in each read (not 4 KiB at a
    time), yet the next PDU stays in the socket for select(), as with pynetdicom's own."""
    from pynetdicom.transport import AssociationSocket

    from node.ingest.transport import _WholeReadSocket

    cli, guarded = _accepted_pair(PduLimits(network_timeout_s=5, max_pdu_bytes=0))
    body = bytes(range(256)) * 1200  # 300 KiB
    first = struct.pack(">BBL", 0x04, 0, len(body)) + body
    second = struct.pack(">BBL", 0x04, 0, 3) + b"xyz"
    calls: list[int] = []

    class Counting(GuardedSocket):
        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            calls.append(buflen)
            return super().recv(buflen, flags)

    guarded.__class__ = Counting
    wrapper = _WholeReadSocket.__new__(_WholeReadSocket)
    wrapper.socket = guarded
    with cli, guarded:
        cli.sendall(first + second)
        assert bytes(wrapper.recv(6)) == first[:6]
        calls.clear()
        assert bytes(wrapper.recv(len(body))) == body
        assert 1 <= len(calls) <= 12  # pynetdicom's own: 75 calls for 300 KiB
        assert calls[0] == len(body)
        assert select.select([guarded], [], [], 5)[0] == [guarded]
        assert bytes(wrapper.recv(6)) == second[:6]
        assert bytes(wrapper.recv(3)) == b"xyz"
        cli.shutdown(socket.SHUT_WR)
        assert bytes(wrapper.recv(6)) == b""  # the peer closed: what came, here nothing
    assert issubclass(_WholeReadSocket, AssociationSocket)


@pytest.mark.parametrize(
    ("status", "message_id", "sop_class", "sop_instance"),
    [
        (0x0000, 1, MRImageStorage, "1.2.3.4"),  # even UIDs
        (0xA700, 65535, "1.2.840.10008.5.1.4.1.1.4.1", "1.2.3.45"),  # odd UIDs
        (0xC000, 7, None, None),  # no UIDs (a response to a malformed request)
    ],
)
def test_store_response_is_encoded_as_pynetdicom_would(
    status: int, message_id: int, sop_class: str | None, sop_instance: str | None
) -> None:
    """The C-STORE-RSP command set encoded directly is byte for byte pynetdicom's (pydicom's
    writer); one with an error comment is left to pynetdicom."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from node.ingest.transport import encode_store_response

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.Status = status
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    assert encode_store_response(rsp) == encode(msg.command_set, True, True)
    setattr(rsp, "ErrorComment", "refused")  # noqa: B010 (typed None in pynetdicom)
    assert encode_store_response(rsp) is None


def test_associations_share_the_listeners_contexts_unchanged(
    receiver: tuple[Receiver, Spool],
) -> None:
    """Each association gets the listener's contexts without pynetdicom's deep copy (17 ms per
    association), and negotiating on them leaves them as they were."""
    rx, _spool = receiver
    contexts = rx._server.contexts
    before = [(str(c.abstract_syntax), tuple(map(str, c.transfer_syntax))) for c in contexts]
    copied = copy.deepcopy(contexts)
    assert copied is not contexts and all(a is b for a, b in zip(copied, contexts, strict=True))
    for _ in range(2):
        assoc = _scu().associate("127.0.0.1", rx.port, ae_title="NEURONODE")
        assert assoc.is_established
        assert assoc.send_c_store(_dataset("1.2.3.1.7")).Status == StoreStatus.SUCCESS
        assoc.release()
    after = [(str(c.abstract_syntax), tuple(map(str, c.transfer_syntax))) for c in contexts]
    assert after == before

"""The DICOM listener: C-ECHO and C-STORE SCP with the rule file's association policy.

Received bytes go to the spool exactly as they came, behind the File Meta Information
pynetdicom's `event.encoded_dataset()` would give them (`part10_bytes`); the header is read
only for the UIDs that name the file. The C-STORE handler is the one place that turns any
unexpected error into a failure status, so one bad instance never ends the association.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import uid as dcm_uid
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EncapsulatedPDFStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    MRSpectroscopyStorage,
    RawDataStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from node.config import NodeSettings
from node.errors import ConfigError, EchoStatus, SpoolError, StoreStatus
from node.ingest.spool import Spool
from node.ingest.transport import PduLimits, guarded_handler, server_tls_context
from node.log import get_logger, uid_key

log = get_logger(__name__)

# What scanners and PACS send: uncompressed in every byte order, deflate, and the lossless and
# lossy compressions of brain MRI archives. Stored as received, never transcoded.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    dcm_uid.ExplicitVRLittleEndian,
    dcm_uid.ImplicitVRLittleEndian,
    dcm_uid.ExplicitVRBigEndian,
    dcm_uid.DeflatedExplicitVRLittleEndian,
    dcm_uid.JPEGBaseline8Bit,
    dcm_uid.JPEGExtended12Bit,
    dcm_uid.JPEGLossless,
    dcm_uid.JPEGLosslessSV1,
    dcm_uid.JPEGLSLossless,
    dcm_uid.JPEGLSNearLossless,
    dcm_uid.JPEG2000Lossless,
    dcm_uid.JPEG2000,
    dcm_uid.RLELossless,
)

# Named so a reader sees the brain-MRI classes are in; all other storage classes come from
# pynetdicom's list (CT localizers, secondary capture, SR, presentation states, PDF ...).
BRAIN_MR_CLASSES: tuple[str, ...] = (
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRSpectroscopyStorage,
    RawDataStorage,
    EncapsulatedPDFStorage,
)


def storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class we accept (pynetdicom's full list plus the brain-MR ones)."""
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    for uid in BRAIN_MR_CLASSES:
        if str(uid) not in classes:
            classes.append(str(uid))
    return tuple(classes)


# The File Meta Information written ahead of every received data set: pynetdicom's own
# (`Event.file_meta`: these seven elements, Explicit VR Little Endian), encoded here directly.
# pydicom's writer took about half a millisecond per instance for these few bytes.
_PREAMBLE = b"\x00" * 128 + b"DICM"
_META_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"


def _meta_text(element: int, vr: bytes, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    if len(raw) > 0xFFFF:
        raise ValueError("a file meta value is too long")
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(raw)) + raw


def part10_bytes(
    dataset: bytes | memoryview,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
) -> bytes:
    """A received data set as a Part 10 file: preamble, File Meta Information, the data set's
    bytes as they came (what `event.encoded_dataset()` returns, without pydicom's writer)."""
    body = b"".join(
        (
            _META_VERSION,
            _meta_text(0x0002, b"UI", sop_class_uid, b"\x00"),
            _meta_text(0x0003, b"UI", sop_instance_uid, b"\x00"),
            _meta_text(0x0010, b"UI", transfer_syntax_uid, b"\x00"),
            _meta_text(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID, b"\x00"),
            _meta_text(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION, b" "),
        )
    )
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body))
    return b"".join((_PREAMBLE, group_length, body, dataset))


def _received_bytes(event: Any) -> bytes:
    """The C-STORE's data set as a Part 10 file (one copy of its bytes)."""
    request = event.request
    view = request.DataSet.getbuffer()
    try:
        return part10_bytes(
            view,
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
    finally:
        view.release()


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)


def check_association(
    settings: NodeSettings, *, calling_ae: str, called_ae: str, peer_host: str
) -> str | None:
    """The reason to reject an association request, or None to accept it."""
    if called_ae.strip() != settings.ae_title.strip():
        return "called AE title not recognised"
    if settings.accept_unknown_callers:
        return None
    for caller in settings.allowed_callers:
        if caller.ae_title.strip() == calling_ae.strip() and (
            caller.host is None or caller.host == peer_host
        ):
            return None
    return "calling AE title not recognised"


def _bind_problem(settings: NodeSettings, exc: OSError) -> str:
    """One line naming the rule-file key behind a failed bind."""
    where = f"{settings.bind_address}:{settings.port}"
    if exc.errno == errno.EADDRINUSE:
        return f"node.port: port {settings.port} is already in use ({where})"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"node.bind_address: {settings.bind_address} is not an address of this host"
            " (use 127.0.0.1, 0.0.0.0 or one of this host's addresses)"
        )
    if exc.errno == errno.EACCES:
        return f"node.port: no permission to listen on port {settings.port} (use 1024 or above)"
    return f"node.bind_address/node.port: cannot listen on {where}: {exc.strerror}"


@dataclass(slots=True)
class _AssocStats:
    assoc_id: str
    calling_ae: str
    peer_host: str
    started: float
    n_stored: int = 0
    n_duplicates: int = 0
    n_failed: int = 0
    n_quarantined: int = 0
    studies: set[str] = field(default_factory=set)


# What became of one C-STORE, for the node's metrics: ("received" | "quarantined" |
# "rejected", reason). Reasons are constant words, never header values.
StoreCounter = Callable[[str, str], None]


def _count_nothing(outcome: str, reason: str) -> None:
    return None


class _SharedPortServer(ThreadedAssociationServer):
    """The association server with SO_REUSEPORT: several receiver processes listen on one
    port and the kernel spreads the connections among them (Linux; only processes of the
    same user can join)."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _SharedContexts(list[Any]):
    """The listener's presentation contexts, shared by its associations.

    pynetdicom deep-copies the server's contexts for every association it accepts: 17 ms of
    CPU for our 171 storage classes x 13 transfer syntaxes (each UID re-validated), a third of
    a millisecond per instance for four associations of 50. Negotiation only reads them, so
    each association gets a new list of the same contexts instead.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class Receiver:
    """The SCP: builds the AE from the rules, stores into the spool, logs per association.

    `shared_port`: listen with SO_REUSEPORT beside the node's other receiver processes.
    """

    def __init__(
        self,
        settings: NodeSettings,
        spool: Spool,
        *,
        on_store: StoreCounter | None = None,
        shared_port: bool = False,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.shared_port = shared_port
        self._count = on_store if on_store is not None else _count_nothing
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.ae = self._build_ae()
        self._server: Any = None

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        ae.network_timeout = self.settings.network_timeout_s
        ae.acse_timeout = self.settings.acse_timeout_s
        ae.dimse_timeout = self.settings.network_timeout_s
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        for sop_class in storage_sop_classes():
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        """Start listening (non-blocking); a bind failure is a ConfigError naming the key."""
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        limits = PduLimits(
            network_timeout_s=self.settings.network_timeout_s,
            max_pdu_bytes=self.settings.max_pdu_bytes,
        )
        address = (self.settings.bind_address, self.settings.port)
        try:
            # AE.start_server without its own TLS wrapping (done per connection, off the
            # accept loop) and with our request handler (timeouts and PDU limits).
            server = self.ae.make_server(
                address,
                evt_handlers=handlers,
                server_class=(_SharedPortServer if self.shared_port else ThreadedAssociationServer),
                request_handler=guarded_handler(limits, self._tls_context()),
            )
        except OSError as exc:
            raise ConfigError(_bind_problem(self.settings, exc)) from None
        server.contexts = _SharedContexts(server.contexts)
        self.ae._servers.append(server)  # so AE.shutdown() stops it, as start_server does
        thread = threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True)
        thread.start()
        self._server = server

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.settings.tls
        if tls is None:
            return None
        try:
            return server_tls_context(
                str(tls.cert_file),
                str(tls.key_file),
                str(tls.ca_file) if tls.ca_file is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"node.tls: cannot load the certificate, key or CA: {type(exc).__name__}"
                f" ({getattr(exc, 'strerror', None) or getattr(exc, 'reason', None) or 'invalid'})"
            ) from None

    @property
    def port(self) -> int:
        """The port the server is bound to."""
        return int(self._server.server_address[1]) if self._server else self.settings.port

    def active_associations(self) -> int:
        """Associations currently established with us (closing threads are not counted)."""
        return sum(1 for a in self.ae.active_associations if a.is_established)

    def stop(self, grace_s: float) -> None:
        """Stop accepting; let open associations finish within `grace_s`, then abort them."""
        if self._server is not None:
            self._server.shutdown()
        deadline = time.monotonic() + grace_s
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.ae.shutdown()

    # --- event handlers (called in association threads) ---------------------------------------

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling_ae = str(rq.calling_ae_title).strip()
        called_ae = str(rq.called_ae_title).strip()
        peer_host = str(assoc.requestor.address)
        reason = check_association(
            self.settings, calling_ae=calling_ae, called_ae=called_ae, peer_host=peer_host
        )
        if reason is None:
            return
        log.warning(
            "association_rejected",
            calling_ae=calling_ae,
            called_ae=called_ae,
            peer_host=peer_host,
            reason=reason,
        )
        rsd = REJECT_CALLED_AE if reason.startswith("called") else REJECT_CALLING_AE
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def _on_rejected(self, event: Any) -> None:
        """pynetdicom's own rejections (too many associations): one line each."""
        rq = event.assoc.requestor.primitive
        rj = event.assoc.acceptor.primitive
        busy = rj is not None and (rj.result_source, rj.diagnostic) == (0x03, 0x02)
        log.warning(
            "association_rejected",
            calling_ae=str(rq.calling_ae_title).strip() if rq is not None else None,
            peer_host=str(event.assoc.requestor.address),
            reason="too many associations" if busy else "rejected during negotiation",
        )

    def _on_established(self, event: Any) -> None:
        assoc = event.assoc
        stats = _AssocStats(
            assoc_id=f"a{next(self._ids)}",
            calling_ae=str(assoc.requestor.ae_title).strip(),
            peer_host=str(assoc.requestor.address),
            started=time.monotonic(),
        )
        with self._lock:
            self._stats[id(assoc)] = stats

    def _on_echo(self, event: Any) -> int:
        return int(EchoStatus.SUCCESS)

    def _on_close(self, event: Any) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        log.info(
            "association_summary",
            assoc_id=stats.assoc_id,
            pid=os.getpid(),  # which receiver process (node.receiver_processes)
            calling_ae=stats.calling_ae,
            peer_host=stats.peer_host,
            n_stored=stats.n_stored,
            n_duplicates=stats.n_duplicates,
            n_failed=stats.n_failed,
            n_quarantined=stats.n_quarantined,
            count=len(stats.studies),
            duration_ms=round((time.monotonic() - stats.started) * 1000),
        )

    def _on_store(self, event: Any) -> int:
        with self._lock:
            stats = self._stats.get(id(event.assoc))
        calling_ae = stats.calling_ae if stats else str(event.assoc.requestor.ae_title).strip()
        status: int
        try:
            result = self.spool.store(
                _received_bytes(event),
                calling_ae=calling_ae,
                sop_class_uid=str(event.request.AffectedSOPClassUID),
            )
            status = int(result.status)
            if result.instance is not None:
                self._count("received", "")
            elif result.quarantine_path is not None:
                self._count("quarantined", "")
            else:
                self._count("rejected", "low_disk")
            if stats is not None:
                if result.instance is not None:
                    stats.studies.add(result.instance.ref.study_uid)
                    if result.instance.duplicate:
                        stats.n_duplicates += 1
                    else:
                        stats.n_stored += 1
                elif result.quarantine_path is not None:
                    stats.n_quarantined += 1
                else:
                    stats.n_failed += 1
            if result.instance is not None:
                log.debug(
                    "instance_stored",
                    study_key=uid_key(result.instance.ref.study_uid),
                    series_key=uid_key(result.instance.ref.series_uid),
                    status="duplicate" if result.instance.duplicate else "stored",
                )
        except SpoolError as exc:
            log.error("store_failed", error_type=type(exc).__name__, error=str(exc))
            status = int(StoreStatus.OUT_OF_RESOURCES)
            self._count("rejected", "write_error")
            if stats is not None:
                stats.n_failed += 1
        except Exception as exc:  # the C-STORE guard: any error is a failure status, not a crash
            # Only the type: the message of a third-party error may quote header values.
            log.error("store_failed", error_type=type(exc).__name__)
            status = int(StoreStatus.PROCESSING_FAILURE)
            self._count("rejected", "error")
            if stats is not None:
                stats.n_failed += 1
        return status

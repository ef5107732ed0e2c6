"""The accepted connection, before pynetdicom reads from it: timeouts, PDU limits, TLS.

pynetdicom reads a PDU as ``recv(6)`` (type and length) and then ``recv(length)``, blocking on
a socket that Python's ``accept()`` hands over without a timeout, and it buffers whatever
length the peer declares. So a peer that sends a few bytes and stops holds an association slot
forever, and one that declares 4 GiB makes us allocate it. pynetdicom lets a server take its
own request handler class (``AE.make_server(request_handler=...)``): ours gives the accepted
socket a reader that follows the PDU framing, so every PDU must be complete within the network
timeout (a byte every few seconds does not keep it open) and a PDU whose declared length is over
the limit is aborted from its header, before a byte of its body is read. TLS is negotiated in
the connection's own thread under the same timeout, not in the accept loop.

Before every read the reader re-arms TCP_QUICKACK (Linux): a sender with Nagle's algorithm on
(a stock dcmtk storescu) holds the last short segment of each PDU until the previous one is
acknowledged, and a delayed ACK (40 ms on Linux) then stalls every C-STORE. The kernel drops
quick-ack mode on its own, so setting it once at accept is not enough. A PDU body is taken
from the socket in pieces of up to 256 KiB (pynetdicom asks for 4 KiB at a time: 128 system
calls per half-megabyte image), never past the PDU's end, so ``select`` still says when the
next PDU has come; and pynetdicom's connection wrapper asks for the rest of the PDU in each
read instead of 4 KiB (`_WholeReadSocket`). A C-STORE-RSP's seven elements are encoded here,
byte for byte as pynetdicom would (`encode_store_response`), not through pydicom's writer.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any, Final

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.log import get_logger

log = get_logger(__name__)

PDU_HEADER_BYTES: Final = 6
P_DATA_TF: Final = 0x04
# Other PDUs (association negotiation, release, abort) are small; an A-ASSOCIATE-RQ proposing
# every storage class in every transfer syntax stays well under this.
MAX_CONTROL_PDU_BYTES: Final = 1024 * 1024
# A-ABORT, source: service provider (2), reason: invalid PDU parameter value (6). PS3.8 9.3.8.
ABORT_INVALID_PARAMETER: Final = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06))
# None where the platform has no quick-ack option (it is Linux's).
TCP_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)
# One system call for up to this much of a PDU body (pynetdicom reads 4 KiB at a time).
READ_AHEAD_BYTES: Final = 256 * 1024
# C-STORE-RSP (PS3.7 9.3.1.2) and "no data set follows" (PS3.7 E.1).
STORE_RSP_COMMAND_FIELD: Final = 0x8001
NO_DATA_SET: Final = 0x0101
# The most one read of pynetdicom's asks the socket for.
WHOLE_READ_MAX_BYTES: Final = 1024 * 1024
# How far a PDU may overrun the network timeout before the socket's timeout is tightened.
TIMEOUT_SLACK_S: Final = 0.5


class PduRefused(ConnectionAbortedError):
    """The peer declared a PDU longer than we accept, or did not finish one in time."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PduLimits:
    """What one accepted connection may do: time per PDU and length of a P-DATA PDU."""

    network_timeout_s: float
    max_pdu_bytes: int  # 0: no limit on P-DATA-TF (PS3.8); control PDUs stay capped

    def max_length(self, pdu_type: int) -> int | None:
        """The largest declared length accepted for a PDU type (None: no limit)."""
        if pdu_type == P_DATA_TF:
            return self.max_pdu_bytes or None
        return max(MAX_CONTROL_PDU_BYTES, self.max_pdu_bytes)


class _PduReader:
    """``recv`` that follows PDU framing: a deadline per PDU and a limit on declared lengths.

    Mixed into ``socket.socket`` and ``ssl.SSLSocket`` so pynetdicom keeps a real socket
    (``select`` and its TLS ``pending()`` check still work).
    """

    limits: PduLimits
    peer_host: str
    _header: bytes
    _left: int  # bytes of the current PDU's body not yet taken from the socket
    _ahead: memoryview  # a piece of the current PDU's body taken from the socket ...
    _ahead_at: int  # ... and how much of it was returned
    _deadline: float | None
    _timeout: float  # the socket's timeout as last set

    def init_reader(self, limits: PduLimits, peer_host: str) -> None:
        self.limits = limits
        self.peer_host = peer_host
        self._header = b""
        self._left = 0
        self._ahead = memoryview(b"")
        self._ahead_at = 0
        self._deadline = None
        self._timeout = limits.network_timeout_s

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self._ahead_at < len(self._ahead):  # the rest of a piece read ahead: no system call
            return self._serve_ahead(buflen)
        sock: Any = super()
        now = time.monotonic()
        if self._deadline is None:
            # The first byte of a PDU is here (pynetdicom reads only when select says so):
            # all of it must follow within the network timeout.
            self._deadline = now + self.limits.network_timeout_s
            if TCP_QUICKACK is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        remaining = self._deadline - now
        if remaining <= 0:
            self._refuse("PDU not complete within the network timeout", send_abort=False)
        if remaining < self._timeout - TIMEOUT_SLACK_S:
            # Tighten the socket's timeout as the PDU's time runs out (not on every call:
            # a PDU may overrun its deadline by at most the slack).
            sock.settimeout(remaining)
            self._timeout = remaining
        try:
            if self._left:
                # pynetdicom asks for 4 KiB at a time; take up to the rest of this PDU's body
                # (never past it, so select() still tells when the next PDU has come).
                chunk: bytes = sock.recv(min(max(buflen, READ_AHEAD_BYTES), self._left), flags)
                self._left -= len(chunk)
                if len(chunk) > buflen:
                    self._ahead, self._ahead_at = memoryview(chunk), 0
                    return self._serve_ahead(buflen)
                data = chunk
            else:
                data = sock.recv(min(buflen, PDU_HEADER_BYTES - len(self._header)), flags)
                self._header += data
                if len(self._header) == PDU_HEADER_BYTES:
                    self._start_body()
        except TimeoutError:
            self._refuse("PDU not complete within the network timeout", send_abort=False)
        if data and (self._left or self._header):
            return data
        self._end_of_pdu()
        return data

    def _serve_ahead(self, buflen: int) -> bytes:
        """The next `buflen` bytes of the piece read ahead (a copy of those bytes only)."""
        start = self._ahead_at
        self._ahead_at = min(start + buflen, len(self._ahead))
        data = bytes(self._ahead[start : self._ahead_at])
        if self._ahead_at == len(self._ahead):
            self._ahead, self._ahead_at = memoryview(b""), 0
            self._end_of_pdu()
        return data

    def _end_of_pdu(self) -> None:
        """After the PDU's last byte: the next PDU gets a deadline of its own."""
        if self._left or self._header or self._ahead_at < len(self._ahead):
            return
        self._deadline = None
        if self._timeout != self.limits.network_timeout_s:
            sock: Any = super()
            sock.settimeout(self.limits.network_timeout_s)
            self._timeout = self.limits.network_timeout_s

    def _start_body(self) -> None:
        pdu_type, _, length = struct.unpack(">BBL", self._header)
        self._header = b""
        limit = self.limits.max_length(pdu_type)
        if limit is not None and length > limit:
            log.warning(
                "pdu_refused",
                peer_host=self.peer_host,
                reason="declared PDU length over the limit",
                bytes=length,
                count=limit,
            )
            self._refuse("declared PDU length over the limit", send_abort=True)
        self._left = length

    def _refuse(self, reason: str, *, send_abort: bool) -> None:
        sock: Any = super()
        if send_abort:
            try:
                sock.settimeout(1.0)
                sock.sendall(ABORT_INVALID_PARAMETER)
            except OSError:
                pass
        else:
            log.warning("pdu_refused", peer_host=self.peer_host, reason=reason)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise PduRefused(reason)


class GuardedSocket(_PduReader, socket.socket):
    """A plain TCP connection read PDU by PDU."""


class GuardedTlsSocket(_PduReader, ssl.SSLSocket):
    """A TLS connection read PDU by PDU."""


class _WholeReadSocket(AssociationSocket):
    """pynetdicom's connection wrapper, asking for the rest of what it wants in each read
    (its own asks for 4 KiB at a time: about 130 Python calls per half-megabyte image)."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock: Any = self.socket
        data = bytearray()
        while len(data) < nr_bytes:
            # Capped: socket.recv(n) allocates n bytes first, and a PDU may declare gigabytes
            # when max_pdu_bytes is 0 (no limit).
            chunk = sock.recv(min(nr_bytes - len(data), WHOLE_READ_MAX_BYTES))
            if not chunk:  # the connection broke: what came, as pynetdicom's returns
                break
            data += chunk
        return data


def _command_element(element: int, value: bytes) -> bytes:
    """One element of a command set: Implicit VR Little Endian (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _command_uid(element: int, uid: str) -> bytes:
    raw = uid.encode("ascii")
    return _command_element(element, raw + b"\x00" if len(raw) % 2 else raw)


def encode_store_response(rsp: C_STORE) -> bytes | None:
    """A C-STORE-RSP's command set, byte for byte what pynetdicom's encoder (pydicom's writer,
    about a third of the association thread's time per instance) makes of it; None for a
    response this does not cover (an error comment or offending element: pynetdicom's)."""
    if rsp.ErrorComment is not None or rsp.OffendingElement is not None:
        return None
    if rsp.Status is None or rsp.MessageIDBeingRespondedTo is None:
        return None
    body = b"".join(
        (
            b""
            if rsp.AffectedSOPClassUID is None
            else _command_uid(0x0002, str(rsp.AffectedSOPClassUID)),
            _command_element(0x0100, struct.pack("<H", STORE_RSP_COMMAND_FIELD)),
            _command_element(0x0120, struct.pack("<H", rsp.MessageIDBeingRespondedTo)),
            _command_element(0x0800, struct.pack("<H", NO_DATA_SET)),
            _command_element(0x0900, struct.pack("<H", rsp.Status)),
            b""
            if rsp.AffectedSOPInstanceUID is None
            else _command_uid(0x1000, str(rsp.AffectedSOPInstanceUID)),
        )
    )
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


class _QuickStoreResponses(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending a C-STORE-RSP it encodes itself
    (`encode_store_response`) as one P-DATA, the command's last fragment."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            command = encode_store_response(primitive)
            if command is not None and (
                not self.maximum_pdu_size or len(command) + 6 <= self.maximum_pdu_size
            ):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


def guarded_handler(limits: PduLimits, tls: ssl.SSLContext | None) -> type[RequestHandler]:
    """A pynetdicom request handler class whose connections are read under `limits`."""
    if tls is not None:
        tls.sslsocket_class = GuardedTlsSocket

    class GuardedRequestHandler(RequestHandler):
        def handle(self) -> None:
            raw: socket.socket = self.request
            peer_host = str(self.client_address[0])
            raw.settimeout(limits.network_timeout_s)
            guarded: GuardedSocket | GuardedTlsSocket
            try:
                if tls is not None:
                    # Handshake here, in this connection's thread, under the timeout.
                    guarded = tls.wrap_socket(raw, server_side=True)  # type: ignore[assignment]
                else:
                    guarded = GuardedSocket(fileno=raw.detach())
            except (OSError, ssl.SSLError) as exc:
                log.warning(
                    "connection_refused",
                    peer_host=peer_host,
                    reason="TLS handshake failed" if tls is not None else "socket error",
                    error_type=type(exc).__name__,
                )
                raw.close()
                return
            guarded.settimeout(limits.network_timeout_s)
            guarded.init_reader(limits, peer_host)
            self.request = guarded
            super().handle()

        def _create_association(self) -> Association:
            assoc = super()._create_association()
            if type(assoc.dul.socket) is AssociationSocket:
                assoc.dul.socket.__class__ = _WholeReadSocket
            if type(assoc.dimse) is DIMSEServiceProvider:
                assoc.dimse.__class__ = _QuickStoreResponses
            return assoc

    return GuardedRequestHandler


def server_tls_context(cert_file: str, key_file: str, ca_file: str | None) -> ssl.SSLContext:
    """The listener's TLS context; with a CA, callers must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if ca_file is not None:
        ctx.load_verify_locations(cafile=ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx

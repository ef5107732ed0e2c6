"""Deliver result objects to a PACS: DICOM C-STORE (pynetdicom) or DICOMweb STOW-RS.

The network sits behind small transports (``connect``/``post`` arguments) so the status
logic, the SR fallback and the error translation are tested without a socket.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any, Final, Protocol

import pydicom
from pydicom.dataset import Dataset

from node.config import DicomDestination, DicomWebDestination
from node.errors import ReportError, SendError, StoreStatus
from node.log import get_logger, uid_key
from node.records import SendResult
from node.report.codes import SC_SOP_CLASS_UID, SR_FALLBACK_ORDER, SR_SOP_CLASS_UIDS, SrClass
from node.report.sr import reencode_sr, sr_class_of

log = get_logger(__name__)

EXPLICIT_VR_LE: Final = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE: Final = "1.2.840.10008.1.2"


class StoreWarning(IntEnum):
    """C-STORE warning statuses: the PACS kept the object (PS3.4 B.2.3)."""

    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007


class HttpStatus(IntEnum):
    """HTTP statuses that decide whether a STOW-RS failure is worth retrying."""

    OK = 200
    ACCEPTED = 202
    REQUEST_TIMEOUT = 408
    CONFLICT = 409
    TOO_MANY_REQUESTS = 429
    SERVER_ERROR = 500


OUT_OF_RESOURCES_PREFIX: Final = 0xA7  # 0xA7xx: refused for lack of resources, try later

# Always proposed, so the PACS tells us which SR classes it takes even before we need them.
BASE_SOP_CLASSES: Final = (*SR_SOP_CLASS_UIDS.values(), SC_SOP_CLASS_UID)


def object_kind(sop_class_uid: str) -> str:
    """A log-safe word for what an object is."""
    if sr_class_of(sop_class_uid) is not None:
        return "sr"
    if sop_class_uid == SC_SOP_CLASS_UID:
        return "sc"
    return "other"


def store_status_delivered(status: int) -> bool:
    """Success and the warnings under which the PACS kept the object count as delivered."""
    return status == StoreStatus.SUCCESS or status in set(StoreWarning)


def store_status_retryable(status: int) -> bool:
    """Out-of-resources and processing failures may pass later; other refusals will not."""
    return (status >> 8) == OUT_OF_RESOURCES_PREFIX or status == StoreStatus.PROCESSING_FAILURE


def _load(item: Dataset | Path) -> Dataset:
    if isinstance(item, Dataset):
        return item
    try:
        return pydicom.dcmread(item)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise SendError(
            f"cannot read queued object {item.name}: {type(exc).__name__}", retryable=False
        ) from exc


# --- DICOM C-STORE ---------------------------------------------------------------------------


class StoreAssociation(Protocol):
    """An established association: which SOP classes the peer accepted, and C-STORE."""

    @property
    def accepted_sop_classes(self) -> frozenset[str]: ...

    def store(self, dataset: Dataset) -> int:
        """Send one object; the DIMSE status, or SendError when the association broke."""
        ...

    def release(self) -> None: ...


Connect = Callable[[DicomDestination, str, tuple[str, ...]], StoreAssociation]


def tls_context(dest: DicomDestination) -> ssl.SSLContext:
    """A client TLS context from the destination's CA and (optional) client certificate."""
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(dest.tls_ca_file) if dest.tls_ca_file is not None else None,
        )
        if dest.tls_cert_file is not None:
            ctx.load_cert_chain(
                str(dest.tls_cert_file),
                str(dest.tls_key_file) if dest.tls_key_file is not None else None,
            )
    except (OSError, ssl.SSLError) as exc:
        raise SendError(f"TLS files of destination {dest.name}: {exc}", retryable=False) from exc
    return ctx


class _PynetdicomAssociation:
    """A pynetdicom association behind the StoreAssociation protocol."""

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self.accepted_sop_classes = frozenset(
            str(cx.abstract_syntax) for cx in assoc.accepted_contexts
        )

    def store(self, dataset: Dataset) -> int:
        try:
            status = self._assoc.send_c_store(dataset)
        except (ValueError, AttributeError, RuntimeError) as exc:
            raise SendError(f"C-STORE could not be sent: {exc}", retryable=True) from exc
        if "Status" not in status:  # no response: timeout, abort or a dropped connection
            raise SendError("no C-STORE response (association aborted)", retryable=True)
        return int(status.Status)

    def release(self) -> None:
        if self._assoc.is_established:
            self._assoc.release()


def _no_delay(event: Any) -> None:
    """Nagle off on the association's socket, as soon as it is connected (EVT_CONN_OPEN).

    With Nagle on, each C-STORE's last short segment waits for the PACS's delayed ACK
    (40 ms and more per object); pynetdicom leaves the option to its caller.
    """
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def pynetdicom_connect(
    dest: DicomDestination, calling_ae: str, sop_classes: tuple[str, ...], *, timeout_s: float = 30
) -> StoreAssociation:
    """Open a (TLS) association proposing each SOP class in explicit and implicit VR LE."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for uid in dict.fromkeys(sop_classes):
        ae.add_requested_context(uid, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])
    tls_args = (tls_context(dest), dest.host) if dest.tls else None
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
    )
    if assoc.is_established:
        return _PynetdicomAssociation(assoc)
    if assoc.is_rejected:
        raise SendError(f"destination {dest.name} rejected the association", retryable=True)
    raise SendError(f"destination {dest.name} cannot be reached", retryable=True)


def _fallback_class(sop_class_uid: str, accepted: frozenset[str]) -> SrClass | None:
    """The next SR class down the fallback order that the peer accepted, if any."""
    kind = sr_class_of(sop_class_uid)
    if kind is None:
        return None
    for candidate in SR_FALLBACK_ORDER[SR_FALLBACK_ORDER.index(kind) + 1 :]:
        if SR_SOP_CLASS_UIDS[candidate] in accepted:
            return candidate
    return None


def send_dicom(
    dest: DicomDestination,
    datasets_or_paths: Sequence[Dataset | Path],
    *,
    calling_ae: str,
    uid_root: str | None = None,
    connect: Connect | None = None,
) -> tuple[SendResult, ...]:
    """C-STORE every object over one association, checking each response status.

    An SR whose class the peer did not accept is re-encoded as the best accepted fallback
    (Comprehensive 3D, then Comprehensive, then Enhanced). Raises SendError (retryable) when
    no association can be made; per-object outcomes are in the results.
    """
    datasets = [_load(item) for item in datasets_or_paths]
    if not datasets:
        return ()
    proposed = (*BASE_SOP_CLASSES, *(str(ds.SOPClassUID) for ds in datasets))
    connector = connect or pynetdicom_connect
    started = time.monotonic()
    assoc = connector(dest, calling_ae, proposed)
    results: list[SendResult] = []
    try:
        for i, ds in enumerate(datasets):
            results.append(_store_one(dest, assoc, ds, uid_root))
            if (
                not results[-1].delivered
                and results[-1].status_code is None
                and (results[-1].retryable)
            ):
                # The association broke: the rest fail the same way without being tried.
                results.extend(
                    _not_sent(d, "association lost before this object", retryable=True)
                    for d in datasets[i + 1 :]
                )
                break
    finally:
        with contextlib.suppress(SendError):  # nothing to release on a broken association
            assoc.release()
    log.info(
        "dicom_send_done",
        destination=dest.name,
        n_objects=len(results),
        n_failed=sum(not r.delivered for r in results),
        duration_ms=round((time.monotonic() - started) * 1000),
    )
    return tuple(results)


def _not_sent(ds: Dataset, message: str, *, retryable: bool) -> SendResult:
    return SendResult(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sent_sop_instance_uid=str(ds.SOPInstanceUID),
        sent_sop_class_uid=str(ds.SOPClassUID),
        delivered=False,
        status_code=None,
        retryable=retryable,
        message=message,
    )


def _store_one(
    dest: DicomDestination, assoc: StoreAssociation, ds: Dataset, uid_root: str | None
) -> SendResult:
    """Store one object (re-encoding an SR the peer does not take) and judge the status."""
    queued_uid = str(ds.SOPInstanceUID)
    to_send = ds
    if str(ds.SOPClassUID) not in assoc.accepted_sop_classes:
        fallback = _fallback_class(str(ds.SOPClassUID), assoc.accepted_sop_classes)
        if fallback is None:
            log.warning(
                "sop_class_not_accepted",
                destination=dest.name,
                object_kind=object_kind(str(ds.SOPClassUID)),
                sop_class=str(ds.SOPClassUID),
            )
            return _not_sent(
                ds,
                "the destination accepts no presentation context for this SOP class",
                retryable=False,
            )
        try:
            to_send = reencode_sr(ds, fallback, uid_root=uid_root)
        except ReportError as exc:
            return _not_sent(ds, f"SR fallback impossible: {type(exc).__name__}", retryable=False)
        log.info(
            "sr_fallback",
            destination=dest.name,
            object_kind="sr",
            sop_class=str(to_send.SOPClassUID),
            instance_key=uid_key(str(to_send.SOPInstanceUID)),
        )
    try:
        status = assoc.store(to_send)
    except SendError as exc:
        return SendResult(
            sop_instance_uid=queued_uid,
            sent_sop_instance_uid=str(to_send.SOPInstanceUID),
            sent_sop_class_uid=str(to_send.SOPClassUID),
            delivered=False,
            status_code=None,
            retryable=exc.retryable,
            message=str(exc),
        )
    delivered = store_status_delivered(status)
    log.info(
        "c_store",
        destination=dest.name,
        object_kind=object_kind(str(to_send.SOPClassUID)),
        status_code=f"0x{status:04X}",
        instance_key=uid_key(str(to_send.SOPInstanceUID)),
    )
    return SendResult(
        sop_instance_uid=queued_uid,
        sent_sop_instance_uid=str(to_send.SOPInstanceUID),
        sent_sop_class_uid=str(to_send.SOPClassUID),
        delivered=delivered,
        status_code=status,
        retryable=not delivered and store_status_retryable(status),
        message="stored" if delivered else f"C-STORE status 0x{status:04X}",
    )


# --- DICOMweb STOW-RS ------------------------------------------------------------------------


class StowError(Exception):
    """Raised by a STOW transport: an HTTP status, or None when no response came."""

    def __init__(self, message: str, *, http_status: int | None) -> None:
        super().__init__(message)
        self.http_status = http_status


Post = Callable[[str, Dataset], Dataset]  # (base URL, object) -> STOW response dataset


def dicomweb_post(url: str, dataset: Dataset, *, timeout_s: float = 30) -> Dataset:
    """STOW-RS one object with dicomweb-client; errors become StowError."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    client = DICOMwebClient(url=url, session=session, timeout=timeout_s)
    client.set_http_retry_params(retry=False)  # the outbox owns retries and their backoff
    try:
        response: Dataset = client.store_instances([dataset])
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        raise StowError(f"HTTP {code}", http_status=code) from exc
    except requests.exceptions.RequestException as exc:
        raise StowError(type(exc).__name__, http_status=None) from exc
    finally:
        session.close()
    return response


def http_retryable(status: int | None) -> bool:
    """No response, timeouts, throttling and server errors may pass later; other 4xx will not."""
    return (
        status is None
        or status >= HttpStatus.SERVER_ERROR
        or status in (HttpStatus.REQUEST_TIMEOUT, HttpStatus.TOO_MANY_REQUESTS)
    )


def send_stow(
    dest: DicomWebDestination,
    datasets_or_paths: Sequence[Dataset | Path],
    *,
    post: Post | None = None,
) -> tuple[SendResult, ...]:
    """STOW-RS each object in its own request so every object gets its own verdict.

    Raises SendError (retryable) when the service cannot be reached at all, so the caller
    leaves every object pending instead of counting failures one by one.
    """
    poster = post or dicomweb_post
    results: list[SendResult] = []
    for ds in (_load(item) for item in datasets_or_paths):
        uid, cls = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        try:
            response = poster(dest.url, ds)
        except StowError as exc:
            if exc.http_status is None:
                raise SendError(
                    f"destination {dest.name} cannot be reached ({exc})", retryable=True
                ) from exc
            results.append(
                SendResult(
                    sop_instance_uid=uid,
                    sent_sop_instance_uid=uid,
                    sent_sop_class_uid=cls,
                    delivered=False,
                    status_code=exc.http_status,
                    retryable=http_retryable(exc.http_status),
                    message=f"STOW-RS {exc}",
                )
            )
        else:
            results.append(_judge_stow(uid, cls, response))
        log.info(
            "stow",
            destination=dest.name,
            object_kind=object_kind(cls),
            status_code=results[-1].status_code,
            instance_key=uid_key(uid),
        )
    return tuple(results)


def _judge_stow(uid: str, cls: str, response: Dataset) -> SendResult:
    """Delivered only when the response lists the instance as referenced (stored)."""
    stored = {
        str(item.get("ReferencedSOPInstanceUID", ""))
        for item in response.get("ReferencedSOPSequence", ())
    }
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", 0))
        for item in response.get("FailedSOPSequence", ())
    }
    if uid in stored:
        return SendResult(
            sop_instance_uid=uid,
            sent_sop_instance_uid=uid,
            sent_sop_class_uid=cls,
            delivered=True,
            status_code=HttpStatus.OK,
            retryable=False,
            message="stored",
        )
    reason = failed.get(uid)
    return SendResult(
        sop_instance_uid=uid,
        sent_sop_instance_uid=uid,
        sent_sop_class_uid=cls,
        delivered=False,
        status_code=reason,
        retryable=reason is None or store_status_retryable(reason),
        message="STOW-RS response does not list the instance as stored"
        if reason is None
        else f"STOW-RS failure reason 0x{reason:04X}",
    )

"""Durable instance store: temp file, fsync, rename, SQLite index; quarantine; low-disk refusal.

A C-STORE is answered with success only after `Spool.store` returns a stored (or duplicate)
result: by then the bytes are synced under a name built from validated UIDs, the folder entry
is synced and the index row is committed (WAL, synchronous=FULL). The index is one SQLite file
shared by the receive threads, the scheduler and the workers; one connection guarded by a lock
keeps it simple and correct. Instances that arrive together on several associations share a
group commit: each thread parses its instance once and writes its own file, then one commit
puts them all in place, syncs each folder once and indexes them in one transaction
(`Spool._commit`).

The three syncs (file data, folder, index WAL) wait on the disk one after the other unless
they overlap: `SyncOrder` says how much may (the index commit always beside the folder syncs on
SQLite; the file's data sync too on file systems where a crash leaves an unsynced file missing
or short). What overlapping gives up is only the order in which unacknowledged state reaches
the disk: after a crash an index row may name a file that is missing or short. Such rows were
never acknowledged; `reconcile_recent_rows` finds them at a start that follows a process which
did not close the spool (its marker in spool/open/ is still there), within `RECENT_ROWS_S`.

Why this module is long: everything that decides whether a received instance is on disk and
known lives here together, so the one rule (success only once stored and indexed) is read in
one place: the one parse that decides quarantine, the group commit and the order of its syncs,
the index and the study state it keeps, and the start-up checks that reconcile the two after a
crash or ENOSPC.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import io
import json
import os
import re
import shutil
import struct
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels.decoders.base import DecodeRunner

from node.errors import InvalidInstance, SpoolError, StoreStatus
from node.ingest.completion import SeriesCount
from node.log import get_logger, uid_key
from node.records import InstanceRef, StoredInstance, StudyStatus
from node.store.db import INDEX, Database, DatabaseError, Row, Session, sqlite_url
from node.store.files import (
    fsync_dir,
    makedirs_durable,
    syncs_may_overlap,
    write_bytes_durable,
    write_temp,
    write_temp_durable,
)

log = get_logger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_MB = 1024 * 1024
# On a shared spool, a temp or instance file without an index row younger than this is another
# receiver's write in progress, not a crash's leftover.
SHARED_LEFTOVER_AGE_S = 600.0
# At start, index rows received this long before the newest one are checked against their files
# (overlapped syncs: a crash may leave a committed row whose file never reached the disk). A
# group commit that took longer than this before a crash is not looked at.
RECENT_ROWS_S = 600.0
# ... and never more rows than this (by seq, newest first): a bounded start-up cost.
RECENT_ROWS_MAX = 200_000


class SyncOrder(enum.Enum):
    """How the syncs of a group commit are ordered (see the module docstring)."""

    SERIAL = "serial"  # file data, rename, folders, then the index commit (PostgreSQL)
    DATA_FIRST = "data_first"  # file data before the rename; folders beside the index commit
    OVERLAPPED = "overlapped"  # file data, folders and the index commit all at once


# Only these are read from a received instance; nothing else of the header is looked at here.
_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "ImagesInAcquisition",
    "NumberOfTemporalPositions",
)


def is_valid_uid(value: str) -> bool:
    """True for a UID usable as a file name: digits and dots, no leading zeros, 1-64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def instance_relpath(ref: InstanceRef) -> Path:
    """Where an instance lives under the spool: instances/<study>/<series>/<sop>.dcm."""
    for name, uid in (
        ("StudyInstanceUID", ref.study_uid),
        ("SeriesInstanceUID", ref.series_uid),
        ("SOPInstanceUID", ref.sop_instance_uid),
    ):
        if not is_valid_uid(uid):
            raise InvalidInstance(f"invalid {name}")
    return Path("instances") / ref.study_uid / ref.series_uid / f"{ref.sop_instance_uid}.dcm"


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (injectable in `Spool` for tests)."""
    return int(shutil.disk_usage(path).free)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreResult:
    """What happened to one received instance, and the status the sender gets."""

    status: StoreStatus
    instance: StoredInstance | None = None  # set when stored or duplicate
    quarantine_path: Path | None = None  # set when quarantined
    reason: str = ""  # constant text, no header values


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyProgress:
    """A study still receiving: when its last instance came and how many each series has."""

    study_uid: str
    last_received_at: float
    receiving_since: float  # first instance of this round (the study's first, or since re-opened)
    series: tuple[SeriesCount, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedInstance:
    """The UIDs and expected-count hints read from a received instance."""

    ref: InstanceRef
    images_in_acquisition: int | None
    temporal_positions: int | None


def _positive_int(value: Any) -> int | None:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


# What pydicom and its pixel handlers raise on malformed input (a truncated value, a length
# running past the end, a VR it cannot read, a compressed stream that does not parse).
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError,
    BytesLengthException,  # a value whose length is not a multiple of its VR's size
    ValueError,  # includes UnicodeError
    EOFError,
    OSError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    RuntimeError,
    MemoryError,
    struct.error,
    zlib.error,
)


def parse_instance(data: bytes, *, transfer_syntax_uid: str | None = None) -> ParsedInstance:
    """Read only the UIDs and count hints of a received instance; raise InvalidInstance."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote header values
            ds = pydicom.dcmread(
                io.BytesIO(data), force=True, stop_before_pixels=True, specific_tags=list(_TAGS)
            )
    except PARSE_ERRORS as exc:
        raise InvalidInstance(f"unparseable: {type(exc).__name__}") from exc
    return _parsed_from(ds, transfer_syntax_uid)


def _parsed_from(ds: Dataset, transfer_syntax_uid: str | None = None) -> ParsedInstance:
    """The UIDs (validated) and count hints of a read data set; raise InvalidInstance."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = {name: ds.get(name) for name in _TAGS}
            ts = transfer_syntax_uid or str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    except PARSE_ERRORS as exc:
        raise InvalidInstance(f"unparseable: {type(exc).__name__}") from exc
    uids: dict[str, str] = {}
    for name in _TAGS[:4]:
        raw = values[name]
        if raw is None or str(raw).strip() == "":
            raise InvalidInstance(f"missing {name}")
        uid = str(raw).strip()
        if not is_valid_uid(uid):
            raise InvalidInstance(f"invalid {name}")
        uids[name] = uid
    return ParsedInstance(
        ref=InstanceRef(
            sop_class_uid=uids["SOPClassUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            transfer_syntax_uid=ts if is_valid_uid(ts) else "",
        ),
        images_in_acquisition=_positive_int(values["ImagesInAcquisition"]),
        temporal_positions=_positive_int(values["NumberOfTemporalPositions"]),
    )


def check_instance(data: bytes) -> ParsedInstance:
    """Read a received instance once, to its end: its UIDs and hints, every element, the pixels.

    The one parse on the store path (`verify_instance` without reading the header twice).
    Raise InvalidInstance: "missing ..."/"invalid ..." for a UID the file cannot be named by,
    any other reason for a data set that does not parse or whose pixel data is incomplete.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote header values
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except PARSE_ERRORS as exc:
        parse_instance(data)  # a header that names no file is the more useful reason
        raise InvalidInstance(f"unparseable: {type(exc).__name__}") from exc
    parsed = _parsed_from(ds)
    _verify_dataset(ds)
    return parsed


def verify_instance(data: bytes) -> None:
    """Parse a received instance to its end, every element and the pixel data included.

    Native pixel data is decoded (its length must fit Rows x Columns x frames x samples x
    bits); encapsulated pixel data must split into its items, one frame or more per frame.
    Raise InvalidInstance with a reason of constant text (no header value) otherwise.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # value warnings quote header values; not fatal
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except PARSE_ERRORS as exc:
        raise InvalidInstance(f"unparseable: {type(exc).__name__}") from exc
    _verify_dataset(ds)


def _verify_dataset(ds: Dataset) -> None:
    """Every element converts (text values may not) and the pixel data is complete."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _convert_all(ds)
            _verify_pixels(ds)
    except InvalidInstance:
        raise
    except PARSE_ERRORS as exc:
        raise InvalidInstance(f"unparseable: {type(exc).__name__}") from exc


# Text VRs whose value may not convert (IS '1A', DA 'ZZDOB0203') while the data set around it is
# sound: a non-conformant value is the value's problem (readers treat values defensively), not
# a reason to refuse the instance. Binary values that do not fit their VR are structural.
_TEXT_VRS = frozenset(
    {
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    }
)


def _convert_all(ds: Dataset) -> None:
    """Convert every element, nested sequences too; only text values may fail to convert.

    A text value read with its VR (explicit VR) is not converted at all: whether it converts
    decides nothing, and converting every string is most of the cost of a full parse.
    """
    for tag in list(ds.keys()):
        if getattr(ds.get_item(tag), "VR", None) in _TEXT_VRS:
            continue
        try:
            elem = ds[tag]
        except (ValueError, TypeError, OverflowError):
            if str(ds.get_item(tag).VR) not in _TEXT_VRS:
                raise
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                _convert_all(item)


def _verify_pixels(ds: Dataset) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if not _positive_int(ds.get(keyword)):
            raise InvalidInstance(f"pixel data: missing or invalid {keyword}")
    meta = getattr(ds, "file_meta", None)
    ts = pydicom.uid.UID(str(meta.get("TransferSyntaxUID", "")) if meta is not None else "")
    if "PixelData" in ds and ts.is_valid and ts.is_encapsulated:
        n_frames = _positive_int(ds.get("NumberOfFrames")) or 1
        frames = sum(1 for _ in generate_frames(ds.PixelData, number_of_frames=n_frames))
        if frames != n_frames:
            raise InvalidInstance("pixel data: fewer compressed frames than NumberOfFrames")
        return
    # Native: the checks pydicom makes before decoding (image attributes, frames >= 1, the
    # length against Rows x Columns x frames x samples x bits), without decoding a copy.
    runner = DecodeRunner(ts if ts.is_valid else pydicom.uid.ExplicitVRLittleEndian)
    runner.set_source(ds)
    runner.validate()


class Index(Database):
    """The spool's index: SQLite beside the spool by default (WAL, synchronous=FULL, one
    connection behind a lock), or the PostgreSQL database of `database.url`; tables and
    migrations in node.store.db. `path` is where the SQLite file is (or would be): its folder
    is the spool root either way."""

    def __init__(self, path: Path, *, url: str | None = None, migrate: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The embedded SQLite is always migrated on open; PostgreSQL only when asked.
        super().__init__(url or sqlite_url(path), component=INDEX, migrate=migrate)

    def studies_by_state(self) -> dict[str, int]:
        """How many studies are in each state; every state listed (0 when none)."""
        got = {
            str(r["state"]): int(r["n"])
            for r in self.query("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")
        }
        return {s.value: got.get(s.value, 0) for s in StudyStatus}


@dataclass(slots=True, kw_only=True)
class _Pending:
    """One instance between its temp file and its group's commit (mutable: the committing
    thread fills in the outcome the waiting thread returns or raises)."""

    parsed: ParsedInstance
    rel: Path
    tmp: Path
    size_bytes: int
    calling_ae: str
    now: float
    fd: int | None = None  # the temp file, open, when its data sync is left to the group commit
    duplicate_of: Row | None = None
    outcome: StoreResult | SpoolError | None = None


@dataclass(slots=True)
class GroupStats:
    """How many group commits ran and how many instances they carried (for the benchmark)."""

    groups: int = 0
    instances: int = 0
    largest: int = 0

    def add(self, size: int) -> None:
        self.groups += 1
        self.instances += size
        self.largest = max(self.largest, size)


def _close(entry: _Pending) -> None:
    """Close the entry's temp file descriptor, if still open."""
    if entry.fd is not None:
        fd, entry.fd = entry.fd, None
        with contextlib.suppress(OSError):
            os.close(fd)


def _discard(entry: _Pending) -> None:
    """Close and remove the entry's temp file (a duplicate, or a failure before its rename)."""
    _close(entry)
    with contextlib.suppress(OSError):
        entry.tmp.unlink(missing_ok=True)


def _alive(pid_text: str) -> bool:
    """Whether a process with this number runs on this host (another user's counts too)."""
    if not pid_text.isdigit() or int(pid_text) <= 0:
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _new_row(result: StoreResult) -> bool:
    """Whether a stored result made a row of its own (not a duplicate of one stored before)."""
    return result.instance is not None and not result.instance.duplicate


def _datasync_of(fd: int) -> Callable[[], None]:
    return lambda: os.fdatasync(fd)


def _dirsync_of(folder: Path) -> Callable[[], None]:
    return lambda: fsync_dir(folder)


class Spool:
    """Instances on disk under validated-UID names, quarantine, and the index that lists them."""

    def __init__(
        self,
        root: Path,
        *,
        min_free_disk_mb: float,
        free_bytes: Callable[[Path], int] = disk_free_bytes,
        clock: Callable[[], float] = time.time,
        database_url: str | None = None,
        shared: bool = False,
        sync_order: SyncOrder | None = None,
    ) -> None:
        self.root = root
        self.shared = shared  # other processes write this spool now (receiver processes)
        self.min_free_bytes = int(min_free_disk_mb * _MB)
        self._free_bytes = free_bytes
        self._clock = clock
        for sub in ("instances", "quarantine", "tmp"):
            makedirs_durable(root / sub)
        self.index = Index(root / "index.sqlite", url=database_url)
        # PostgreSQL: serial, so a committed row always names a synced file (other nodes may
        # read it at once, and no start-up here could vouch for their rows).
        if self.index.postgres:
            self.sync_order = SyncOrder.SERIAL
        elif sync_order is not None:
            self.sync_order = sync_order
        else:
            overlap = syncs_may_overlap(root)
            self.sync_order = SyncOrder.OVERLAPPED if overlap else SyncOrder.DATA_FIRST
        self._syncs: ThreadPoolExecutor | None = None
        # Temp files left by a crash were never acknowledged: drop them. On a shared spool
        # (PostgreSQL, or a receiver process beside others) other receivers are writing
        # theirs: only old ones are leftovers.
        for leftover in (root / "tmp").glob("*.part"):
            if self._abandoned(leftover):
                leftover.unlink(missing_ok=True)
        self._inflight: set[str] = set()
        self._inflight_cv = threading.Condition()
        self._group_cv = threading.Condition()
        self._queue: list[_Pending] = []
        self._committing = False
        self.groups = GroupStats()
        self._marker: Path | None = None
        if not (self.index.postgres or shared):  # the node's own process checks for all
            if self._open_markers():  # a process that wrote here did not close: maybe a crash
                self.reconcile_recent_rows()
            self._marker = self._mark_open()
        self.sweep_orphans()

    def _abandoned(self, path: Path) -> bool:
        """Whether a file no index row names was left by a crash, not written right now by
        another process sharing the spool (on PostgreSQL, or opened `shared`: only files older
        than SHARED_LEFTOVER_AGE_S; else this process is the one writer, so every such file)."""
        if not (self.index.postgres or self.shared):
            return True
        try:
            return time.time() - path.stat().st_mtime > SHARED_LEFTOVER_AGE_S
        except OSError:
            return False

    def _open_markers(self) -> list[Path]:
        """The markers of processes that opened this spool and have not closed it; those of
        processes no longer alive are removed (they are looked at once, now)."""
        folder = self.root / "open"
        markers = sorted(folder.glob("*.pid")) if folder.is_dir() else []
        for marker in markers:
            if not _alive(marker.stem.split("-")[0]):
                marker.unlink(missing_ok=True)
        return markers

    def _mark_open(self) -> Path:
        """Leave a durable marker while this process has the spool open (removed by `close`):
        found at the next start, it says rows may need `reconcile_recent_rows`."""
        folder = self.root / "open"
        makedirs_durable(folder)
        marker = folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.pid"
        marker.touch()
        fsync_dir(folder)
        return marker

    def reconcile_recent_rows(self) -> int:
        """Drop index rows whose file a crash left missing or short (never acknowledged: see
        `SyncOrder`); returns how many. A short file whose copy parses completely under its own
        name is kept with its size (the same instance sent twice at once, written by the
        second sender); any other is quarantined."""
        newest = self.index.query("SELECT MAX(seq) AS seq, MAX(received_at) AS t FROM instances")
        if newest[0]["seq"] is None:
            return 0
        rows = self.index.query(
            "SELECT seq, study_uid, path, size_bytes FROM instances WHERE seq > ? "
            "AND received_at >= ?",
            (int(newest[0]["seq"]) - RECENT_ROWS_MAX, float(newest[0]["t"]) - RECENT_ROWS_S),
        )
        dropped = 0
        for row in rows:
            path = self.root / str(row["path"])
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = None
            if size == int(row["size_bytes"]):
                continue
            if size is not None and self._keep_resized(path, Path(str(row["path"])), row):
                continue
            with self.index.transaction() as db:
                self._unindex(db, seq=int(row["seq"]), study_uid=str(row["study_uid"]))
            dropped += 1
        if dropped:
            log.warning("spool_unacknowledged_rows_dropped", count=dropped)
        return dropped

    def _keep_resized(self, path: Path, rel: Path, row: Row) -> bool:
        """Whether a file of another size than its row's is a complete instance under its own
        name (then the row takes its size); else it is quarantined and removed."""
        data = path.read_bytes()
        reason = ""
        try:
            if instance_relpath(check_instance(data).ref) != rel:
                reason = "incomplete after a crash: its UIDs do not match its path"
        except InvalidInstance as exc:
            reason = f"incomplete after a crash: {exc}"
        if not reason:
            with self.index.transaction() as db:
                db.execute(
                    "UPDATE instances SET size_bytes = ? WHERE seq = ?", (len(data), row["seq"])
                )
            return True
        self._quarantine(
            data,
            reason=reason,
            calling_ae="",
            now=self._clock(),
            status=StoreStatus.CANNOT_UNDERSTAND,
        )
        path.unlink(missing_ok=True)
        return False

    @staticmethod
    def _unindex(db: Session, *, seq: int, study_uid: str) -> None:
        """Take back one instance's row; its study, if nothing else of it is left and no job
        knows it, goes too."""
        if db.execute("DELETE FROM instances WHERE seq = ?", (seq,)).rowcount:
            db.execute(
                "UPDATE studies SET n_instances = n_instances - 1 WHERE study_uid = ?",
                (study_uid,),
            )
        db.execute(
            "DELETE FROM studies WHERE study_uid = ? AND state = ? AND NOT EXISTS "
            "(SELECT 1 FROM instances WHERE study_uid = ?) AND NOT EXISTS "
            "(SELECT 1 FROM jobs WHERE study_uid = ?)",
            (study_uid, StudyStatus.RECEIVING.value, study_uid, study_uid),
        )

    def sweep_orphans(self) -> tuple[int, int]:
        """Reconcile files under instances/ that the index does not know (the index write
        failed after the rename, e.g. ENOSPC; the sender was told it failed): index each one
        that parses under its own name, quarantine the others. Returns (indexed, quarantined)."""
        indexed = quarantined = 0
        instances = self.root / "instances"
        for study_dir in sorted(p for p in instances.iterdir() if p.is_dir()):
            known = {
                str(r["path"])
                for r in self.index.query(
                    "SELECT path FROM instances WHERE study_uid = ?", (study_dir.name,)
                )
            }
            for path in sorted(study_dir.rglob("*.dcm")):
                rel = path.relative_to(self.root)
                if str(rel) in known or not self._abandoned(path):
                    continue
                try:
                    adopted = self._adopt(path, rel)
                except (SpoolError, OSError) as exc:  # still no room: try again next start
                    log.error("spool_orphan_not_reconciled", error_type=type(exc).__name__)
                    continue
                if adopted:
                    indexed += 1
                else:
                    quarantined += 1
        if indexed or quarantined:
            log.warning("spool_orphans_reconciled", count=indexed, n_quarantined=quarantined)
        return indexed, quarantined

    def _adopt(self, path: Path, rel: Path) -> bool:
        """Index one orphan file if it parses and lives under its own UIDs; else quarantine it."""
        data = path.read_bytes()
        now = self._clock()
        reason = ""
        try:
            parsed = parse_instance(data)
            verify_instance(data)
            if instance_relpath(parsed.ref) != rel:
                reason = "orphan in the spool: its UIDs do not match its path"
        except InvalidInstance as exc:
            reason = f"orphan in the spool: {exc}"
        if reason:
            self._quarantine(
                data,
                reason=reason,
                calling_ae="",
                now=now,
                status=StoreStatus.CANNOT_UNDERSTAND,
            )
            path.unlink()
            return False
        # Its arrival time is unknown: the file's own time is the best there is.
        received = path.stat().st_mtime
        result = self._store_parsed(data, parsed, calling_ae="", now=received)
        # A duplicate: another receiver sharing the spool indexed it meanwhile.
        return result.instance is not None

    def store(
        self, data: bytes, *, calling_ae: str, sop_class_uid: str | None = None
    ) -> StoreResult:
        """Store one received instance durably, or quarantine it, or refuse it (low disk).

        Called from every association's thread at once: the parse and the file's own write and
        fsync run in the caller's thread; the rename, the folder fsync and the index row join
        the next group commit (see `_commit`).
        """
        now = self._clock()
        free = self._free_bytes(self.root)
        if free - len(data) < self.min_free_bytes:
            log.warning("spool_low_disk", free_bytes=free, bytes=len(data))
            return StoreResult(status=StoreStatus.OUT_OF_RESOURCES, reason="free disk below floor")
        try:
            parsed = check_instance(data)
        except InvalidInstance as exc:
            reason = str(exc)
            status = (
                StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
                if reason.startswith(("missing ", "invalid "))
                else StoreStatus.CANNOT_UNDERSTAND
            )
            return self._quarantine(
                data, reason=reason, calling_ae=calling_ae, now=now, status=status
            )
        if sop_class_uid is not None and parsed.ref.sop_class_uid != sop_class_uid:
            return self._quarantine(
                data,
                reason="SOPClassUID differs from the negotiated SOP class",
                calling_ae=calling_ae,
                now=now,
                status=StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            )
        sop = parsed.ref.sop_instance_uid
        with self._inflight_cv:
            while sop in self._inflight:
                self._inflight_cv.wait()
            self._inflight.add(sop)
        try:
            return self._store_parsed(data, parsed, calling_ae=calling_ae, now=now)
        finally:
            with self._inflight_cv:
                self._inflight.discard(sop)
                self._inflight_cv.notify_all()

    def _store_parsed(
        self, data: bytes, parsed: ParsedInstance, *, calling_ae: str, now: float
    ) -> StoreResult:
        """Write the temp file here (and sync it, unless the group commit overlaps its sync),
        then wait for the group commit that indexes it."""
        rel = instance_relpath(parsed.ref)
        fd: int | None = None
        try:
            if self.sync_order is SyncOrder.OVERLAPPED:
                tmp, fd = write_temp(self.root / "tmp", data)
            else:
                tmp = write_temp_durable(self.root / "tmp", data)
        except OSError as exc:
            raise SpoolError(f"cannot write instance: {exc.strerror}") from exc
        return self._commit(
            _Pending(
                parsed=parsed,
                rel=rel,
                tmp=tmp,
                size_bytes=len(data),
                calling_ae=calling_ae,
                now=now,
                fd=fd,
            )
        )

    def _commit(self, entry: _Pending) -> StoreResult:
        """Group commit: queue the entry; the first thread to find no commit running commits
        every queued entry (its own included) and wakes the others.

        No thread waits for company: one association commits alone, several share whatever
        queued while the previous group was on its way to disk.
        """
        with self._group_cv:
            self._queue.append(entry)
            while entry.outcome is None and self._committing:
                self._group_cv.wait()
            if entry.outcome is None:
                self._committing = True
                batch, self._queue = self._queue, []
            else:
                batch = []
        if batch:
            try:
                self._commit_group(batch)
            finally:
                for queued in batch:
                    _close(queued)
                    if queued.outcome is None:  # only if interrupted (KeyboardInterrupt ...)
                        queued.outcome = SpoolError("the group commit was interrupted")
                with self._group_cv:
                    self._committing = False
                    self.groups.add(len(batch))
                    self._group_cv.notify_all()
        outcome = entry.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def _commit_group(self, batch: list[_Pending]) -> None:
        """Put every entry in place, sync each folder once, index all in one transaction.

        Never raises: each entry gets its own outcome. A failure touches only the entries it
        concerns (a rename: that entry; a folder fsync: that folder's; an index row: that row,
        rolled back to its savepoint); only a failed COMMIT fails the whole group, since then
        none of it is indexed (the renamed files are orphans the next start reconciles).
        """
        try:
            self._place_and_index(batch)
        except Exception as exc:  # part of the C-STORE guard: every waiting sender gets an answer
            for entry in batch:
                if entry.outcome is None:
                    failure = SpoolError(f"cannot store instance: {type(exc).__name__}")
                    failure.__cause__ = exc
                    entry.outcome = failure
                    _discard(entry)

    def _place_and_index(self, batch: list[_Pending]) -> None:
        sops = [e.parsed.ref.sop_instance_uid for e in batch]
        known = {
            str(r["sop_instance_uid"]): r
            for r in self.index.query(
                "SELECT sop_instance_uid, path, size_bytes, received_at, calling_ae "
                f"FROM instances WHERE sop_instance_uid IN ({','.join('?' * len(sops))})",
                tuple(sops),
            )
        }
        placed: list[_Pending] = []
        for entry in batch:
            row = known.get(entry.parsed.ref.sop_instance_uid)
            if row is not None:  # stored before: keep the first copy, drop this one
                _discard(entry)
                entry.duplicate_of = row
                placed.append(entry)
                continue
            try:
                makedirs_durable((self.root / entry.rel).parent)
                self._place(entry)
            except OSError as exc:
                _discard(entry)
                entry.outcome = SpoolError(f"cannot write instance: {exc.strerror}")
                continue
            placed.append(entry)
        syncs = self._start_syncs([e for e in placed if e.duplicate_of is None])
        if self.sync_order is SyncOrder.SERIAL:  # every sync done before the index commit
            self._synced(placed, syncs)
        to_index = [e for e in placed if e.outcome is None]
        results: dict[int, StoreResult] = {}
        failed: list[_Pending] = []
        try:
            if to_index:
                results = self._index_all(to_index)
        finally:
            if self.sync_order is not SyncOrder.SERIAL:  # the syncs ran beside the commit
                failed = self._synced(placed, syncs)
        # Only rows this group made: a duplicate's row and file are another sender's copy.
        self._take_back([e for e in failed if id(e) in results and _new_row(results[id(e)])])
        for entry in to_index:
            if entry.outcome is None:
                entry.outcome = results[id(entry)]

    def _index_all(self, to_index: list[_Pending]) -> dict[int, StoreResult]:
        """Index the entries in one transaction; an entry whose row fails gets a failure."""
        results: dict[int, StoreResult] = {}
        try:
            with self.index.transaction() as db:
                if len(to_index) == 1:  # alone: a failure rolls back the whole transaction
                    results[id(to_index[0])] = self._index_entry(db, to_index[0])
                    to_index_each: list[_Pending] = []
                else:
                    to_index_each = to_index
                for entry in to_index_each:
                    db.execute("SAVEPOINT instance")
                    try:
                        results[id(entry)] = self._index_entry(db, entry)
                    except DatabaseError as exc:
                        db.execute("ROLLBACK TO instance")
                        entry.outcome = SpoolError(f"cannot index instance: {type(exc).__name__}")
                    db.execute("RELEASE instance")
        except DatabaseError as exc:
            for entry in to_index:
                entry.outcome = SpoolError(f"cannot index instance: {type(exc).__name__}")
            return {}
        return results

    def _place(self, entry: _Pending) -> None:
        """Give the entry's temp file its final name. A file whose data is not synced yet gets
        a new name only (a link): it never replaces a file already there (another receiver's
        copy, or a crash's leftover), which gets a synced copy by rename instead."""
        final = self.root / entry.rel
        if entry.fd is not None:
            try:
                os.link(entry.tmp, final)
            except FileExistsError:
                os.fdatasync(entry.fd)
                _close(entry)
            else:
                with contextlib.suppress(OSError):  # a leftover .part goes at the next start
                    entry.tmp.unlink()
                return
        os.replace(entry.tmp, final)

    def _start_syncs(self, new: list[_Pending]) -> dict[Future[None], tuple[_Pending, ...]]:
        """Start each new entry's data sync (when left to the group) and each folder's sync,
        in the sync threads; SERIAL runs them here and now."""
        jobs: list[tuple[Callable[[], None], tuple[_Pending, ...]]] = []
        for entry in new:
            if entry.fd is not None:
                jobs.append((_datasync_of(entry.fd), (entry,)))
        folders: dict[Path, list[_Pending]] = {}
        for entry in new:
            folders.setdefault((self.root / entry.rel).parent, []).append(entry)
        for folder, in_folder in folders.items():
            jobs.append((_dirsync_of(folder), tuple(in_folder)))
        started: dict[Future[None], tuple[_Pending, ...]] = {}
        for job, entries in jobs:
            if self.sync_order is SyncOrder.SERIAL:
                done: Future[None] = Future()
                try:
                    job()
                    done.set_result(None)
                except OSError as exc:
                    done.set_exception(exc)
                started[done] = entries
            else:
                if self._syncs is None:
                    self._syncs = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-sync")
                started[self._syncs.submit(job)] = entries
        return started

    @staticmethod
    def _synced(
        entries: list[_Pending], syncs: dict[Future[None], tuple[_Pending, ...]]
    ) -> list[_Pending]:
        """Wait for the syncs; an entry whose file or folder did not sync gets a failure.
        Returns the entries that failed just now."""
        failed: list[_Pending] = []
        for future, concerned in syncs.items():
            problem = future.exception()
            if problem is None:
                continue
            for entry in concerned:
                if entry.outcome is None and entry not in failed:
                    reason = getattr(problem, "strerror", None) or type(problem).__name__
                    entry.outcome = SpoolError(f"cannot write instance: {reason}")
                    failed.append(entry)
        for entry in entries:
            _close(entry)
        return failed

    def _take_back(self, committed: list[_Pending]) -> None:
        """Remove the rows (committed beside the syncs) and files of entries whose sync failed:
        their senders are told so, and nothing may name a file that is not on disk."""
        if not committed:
            return
        try:
            with self.index.transaction() as db:
                for entry in committed:
                    row = db.execute(
                        "SELECT seq FROM instances WHERE sop_instance_uid = ? AND path = ?",
                        (entry.parsed.ref.sop_instance_uid, str(entry.rel)),
                    ).fetchone()
                    if row is not None:
                        self._unindex(db, seq=int(row["seq"]), study_uid=entry.parsed.ref.study_uid)
        except DatabaseError as exc:  # the next start's reconcile_recent_rows finds them
            log.error("spool_take_back_failed", error_type=type(exc).__name__)
            return
        for entry in committed:
            with contextlib.suppress(OSError):
                (self.root / entry.rel).unlink()

    def _index_entry(self, db: Session, entry: _Pending) -> StoreResult:
        """The entry's index row and its study's state (inside the group's transaction)."""
        ref, parsed = entry.parsed.ref, entry.parsed
        row = entry.duplicate_of
        if row is not None:
            self._reopen_given_up(db, ref.study_uid, now=entry.now)
            return StoreResult(
                status=StoreStatus.SUCCESS,
                instance=StoredInstance(
                    ref=ref,
                    path=self.root / row["path"],
                    size_bytes=int(row["size_bytes"]),
                    received_at=float(row["received_at"]),
                    calling_ae=str(row["calling_ae"]),
                    duplicate=True,
                    images_in_acquisition=parsed.images_in_acquisition,
                    temporal_positions=parsed.temporal_positions,
                ),
            )
        # The study row is locked before the instance takes its seq, so on a shared database
        # seqs commit in order per study (claim and re-open compare them).
        state = self._lock_study(db, ref.study_uid, now=entry.now)
        inserted = db.execute(
            "INSERT INTO instances (sop_instance_uid, study_uid, series_uid, "
            "sop_class_uid, transfer_syntax_uid, path, size_bytes, received_at, "
            "calling_ae, images_in_acquisition, temporal_positions) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING seq",
            (
                ref.sop_instance_uid,
                ref.study_uid,
                ref.series_uid,
                ref.sop_class_uid,
                ref.transfer_syntax_uid,
                str(entry.rel),
                entry.size_bytes,
                entry.now,
                entry.calling_ae,
                parsed.images_in_acquisition,
                parsed.temporal_positions,
            ),
        ).fetchone()
        if inserted is None:  # another receiver indexed the same instance meanwhile: same bytes
            entry.duplicate_of = db.execute(
                "SELECT path, size_bytes, received_at, calling_ae FROM instances "
                "WHERE sop_instance_uid = ?",
                (ref.sop_instance_uid,),
            ).fetchone()
            assert entry.duplicate_of is not None
            return self._index_entry(db, entry)
        self._touch_study(db, ref.study_uid, now=entry.now, seq=int(inserted["seq"]), state=state)
        return StoreResult(
            status=StoreStatus.SUCCESS,
            instance=StoredInstance(
                ref=ref,
                path=self.root / entry.rel,
                size_bytes=entry.size_bytes,
                received_at=entry.now,
                calling_ae=entry.calling_ae,
                images_in_acquisition=parsed.images_in_acquisition,
                temporal_positions=parsed.temporal_positions,
            ),
        )

    @staticmethod
    def _lock_study(db: Session, study_uid: str, *, now: float) -> str:
        """Make the study's row if it is new (receiving, no instance yet), lock it, and return
        its state."""
        db.execute(
            "INSERT INTO studies (study_uid, state, first_received_at, last_received_at, "
            "last_seq, n_instances, receiving_since) VALUES (?, ?, ?, ?, 0, 0, ?) "
            "ON CONFLICT (study_uid) DO NOTHING",
            (study_uid, StudyStatus.RECEIVING.value, now, now, now),
        )
        row = db.execute(
            "SELECT state FROM studies WHERE study_uid = ? FOR UPDATE", (study_uid,)
        ).fetchone()
        assert row is not None  # made just now, or before
        return str(row["state"])

    @staticmethod
    def _touch_study(db: Session, study_uid: str, *, now: float, seq: int, state: str) -> None:
        """Record a new instance on its study (locked, in `state`); a study already finished is
        re-opened."""
        finished = state in (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.DEAD)
        db.execute(
            "UPDATE studies SET last_received_at = ?, last_seq = ?, n_instances = n_instances + 1, "
            "state = CASE WHEN ? THEN ? ELSE state END, "
            "receiving_since = CASE WHEN ? THEN ? ELSE COALESCE(receiving_since, ?) END, "
            "reopened = CASE WHEN ? THEN 1 ELSE reopened END WHERE study_uid = ?",
            (
                now,
                seq,
                finished,
                StudyStatus.RECEIVING.value,
                finished,
                now,
                now,
                finished,
                study_uid,
            ),
        )
        if finished:
            log.info("study_reopened", study_key=uid_key(study_uid), state=state)

    @staticmethod
    def _reopen_given_up(db: Session, study_uid: str, *, now: float) -> None:
        """A re-sent instance of a failed or dead study is an explicit request to try again:
        the study receives anew and gets a fresh job (a done study stays done: no duplicates)."""
        cur = db.execute(
            "UPDATE studies SET state = ?, reopened = 1, last_received_at = ?, "
            "receiving_since = ? WHERE study_uid = ? AND state IN (?, ?)",
            (
                StudyStatus.RECEIVING.value,
                now,
                now,
                study_uid,
                StudyStatus.FAILED.value,
                StudyStatus.DEAD.value,
            ),
        )
        if cur.rowcount:
            log.info("study_reopened", study_key=uid_key(study_uid), reason="instance sent again")

    def _quarantine(
        self, data: bytes, *, reason: str, calling_ae: str, now: float, status: StoreStatus
    ) -> StoreResult:
        """Keep an unusable instance under its hash with a reason file; the sender gets `status`."""
        digest = hashlib.sha256(data).hexdigest()
        qdir = self.root / "quarantine"
        path = qdir / f"{digest}.dcm"
        try:
            if not path.exists():
                write_bytes_durable(path, data, tmp_dir=self.root / "tmp")
            reason_doc = {
                "reason": reason,
                "calling_ae": calling_ae,
                "received_at": now,
                "status_code": int(status),
                "size_bytes": len(data),
            }
            write_bytes_durable(
                qdir / f"{digest}.reason.json",
                json.dumps(reason_doc, indent=2).encode(),
                tmp_dir=self.root / "tmp",
            )
            with self.index.transaction() as db:
                db.execute(
                    "INSERT INTO quarantine (sha256, reason, calling_ae, received_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET "
                    "reason = excluded.reason, calling_ae = excluded.calling_ae, "
                    "received_at = excluded.received_at",
                    (digest, reason, calling_ae, now),
                )
        except (OSError, DatabaseError) as exc:
            raise SpoolError(f"cannot quarantine instance: {type(exc).__name__}") from exc
        log.warning(
            "instance_quarantined",
            reason=reason,
            calling_ae=calling_ae,
            status_code=int(status),
            path=f"quarantine/{digest}.dcm",
        )
        return StoreResult(status=status, quarantine_path=path, reason=reason)

    def receiving_studies(self) -> tuple[StudyProgress, ...]:
        """Studies still receiving, with per-series counts and expected-count hints."""
        studies = self.index.query(
            "SELECT study_uid, last_received_at, receiving_since FROM studies WHERE state = ?",
            (StudyStatus.RECEIVING.value,),
        )
        out = []
        for st in studies:
            rows = self.index.query(
                "SELECT series_uid, COUNT(*) AS n, MAX(images_in_acquisition) AS iia, "
                "MAX(temporal_positions) AS ntp FROM instances WHERE study_uid = ? "
                "GROUP BY series_uid",
                (st["study_uid"],),
            )
            series = tuple(
                SeriesCount(
                    series_uid=str(r["series_uid"]),
                    received=int(r["n"]),
                    # The product over-estimates rather than under-estimates (a vendor may count
                    # all temporal positions in ImagesInAcquisition): never ready too soon.
                    expected=int(r["iia"]) * int(r["ntp"] or 1) if r["iia"] else None,
                )
                for r in rows
            )
            out.append(
                StudyProgress(
                    study_uid=str(st["study_uid"]),
                    last_received_at=float(st["last_received_at"]),
                    receiving_since=float(
                        st["receiving_since"]
                        if st["receiving_since"] is not None
                        else st["last_received_at"]
                    ),
                    series=series,
                )
            )
        return tuple(out)

    def instance_paths(self, study_uid: str) -> tuple[Path, ...]:
        """Every stored file of a study, in arrival order."""
        rows = self.index.query(
            "SELECT path FROM instances WHERE study_uid = ? ORDER BY seq", (study_uid,)
        )
        return tuple(self.root / str(r["path"]) for r in rows)

    def close(self) -> None:
        """Stop the sync threads, close the index, and remove this process's open marker."""
        if self._syncs is not None:
            self._syncs.shutdown(wait=True)
        self.index.close()
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)
            self._marker = None

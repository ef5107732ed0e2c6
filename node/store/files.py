"""Durable file writes: the one way the node puts a file on disk.

A writer sees the old file or the new one, never half of one, and after return the new one
survives a power cut: the bytes go to a temp file in the same folder (or a spool's tmp folder on
the same file system), which is fsync'ed, renamed into place, and the folder is fsync'ed. New
parent folders are created and fsync'ed too.

The spool's group commit may also let a file's data sync run beside its folder's sync and the
index commit (`syncs_may_overlap`): on file systems where a crash leaves an unsynced file
missing or short, never full length with bytes that were not written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: Path) -> None:
    """Create `path` and any missing parents, fsync'ing each parent so the entries survive."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        fsync_dir(d.parent)


def write_temp(folder: Path, data: bytes) -> tuple[Path, int]:
    """Write bytes to a new temp file (``*.part``) in `folder`, not synced; return its path and
    its open descriptor (the caller syncs it with `os.fdatasync` and closes it)."""
    tmp = folder / f"{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp, fd


def write_temp_durable(folder: Path, data: bytes) -> Path:
    """Write bytes to a new temp file (``*.part``) in `folder` and sync its data; return its path.

    The first half of a durable write, for a caller that renames many files and then fsyncs
    their folders once (the spool's group commit); removing it after a later failure is the
    caller's job. `fdatasync`, not `fsync`: a new file's size and blocks are synced either way;
    its times are not worth a journal write.
    """
    tmp, fd = write_temp(folder, data)
    try:
        os.fdatasync(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)
    return tmp


# File systems on which a crash leaves a file whose data was not yet synced missing or shorter
# than written (the size reaches the disk with or after the data): ext4 in its default
# data=ordered mode (and data=journal), XFS (the size is logged when the data's write ends),
# btrfs (copy-on-write). Not ext4 data=writeback, ext2/3, FAT, network file systems, tmpfs.
_SIZE_AFTER_DATA = frozenset({"ext4", "xfs", "btrfs"})


def mount_of(path: Path, mountinfo: str) -> tuple[str, frozenset[str]]:
    """The file system type and its options (mount and super-block) of the mount holding
    `path`, from the text of /proc/self/mountinfo; ("", {}) when none matches."""
    best: tuple[int, str, frozenset[str]] = (-1, "", frozenset())
    target = str(path)
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best[0]:
            options = frozenset(fields[5].split(",")) | frozenset(fields[sep + 3].split(","))
            best = (len(point), fields[sep + 1], options)
    return best[1], best[2]


def syncs_may_overlap(path: Path) -> bool:
    """Whether a file under `path` may be renamed into place before its data is synced, the
    data sync running beside the folder's (Linux, on the file systems of `_SIZE_AFTER_DATA`):
    after a crash such a file is missing or short, which a full parse detects."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8")
    except OSError:  # not Linux: keep the order (data synced before the rename)
        return False
    fstype, options = mount_of(path.resolve(), mountinfo)
    return fstype in _SIZE_AFTER_DATA and "data=writeback" not in options


def write_bytes_durable(path: Path, data: bytes, *, tmp_dir: Path | None = None) -> None:
    """Write bytes to `path` atomically and durably (temp file in `tmp_dir` or beside it)."""
    folder = tmp_dir if tmp_dir is not None else path.parent
    makedirs_durable(folder)
    tmp = write_temp_durable(folder, data)
    try:
        makedirs_durable(path.parent)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json_durable(path: Path, data: Any) -> None:
    """Write a JSON document (indented, newline-terminated) atomically and durably."""
    write_bytes_durable(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def dicom_bytes(ds: Dataset) -> bytes:
    """A dataset encoded as a Part 10 file (ValueError or AttributeError when it cannot be)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom_durable(ds: Dataset, path: Path) -> None:
    """Write a DICOM dataset as a Part 10 file atomically and durably.

    Raises OSError, ValueError or AttributeError when the dataset cannot be encoded or written.
    """
    write_bytes_durable(path, dicom_bytes(ds))


def write_files_durable(files: Sequence[tuple[Path, bytes]]) -> None:
    """Write several files atomically and durably with one folder sync per folder.

    Each file is its own temp file, fsync'ed; then all are renamed into place and each folder
    is fsync'ed once (instead of once per file). After return every file survives a power cut;
    a crash before leaves each file old or new, never half (and maybe a ``*.part`` behind).
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            makedirs_durable(path.parent)
            temps.append((write_temp_durable(path.parent, data), path))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    for folder in dict.fromkeys(path.parent for path, _ in files):
        fsync_dir(folder)


def link_files_durable(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Give each durable file `src` a second name `dst` (a hard link; a durable copy across
    file systems), keeping a `dst` that exists; one folder sync per destination folder.

    The source must already be durable (written by this module): a link shares its bytes, so
    only the new folder entries need syncing.
    """
    for src, dst in pairs:
        if dst.exists():
            continue
        makedirs_durable(dst.parent)
        try:
            os.link(src, dst)
        except FileExistsError:
            continue
        except OSError:  # another file system, or links not allowed: copy it
            tmp = write_temp_durable(dst.parent, src.read_bytes())
            try:
                os.replace(tmp, dst)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
    for folder in dict.fromkeys(dst.parent for _, dst in pairs):
        fsync_dir(folder)

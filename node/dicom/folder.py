"""A folder of DICOM files grouped by study (`neuronode process`, `classify`,
`evaluate-sequences`).

One StudyInstanceUID is one study to DICOM, but a folder tree is how a model developer lays out
data sets, and the same UID in two top-level folders is nearly always two copies (a study
exported twice, an anonymiser that kept or reused UIDs, one study in a training and a test set),
not one study split in two. Merging the copies would double every instance: each series would
then hold every slice twice, which reads as a time series and changes its label. So files are
grouped by (top-level folder, StudyInstanceUID): copies in two folders stay two studies, and a
warning says which study UID was found in several folders (``FolderScan.shared_uids``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from node.log import get_logger, uid_key

log = get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderScan:
    """DICOM files of a folder grouped by study, and what was skipped."""

    studies: tuple[tuple[str, tuple[Path, ...]], ...]  # (StudyInstanceUID, files), by folder
    n_skipped: int  # not DICOM, DICOMDIR, or without a StudyInstanceUID
    folders: tuple[Path, ...] = ()  # the top-level folder of each study, as studies
    shared_uids: tuple[str, ...] = ()  # study UIDs found in more than one top-level folder


def dicom_files(directory: Path) -> tuple[Path, ...]:
    """Every file under a folder (recursively, sorted) except DICOMDIR indexes."""
    return tuple(
        sorted(p for p in directory.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")
    )


def _top_folder(directory: Path, path: Path) -> Path:
    """The folder directly under `directory` that holds `path` (`directory` for its own files)."""
    parts = path.relative_to(directory).parts
    return directory / parts[0] if len(parts) > 1 else directory


def scan_folder(directory: Path) -> FolderScan:
    """Find DICOM files under a folder (recursively) and group them by top-level folder and
    StudyInstanceUID (see the module docstring for why not by UID alone)."""
    by_study: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    skipped = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            skipped += 1
            continue
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "MediaStorageSOPClassUID"],
            )
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError, KeyError):
            skipped += 1
            continue
        study_uid = ds.get("StudyInstanceUID")
        media_class = ds.file_meta.get("MediaStorageSOPClassUID") if ds.file_meta else None
        if not study_uid or str(media_class) == "1.2.840.10008.1.3.10":  # Media Storage Directory
            skipped += 1
            continue
        by_study[(_top_folder(directory, path), str(study_uid))].append(path)
    folders_of: dict[str, set[Path]] = defaultdict(set)
    for folder, uid in by_study:
        folders_of[uid].add(folder)
    shared = tuple(uid for uid, folders in folders_of.items() if len(folders) > 1)
    for uid in shared:
        log.warning(
            "study_uid_in_several_folders",
            study_key=uid_key(uid),
            count=len(folders_of[uid]),
        )
    return FolderScan(
        studies=tuple((uid, tuple(paths)) for (_, uid), paths in by_study.items()),
        n_skipped=skipped,
        folders=tuple(folder for folder, _ in by_study),
        shared_uids=shared,
    )

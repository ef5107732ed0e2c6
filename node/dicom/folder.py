"""A folder of DICOM files grouped by study (`neuronode process`, `classify`,
`evaluate-sequences`).

One StudyInstanceUID is one study to DICOM, and a study is often laid out one folder per
series (``study/series/files``, what `neuronode synth` and most exports write): those folders
are one study. But the same UID in two top-level folders may also be two copies (a study
exported twice, an anonymiser that kept or reused UIDs, one study in a training and a test set).
Merging copies would double every instance: each series would then hold every slice twice, which
reads as a time series and changes its label. What tells them apart is the instances: copies
share SOP Instance UIDs. So a study UID found in several top-level folders is one study when no
SOP Instance UID is in two of them, and stays one study per folder when any is (copies), with a
warning naming the study (``FolderScan.shared_uids``).
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
    """Find DICOM files under a folder (recursively) and group them by study: by
    StudyInstanceUID, kept apart per top-level folder only where those folders hold copies of
    the same instances (see the module docstring)."""
    by_study: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    instances: dict[tuple[Path, str], set[str]] = defaultdict(set)
    skipped = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            skipped += 1
            continue
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SOPInstanceUID", "MediaStorageSOPClassUID"],
            )
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError, KeyError):
            skipped += 1
            continue
        study_uid = ds.get("StudyInstanceUID")
        media_class = ds.file_meta.get("MediaStorageSOPClassUID") if ds.file_meta else None
        if not study_uid or str(media_class) == "1.2.840.10008.1.3.10":  # Media Storage Directory
            skipped += 1
            continue
        key = (_top_folder(directory, path), str(study_uid))
        by_study[key].append(path)
        instances[key].add(str(ds.get("SOPInstanceUID", path)))
    folders_of: dict[str, list[Path]] = defaultdict(list)
    for folder, uid in by_study:
        folders_of[uid].append(folder)
    copies = tuple(
        uid
        for uid, folders in folders_of.items()
        if len(folders) > 1 and _share_instances([instances[(f, uid)] for f in folders])
    )
    for uid in copies:
        log.warning(
            "study_uid_in_several_folders",
            study_key=uid_key(uid),
            count=len(folders_of[uid]),
        )
    groups: dict[tuple[Path, str], list[Path]] = {}
    for (folder, uid), paths in by_study.items():
        if uid in copies or len(folders_of[uid]) == 1:
            groups[(folder, uid)] = paths
        else:  # one study laid out over several folders: one group, under the scanned folder
            groups.setdefault((directory, uid), []).extend(paths)
    return FolderScan(
        studies=tuple((uid, tuple(sorted(paths))) for (_, uid), paths in groups.items()),
        n_skipped=skipped,
        folders=tuple(folder for folder, _ in groups),
        shared_uids=copies,
    )


def _share_instances(sets: list[set[str]]) -> bool:
    """Whether any SOP Instance UID is in two of ``sets``."""
    return sum(len(s) for s in sets) > len(set().union(*sets))

"""A folder of DICOM files grouped by study (`neuronode process DIR`)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderScan:
    """DICOM files of a folder grouped by study, and what was skipped."""

    studies: tuple[tuple[str, tuple[Path, ...]], ...]
    n_skipped: int  # not DICOM, DICOMDIR, or without a StudyInstanceUID


def scan_folder(directory: Path) -> FolderScan:
    """Find DICOM files under a folder (recursively) and group them by StudyInstanceUID."""
    by_study: dict[str, list[Path]] = defaultdict(list)
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
        by_study[str(study_uid)].append(path)
    return FolderScan(
        studies=tuple((uid, tuple(paths)) for uid, paths in by_study.items()),
        n_skipped=skipped,
    )

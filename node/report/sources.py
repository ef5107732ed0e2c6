"""The source images' headers and the patient/study attributes copied from them."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import pydicom
from pydicom.dataset import Dataset

from node.errors import ReportError

T = TypeVar("T")

# Patient- and study-level attributes highdicom does not copy; copied when the source has them
# so dcentvfy finds source and results consistent.
EXTRA_ENTITY_KEYWORDS: Final = (
    "IssuerOfPatientID",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "NameOfPhysiciansReadingStudy",
    "OtherPatientIDs",
    "EthnicGroup",
)


def copy_entity_attributes(src: Dataset, dst: Dataset) -> None:
    """Copy the patient/study attributes highdicom leaves out, value for value."""
    for keyword in EXTRA_ENTITY_KEYWORDS:
        if keyword in src and keyword not in dst:
            dst[keyword] = copy.deepcopy(src[keyword])
    if "SpecificCharacterSet" in src:
        dst.SpecificCharacterSet = src.SpecificCharacterSet


def quietly(build: Callable[..., T], /, **kwargs: Any) -> T:
    """Call a highdicom constructor without its person-name warnings: they quote the name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        return build(**kwargs)


def read_header(path: Path) -> Dataset:
    """A source header without pixels; a file that cannot be read is a ReportError."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ReportError(f"cannot read source {path.name}: {exc}") from exc

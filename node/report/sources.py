"""The source images' headers and the patient/study attributes copied from them."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import pydicom
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

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


# Date and time VRs highdicom converts when it copies patient and study attributes: a value
# that does not convert (a scanner's 'ZZDOB0203') would make the whole result fail.
_DATE_TIME_VRS: Final = {"DA": DA, "DT": DT, "TM": TM}


def blank_nonconformant_dates(ds: Dataset) -> tuple[str, ...]:
    """Empty the top-level date and time values that are not valid DICOM (Type 2: present but
    empty is conformant), so one bad header value costs that value, never the result.
    Returns the keywords blanked (never the values: they may be patient data)."""
    blanked = []
    for elem in ds:
        convert = _DATE_TIME_VRS.get(str(elem.VR))
        if convert is None or elem.value in (None, ""):
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for value in values:
                    convert(str(value))
        except (ValueError, TypeError, OverflowError):
            elem.value = ""
            blanked.append(elem.keyword or str(elem.tag))
    return tuple(blanked)


def read_header(path: Path) -> Dataset:
    """A source header without pixels, its non-conformant dates blanked; a file that cannot be
    read is a ReportError (naming the error type only: its text may quote header values)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # value warnings quote header values
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            blank_nonconformant_dates(ds)
    except (OSError, ValueError, TypeError, EOFError, pydicom.errors.InvalidDicomError) as exc:
        raise ReportError(f"cannot read source {path.name}: {type(exc).__name__}") from exc
    return ds

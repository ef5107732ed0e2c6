"""The fixed vocabulary of our result objects: SOP classes, series names, coded concepts."""

from __future__ import annotations

import re
from typing import Final, Literal

from pydicom.sr.coding import Code

from node.records import FindingStatus

SrClass = Literal["comprehensive3d", "comprehensive", "enhanced"]


SR_SOP_CLASS_UIDS: Final[dict[SrClass, str]] = {
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
}


SR_FALLBACK_ORDER: Final[tuple[SrClass, ...]] = ("comprehensive3d", "comprehensive", "enhanced")


SC_SOP_CLASS_UID: Final = "1.2.840.10008.5.1.4.1.1.7"


NOT_FOR_DIAGNOSTIC_USE: Final = "NOT FOR DIAGNOSTIC USE"


SR_SERIES_DESCRIPTION: Final = "AI results - NOT FOR DIAGNOSTIC USE"


SC_SERIES_DESCRIPTION: Final = "AI attention maps - NOT FOR DIAGNOSTIC USE"


SR_SERIES_NUMBER: Final = 9900


SC_SERIES_NUMBER: Final = 9901


MANUFACTURER: Final = "neuronode"


# Our own coding scheme for concepts SNOMED CT has no code for; declared in every SR.
PRIVATE_SCHEME: Final = "99NEURONODE"


PRIVATE_SCHEME_NAME: Final = "neuronode private codes"


# SNOMED CT where a code exists; everything else in the declared private scheme.
FINDING_CODES: Final[dict[str, Code]] = {
    "glioblastoma": Code("393563007", "SCT", "Glioblastoma multiforme"),
    "tuberous sclerosis": Code("7199000", "SCT", "Tuberous sclerosis syndrome"),
    "primary cns lymphoma": Code("PCNSL", PRIVATE_SCHEME, "Primary CNS lymphoma"),
    "high grade glioma": Code("HGG", PRIVATE_SCHEME, "High grade glioma"),
    "low grade glioma": Code("LGG", PRIVATE_SCHEME, "Low grade glioma"),
    "cortical tubers": Code("TUBERS", PRIVATE_SCHEME, "Cortical tubers"),
}


STATUS_CODES: Final[dict[FindingStatus, Code]] = {
    FindingStatus.PRESENT: Code("52101004", "SCT", "Present"),
    FindingStatus.ABSENT: Code("2667000", "SCT", "Absent"),
    FindingStatus.INDETERMINATE: Code("82334004", "SCT", "Indeterminate"),
    FindingStatus.NOT_ASSESSABLE: Code("NOTASSESSABLE", PRIVATE_SCHEME, "Not assessable"),
    FindingStatus.NO_LESION: Code("NOLESION", PRIVATE_SCHEME, "No lesion found"),
}


CERTAINTY_OF_FINDING: Final = Code("111012", "DCM", "Certainty of Finding")


PERCENT: Final = Code("%", "UCUM", "percent")


COMMENT: Final = Code("121106", "DCM", "Comment")


SEQUENCE_CLASS: Final = Code("SEQCLASS", PRIVATE_SCHEME, "MR sequence class")


PROCEDURE_MR_BRAIN: Final = Code("4573000", "SCT", "MR of brain")


def finding_code(label: str) -> Code:
    """The coded concept of a finding label: SNOMED CT where known, else the private scheme."""
    key = " ".join(label.lower().split())
    if key in FINDING_CODES:
        return FINDING_CODES[key]
    value = re.sub(r"[^A-Z0-9]", "", key.upper())[:16] or "FINDING"
    return Code(value, PRIVATE_SCHEME, label[:64])

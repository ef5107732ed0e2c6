"""Vendor private elements: the one reader, by private creator or at a well-known fixed address.

A private element (gggg,xxEE) lives in the block its private creator (gggg,00xx) reserved. An
anonymiser that removes private creators but keeps the elements leaves the value readable only
at the block the vendor always uses, (gggg,10EE). Like dcm2niix, the fixed address is read only
for the vendor that wrote the file and only when no creator at all holds that block, so an
element reserved by another creator is never misread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

_FIXED_BLOCK = 0x10  # the block every vendor uses in practice: elements (gggg,10EE)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivateTag:
    """A vendor private element: its group, its creator and its offset in the creator's block."""

    group: int
    creator: str
    offset: int  # low byte of the element, e.g. 0x0C for (0019,xx0C)
    name: str  # what it holds, for reasons: "Siemens b-value"

    def __post_init__(self) -> None:
        if not isinstance(self.group, int) or self.group % 2 == 0:
            raise ValueError(f"group: {self.group!r} is not an odd (private) group number")
        if not isinstance(self.creator, str) or not self.creator:
            raise TypeError(f"creator: a private creator string is needed, not {self.creator!r}")
        if not isinstance(self.offset, int) or not 0 <= self.offset <= 0xFF:
            raise ValueError(f"offset: {self.offset!r} is not an element offset 0x00..0xFF")

    @property
    def fixed_address(self) -> str:
        """The fixed address as DICOM writes it, e.g. (0019,100C)."""
        return f"({self.group:04X},{(_FIXED_BLOCK << 8) | self.offset:04X})"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivateValue:
    """A private element's value and whether it was found only at its fixed address."""

    value: Any
    creator_missing: bool  # True: read at the fixed address, its private creator was removed
    tag: PrivateTag

    @property
    def note(self) -> str:
        """A reason fragment saying where the value came from, "" for the normal case."""
        if not self.creator_missing:
            return ""
        return (
            f"{self.tag.name} read at its fixed address {self.tag.fixed_address}: "
            "private creator missing"
        )


SIEMENS_MOSAIC_IMAGES = PrivateTag(
    group=0x0019, creator="SIEMENS MR HEADER", offset=0x0A, name="Siemens NumberOfImagesInMosaic"
)
SIEMENS_B_VALUE = PrivateTag(
    group=0x0019, creator="SIEMENS MR HEADER", offset=0x0C, name="Siemens b-value"
)
SIEMENS_CSA_IMAGE = PrivateTag(
    group=0x0029, creator="SIEMENS CSA HEADER", offset=0x10, name="Siemens CSA image header"
)
GE_B_VALUE = PrivateTag(group=0x0043, creator="GEMS_PARM_01", offset=0x39, name="GE b-value")
GE_IMAGE_KIND = PrivateTag(
    group=0x0043, creator="GEMS_PARM_01", offset=0x2F, name="GE image type (magnitude/phase)"
)
GE_PULSE_SEQUENCE = PrivateTag(
    group=0x0019, creator="GEMS_ACQU_01", offset=0x9C, name="GE pulse sequence name"
)
GE_INTERNAL_SEQUENCE = PrivateTag(
    group=0x0019, creator="GEMS_ACQU_01", offset=0x9E, name="GE internal pulse sequence name"
)
PHILIPS_B_VALUE = PrivateTag(
    group=0x2001, creator="Philips Imaging DD 001", offset=0x03, name="Philips b-value"
)


def read_private(
    ds: Dataset, tag: PrivateTag, *, fixed_fallback: bool = False
) -> PrivateValue | None:
    """The element's value by its creator; with ``fixed_fallback``, at (gggg,10EE) when no
    creator holds block 0x10 of the group (an anonymiser removed it). None when absent."""
    try:
        block = ds.private_block(tag.group, tag.creator)
    except KeyError:
        pass  # no such creator in the group
    else:
        try:
            return PrivateValue(value=block[tag.offset].value, creator_missing=False, tag=tag)
        except KeyError:
            return None
    if not fixed_fallback or (tag.group, _FIXED_BLOCK) in ds:
        return None  # block 0x10 belongs to another creator: its elements mean something else
    element = ds.get((tag.group, (_FIXED_BLOCK << 8) | tag.offset))
    if element is None:
        return None
    return PrivateValue(value=element.value, creator_missing=True, tag=tag)


def private_value(ds: Dataset, tag: PrivateTag) -> Any:
    """The element's value by its creator only, or None (for elements not worth a fallback)."""
    found = read_private(ds, tag)
    return found.value if found is not None else None

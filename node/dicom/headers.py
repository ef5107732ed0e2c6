"""Series headers: the acquisition physics of each series, read with pydicom (no pixels).

This is the one place that knows vendor private tags and vendor spellings; everything after it
(sequence rules) sees a normalised ``SeriesHeader``. Private b-value tags follow the public
documentation of dcm2niix (Siemens (0019,xx0C), GE (0043,xx39), Philips (2001,xx03), UIH
(0065,xx09), Canon/Toshiba b-value in ImageComments); when an anonymiser removed the private
creator, the b-value is read at the vendor's fixed address (node/dicom/private.py) and the header
says so. Objects without pixels (Raw Data, spectroscopy, vendor private non-image SOP classes)
that share a SeriesInstanceUID with images are set aside: they must not decide the series.

Why this module is long: one header read per instance, for classic and enhanced MR, every
vendor's conventions and the per-series aggregation; the private tags live in
node/dicom/private.py.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.dicom.private import (
    GE_B_VALUE,
    GE_IMAGE_KIND,
    GE_INTERNAL_SEQUENCE,
    GE_PULSE_SEQUENCE,
    PHILIPS_B_VALUE,
    SIEMENS_B_VALUE,
    SIEMENS_MOSAIC_IMAGES,
    PrivateValue,
    private_value,
    read_private,
)
from node.log import get_logger, uid_key
from node.records import SeriesHeader

log = get_logger(__name__)

_MANUFACTURERS = (
    # (prefix of the upper-cased Manufacturer, normalised name); first match wins
    ("SIEMENS", "siemens"),
    ("CPS", "siemens"),
    ("GE ", "ge"),
    ("GE_", "ge"),
    ("GEMS", "ge"),
    ("GE MEDICAL", "ge"),
    ("GENERAL ELECTRIC", "ge"),
    ("PHILIPS", "philips"),
    ("CANON", "canon"),
    ("TOSHIBA", "canon"),
    ("UIH", "uih"),
    ("UNITED IMAGING", "uih"),
    ("SHANGHAI UNITED", "uih"),
    ("HITACHI", "hitachi"),
    ("FUJIFILM", "hitachi"),
)

_CANON_B_COMMENT = re.compile(r"\bb\s*=\s*(\d+(?:\.\d+)?)\s*\(")
_GE_B_BIAS = 1_000_000_000  # GE adds 1e9 (or more) to the b-value in (0043,xx39)


def normalise_manufacturer(text: str) -> str:
    """Map a free-text Manufacturer to one of siemens, ge, philips, canon, uih, hitachi, other."""
    up = text.strip().upper()
    if up == "GE":
        return "ge"
    for prefix, name in _MANUFACTURERS:
        if up.startswith(prefix):
            return name
    return "other"


def _text(value: Any) -> str:
    """A header value as one stripped string (multi-values joined by backslash)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace").strip(" \x00")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Sequence):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _tokens(value: Any) -> tuple[str, ...]:
    """A multi-valued code string as upper-case tokens."""
    text = _text(value)
    return tuple(t.strip().upper() for t in text.split("\\") if t.strip())


def _floats(value: Any) -> tuple[float, ...]:
    """All numbers in a header value (DS/IS/FD/FL, multi-valued, or raw bytes of an UN element)."""
    if value is None:
        return ()
    if isinstance(value, bytes):
        text = value.decode("latin-1", errors="replace").strip(" \x00")
        if text and all(c in "0123456789+-.eE\\ " for c in text):
            return _floats(text.split("\\"))
        if len(value) == 4:
            return (float(struct.unpack("<f", value)[0]),)
        if len(value) == 8:
            return (float(struct.unpack("<d", value)[0]),)
        return ()
    if isinstance(value, str):
        return _floats(value.split("\\")) if "\\" in value else _one_float(value)
    if isinstance(value, Sequence):
        out: list[float] = []
        for v in value:
            out.extend(_floats(v))
        return tuple(out)
    return _one_float(value)


def _one_float(value: Any) -> tuple[float, ...]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ()
    return (number,) if number == number else ()  # drop NaN


def _first_float(value: Any) -> float | None:
    numbers = _floats(value)
    return numbers[0] if numbers else None


# SOP classes that never carry pixel data although they may share a series with images.
NON_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66",  # Raw Data Storage
        "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy Storage
        "1.3.12.2.1107.5.9.1",  # Siemens CSA Non-Image Storage
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF Storage
        "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State Storage
    }
)


def is_image_object(ds: Dataset) -> bool:
    """Whether an instance holds an image: an image SOP class with Rows and Columns.

    Headers are read without pixel data, so the Image Pixel module's Rows and Columns (type 1
    in every image IOD) stand in for PixelData; known non-image SOP classes are never images.
    """
    if _text(ds.get("SOPClassUID")) in NON_IMAGE_SOP_CLASSES:
        return False
    rows, cols = _first_float(ds.get("Rows")), _first_float(ds.get("Columns"))
    return bool(rows and cols)


def set_aside_non_images(datasets: Sequence[Dataset]) -> tuple[list[Dataset], int]:
    """The image instances of a series and how many non-image objects were set aside.

    A series made only of non-image objects is kept whole (the tag rules then call it OTHER).
    """
    images = [ds for ds in datasets if is_image_object(ds)]
    if not images:
        return list(datasets), 0
    return images, len(datasets) - len(images)


def _items(ds: Dataset, keyword: str) -> Iterator[Dataset]:
    seq = ds.get(keyword)
    if seq is None:
        return iter(())
    try:
        return iter(list(seq))
    except TypeError:
        return iter(())


def _frame_groups(ds: Dataset) -> Iterator[Dataset]:
    """Shared then per-frame functional group items of an enhanced object (nothing otherwise)."""
    yield from _items(ds, "SharedFunctionalGroupsSequence")
    yield from _items(ds, "PerFrameFunctionalGroupsSequence")


def _plane(orientation: Sequence[float]) -> str:
    """axial / sagittal / coronal / oblique from an ImageOrientationPatient."""
    if len(orientation) != 6:
        return ""
    r, c = orientation[:3], orientation[3:]
    normal = (
        r[1] * c[2] - r[2] * c[1],
        r[2] * c[0] - r[0] * c[2],
        r[0] * c[1] - r[1] * c[0],
    )
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _seconds(value: Any) -> float | None:
    """Seconds from midnight of a TM (or the time part of a DT)."""
    text = _text(value)
    if not text:
        return None
    if len(text) >= 14 and text[:8].isdigit():  # DT: YYYYMMDDHHMMSS...
        text = text[8:]
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?", text)
    if m is None:
        return None
    hours, minutes, secs = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    frac = float(m.group(4)) if m.group(4) else 0.0
    return hours * 3600.0 + minutes * 60.0 + secs + frac


@dataclass(slots=True)
class _Accumulator:
    """Facts gathered over the instances of one series before the record is frozen."""

    first: Dataset | None  # the series' first instance (None in a one-instance part)
    first_number: int
    n_instances: int = 0
    n_frames: int = 0
    image_type: dict[str, None] = field(default_factory=dict)
    complex_parts: dict[str, None] = field(default_factory=dict)
    acquisition_contrast: dict[str, None] = field(default_factory=dict)
    echo_times: set[float] = field(default_factory=set)
    b_values: set[float] = field(default_factory=set)
    directionality: dict[str, None] = field(default_factory=dict)
    orientations: dict[str, None] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    positions: Counter[tuple[float, float, float]] = field(default_factory=Counter)
    temporal: int = 1
    contrast: str | None = None
    contrast_route: str | None = None
    inversion_recovery: bool | None = None
    tr: float | None = None
    ti: float | None = None
    flip: float | None = None
    etl: int | None = None
    mosaic: bool = False
    b_notes: dict[str, None] = field(default_factory=dict)
    n_set_aside: int = 0

    def add(self, ds: Dataset, manufacturer: str) -> None:
        """Fold one instance into the series facts."""
        self.n_instances += 1
        n_frames = int(_first_float(ds.get("NumberOfFrames")) or 1)
        self.n_frames += n_frames
        for token in _tokens(ds.get("ImageType")):
            self.image_type.setdefault(token, None)
        self._timing(ds)
        self._echo(ds)
        self._diffusion(ds, manufacturer)
        self._contrast(ds)
        self._geometry(ds)
        self._temporal(ds)
        self._enhanced(ds)
        if "MOSAIC" in self.image_type or private_value(ds, SIEMENS_MOSAIC_IMAGES):
            self.mosaic = True
        complex_part = _text(ds.get("ComplexImageComponent")).upper()
        if complex_part:
            self.complex_parts.setdefault(complex_part, None)
        if manufacturer == "ge":
            ge_kind = _first_float(private_value(ds, GE_IMAGE_KIND))
            names = {0: "MAGNITUDE", 1: "PHASE", 2: "REAL", 3: "IMAGINARY"}
            if ge_kind is not None and int(ge_kind) in names:
                self.complex_parts.setdefault(names[int(ge_kind)], None)

    def merge(self, part: _Accumulator) -> None:
        """Fold in the facts of one instance folded alone (``add`` on a fresh accumulator), as
        if ``add`` ran on that instance now: first-found values stay, ordered sets keep
        their first-seen order."""
        self.n_instances += part.n_instances
        self.n_frames += part.n_frames
        for ordered, more in (
            (self.image_type, part.image_type),
            (self.complex_parts, part.complex_parts),
            (self.acquisition_contrast, part.acquisition_contrast),
            (self.directionality, part.directionality),
            (self.orientations, part.orientations),
            (self.b_notes, part.b_notes),
        ):
            for key in more:
                ordered.setdefault(key, None)
        self.echo_times |= part.echo_times
        self.b_values |= part.b_values
        self.times.extend(part.times)
        self.positions.update(part.positions)
        self.temporal = max(self.temporal, part.temporal)
        self.contrast = self.contrast or part.contrast
        self.contrast_route = self.contrast_route or part.contrast_route
        if part.inversion_recovery is not None:
            self.inversion_recovery = (self.inversion_recovery or False) or part.inversion_recovery
        self.tr = self.tr if self.tr is not None else part.tr
        self.ti = self.ti if self.ti is not None else part.ti
        self.flip = self.flip if self.flip is not None else part.flip
        self.etl = self.etl if self.etl is not None else part.etl
        self.mosaic = self.mosaic or part.mosaic

    def _timing(self, ds: Dataset) -> None:
        self.tr = self.tr if self.tr is not None else _first_float(ds.get("RepetitionTime"))
        ti = _first_float(ds.get("InversionTime"))
        if ti is not None and ti > 0:
            self.ti = ti if self.ti is None else self.ti
        self.flip = self.flip if self.flip is not None else _first_float(ds.get("FlipAngle"))
        etl = _first_float(ds.get("EchoTrainLength"))
        if self.etl is None and etl is not None:
            self.etl = int(etl)
        for key in ("AcquisitionTime", "AcquisitionDateTime", "ContentTime", "SeriesTime"):
            seconds = _seconds(ds.get(key))
            if seconds is not None:
                self.times.append(seconds)
                break

    def _echo(self, ds: Dataset) -> None:
        for te in _floats(ds.get("EchoTime")):
            self.echo_times.add(round(te, 3))

    def _diffusion(self, ds: Dataset, manufacturer: str) -> None:
        values: list[float] = list(_floats(ds.get("DiffusionBValue")))
        direction = _text(ds.get("DiffusionDirectionality")).upper()
        if direction:
            self.directionality.setdefault(direction, None)
        found: PrivateValue | None = None
        if manufacturer == "siemens":
            found = read_private(ds, SIEMENS_B_VALUE, fixed_fallback=True)
            values.extend(_floats(found.value if found else None))
        elif manufacturer == "ge":
            # Only the first value is the b-value; GE adds 1e9 (or more) to it.
            found = read_private(ds, GE_B_VALUE, fixed_fallback=True)
            raw = _floats(found.value if found else None)
            if raw:
                values.append(raw[0] % _GE_B_BIAS)
        elif manufacturer == "philips":
            found = read_private(ds, PHILIPS_B_VALUE, fixed_fallback=True)
            values.extend(_floats(found.value if found else None))
        elif manufacturer == "uih":
            element = ds.get((0x0065, 0x1009))
            values.extend(_floats(element.value if element is not None else None))
        elif manufacturer == "canon":
            m = _CANON_B_COMMENT.search(_text(ds.get("ImageComments")))
            if m is not None:
                values.append(float(m.group(1)))
        if found is not None and found.creator_missing and _floats(found.value):
            self.b_notes.setdefault(found.note, None)
        for value in values:
            if 0 <= value < 100_000:
                self.b_values.add(round(value, 1))

    def _contrast(self, ds: Dataset) -> None:
        agent = _text(ds.get("ContrastBolusAgent"))
        if agent and agent.upper() not in {"NONE", "NO", "N/A", "NA", "-", "0", "UNKNOWN"}:
            self.contrast = self.contrast or agent
        route = _text(ds.get("ContrastBolusRoute"))
        if route:
            self.contrast_route = self.contrast_route or route
        for item in _items(ds, "ContrastBolusAgentSequence"):
            meaning = _text(item.get("CodeMeaning"))
            if meaning:
                self.contrast = self.contrast or meaning

    def _geometry(self, ds: Dataset) -> None:
        iop = _floats(ds.get("ImageOrientationPatient"))
        if iop:
            self.orientations.setdefault(_plane(iop), None)
        ipp = _floats(ds.get("ImagePositionPatient"))
        if len(ipp) == 3:
            self.positions[(round(ipp[0], 2), round(ipp[1], 2), round(ipp[2], 2))] += 1

    def _temporal(self, ds: Dataset) -> None:
        for key in ("NumberOfTemporalPositions", "TemporalPositionIdentifier"):
            value = _first_float(ds.get(key))
            if value is not None and value > self.temporal:
                self.temporal = int(value)

    def _enhanced(self, ds: Dataset) -> None:
        """Read the functional groups of an enhanced MR object (all frames)."""
        for token in _tokens(ds.get("AcquisitionContrast")):
            self.acquisition_contrast.setdefault(token, None)
        for group in _frame_groups(ds):
            for item in _items(group, "MRImageFrameTypeSequence"):
                for token in _tokens(item.get("FrameType")):
                    self.image_type.setdefault(token, None)
                for token in _tokens(item.get("AcquisitionContrast")):
                    self.acquisition_contrast.setdefault(token, None)
                part = _text(item.get("ComplexImageComponent")).upper()
                if part:
                    self.complex_parts.setdefault(part, None)
            for item in _items(group, "MRTimingAndRelatedParametersSequence"):
                self.tr = (
                    self.tr if self.tr is not None else _first_float(item.get("RepetitionTime"))
                )
                flip = _first_float(item.get("FlipAngle"))
                self.flip = self.flip if self.flip is not None else flip
                etl = _first_float(item.get("EchoTrainLength"))
                if self.etl is None and etl is not None:
                    self.etl = int(etl)
            for item in _items(group, "MREchoSequence"):
                for te in _floats(item.get("EffectiveEchoTime")):
                    self.echo_times.add(round(te, 3))
            for item in _items(group, "MRModifierSequence"):
                ir = _text(item.get("InversionRecovery")).upper()
                if ir in {"YES", "NO"}:
                    self.inversion_recovery = (self.inversion_recovery or False) or ir == "YES"
                for ti in _floats(item.get("InversionTimes")):
                    if ti > 0 and self.ti is None:
                        self.ti = ti
            for item in _items(group, "MRDiffusionSequence"):
                for b in _floats(item.get("DiffusionBValue")):
                    if 0 <= b < 100_000:
                        self.b_values.add(round(b, 1))
                direction = _text(item.get("DiffusionDirectionality")).upper()
                if direction:
                    self.directionality.setdefault(direction, None)
            for item in _items(group, "ContrastBolusUsageSequence"):
                if _text(item.get("ContrastBolusAgentAdministered")).upper() == "YES":
                    self.contrast = self.contrast or "administered"
            for item in _items(group, "PlaneOrientationSequence"):
                iop = _floats(item.get("ImageOrientationPatient"))
                if iop:
                    self.orientations.setdefault(_plane(iop), None)
            for item in _items(group, "FrameContentSequence"):
                index = _first_float(item.get("TemporalPositionIndex"))
                if index is not None and index > self.temporal:
                    self.temporal = int(index)
            for item in _items(group, "PlanePositionSequence"):
                ipp = _floats(item.get("ImagePositionPatient"))
                if len(ipp) == 3:
                    self.positions[(round(ipp[0], 2), round(ipp[1], 2), round(ipp[2], 2))] += 1


def _series_number(ds: Dataset) -> int | None:
    number = _first_float(ds.get("SeriesNumber"))
    return int(number) if number is not None else None


def _instance_number(ds: Dataset) -> int:
    number = _first_float(ds.get("InstanceNumber"))
    return int(number) if number is not None else 0


def header_from_datasets(datasets: Iterable[Dataset]) -> SeriesHeader:
    """Build the header record of one series from its instances (already grouped)."""
    images, n_set_aside = set_aside_non_images(list(datasets))
    ordered = sorted(images, key=_instance_number)
    if not ordered:
        raise ValueError("datasets: a series needs at least one instance")
    first = ordered[0]
    manufacturer = normalise_manufacturer(_text(first.get("Manufacturer")))
    acc = _Accumulator(first=first, first_number=_instance_number(first), n_set_aside=n_set_aside)
    for ds in ordered:
        acc.add(ds, manufacturer)
    return _finish(acc, manufacturer)


def _enhanced_scanning(ds: Dataset, inversion: bool | None) -> tuple[str, ...]:
    """Classic ScanningSequence codes for an enhanced MR object (it has none of its own)."""
    echo = _text(ds.get("EchoPulseSequence")).upper()
    codes = {"SPIN": ("SE",), "GRADIENT": ("GR",), "BOTH": ("SE", "GR")}.get(echo, ())
    if _text(ds.get("EchoPlanarPulseSequence")).upper() == "YES":
        codes = ("EP", *codes)
    if inversion:
        codes = (*codes, "IR")
    return codes


def _enhanced_options(ds: Dataset) -> tuple[str, ...]:
    """Scan options implied by the enhanced MR pulse-sequence flags (TOF, phase contrast)."""
    options: tuple[str, ...] = ()
    if _text(ds.get("TimeOfFlightContrast")).upper() == "YES":
        options += ("TOF",)
    if _text(ds.get("PhaseContrast")).upper() == "YES":
        options += ("PHASE_CONTRAST",)
    return options


def _finish(acc: _Accumulator, manufacturer: str) -> SeriesHeader:
    ds = acc.first
    assert ds is not None  # set for a series (only one-instance parts have none)
    image_type = tuple(acc.image_type)
    echo_times = tuple(sorted(acc.echo_times))
    b_values = tuple(sorted(acc.b_values))
    temporal = acc.temporal
    if temporal <= 1 and acc.positions and len(b_values) <= 1:
        # Repeated slice positions with one b-value: volumes in time (per echo). Two copies of
        # a position are as often magnitude + map as two time points, so three are required.
        repeats = max(acc.positions.values()) // max(1, len(echo_times))
        temporal = repeats if repeats >= 3 else 1
    orientations = tuple(o for o in acc.orientations if o)
    localizer = "LOCALIZER" in image_type or (
        len({o for o in orientations if o != "oblique"}) >= 2 and acc.n_frames <= 100
    )
    spacing = _floats(ds.get("PixelSpacing"))
    thickness = _first_float(ds.get("SliceThickness"))
    for group in _frame_groups(ds):
        for item in _items(group, "PixelMeasuresSequence"):
            spacing = spacing or _floats(item.get("PixelSpacing"))
            thickness = (
                thickness if thickness is not None else _first_float(item.get("SliceThickness"))
            )
    scanning = _tokens(ds.get("ScanningSequence"))
    inversion = acc.inversion_recovery
    if inversion is None and scanning:
        inversion = "IR" in scanning
    if not scanning:
        scanning = _enhanced_scanning(ds, inversion)
    scan_options = _tokens(ds.get("ScanOptions")) + _enhanced_options(ds)
    sequence_name = _text(ds.get("SequenceName")) or _text(ds.get("PulseSequenceName"))
    if not sequence_name and manufacturer == "ge":
        sequence_name = _text(private_value(ds, GE_PULSE_SEQUENCE)) or _text(
            private_value(ds, GE_INTERNAL_SEQUENCE)
        )
    rows = _first_float(ds.get("Rows"))
    cols = _first_float(ds.get("Columns"))
    return SeriesHeader(
        series_uid=_text(ds.get("SeriesInstanceUID")),
        study_uid=_text(ds.get("StudyInstanceUID")),
        series_number=_series_number(ds),
        series_description=_text(ds.get("SeriesDescription")),
        body_part=_text(ds.get("BodyPartExamined")).upper(),
        protocol_name=_text(ds.get("ProtocolName")),
        sequence_name=sequence_name,
        manufacturer=manufacturer,
        model=_text(ds.get("ManufacturerModelName")),
        sop_class_uid=_text(ds.get("SOPClassUID")),
        modality=_text(ds.get("Modality")).upper(),
        image_type=image_type,
        scanning_sequence=scanning,
        sequence_variant=_tokens(ds.get("SequenceVariant")),
        scan_options=scan_options,
        mr_acquisition_type=_text(ds.get("MRAcquisitionType")).upper(),
        echo_pulse_sequence=_text(ds.get("EchoPulseSequence")).upper(),
        inversion_recovery=inversion,
        acquisition_contrast=tuple(acc.acquisition_contrast),
        complex_parts=tuple(acc.complex_parts),
        repetition_time_ms=acc.tr,
        echo_time_ms=echo_times[0] if echo_times else None,
        echo_times_ms=echo_times,
        inversion_time_ms=acc.ti,
        flip_angle_deg=acc.flip,
        echo_train_length=acc.etl,
        b_values=b_values,
        diffusion_directionality=tuple(acc.directionality),
        contrast_agent=acc.contrast,
        contrast_route=acc.contrast_route,
        n_instances=acc.n_instances,
        n_frames=acc.n_frames,
        n_temporal_positions=temporal,
        acquisition_times=(min(acc.times), max(acc.times)) if acc.times else None,
        orientation=orientations[0] if orientations else "",
        orientations=orientations,
        rows=int(rows) if rows is not None else None,
        cols=int(cols) if cols is not None else None,
        pixel_spacing=(spacing[0], spacing[1]) if len(spacing) >= 2 else None,
        slice_thickness=thickness,
        photometric_interpretation=_text(ds.get("PhotometricInterpretation")).upper(),
        samples_per_pixel=int(_first_float(ds.get("SamplesPerPixel")) or 1),
        is_mosaic=acc.mosaic,
        is_localizer=localizer,
        b_values_note="; ".join(acc.b_notes),
        n_set_aside=acc.n_set_aside,
    )


def _read(path: Path) -> Dataset | None:
    """One file's header (no pixels), or None when it is not DICOM."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, struct.error) as exc:
        log.info("header_unreadable", error_type=type(exc).__name__)
        return None
    if "SeriesInstanceUID" not in ds or "SOPClassUID" not in ds:
        return None
    return ds


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path


def group_key(series_uid: str, series_number: int | None, numbers: set[int | None]) -> str:
    """The series grouping key: the UID, split by SeriesNumber when one UID has several numbers."""
    if len(numbers) > 1:
        return f"{series_uid}#{series_number}"
    return series_uid


def read_series_headers(paths: Iterable[Path]) -> tuple[SeriesHeader, ...]:
    """Read every DICOM file under ``paths`` and return one header per series, by series number.

    Files are grouped by SeriesInstanceUID; a UID that carries several SeriesNumbers is split
    into one series per number (the same rule as node/dicomio.py).
    """
    return series_headers_from(ds for ds in map(_read, _files(paths)) if ds is not None)


@dataclass(slots=True)
class _Part:
    """One instance folded alone, with what grouping and ordering need (its dataset is not
    kept)."""

    facts: _Accumulator | None  # None: its header values could not be folded
    error: str
    number: int | None
    instance: int
    index: int
    image: bool


class SeriesHeaderBuilder:
    """Series header records built while the instances are read, one dataset at a time.

    Each instance is folded alone when it is added and its dataset dropped (only the first
    instance of each series is kept, for the series-level values), so a study's headers are
    never all in memory; ``build`` gives the records that grouping each series' datasets first
    and folding them at once (``header_from_datasets``) gives. One difference: an instance is
    folded under its own manufacturer's vendor rules, not the first instance's (they differ
    only in a series that mixes manufacturers). Every reader of series headers goes through it
    (``series_headers_from``, ``read_series_headers``, the pipeline's LOAD).
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[_Part]] = {}
        self._firsts: dict[tuple[str, int | None, bool], tuple[int, int, Dataset]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, ds: Dataset) -> None:
        """Fold in one instance header (skipped without SeriesInstanceUID or SOPClassUID)."""
        if "SeriesInstanceUID" not in ds or "SOPClassUID" not in ds:
            return
        uid = _text(ds.SeriesInstanceUID)
        instance, index = _instance_number(ds), self._count
        self._count += 1
        part = _Part(
            facts=None,
            error="",
            number=_series_number(ds),
            instance=instance,
            index=index,
            image=is_image_object(ds),
        )
        try:
            facts = _Accumulator(first=None, first_number=instance)
            facts.add(ds, normalise_manufacturer(_text(ds.get("Manufacturer"))))
            part.facts = facts
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            part.error = type(exc).__name__
        key = (uid, part.number, part.image)
        best = self._firsts.get(key)
        if best is None or (instance, index) < best[:2]:
            self._firsts[key] = (instance, index, ds)
        self._parts.setdefault(uid, []).append(part)

    def build(self) -> tuple[SeriesHeader, ...]:
        """One header per series, grouped and ordered as ``read_series_headers`` does."""
        headers: list[SeriesHeader] = []
        for uid, found in self._parts.items():
            images = [p for p in found if p.image]
            parts = images or found
            n_set_aside = len(found) - len(parts)
            if n_set_aside:
                log.info("non_image_objects_set_aside", series_key=uid_key(uid), count=n_set_aside)
            numbers = {p.number for p in parts}
            groups: dict[str, list[_Part]] = {}
            for p in parts:
                groups.setdefault(group_key(uid, p.number, numbers), []).append(p)
            for group in groups.values():
                try:
                    header = self._series(uid, group)
                except (AttributeError, TypeError, ValueError, KeyError) as exc:
                    log.warning(
                        "series_header_failed",
                        series_key=uid_key(uid),
                        error_type=type(exc).__name__,
                    )
                    continue
                headers.append(replace(header, n_set_aside=header.n_set_aside + n_set_aside))
        headers.sort(key=lambda h: (h.study_uid, h.series_number or 0, h.series_uid))
        return tuple(headers)

    def _series(self, uid: str, group: list[_Part]) -> SeriesHeader:
        ordered = sorted(group, key=lambda p: (p.instance, p.index))
        first = ordered[0]
        failed = next((p.error for p in ordered if p.facts is None), "")
        if failed:
            raise ValueError(f"an instance header could not be folded: {failed}")
        _, _, ds = self._firsts[(uid, first.number, first.image)]
        manufacturer = normalise_manufacturer(_text(ds.get("Manufacturer")))
        acc = _Accumulator(first=ds, first_number=first.instance)
        for p in ordered:
            assert p.facts is not None  # checked above
            acc.merge(p.facts)
        return _finish(acc, manufacturer)


def series_headers_from(datasets: Iterable[Dataset]) -> tuple[SeriesHeader, ...]:
    """One header per series from instance headers, each folded as it comes (the pipeline,
    `read_series_headers`, training and the benchmarks share SeriesHeaderBuilder, so they give
    one series the same record); datasets without SeriesInstanceUID or SOPClassUID are
    skipped."""
    builder = SeriesHeaderBuilder()
    for ds in datasets:
        builder.add(ds)
    return builder.build()

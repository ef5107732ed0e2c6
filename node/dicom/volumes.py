"""DICOM files -> series volumes: slices in spatial order with geometry and modality values.

Decisions (read these before relying on the output):

- Series split: instances are grouped by ``(SeriesInstanceUID, SeriesNumber)``. Normally a
  series has one number, so this is the series; a few sources (dcm_qa_ts: one UID, nine
  numbers in nine transfer syntaxes) reuse one UID, and those become one volume per number.
  Two volumes may then share ``series_uid``; ``series_id()`` gives a key unique in the study.
- Inside a series, frames are grouped by (matrix, orientation, has-geometry). The group with
  the most frames is the volume; frames of other groups (localizer planes, a stray reformat)
  are left out and reported as one ``DecodeProblem`` per file, never raised.
- Spatial order: ascending projection of ImagePositionPatient on the slice normal
  cross(row cosines, column cosines).
- Time series (positions repeat: fMRI, DWI directions, multi-phase): each frame's time rank is
  its rank among the frames at the same position, ordered by (TemporalPositionIndex /
  TemporalPositionIdentifier, AcquisitionNumber, InstanceNumber, frame number, file order).
  ``pixels`` is then time-major, space-minor: index = t * n_positions + k, every time point in
  the first volume's spatial order. ``slice_spacing_mm`` is the median gap between positions.
- Pixels are float32 with the modality LUT applied (RescaleSlope/Intercept; for enhanced
  objects the Pixel Value Transformation functional group per frame). Colour images are turned
  into luminance (ITU-R BT.601) so every volume is (n, rows, cols).
- Objects without geometry (some Secondary Captures) keep file and frame order, with a nominal
  geometry (origin, axial, spacing from PixelSpacing or 1 mm) and ``slice_spacing_mm`` None.
- Siemens mosaics (ImageType MOSAIC with NumberOfImagesInMosaic) are unpacked into their
  tiles, one slice each, placed as dcm2niix/nibabel do: the first tile's corner moved from the
  mosaic's corner by half the matrix difference, then SpacingBetweenSlices (else SliceThickness)
  along the slice normal, whose sign comes from the CSA header's SliceNormalVector when it can
  be read (else cross(row, col)). Tiles refer to their file with ``frame_number`` None.
- Objects without pixel data (SR, documents) are listed in the headers and make no volume.
- A file that cannot be read costs that file only: whatever pydicom or a pixel handler raises
  becomes a ``DecodeProblem`` naming the error type (never its text: it may quote a header
  value), and the study goes on.

- Two steps, so a study's memory does not grow with its size (issue 15): ``read_study`` reads
  each file's header once (pixel data deferred, not loaded) and lays every series out from the
  headers alone (grouping, order, geometry: a ``SeriesLayout``), and builds the series header
  records from the same reads; ``decode_series`` then decodes one series' pixels when a model
  needs them, file by file into one float32 volume. A file whose pixels fail then costs that
  file: the series is laid out again from the files that decoded. ``scan_study`` does both for
  every series (tests and the lab).

Why this module is long: the decisions above are one algorithm (split, group, order, scale,
unpack mosaics) over one file list, in two steps that share the private frame records (laid
out from the headers, decoded later); split across modules, each part would need them.
"""

from __future__ import annotations

import itertools
import math
import statistics
import struct
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from node.dicom.private import SIEMENS_CSA_IMAGE, SIEMENS_MOSAIC_IMAGES, private_value
from node.errors import LoadError
from node.log import get_logger, uid_key
from node.records import (
    DecodeProblem,
    InstanceHeader,
    SeriesLayout,
    SeriesVolume,
    SliceGeometry,
    SliceRef,
    StudyLoad,
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_POSITION_TOLERANCE_MM = 0.01
_ORIENTATION_TOLERANCE = 1e-3  # direction cosines; about 0.06 degrees
_REASON_CHARS = 300
_DEFER_BYTES = 4096  # values longer than this (pixel data) are not read with the header

SeriesId = tuple[str, int | None]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Frame:
    """One frame of one decoded file, with what ordering and scaling need."""

    file_index: int
    frame_index: int  # 0-based index into the file's decoded pixels
    frame_number: int | None  # 1-based for multi-frame objects, None for single-frame
    geometry: SliceGeometry | None
    slope: float
    intercept: float
    time_key: tuple[float, ...]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class _Meta:
    """One file as its header describes it: its frames and the shape of each decoded frame."""

    header: InstanceHeader
    frames: tuple[_Frame, ...]
    shape: tuple[int, int]  # rows, cols of each decoded frame (of each tile of a mosaic)
    mosaic: tuple[int, int] | None = None  # (tiles, grid) of a Siemens mosaic


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class _Plan:
    """How a layout is decoded: the series' files (file order) and, per slice, its frame."""

    sid: SeriesId
    metas: tuple[_Meta, ...]
    ordered: tuple[tuple[_Meta, _Frame], ...]


def series_id(header: InstanceHeader) -> SeriesId:
    """The key that splits a study into series: (SeriesInstanceUID, SeriesNumber)."""
    return (header.series_uid, header.series_number)


def volume_id(volume: SeriesVolume | SeriesLayout) -> SeriesId:
    """The same key for an assembled volume (or its layout)."""
    return (volume.series_uid, volume.series_number)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _float_or(value: Any, default: float) -> float:
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in _PIXEL_KEYWORDS)


def _header(path: Path, ds: Dataset, *, has_pixels: bool) -> InstanceHeader:
    """The header record of a dataset; raise LoadError when its UIDs are missing."""
    missing = [
        k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if k not in ds
    ]
    if missing:
        raise LoadError(f"missing {', '.join(missing)}")
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    image_type = ds.get("ImageType")
    if image_type is None:
        types: tuple[str, ...] = ()
    elif isinstance(image_type, str):
        types = (image_type,)
    else:
        types = tuple(str(v) for v in image_type)
    n_frames = (_int_or_none(ds.get("NumberOfFrames")) or 1) if has_pixels else 0
    return InstanceHeader(
        path=path,
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        series_description=str(ds.get("SeriesDescription", "")),
        modality=str(ds.get("Modality", "")),
        transfer_syntax_uid=ts,
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        n_frames=n_frames,
        image_type=types,
        photometric=str(ds.PhotometricInterpretation)
        if "PhotometricInterpretation" in ds
        else None,
        has_pixels=has_pixels,
    )


# What reading one file may raise: pydicom on a malformed header or value, its pixel
# handlers on a stream they cannot decode (NotImplementedError for an unsupported one).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    InvalidDicomError,
    BytesLengthException,  # a value whose length is not a multiple of its VR's size
    LoadError,
    OSError,
    ValueError,
    TypeError,
    EOFError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    RuntimeError,
    MemoryError,
    struct.error,
)


def _reason(exc: BaseException) -> str:
    """What the audit says about a file: our own message, or only the type of a third-party
    error (its text may quote header values, e.g. a birth date pydicom cannot convert)."""
    if isinstance(exc, LoadError):
        return f"{type(exc).__name__}: {exc}"[:_REASON_CHARS]
    return type(exc).__name__


def read_headers(
    paths: Sequence[Path],
) -> tuple[tuple[InstanceHeader, ...], tuple[DecodeProblem, ...]]:
    """Read only the headers of the files (fast: pixel data is not read)."""
    headers: list[InstanceHeader] = []
    problems: list[DecodeProblem] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            # stop_before_pixels hides PixelData: look at the tags the header does carry.
            has_pixels = "Rows" in ds and "Columns" in ds
            headers.append(_header(Path(path), ds, has_pixels=has_pixels))
        except _READ_ERRORS as exc:
            problems.append(DecodeProblem(path=Path(path), series_uid=None, reason=_reason(exc)))
    return tuple(headers), tuple(problems)


def _item(groups: Iterable[Dataset | None], keyword: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame first, then shared."""
    for group in groups:
        if group is not None and keyword in group:
            seq = group[keyword].value
            if len(seq):
                first: Dataset = seq[0]
                return first
    return None


def _geometry(
    position: Any, orientation: Any, spacing: Any, thickness: Any
) -> SliceGeometry | None:
    if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
        return None
    pos = tuple(float(v) for v in position)
    ori = tuple(float(v) for v in orientation)
    if spacing is not None and len(spacing) == 2:
        ps = (float(spacing[0]), float(spacing[1]))
    else:
        ps = (1.0, 1.0)
    return SliceGeometry(
        position=(pos[0], pos[1], pos[2]),
        orientation=(ori[0], ori[1], ori[2], ori[3], ori[4], ori[5]),
        pixel_spacing=ps,
        slice_thickness=_float_or(thickness, 0.0) if thickness not in (None, "") else None,
    )


def _frames(ds: Dataset, file_index: int, n_frames: int) -> tuple[_Frame, ...]:
    """Geometry, rescale and time key of every frame of a dataset (enhanced or classic)."""
    base_time = (
        _float_or(ds.get("TemporalPositionIdentifier"), 0.0),
        _float_or(ds.get("AcquisitionNumber"), 0.0),
        _float_or(ds.get("InstanceNumber"), 0.0),
    )
    slope = _float_or(ds.get("RescaleSlope"), 1.0)
    intercept = _float_or(ds.get("RescaleIntercept"), 0.0)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq is not None and len(shared_seq) else None
    if per_frame is None and shared is None:
        # Classic object; a classic multi-frame without per-frame geometry cannot place its
        # frames in space, so its frames keep their stored order.
        geom = _geometry(
            ds.get("ImagePositionPatient"),
            ds.get("ImageOrientationPatient"),
            spacing,
            ds.get("SliceThickness"),
        )
        return tuple(
            _Frame(
                file_index=file_index,
                frame_index=i,
                frame_number=i + 1 if n_frames > 1 else None,
                geometry=geom if n_frames == 1 else None,
                slope=slope,
                intercept=intercept,
                time_key=(*base_time, float(i)),
            )
            for i in range(n_frames)
        )
    frames = []
    for i in range(n_frames):
        fg = per_frame[i] if per_frame is not None and i < len(per_frame) else None
        groups = (fg, shared)
        pos_item = _item(groups, "PlanePositionSequence")
        ori_item = _item(groups, "PlaneOrientationSequence")
        meas = _item(groups, "PixelMeasuresSequence")
        pvt = _item(groups, "PixelValueTransformationSequence")
        content = _item(groups, "FrameContentSequence")
        geom = _geometry(
            pos_item.get("ImagePositionPatient") if pos_item is not None else None,
            ori_item.get("ImageOrientationPatient") if ori_item is not None else None,
            meas.get("PixelSpacing") if meas is not None else spacing,
            meas.get("SliceThickness") if meas is not None else ds.get("SliceThickness"),
        )
        temporal = content.get("TemporalPositionIndex") if content is not None else None
        acquisition = content.get("FrameAcquisitionNumber") if content is not None else None
        frames.append(
            _Frame(
                file_index=file_index,
                frame_index=i,
                frame_number=i + 1,
                geometry=geom,
                slope=_float_or(pvt.get("RescaleSlope"), slope) if pvt is not None else slope,
                intercept=_float_or(pvt.get("RescaleIntercept"), intercept)
                if pvt is not None
                else intercept,
                time_key=(
                    _float_or(temporal, base_time[0]),
                    _float_or(acquisition, base_time[1]),
                    base_time[2],
                    float(i),
                ),
            )
        )
    return tuple(frames)


def _csa_slice_normal(raw: bytes) -> tuple[float, float, float] | None:
    """SliceNormalVector from a Siemens CSA2 ("SV10") image header, or None if absent/unreadable."""
    try:
        if raw[:4] != b"SV10":
            return None
        n_tags = struct.unpack_from("<I", raw, 8)[0]
        pos = 16
        for _ in range(n_tags):
            name = raw[pos : pos + 64].split(b"\0", 1)[0].decode("ascii", "replace")
            n_items = struct.unpack_from("<i", raw, pos + 76)[0]
            pos += 84
            values: list[str] = []
            for _ in range(n_items):
                item_len = struct.unpack_from("<i", raw, pos + 4)[0]
                pos += 16
                values.append(raw[pos : pos + item_len].split(b"\0", 1)[0].decode("ascii"))
                pos += (item_len + 3) // 4 * 4
            if name == "SliceNormalVector":
                numbers = [float(v) for v in values if v.strip()]
                return (numbers[0], numbers[1], numbers[2]) if len(numbers) >= 3 else None
    except (struct.error, ValueError, UnicodeDecodeError):
        return None
    return None


def _mosaic_layout(
    ds: Dataset, header: InstanceHeader
) -> tuple[int, int, int, int, list[tuple[float, float, float]]] | None:
    """A Siemens mosaic's (tiles, grid, tile rows, tile cols, tile positions); None if the file
    is not one. Read from the header alone, so a series is laid out before it is decoded."""
    if "MOSAIC" not in header.image_type or header.n_frames != 1:
        return None
    count = _int_or_none(private_value(ds, SIEMENS_MOSAIC_IMAGES))
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if not count or count < 1 or position is None or orientation is None:
        return None
    if header.rows is None or header.columns is None:
        return None
    grid = math.ceil(math.sqrt(count))
    rows, cols = header.rows // grid, header.columns // grid
    if rows * grid != header.rows or cols * grid != header.columns:
        return None
    row_cos = np.asarray([float(v) for v in orientation[:3]])
    col_cos = np.asarray([float(v) for v in orientation[3:]])
    spacing = ds.get("PixelSpacing") or (1.0, 1.0)
    corner = (
        np.asarray([float(v) for v in position])
        + row_cos * float(spacing[1]) * (header.columns - cols) / 2
        + col_cos * float(spacing[0]) * (header.rows - rows) / 2
    )
    normal = np.cross(row_cos, col_cos)
    csa = private_value(ds, SIEMENS_CSA_IMAGE)
    csa_normal = _csa_slice_normal(bytes(csa)) if isinstance(csa, bytes) else None
    if csa_normal is not None and float(np.dot(normal, csa_normal)) < 0:
        normal = -normal
    step = _float_or(ds.get("SpacingBetweenSlices"), _float_or(ds.get("SliceThickness"), 1.0))
    positions = [tuple(float(v) for v in corner + k * step * normal) for k in range(count)]
    return count, grid, rows, cols, [(p[0], p[1], p[2]) for p in positions]


def _meta(path: Path, file_index: int, ds: Dataset) -> _Meta | InstanceHeader:
    """What one file's header says about its frames; only its header if it has no pixels."""
    has_pixels = _has_pixels(ds)
    header = _header(path, ds, has_pixels=has_pixels)
    if not has_pixels:
        return header
    if header.rows is None or header.columns is None:
        raise LoadError("pixel data without Rows and Columns")
    frames = _frames(ds, file_index, header.n_frames)
    mosaic = _mosaic_layout(ds, header)
    if mosaic is not None and frames[0].geometry is not None:
        count, grid, rows, cols, positions = mosaic
        template = frames[0]
        geom = template.geometry
        assert geom is not None
        frames = tuple(
            replace(
                template,
                frame_index=k,
                geometry=replace(geom, position=pos),
                time_key=(*template.time_key, float(k)),
            )
            for k, pos in enumerate(positions)
        )
        return _Meta(header=header, frames=frames, shape=(rows, cols), mosaic=(count, grid))
    return _Meta(header=header, frames=frames, shape=(header.rows, header.columns))


def _file_pixels(meta: _Meta) -> npt.NDArray[Any]:
    """Decode one file's stored pixels as (frames or tiles, rows, cols); LoadError when they do
    not match what its header promised."""
    ds = pydicom.dcmread(meta.header.path)
    if not _has_pixels(ds):
        raise LoadError("no pixel data")
    arr = np.asarray(ds.pixel_array)
    samples = _int_or_none(ds.get("SamplesPerPixel")) or 1
    n_frames = meta.header.n_frames
    del ds
    if samples > 1:
        # pydicom gives colour as RGB in the last axis; keep one grey channel (luminance).
        if arr.ndim == 3 and n_frames == 1:
            arr = arr[None]
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif arr.ndim == 2:
        arr = arr[None]
    if arr.shape[0] != n_frames:
        raise LoadError(f"decoded {arr.shape[0]} frames, header says {n_frames}")
    if meta.mosaic is not None:
        count, grid = meta.mosaic
        rows, cols = meta.shape
        arr = np.ascontiguousarray(
            arr[0, : rows * grid, : cols * grid]
            .reshape(grid, rows, grid, cols)
            .transpose(0, 2, 1, 3)
            .reshape(grid * grid, rows, cols)[:count]
        )
    if tuple(arr.shape[1:3]) != meta.shape:
        raise LoadError(f"decoded {arr.shape[1]}x{arr.shape[2]} pixels, header says {meta.shape}")
    return arr


def _normal(orientation: tuple[float, ...]) -> npt.NDArray[np.float64]:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    return np.cross(row, col)


def _group_key(dec: _Meta, frame: _Frame, seen: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Frames of one volume share matrix, orientation (within tolerance) and having geometry.

    A frame joins the first group already ``seen`` whose orientation is within
    ``_ORIENTATION_TOLERANCE`` of its own (no rounding boundary can split a stack).
    """
    shape = dec.shape
    if frame.geometry is None:
        key: tuple[Any, ...] = (shape, None)
    else:
        ori = frame.geometry.orientation
        for known in seen:
            if (
                known[0] == shape
                and known[1] is not None
                and max(abs(a - b) for a, b in zip(ori, known[1], strict=True))
                < _ORIENTATION_TOLERANCE
            ):
                return known
        key = (shape, tuple(round(v, 4) + 0.0 for v in ori))
    if key not in seen:
        seen.append(key)
    return key


def _order(
    frames: Sequence[tuple[_Meta, _Frame]],
) -> tuple[list[tuple[_Meta, _Frame]], float | None]:
    """Frames in time-major, space-minor order, and the spacing between positions."""
    if any(f.geometry is None for _, f in frames):
        ordered = sorted(
            frames,
            key=lambda df: (df[0].header.instance_number or 0, df[1].file_index, df[1].frame_index),
        )
        return ordered, None
    first = frames[0][1].geometry
    assert first is not None
    normal = _normal(first.orientation)
    dist = [float(np.dot(normal, f.geometry.position)) for _, f in frames if f.geometry]
    # Cluster projected positions: equal within tolerance = the same slice location.
    order = sorted(range(len(frames)), key=lambda i: dist[i])
    location = [0] * len(frames)
    centres: list[float] = []
    for i in order:
        if not centres or dist[i] - centres[-1] > _POSITION_TOLERANCE_MM:
            centres.append(dist[i])
        location[i] = len(centres) - 1
    by_location: dict[int, list[int]] = defaultdict(list)
    for i in range(len(frames)):
        by_location[location[i]].append(i)
    rank = [0] * len(frames)
    for members in by_location.values():
        members.sort(key=lambda i: (frames[i][1].time_key, frames[i][1].file_index))
        for r, i in enumerate(members):
            rank[i] = r
    ordered_idx = sorted(range(len(frames)), key=lambda i: (rank[i], location[i]))
    gaps = [b - a for a, b in itertools.pairwise(centres)]
    spacing = float(statistics.median(gaps)) if gaps else None
    return [frames[i] for i in ordered_idx], spacing


def _layout(
    sid: SeriesId, metas: Sequence[_Meta]
) -> tuple[SeriesLayout | None, list[DecodeProblem]]:
    """One series laid out from its files' headers; frames of other geometries become problems."""
    groups: dict[tuple[Any, ...], list[tuple[_Meta, _Frame]]] = defaultdict(list)
    seen: list[tuple[Any, ...]] = []
    for dec in metas:
        for frame in dec.frames:
            groups[_group_key(dec, frame, seen)].append((dec, frame))
    if not groups:
        return None, []
    # Largest group wins; ties go to the group seen first (dict order follows file order).
    main_key = max(groups, key=lambda k: len(groups[k]))
    problems: list[DecodeProblem] = []
    main_paths = {dec.header.path for dec, _ in groups[main_key]}
    for key, members in groups.items():
        if key == main_key:
            continue
        left_out = Counter(dec.header.path for dec, _ in members)
        (rows, cols), ori = key
        for path, n in left_out.items():
            where = "also holds frames kept; " if path in main_paths else ""
            problems.append(
                DecodeProblem(
                    path=path,
                    series_uid=sid[0],
                    reason=(
                        f"mixed geometry: {where}{n} frame(s) of {rows}x{cols} "
                        f"orientation {ori} left out; the series volume keeps "
                        f"{len(groups[main_key])} frame(s) of {main_key[0][0]}x{main_key[0][1]}"
                    ),
                )
            )
    ordered, spacing = _order(groups[main_key])
    rows, cols = main_key[0]
    slices = []
    for i, (dec, frame) in enumerate(ordered):
        geom = frame.geometry
        if geom is None:
            geom = SliceGeometry(
                position=(0.0, 0.0, float(i)),
                orientation=_AXIAL,
                pixel_spacing=(1.0, 1.0),
                slice_thickness=None,
            )
        slices.append(
            SliceRef(
                path=dec.header.path,
                sop_class_uid=dec.header.sop_class_uid,
                sop_instance_uid=dec.header.sop_instance_uid,
                frame_number=frame.frame_number,
                geometry=geom,
            )
        )
    used = {dec.header.path for dec, _ in ordered}
    layout = SeriesLayout(
        study_uid=metas[0].header.study_uid,
        series_uid=sid[0],
        series_number=sid[1],
        shape=(len(ordered), rows, cols),
        slices=tuple(slices),
        slice_spacing_mm=spacing,
        n_instances=len(used),
        n_frames=len(ordered),
        plan=_Plan(sid=sid, metas=tuple(metas), ordered=tuple(ordered)),
    )
    return layout, problems


def _fill(layout: SeriesLayout, plan: _Plan) -> tuple[SeriesVolume | None, list[DecodeProblem]]:
    """Decode the layout's files one at a time into its float32 volume (modality LUT applied)."""
    by_file: dict[Path, list[int]] = {}
    for i, (dec, _) in enumerate(plan.ordered):
        by_file.setdefault(dec.header.path, []).append(i)
    metas = {dec.header.path: dec for dec, _ in plan.ordered}
    pixels = np.empty(layout.shape, dtype=np.float32)
    problems: list[DecodeProblem] = []
    for path, indices in by_file.items():
        try:
            stored = _file_pixels(metas[path])
        except Exception as exc:  # per-file guard: decoders raise anything
            problems.append(DecodeProblem(path=path, series_uid=plan.sid[0], reason=_reason(exc)))
            log.warning(
                "instance_not_decoded",
                series_key=uid_key(plan.sid[0]),
                error_type=type(exc).__name__,
            )
            continue
        for i in indices:
            frame = plan.ordered[i][1]
            plane = stored[frame.frame_index]
            if frame.slope != 1.0 or frame.intercept != 0.0:
                np.multiply(plane, frame.slope, out=pixels[i], casting="unsafe")
                pixels[i] += frame.intercept
            else:
                pixels[i] = plane
        del stored
    if problems:
        return None, problems
    volume = SeriesVolume(
        study_uid=layout.study_uid,
        series_uid=layout.series_uid,
        series_number=layout.series_number,
        pixels=pixels,
        slices=layout.slices,
        slice_spacing_mm=layout.slice_spacing_mm,
        n_instances=layout.n_instances,
        n_frames=layout.n_frames,
    )
    return volume, problems


def decode_series(layout: SeriesLayout) -> tuple[SeriesVolume | None, tuple[DecodeProblem, ...]]:
    """The series' volume, decoded now (one file at a time), and the files whose pixels failed.

    A failed file costs that file only: the series is laid out again from the files that
    decoded (the group, order and spacing they make) and decoded again. None when no file
    of the series decodes.
    """
    volume, problems, _ = _decode_series(layout)
    return volume, problems


def _decode_series(
    layout: SeriesLayout,
) -> tuple[SeriesVolume | None, tuple[DecodeProblem, ...], SeriesLayout | None]:
    """decode_series, and the layout the volume was decoded from (None: nothing decoded)."""
    plan = layout.plan
    if not isinstance(plan, _Plan):
        raise TypeError("layout: a SeriesLayout made by node.dicom.volumes is needed")
    volume, problems = _fill(layout, plan)
    failed = {p.path for p in problems}
    final: SeriesLayout | None = layout
    while volume is None and failed:
        kept = [m for m in plan.metas if m.header.path not in failed]
        final, _ = _layout(plan.sid, kept) if kept else (None, [])
        if final is None:
            break
        assert isinstance(final.plan, _Plan)
        volume, more = _fill(final, final.plan)
        problems.extend(more)
        failed |= {p.path for p in more}
        plan = final.plan
    return volume, tuple(problems), final if volume is not None else None


def _read_one(
    path: Path, index: int
) -> tuple[_Meta | InstanceHeader | None, Dataset | None, DecodeProblem | None]:
    """One file's header read (pixel data deferred): its record, its dataset, or its problem."""
    ds: Dataset | None = None
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        return _meta(path, index, ds), ds, None
    except Exception as exc:  # per-file guard: pydicom and header values raise anything
        # One bad file must not sink the study: record it and go on. Its header is still
        # listed when it was readable, so the audit shows which series it belonged to.
        header = _header_of_failed(path, ds)
        log.warning(
            "instance_not_decoded",
            series_key=uid_key(header.series_uid) if header is not None else None,
            error_type=type(exc).__name__,
        )
        problem = DecodeProblem(
            path=path,
            series_uid=header.series_uid if header is not None else None,
            reason=_reason(exc),
        )
        return header, None, problem


def _header_of_failed(path: Path, ds: Dataset | None) -> InstanceHeader | None:
    """The header of a file that could not be laid out, or None if even that is unreadable."""
    if ds is None:
        headers, _ = read_headers((path,))
        return headers[0] if headers else None
    try:
        return _header(path, ds, has_pixels="Rows" in ds and "Columns" in ds)
    except _READ_ERRORS:
        return None


def read_study(
    paths: Sequence[Path], *, ignore: Callable[[InstanceHeader], bool] | None = None
) -> tuple[StudyLoad, int]:
    """Read every file's header once: instance headers, series layouts (no pixels decoded),
    series header records and what failed; files for which ``ignore`` is true are left out
    (returned: how many)."""
    from node.dicom.headers import SeriesHeaderBuilder

    headers: list[InstanceHeader] = []
    problems: list[DecodeProblem] = []
    by_series: dict[SeriesId, list[_Meta]] = defaultdict(list)
    # The series header records come from the same reads, folded as they come (the datasets
    # are not kept): image files, or every header of a study without any.
    images, others = SeriesHeaderBuilder(), SeriesHeaderBuilder()
    n_ignored = 0
    for index, raw in enumerate(paths):
        path = Path(raw)
        record, ds, problem = _read_one(path, index)
        header = record.header if isinstance(record, _Meta) else record
        if header is not None and ignore is not None and ignore(header):
            n_ignored += 1
            continue
        if problem is not None:
            problems.append(problem)
        if header is None:
            continue
        headers.append(header)
        if ds is not None:
            (images if header.has_pixels else others).add(ds)
        del ds
        if isinstance(record, _Meta):
            by_series[series_id(header)].append(record)
    layouts = []
    for sid, metas in by_series.items():
        layout, extra = _layout(sid, metas)
        if extra:
            log.info("series_frames_left_out", series_key=uid_key(sid[0]), count=len(extra))
        problems.extend(extra)
        if layout is not None:
            layouts.append(layout)
    layouts.sort(
        key=lambda v: (v.series_number if v.series_number is not None else -1, v.series_uid)
    )
    series_headers = (images if len(images) else others).build()
    del images, others
    load = StudyLoad(
        headers=tuple(headers),
        layouts=tuple(layouts),
        problems=tuple(problems),
        series_headers=series_headers,
    )
    return load, n_ignored


class LazyVolumes:
    """Series volumes by (SeriesInstanceUID, SeriesNumber), decoded when asked for.

    Nothing is kept: each request decodes the series again, and a volume lives only as long as
    its caller holds it, so a study costs one series' pixels at a time (two for a T1 pair).
    The files whose pixels failed are collected in ``problems`` (each once).
    """

    def __init__(self, layouts: Iterable[SeriesLayout]) -> None:
        self._layouts = {volume_id(layout): layout for layout in layouts}
        self._seen: set[Path] = set()
        self.problems: list[DecodeProblem] = []
        # Series whose files did not all decode: the layout of the volume they made instead
        # (None: no file decoded), so the audit describes the volume the models read.
        self.relaid: dict[SeriesId, SeriesLayout | None] = {}

    def get(self, key: SeriesId, /) -> SeriesVolume | None:
        """The series' volume (None: no such series, or no file of it decodes)."""
        layout = self._layouts.get(key)
        if layout is None:
            return None
        volume, problems, final = _decode_series(layout)
        if problems:
            self.relaid[key] = final
            if final is not None:
                self._layouts[key] = final
            else:
                del self._layouts[key]
        for problem in problems:
            if problem.path not in self._seen:
                self._seen.add(problem.path)
                self.problems.append(problem)
        return volume

    def layouts(self, original: Iterable[SeriesLayout]) -> tuple[SeriesLayout, ...]:
        """``original`` with the layouts of series laid out again (or dropped) on decoding."""
        out: list[SeriesLayout] = []
        for layout in original:
            key = volume_id(layout)
            if key not in self.relaid:
                out.append(layout)
            elif (again := self.relaid[key]) is not None:
                out.append(again)
        return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class DecodedStudy:
    """A study with every series decoded (``scan_study``: tests, the lab)."""

    headers: tuple[InstanceHeader, ...]
    volumes: tuple[SeriesVolume, ...]
    problems: tuple[DecodeProblem, ...]


def scan_study(paths: Sequence[Path]) -> DecodedStudy:
    """Read every file of a study and decode every series: headers, volumes, what failed."""
    load, _ = read_study(paths)
    problems = list(load.problems)
    volumes = []
    for layout in load.layouts:
        volume, failed = decode_series(layout)
        problems.extend(failed)
        if volume is not None:
            volumes.append(volume)
    return DecodedStudy(headers=load.headers, volumes=tuple(volumes), problems=tuple(problems))


def load_study(
    paths: Sequence[Path],
) -> tuple[tuple[SeriesVolume, ...], tuple[DecodeProblem, ...]]:
    """Every series of a study as ordered volumes, plus the files that could not be used."""
    loaded = scan_study(paths)
    return loaded.volumes, loaded.problems


def load_series(paths: Sequence[Path]) -> SeriesVolume:
    """The files of one series as one ordered volume; LoadError if that is not what they are."""
    volumes, problems = load_study(paths)
    if len(volumes) != 1:
        detail = f"; first problem: {problems[0].reason}" if problems else ""
        raise LoadError(f"expected one series with pixels, found {len(volumes)}{detail}")
    return volumes[0]

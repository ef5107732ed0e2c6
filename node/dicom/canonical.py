"""One canonical geometry for every series: axial slices, read as a radiologist reads them.

Models were trained on axial slices; scanners also send sagittal and coronal series, 2D and
3D. Before a model reads a series, its volume is turned into axial slices from its DICOM
geometry (ImageOrientationPatient, the slice order along the normal, PixelSpacing and the slice
spacing): slices run feet to head, rows anterior to posterior, columns patient right to left
(the standard axial display), with square pixels, padded to a square field of view so a model's
resize never stretches anatomy (a sagittal slab becomes a band across the axial slice). Only
axis permutations, flips, an in-plane linear resampling and padding are used, so an axial
series keeps its slices and every canonical voxel
maps back to the source grid exactly (`to_source`), which is how Grad-CAM maps computed on
canonical slices return to the source slices for the Secondary Captures.

A series whose slices are not one spatial stack (a time series, repeated positions) or whose
orientation is missing is left as it is (plane "unknown"). Pure numpy and scipy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from node.records import FloatArray, SeriesVolume

# Target direction of each canonical axis in patient (LPS) coordinates: slices towards the head
# (+z), rows towards posterior (+y), columns towards the patient's left (+x).
_TARGET = ((2, 1.0), (1, 1.0), (0, 1.0))
_PLANE_OF_NORMAL = {0: "sagittal", 1: "coronal", 2: "axial"}


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class CanonicalVolume:
    """A series' pixels as canonical axial slices, and how they map back to the source grid."""

    pixels: FloatArray  # (slices feet->head, rows A->P, cols R->L)
    plane: str  # the source's acquisition plane: axial, sagittal, coronal or unknown
    axes: tuple[int, int, int]  # canonical axis k is source axis axes[k]
    flips: tuple[bool, bool, bool]  # canonical axis k runs against source axis axes[k]
    zoom: tuple[float, float]  # in-plane factors applied to canonical rows and columns
    permuted_shape: tuple[int, int, int]  # canonical shape before the in-plane zoom
    spacing_mm: tuple[float, float, float]  # canonical voxel size (slice, row, column)
    pad: tuple[int, int] = (0, 0)  # rows, columns added before the data (half the padding)
    unpadded_shape: tuple[int, int] | None = None  # in-plane shape before padding
    # Patient (LPS) position of canonical voxel (0, 0, 0); voxel (z, y, x) sits at
    # origin + (x * spacing[2], y * spacing[1], z * spacing[0]). None when unknown.
    origin_mm: tuple[float, float, float] | None = None

    @property
    def slice_aligned(self) -> bool:
        """True when canonical slice k is source slice k (at most padded to a square)."""
        return self.axes == (0, 1, 2) and not any(self.flips) and self.zoom == (1.0, 1.0)

    @property
    def identity(self) -> bool:
        """True when the canonical pixels are the source pixels themselves."""
        unpadded = self.unpadded_shape is None or self.unpadded_shape == self.pixels.shape[1:]
        return (
            self.axes == (0, 1, 2) and not any(self.flips) and self.zoom == (1.0, 1.0) and unpadded
        )


def _source_axes(volume: SeriesVolume) -> tuple[npt.NDArray[np.float64], ...] | None:
    """Unit direction (LPS) of source axes (slice, row index, column index), or None."""
    first, last = volume.slices[0].geometry, volume.slices[-1].geometry
    ori = np.asarray(first.orientation, dtype=np.float64)
    if ori.shape != (6,) or not np.all(np.isfinite(ori)):
        return None
    row_cos, col_cos = ori[:3], ori[3:]
    if np.linalg.norm(row_cos) < 0.5 or np.linalg.norm(col_cos) < 0.5:
        return None
    normal = np.cross(row_cos, col_cos)
    if len(volume.slices) > 1:
        step = np.asarray(last.position, dtype=np.float64) - np.asarray(first.position)
        if float(np.dot(step, normal)) < 0:
            normal = -normal
    # pixels[k, r, c]: r moves along the column cosines, c along the row cosines.
    return (
        normal / np.linalg.norm(normal),
        col_cos / np.linalg.norm(col_cos),
        row_cos / np.linalg.norm(row_cos),
    )


def _one_stack(volume: SeriesVolume) -> bool:
    """Slices strictly ascending along their normal: one spatial stack, no repeats."""
    if len(volume.slices) != volume.pixels.shape[0]:
        return False
    ori = np.asarray(volume.slices[0].geometry.orientation, dtype=np.float64)
    normal = np.cross(ori[:3], ori[3:])
    d = np.array([float(np.dot(normal, s.geometry.position)) for s in volume.slices])
    return bool(len(d) < 2 or np.all(np.diff(d) > 1e-3) or np.all(np.diff(d) < -1e-3))


def _assign(directions: tuple[npt.NDArray[np.float64], ...]) -> tuple[int, int, int] | None:
    """Source axis for each patient axis (x, y, z): the best one-to-one match by |cosine|."""
    weights = np.abs(np.stack(directions))  # [source axis, patient axis]
    best: tuple[float, tuple[int, int, int]] | None = None
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        # perm[p] = source axis that carries patient axis p
        score = float(sum(weights[perm[p], p] for p in range(3)))
        if best is None or score > best[0] + 1e-9:
            best = (score, perm)
    return None if best is None else best[1]


def canonical_axial(volume: SeriesVolume) -> CanonicalVolume:
    """The series as canonical axial slices (the source itself when it already is one)."""
    pixels = np.asarray(volume.pixels, dtype=np.float32)
    unchanged = CanonicalVolume(
        pixels=pixels,
        plane="unknown",
        axes=(0, 1, 2),
        flips=(False, False, False),
        zoom=(1.0, 1.0),
        permuted_shape=(int(pixels.shape[0]), int(pixels.shape[1]), int(pixels.shape[2])),
        spacing_mm=(1.0, 1.0, 1.0),
    )
    if pixels.ndim != 3 or not volume.slices or not _one_stack(volume):
        return unchanged
    directions = _source_axes(volume)
    if directions is None:
        return unchanged
    geom = volume.slices[0].geometry
    slice_mm = volume.slice_spacing_mm or geom.slice_thickness or 1.0
    source_mm = (float(slice_mm), float(geom.pixel_spacing[0]), float(geom.pixel_spacing[1]))
    carrier = _assign(directions)
    if carrier is None:
        return unchanged
    plane = _PLANE_OF_NORMAL[int(np.argmax(np.abs(directions[0])))]
    axes_list: list[int] = []
    flips_list: list[bool] = []
    for patient_axis, sign in _TARGET:
        src = carrier[patient_axis]
        axes_list.append(src)
        flips_list.append(bool(directions[src][patient_axis] * sign < 0))
    axes = (axes_list[0], axes_list[1], axes_list[2])
    flips = (flips_list[0], flips_list[1], flips_list[2])
    out = np.transpose(pixels, axes)
    for k, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=k)
    permuted_shape = (int(out.shape[0]), int(out.shape[1]), int(out.shape[2]))
    mm = tuple(source_mm[a] for a in axes)
    target = min(mm[1], mm[2])
    zoom = (mm[1] / target, mm[2] / target)
    if zoom != (1.0, 1.0):
        out = ndimage.zoom(out, (1.0, zoom[0], zoom[1]), order=1, mode="nearest", grid_mode=True)
    unpadded = (int(out.shape[1]), int(out.shape[2]))
    out, pad = _square(out)
    origin = _origin(volume, axes, flips, permuted_shape, source_mm, target)
    origin = (origin[0] - pad[1] * target, origin[1] - pad[0] * target, origin[2])
    return CanonicalVolume(
        pixels=np.ascontiguousarray(out, dtype=np.float32),
        pad=pad,
        unpadded_shape=unpadded,
        origin_mm=origin,
        plane=plane,
        axes=axes,
        flips=flips,
        zoom=(float(zoom[0]), float(zoom[1])),
        permuted_shape=permuted_shape,
        spacing_mm=(mm[0], target, target),
    )


def _square(pixels: FloatArray) -> tuple[FloatArray, tuple[int, int]]:
    """Pad rows or columns (with the volume's background, its minimum) to a square slice."""
    rows, cols = int(pixels.shape[1]), int(pixels.shape[2])
    if rows == cols:
        return pixels, (0, 0)
    side = max(rows, cols)
    before = ((side - rows) // 2, (side - cols) // 2)
    widths = ((0, 0), (before[0], side - rows - before[0]), (before[1], side - cols - before[1]))
    background = float(pixels.min()) if pixels.size else 0.0
    return np.pad(pixels, widths, mode="constant", constant_values=background), before


def _origin(
    volume: SeriesVolume,
    axes: tuple[int, int, int],
    flips: tuple[bool, bool, bool],
    shape: tuple[int, int, int],
    source_mm: tuple[float, float, float],
    target_mm: float,
) -> tuple[float, float, float]:
    """Patient position of canonical voxel (0, 0, 0) (approximate for oblique slices)."""
    first = [0, 0, 0]  # the source voxel (slice, row, column) that becomes canonical (0, 0, 0)
    for k in range(3):
        if flips[k]:
            first[axes[k]] = shape[k] - 1
    geom = volume.slices[first[0]].geometry
    ori = np.asarray(geom.orientation, dtype=np.float64)
    point = (
        np.asarray(geom.position, dtype=np.float64)
        + first[1] * geom.pixel_spacing[0] * ori[3:]
        + first[2] * geom.pixel_spacing[1] * ori[:3]
    )
    # In-plane resampling (grid mode) moves the first voxel centre by half a voxel difference.
    for k, patient_axis in ((1, 1), (2, 0)):
        point[patient_axis] += 0.5 * (target_mm - source_mm[axes[k]])
    return (float(point[0]), float(point[1]), float(point[2]))


def resample_onto(
    moving: CanonicalVolume, fixed: CanonicalVolume, *, min_overlap: float = 0.5
) -> tuple[FloatArray, FloatArray] | None:
    """Both series on the fixed series' canonical grid, cut to where they overlap.

    Returns (fixed pixels, moving pixels resampled), the same shape, or None when the two do
    not share geometry (an unknown origin) or overlap on less than `min_overlap` of the fixed
    grid. Canonical grids are axis-aligned, so this is a scaling and a shift per axis.
    """
    fixed_view, moving_view = _data(fixed), _data(moving)
    if fixed_view is None or moving_view is None:
        return None
    (fixed_pixels, fixed_origin), (moving_pixels, moving_origin) = fixed_view, moving_view
    scale = []
    offset = []
    for k, patient_axis in ((0, 2), (1, 1), (2, 0)):
        scale.append(fixed.spacing_mm[k] / moving.spacing_mm[k])
        shift = fixed_origin[patient_axis] - moving_origin[patient_axis]
        offset.append(shift / moving.spacing_mm[k])
    resampled = ndimage.affine_transform(
        moving_pixels,
        np.asarray(scale),
        offset=np.asarray(offset),
        output_shape=fixed_pixels.shape,
        order=1,
        mode="constant",
        cval=np.nan,
    )
    inside = np.isfinite(resampled)
    if inside.mean() < min_overlap:
        return None
    zs, ys, xs = (np.flatnonzero(inside.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    box = np.s_[zs[0] : zs[-1] + 1, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    # Outside the moving series: 0, in place (the resampled volume is this function's own),
    # so a long series is not copied twice more.
    np.copyto(resampled, np.float32(0.0), where=~inside)
    del inside
    moved = np.ascontiguousarray(resampled[box], dtype=np.float32)
    del resampled
    return np.ascontiguousarray(fixed_pixels[box], dtype=np.float32), moved


def _data(
    canonical: CanonicalVolume,
) -> tuple[FloatArray, tuple[float, float, float]] | None:
    """The canonical pixels without padding, and the patient position of their first voxel."""
    if canonical.origin_mm is None:
        return None
    pixels = canonical.pixels
    x0, y0, z0 = canonical.origin_mm
    if canonical.unpadded_shape is not None:
        (r0, c0), (rows, cols) = canonical.pad, canonical.unpadded_shape
        pixels = pixels[:, r0 : r0 + rows, c0 : c0 + cols]
        x0 += c0 * canonical.spacing_mm[2]
        y0 += r0 * canonical.spacing_mm[1]
    return pixels, (x0, y0, z0)


def canonical_index(
    voxel: tuple[float, float, float], canonical: CanonicalVolume
) -> tuple[float, float, float]:
    """Where a source voxel (slice, row, column) lands on the canonical grid."""
    point = [float(voxel[a]) for a in canonical.axes]
    for k, flip in enumerate(canonical.flips):
        if flip:
            point[k] = canonical.permuted_shape[k] - 1 - point[k]
    for k, factor in ((1, canonical.zoom[0]), (2, canonical.zoom[1])):
        point[k] = (point[k] + 0.5) * factor - 0.5 + canonical.pad[k - 1]
    return (point[0], point[1], point[2])


def to_source(values: npt.NDArray[np.floating], canonical: CanonicalVolume) -> FloatArray:
    """A canonical-grid volume (e.g. a Grad-CAM map) on the source grid of the series."""
    arr = np.asarray(values, dtype=np.float32)
    if canonical.identity:
        return arr
    if canonical.unpadded_shape is not None:
        r0, c0 = canonical.pad
        rows, cols = canonical.unpadded_shape
        arr = arr[:, r0 : r0 + rows, c0 : c0 + cols]
    if canonical.zoom != (1.0, 1.0):
        shape = canonical.permuted_shape
        factors = (1.0, shape[1] / arr.shape[1], shape[2] / arr.shape[2])
        arr = _fit(ndimage.zoom(arr, factors, order=1, mode="nearest", grid_mode=True), shape)
    for k, flip in enumerate(canonical.flips):
        if flip:
            arr = np.flip(arr, axis=k)
    inverse = tuple(int(i) for i in np.argsort(canonical.axes))
    return np.ascontiguousarray(np.transpose(arr, inverse), dtype=np.float32)


def _fit(arr: FloatArray, shape: tuple[int, int, int]) -> FloatArray:
    """Crop or edge-pad rows and columns to `shape` (zoom can round a pixel either way)."""
    arr = arr[:, : shape[1], : shape[2]]
    pad = ((0, 0), (0, shape[1] - arr.shape[1]), (0, shape[2] - arr.shape[2]))
    return np.pad(arr, pad, mode="edge") if any(p[1] for p in pad) else arr

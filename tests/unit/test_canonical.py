"""Canonical axial geometry: sagittal and coronal series come out as the axial one, and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from node.dicom.canonical import (
    CanonicalVolume,
    canonical_axial,
    canonical_index,
    resample_onto,
    to_source,
)
from node.records import SeriesVolume, SliceGeometry, SliceRef

X, Y, Z = 20, 24, 16  # patient voxels (L, P, H), 1 mm


def _patient_volume() -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(7)
    v = rng.random((X, Y, Z)).astype(np.float32)
    v[2:6, 3:9, 10:14] += 5.0  # an asymmetric block: left, anterior, high
    return v


def _volume(
    pixels: npt.NDArray[np.float32],
    row_cos: tuple[float, float, float],
    col_cos: tuple[float, float, float],
    positions: list[tuple[float, float, float]],
    spacing: tuple[float, float] = (1.0, 1.0),
    slice_mm: float = 1.0,
) -> SeriesVolume:
    slices = tuple(
        SliceRef(
            path=Path(f"/x/{k}.dcm"),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            sop_instance_uid=f"1.2.3.{k}",
            frame_number=None,
            geometry=SliceGeometry(
                position=pos,
                orientation=(*row_cos, *col_cos),
                pixel_spacing=spacing,
                slice_thickness=slice_mm,
            ),
        )
        for k, pos in enumerate(positions)
    )
    return SeriesVolume(
        study_uid="1.2",
        series_uid="1.2.3",
        series_number=1,
        pixels=pixels,
        slices=slices,
        slice_spacing_mm=slice_mm,
        n_instances=len(slices),
        n_frames=len(slices),
    )


def _unpadded(canon: CanonicalVolume) -> npt.NDArray[np.float32]:
    """The canonical pixels without the padding that made the slices square."""
    if canon.unpadded_shape is None:
        return canon.pixels
    (r0, c0), (rows, cols) = canon.pad, canon.unpadded_shape
    return canon.pixels[:, r0 : r0 + rows, c0 : c0 + cols]


def _axial(v: npt.NDArray[np.float32]) -> SeriesVolume:
    # pixels[k, r, c] = v[c, r, k]: rows along +y (posterior), columns along +x (left)
    return _volume(v.transpose(2, 1, 0).copy(), (1, 0, 0), (0, 1, 0), [(0, 0, k) for k in range(Z)])


def _sagittal(v: npt.NDArray[np.float32]) -> SeriesVolume:
    # rows run head to feet, columns anterior to posterior; slices right to left
    pixels = np.stack([v[k, :, ::-1].T for k in range(X)])
    return _volume(pixels, (0, 1, 0), (0, 0, -1), [(k, 0, Z - 1) for k in range(X)])


def _coronal(v: npt.NDArray[np.float32]) -> SeriesVolume:
    # rows head to feet, columns right to left; slices anterior to posterior
    pixels = np.stack([v[:, k, ::-1].T for k in range(Y)])
    return _volume(pixels, (1, 0, 0), (0, 0, -1), [(0, k, Z - 1) for k in range(Y)])


@pytest.mark.parametrize(
    ("make", "plane"), [(_axial, "axial"), (_sagittal, "sagittal"), (_coronal, "coronal")]
)
def test_every_plane_gives_the_same_axial_volume(make: object, plane: str) -> None:
    v = _patient_volume()
    series = make(v)  # type: ignore[operator]
    canon = canonical_axial(series)
    assert canon.plane == plane
    assert canon.pixels.shape == (Z, Y, Y)  # square slices: the 20 columns padded to 24
    assert np.array_equal(_unpadded(canon), v.transpose(2, 1, 0))
    assert np.array_equal(to_source(canon.pixels, canon), series.pixels)
    assert canon.slice_aligned is (plane == "axial")


def test_slices_stored_head_first_are_turned_feet_first() -> None:
    v = _patient_volume()
    pixels = v.transpose(2, 1, 0)[::-1].copy()
    series = _volume(pixels, (1, 0, 0), (0, 1, 0), [(0, 0, Z - 1 - k) for k in range(Z)])
    canon = canonical_axial(series)
    assert np.array_equal(_unpadded(canon), v.transpose(2, 1, 0))
    assert np.array_equal(to_source(canon.pixels, canon), pixels)


def test_thick_sagittal_slices_are_resampled_to_square_pixels_and_back() -> None:
    v = _patient_volume()[::4]  # 5 sagittal slices, 4 mm apart
    pixels = np.stack([v[k, :, ::-1].T for k in range(v.shape[0])])
    series = _volume(
        pixels,
        (0, 1, 0),
        (0, 0, -1),
        [(4.0 * k, 0, Z - 1) for k in range(v.shape[0])],
        slice_mm=4.0,
    )
    canon = canonical_axial(series)
    assert canon.plane == "sagittal"
    assert canon.unpadded_shape == (Y, 4 * v.shape[0])  # columns (x) at 1 mm now
    assert canon.pixels.shape == (Z, Y, Y)  # and padded to a square slice, not stretched
    assert canon.spacing_mm == (1.0, 1.0, 1.0)
    back = to_source(canon.pixels, canon)
    assert back.shape == pixels.shape
    # Linear resampling there and back: close on average, and the bright block stays put.
    assert float(np.abs(back - pixels).mean()) < 0.15
    assert (
        np.unravel_index(np.argmax(back), back.shape)[0]
        == np.unravel_index(np.argmax(pixels), pixels.shape)[0]
    )


def test_a_time_series_is_left_as_it_is() -> None:
    v = _patient_volume()
    axial = _axial(v)
    positions = [(0.0, 0.0, float(k % 4)) for k in range(8)]  # 2 time points of 4 slices
    series = _volume(axial.pixels[:8], (0, 1, 0), (0, 0, -1), positions)
    canon = canonical_axial(series)
    assert canon.identity and canon.plane == "unknown"
    assert canon.pixels is series.pixels or np.array_equal(canon.pixels, series.pixels)


def test_a_source_voxel_lands_on_its_canonical_voxel() -> None:
    v = _patient_volume()
    series = _sagittal(v)
    canon = canonical_axial(series)
    k, r, c = 3, 4, 7  # sagittal slice x=3, row z=Z-1-4, column y=7
    z, y, x = canonical_index((k, r, c), canon)
    assert canon.pad == (0, 2)
    assert (z, y, x) == (Z - 1 - r, c, k + 2)  # two padding columns on the right
    assert canon.pixels[int(z), int(y), int(x)] == series.pixels[k, r, c]


def test_a_sagittal_and_an_axial_series_of_one_head_meet_on_one_grid() -> None:
    v = _patient_volume()
    axial = canonical_axial(_axial(v))
    sagittal = canonical_axial(_sagittal(v))
    assert axial.origin_mm == pytest.approx((-2.0, 0.0, 0.0))  # two padding columns
    assert sagittal.origin_mm == pytest.approx((-2.0, 0.0, 0.0))
    pair = resample_onto(sagittal, axial)
    assert pair is not None
    fixed, moved = pair
    assert np.allclose(fixed, moved)


def test_a_shifted_series_is_resampled_by_its_origin() -> None:
    v = _patient_volume()
    shifted = _volume(
        v.transpose(2, 1, 0)[:, :, 2:].copy(),
        (1, 0, 0),
        (0, 1, 0),
        [(2.0, 0, k) for k in range(Z)],
    )  # starts 2 mm to the left: the same head, fewer columns
    pair = resample_onto(canonical_axial(shifted), canonical_axial(_axial(v)))
    assert pair is not None
    fixed, moved = pair
    assert fixed.shape == (Z, Y, X - 2)
    assert np.allclose(fixed, moved)
    far = _volume(shifted.pixels, (1, 0, 0), (0, 1, 0), [(500.0, 0, k) for k in range(Z)])
    assert resample_onto(canonical_axial(far), canonical_axial(_axial(v))) is None

"""dicomio: series assembly, ordering, geometry, rescale, enhanced frames, broken files."""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from node.dicom.volumes import load_series, load_study, read_headers, scan_study
from node.errors import LoadError

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SENTINEL_NAME = "Zyxwvut^Sentinelpatient"


def _base(sop_class: str, study: str, series: str, number: int | None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    if number is not None:
        ds.SeriesNumber = number
    ds.Modality = "MR"
    ds.PatientName = SENTINEL_NAME
    ds.PatientID = "SENTINEL-ID-4711"
    ds.PatientBirthDate = "19010203"
    ds.AccessionNumber = "ACC-SENTINEL"
    ds.SeriesDescription = "t1_mprage_sag"
    return ds


def _set_pixels(ds: Dataset, pixels: npt.NDArray[np.uint16]) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()


def write_mr(
    path: Path,
    *,
    study: str,
    series: str,
    position: Sequence[float] | None,
    orientation: Sequence[float] = AXIAL,
    value: int = 0,
    shape: tuple[int, int] = (4, 5),
    number: int | None = 3,
    instance: int = 1,
    slope: float | None = None,
    intercept: float | None = None,
    acquisition: int | None = None,
    sop_class: str = MR,
) -> Path:
    """A classic single-frame image whose every pixel is `value` (so order can be read back)."""
    ds = _base(sop_class, study, series, number)
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [0.9, 0.8]
    ds.SliceThickness = 3.0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept if intercept is not None else 0.0
    if acquisition is not None:
        ds.AcquisitionNumber = acquisition
    _set_pixels(ds, np.full(shape, value, dtype=np.uint16))
    ds.save_as(path, enforce_file_format=True)
    return path


def write_enhanced(
    path: Path,
    *,
    study: str,
    series: str,
    frames: Sequence[tuple[tuple[float, float, float], int, int | None, float]],
    orientation: Sequence[float] = AXIAL,
    shape: tuple[int, int] = (4, 5),
    number: int = 5,
) -> Path:
    """Enhanced MR: frames given as (position, stored value, temporal index, rescale slope)."""
    ds = _base(ENHANCED_MR, study, series, number)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [float(v) for v in orientation]
    shared.PlaneOrientationSequence = DicomSequence([ori])
    meas = Dataset()
    meas.PixelSpacing = [0.5, 0.5]
    meas.SliceThickness = 2.0
    shared.PixelMeasuresSequence = DicomSequence([meas])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per = []
    for position, _value, temporal, slope in frames:
        fg = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [float(v) for v in position]
        fg.PlanePositionSequence = DicomSequence([pos])
        pvt = Dataset()
        pvt.RescaleSlope = slope
        pvt.RescaleIntercept = 1.0
        pvt.RescaleType = "US"
        fg.PixelValueTransformationSequence = DicomSequence([pvt])
        content = Dataset()
        if temporal is not None:
            content.TemporalPositionIndex = temporal
        fg.FrameContentSequence = DicomSequence([content])
        per.append(fg)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    pixels = np.stack([np.full(shape, v, dtype=np.uint16) for _, v, _, _ in frames])
    _set_pixels(ds, pixels)
    ds.save_as(path, enforce_file_format=True)
    return path


def _firsts(pixels: npt.NDArray[np.float32]) -> list[float]:
    return [float(v) for v in pixels[:, 0, 0]]


def test_shuffled_axial_files_are_ordered_along_the_normal(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    zs = [10.0, 12.5, 15.0, 17.5, 20.0, 22.5]
    paths = [
        write_mr(tmp_path / f"f{i}.dcm", study=study, series=series, position=(0, 0, z), value=i)
        for i, z in enumerate(zs)
    ]
    random.Random(3).shuffle(paths)
    volume = load_series(paths)
    assert _firsts(volume.pixels) == [0, 1, 2, 3, 4, 5]
    assert [s.geometry.position[2] for s in volume.slices] == zs
    assert volume.slice_spacing_mm == pytest.approx(2.5)
    assert volume.pixels.dtype == np.float32
    assert volume.pixels.shape == (6, 4, 5)
    assert volume.slices[0].geometry.pixel_spacing == (0.9, 0.8)
    assert volume.slices[0].frame_number is None
    assert volume.n_instances == 6 and volume.n_frames == 6


def test_reversed_positions_follow_space_not_instance_number(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    paths = [
        write_mr(
            tmp_path / f"f{i}.dcm",
            study=study,
            series=series,
            position=(0, 0, 50.0 - 4 * i),
            value=i,
            instance=i + 1,
        )
        for i in range(5)
    ]
    volume = load_series(paths)
    assert _firsts(volume.pixels) == [4, 3, 2, 1, 0]
    assert volume.slice_spacing_mm == pytest.approx(4.0)


def test_oblique_stack_orders_by_projection_on_cross_of_cosines(tmp_path: Path) -> None:
    a = np.deg2rad(25.0)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([0.0, np.sin(0.3), -np.cos(0.3)])
    col -= row * np.dot(row, col)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    origin = np.array([-100.0, 20.0, 30.0])
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(6):
        # Shift each slice in-plane too: ordering must use only the normal component.
        pos = origin + 3.3 * i * normal + (7.0 * (i % 2)) * row - 5.0 * i * col
        paths.append(
            write_mr(
                tmp_path / f"o{i}.dcm",
                study=study,
                series=series,
                position=tuple(pos),
                orientation=(*row, *col),
                value=10 + i,
                instance=6 - i,
            )
        )
    random.Random(1).shuffle(paths)
    volume = load_series(paths)
    assert _firsts(volume.pixels) == [10, 11, 12, 13, 14, 15]
    assert volume.slice_spacing_mm == pytest.approx(3.3, abs=1e-3)


def test_rescale_slope_and_intercept_give_float_modality_values(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    paths = [
        write_mr(
            tmp_path / "a.dcm",
            study=study,
            series=series,
            position=(0, 0, 0),
            value=100,
            slope=0.5,
            intercept=-1024.0,
        ),
        write_mr(
            tmp_path / "b.dcm",
            study=study,
            series=series,
            position=(0, 0, 1),
            value=100,
            slope=2.0,
            intercept=0.25,
        ),
    ]
    volume = load_series(paths)
    assert volume.pixels.dtype == np.float32
    assert _firsts(volume.pixels) == [pytest.approx(-974.0), pytest.approx(200.25)]


def test_enhanced_frames_use_functional_groups_for_order_and_rescale(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    # Frames stored out of spatial order, each with its own slope.
    frames = [
        ((0.0, 0.0, 6.0), 30, None, 1.0),
        ((0.0, 0.0, 0.0), 10, None, 2.0),
        ((0.0, 0.0, 3.0), 20, None, 3.0),
    ]
    path = write_enhanced(tmp_path / "enh.dcm", study=study, series=series, frames=frames)
    volume = load_series([path])
    assert _firsts(volume.pixels) == [10 * 2.0 + 1, 20 * 3.0 + 1, 30 * 1.0 + 1]
    assert [s.frame_number for s in volume.slices] == [2, 3, 1]
    assert volume.slice_spacing_mm == pytest.approx(3.0)
    assert volume.slices[0].geometry.pixel_spacing == (0.5, 0.5)
    assert volume.slices[0].geometry.slice_thickness == 2.0
    assert volume.n_instances == 1 and volume.n_frames == 3


def test_enhanced_time_series_is_time_major_in_first_volume_order(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    frames = []
    # 2 time points x 3 positions, stored interleaved and shuffled.
    for t, z in [(2, 4.0), (1, 8.0), (1, 0.0), (2, 0.0), (1, 4.0), (2, 8.0)]:
        frames.append(((0.0, 0.0, z), int(100 * t + z), t, 1.0))
    path = write_enhanced(tmp_path / "fmri.dcm", study=study, series=series, frames=frames)
    volume = load_series([path])
    assert _firsts(volume.pixels) == [101, 105, 109, 201, 205, 209]  # value + intercept 1
    assert volume.slice_spacing_mm == pytest.approx(4.0)


def test_classic_fmri_repeated_positions_by_acquisition_number(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    paths = []
    n = 0
    for acq in (1, 2, 3):
        for k, z in enumerate((0.0, 5.0, 10.0, 15.0)):
            n += 1
            paths.append(
                write_mr(
                    tmp_path / f"{n}.dcm",
                    study=study,
                    series=series,
                    position=(0, 0, z),
                    value=acq * 10 + k,
                    acquisition=acq,
                    instance=n,
                )
            )
    random.Random(7).shuffle(paths)
    volume = load_series(paths)
    assert _firsts(volume.pixels) == [10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33]
    assert volume.slice_spacing_mm == pytest.approx(5.0)
    assert volume.n_frames == 12


def test_mixed_matrix_and_planes_keep_dominant_stack_and_report_the_rest(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    paths = [
        write_mr(
            tmp_path / f"ax{i}.dcm",
            study=study,
            series=series,
            position=(0, 0, i),
            value=i,
            shape=(6, 6),
        )
        for i in range(4)
    ]
    sagittal = write_mr(
        tmp_path / "sag.dcm",
        study=study,
        series=series,
        position=(0, 0, 0),
        orientation=(0, 1, 0, 0, 0, -1),
        shape=(6, 6),
    )
    small = write_mr(
        tmp_path / "small.dcm", study=study, series=series, position=(0, 0, 9), shape=(3, 3)
    )
    volumes, problems = load_study([*paths, sagittal, small])
    assert len(volumes) == 1
    assert volumes[0].pixels.shape == (4, 6, 6)
    assert sorted(p.path.name for p in problems) == ["sag.dcm", "small.dcm"]
    assert all("mixed geometry" in p.reason and p.series_uid == series for p in problems)


def test_broken_files_become_problems_and_the_study_goes_on(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    good = [
        write_mr(tmp_path / f"g{i}.dcm", study=study, series=series, position=(0, 0, i), value=i)
        for i in range(3)
    ]
    truncated = write_mr(tmp_path / "t.dcm", study=study, series=series, position=(0, 0, 7))
    data = truncated.read_bytes()
    truncated.write_bytes(data[:-15])
    text = tmp_path / "notes.txt"
    text.write_text("not dicom")
    loaded = scan_study([*good, truncated, text])
    assert [v.pixels.shape for v in loaded.volumes] == [(3, 4, 5)]
    reasons = {p.path.name: p for p in loaded.problems}
    assert set(reasons) == {"t.dcm", "notes.txt"}
    assert reasons["t.dcm"].series_uid == series
    assert reasons["notes.txt"].series_uid is None
    # The truncated file's header is still listed, so the audit can name its series.
    assert truncated in {h.path for h in loaded.headers}


def test_one_uid_with_several_series_numbers_splits(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    paths = [
        write_mr(tmp_path / f"n{n}.dcm", study=study, series=series, position=(0, 0, 0), number=n)
        for n in (1, 2, 3)
    ]
    volumes, problems = load_study(paths)
    assert problems == ()
    assert [(v.series_uid, v.series_number) for v in volumes] == [(series, n) for n in (1, 2, 3)]
    with pytest.raises(LoadError, match="found 3"):
        load_series(paths)


def test_rle_compressed_file_decodes_to_the_same_values(tmp_path: Path) -> None:
    from pydicom import dcmread

    study, series = generate_uid(), generate_uid()
    path = write_mr(
        tmp_path / "r.dcm", study=study, series=series, position=(0, 0, 0), shape=(8, 8)
    )
    ds = dcmread(path)
    arr = (np.arange(64, dtype=np.uint16) * 37).reshape(8, 8)
    ds.PixelData = arr.tobytes()
    ds.compress(RLELossless, arr)
    ds.save_as(path, enforce_file_format=True)
    volume = load_series([path])
    np.testing.assert_array_equal(volume.pixels[0], arr.astype(np.float32))
    headers, _ = read_headers([path])
    assert headers[0].transfer_syntax_uid == RLELossless


def test_colour_image_becomes_luminance(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    ds = _base(SC, study, series, 9)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = 2, 2
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[..., 0] = 100
    rgb[..., 1] = 200
    ds.PixelData = rgb.tobytes()
    path = tmp_path / "rgb.dcm"
    ds.save_as(path, enforce_file_format=True)
    volume = load_series([path])
    assert volume.pixels.shape == (1, 2, 2)
    assert float(volume.pixels[0, 0, 0]) == pytest.approx(0.299 * 100 + 0.587 * 200)


def test_images_without_geometry_keep_instance_order(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    paths = [
        write_mr(
            tmp_path / f"sc{i}.dcm",
            study=study,
            series=series,
            position=None,
            value=i,
            instance=3 - i,
            sop_class=SC,
        )
        for i in range(3)
    ]
    volume = load_series(paths)
    assert _firsts(volume.pixels) == [2, 1, 0]
    assert volume.slice_spacing_mm is None


def test_objects_without_pixels_are_headers_only(tmp_path: Path) -> None:
    study = generate_uid()
    ds = _base(BASIC_TEXT_SR, study, generate_uid(), 99)
    ds.Modality = "SR"
    sr = tmp_path / "sr.dcm"
    ds.save_as(sr, enforce_file_format=True)
    image = write_mr(tmp_path / "i.dcm", study=study, series=generate_uid(), position=(0, 0, 0))
    loaded = scan_study([sr, image])
    assert len(loaded.volumes) == 1
    assert loaded.problems == ()
    sr_header = next(h for h in loaded.headers if h.path == sr)
    assert sr_header.has_pixels is False and sr_header.n_frames == 0
    assert sr_header.series_number == 99


def test_six_series_study_loads_whole(tmp_path: Path) -> None:
    """6 series x 24 slices of 256x256 (random pixels): the load budget of a routine study."""
    from pydicom import dcmread

    study = generate_uid()
    template = write_mr(
        tmp_path / "template.dcm",
        study=study,
        series=generate_uid(),
        position=(0, 0, 0),
        shape=(256, 256),
    )
    base = dcmread(template)
    template.unlink()
    rng = np.random.default_rng(0)
    paths = []
    for s in range(6):
        series = generate_uid()
        for k in range(24):
            base.SeriesInstanceUID = series
            base.SeriesNumber = s + 1
            base.SOPInstanceUID = generate_uid()
            base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
            base.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
            base.InstanceNumber = k + 1
            base.PixelData = rng.integers(0, 4096, (256, 256), dtype=np.uint16).tobytes()
            path = tmp_path / f"s{s}_{k}.dcm"
            base.save_as(path, enforce_file_format=True)
            paths.append(path)
    random.Random(0).shuffle(paths)
    volumes, problems = load_study(paths)  # its speed is a benchmark figure, not a test
    assert problems == ()
    assert [v.pixels.shape for v in volumes] == [(24, 256, 256)] * 6
    assert all(v.slice_spacing_mm == pytest.approx(5.0) for v in volumes)


def test_orientation_noise_across_a_rounding_boundary_stays_one_stack(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    paths = [
        write_mr(
            tmp_path / f"n{i}.dcm",
            study=study,
            series=series,
            position=(0, 0, 2.0 * i),
            orientation=(1.0, 0.0, 0.00049 + 0.00002 * i, 0.0, 1.0, 0.0),
            value=i,
        )
        for i in range(4)
    ]
    volumes, problems = load_study(paths)
    assert problems == ()
    assert [v.pixels.shape[0] for v in volumes] == [4]


def _csa2(tags: dict[str, list[str]]) -> bytes:
    """A minimal Siemens CSA2 header holding the given tags (string items)."""
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<II", len(tags), 77)
    for name, values in tags.items():
        out += name.encode().ljust(64, b"\0") + struct.pack(
            "<i4siii", 1, b"FD\0\0", 4, len(values), 77
        )
        for v in values:
            data = v.encode() + b"\0"
            out += struct.pack("<iiii", len(data), len(data), 77, len(data))
            out += data.ljust((len(data) + 3) // 4 * 4, b"\0")
    return out


@pytest.mark.parametrize("normal_sign", [1.0, -1.0])
def test_siemens_mosaic_is_unpacked_into_placed_slices(tmp_path: Path, normal_sign: float) -> None:
    study, series = generate_uid(), generate_uid()
    ds = _base(MR, study, series, 4)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-10.0, -20.0, 30.0]
    ds.ImageOrientationPatient = list(AXIAL)
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = 3.0
    ds.SpacingBetweenSlices = 4.0
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "US", 3)
    csa = _csa2({"SliceNormalVector": ["0.0", "0.0", str(normal_sign)]})
    ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", csa)
    mosaic = np.zeros((8, 8), dtype=np.uint16)  # a 2x2 grid of 4x4 tiles, 3 used
    mosaic[:4, :4], mosaic[:4, 4:], mosaic[4:, :4] = 11, 22, 33
    _set_pixels(ds, mosaic)
    path = tmp_path / "mosaic.dcm"
    ds.save_as(path, enforce_file_format=True)
    volume = load_series([path])
    assert volume.pixels.shape == (3, 4, 4)
    # The first tile's corner sits half the matrix difference (2 px of 2 mm) in from the corner.
    z = [30.0 + normal_sign * 4.0 * k for k in range(3)]
    expected = [(-6.0, -16.0, zk) for zk in z]
    values = [11, 22, 33]
    if normal_sign < 0:  # spatial order is ascending along cross(row, col): reversed
        expected, values = expected[::-1], values[::-1]
    assert [s.geometry.position for s in volume.slices] == [pytest.approx(e) for e in expected]
    assert _firsts(volume.pixels) == values
    assert volume.slice_spacing_mm == pytest.approx(4.0)
    assert {s.frame_number for s in volume.slices} == {None}


def test_enhanced_localizer_planes_keep_the_largest_plane(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    frames = [((0.0, 0.0, float(z)), z, None, 1.0) for z in (0, 5, 10)]
    path = write_enhanced(tmp_path / "loc.dcm", study=study, series=series, frames=frames)
    # Turn the middle frame sagittal: a three-plane localizer stored in one object.
    from pydicom import dcmread

    ds = dcmread(path)
    ori = Dataset()
    ori.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.PerFrameFunctionalGroupsSequence[1].PlaneOrientationSequence = DicomSequence([ori])
    ds.save_as(path, enforce_file_format=True)
    volumes, problems = load_study([path])
    assert [v.pixels.shape[0] for v in volumes] == [2]
    assert _firsts(volumes[0].pixels) == [1.0, 11.0]  # stored value + intercept 1
    (problem,) = problems
    assert "also holds frames kept" in problem.reason and "1 frame(s)" in problem.reason


def test_read_headers_lists_images_and_reports_non_dicom(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    image = write_mr(tmp_path / "i.dcm", study=study, series=series, position=(0, 0, 0), number=8)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"DICM" * 10)
    headers, problems = read_headers([image, junk])
    (h,) = headers
    assert (h.series_uid, h.series_number, h.rows, h.columns, h.n_frames) == (series, 8, 4, 5, 1)
    assert h.sop_class_uid == MR and h.has_pixels and h.series_description == "t1_mprage_sag"
    assert [p.path for p in problems] == [junk]

"""Decoding against files no one here wrote: pydicom's test data and ../shared/realdata."""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import UID, generate_uid

from node.cli import study as study_cli
from node.cli.study import ProcessArgs, cmd_process
from node.dicom.volumes import scan_study
from node.records import SeriesVolume

pytestmark = pytest.mark.integration

# Documented-broken files of pydicom's test data, with the reason each one cannot decode here.
BROKEN = {
    "MR_truncated.dcm": "pixel data deliberately truncated (pydicom tests its error path)",
    "JPEG2000-embedded-sequence-delimiter.dcm": (
        "J2K codestream holds an embedded sequence delimiter; openjpeg cannot read its header"
    ),
    "JPEG-lossy.dcm": (
        "12-bit JPEG extended with a misplaced marker; pydicom's own tests expect libjpeg "
        "to fail on it (GDCM decodes it, not installed)"
    ),
}
IMAGE_CLASSES = ("MR Image Storage", "CT Image Storage", "Secondary Capture Image Storage")


def _image_testdata() -> list[Path]:
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files():
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, OSError, ValueError, TypeError, EOFError):
                continue
            sop = UID(str(ds.get("SOPClassUID", ""))).name
            if any(c in sop for c in IMAGE_CLASSES) and "Rows" in ds:
                found.append(Path(name))
    return sorted(found, key=lambda p: p.name)


TESTDATA = _image_testdata()


def test_testdata_selection_is_not_empty() -> None:
    assert len(TESTDATA) > 60
    assert {"MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"} <= {
        p.name for p in TESTDATA
    }


@pytest.mark.parametrize("path", TESTDATA, ids=lambda p: p.name)
def test_pydicom_testdata_image_decodes(path: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        if "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            # Some pydicom samples omit the UIDs dicomio needs to group files (the spool would
            # reject them): add them to a copy so the pixel decoding is still tested.
            ds.StudyInstanceUID = ds.get("StudyInstanceUID", generate_uid())
            ds.SeriesInstanceUID = ds.get("SeriesInstanceUID", generate_uid())
            ds.SOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
            path = tmp_path / path.name
            ds.save_as(path)
        loaded = scan_study([path])
    if path.name in BROKEN:
        assert len(loaded.problems) == 1, f"{path.name} now decodes: remove it from BROKEN"
        return
    assert loaded.problems == ()
    (volume,) = loaded.volumes
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    assert volume.pixels.shape == (frames, ds.Rows, ds.Columns)
    assert volume.pixels.dtype == np.float32
    assert np.isfinite(volume.pixels).all()


def test_big_endian_and_rle_decode_to_the_same_values() -> None:
    names = {p.name: p for p in TESTDATA}
    ref = scan_study([names["MR_small.dcm"]]).volumes[0].pixels
    for other in ("MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        np.testing.assert_array_equal(scan_study([names[other]]).volumes[0].pixels, ref)


def _projections(volume: SeriesVolume) -> list[float]:
    ori = volume.slices[0].geometry.orientation
    normal = np.cross(ori[:3], ori[3:])
    return [float(np.dot(normal, s.geometry.position)) for s in volume.slices]


def _check_geometry(volume: SeriesVolume) -> tuple[int, int]:
    """Positions rise along the normal in every time point; return (positions, time points)."""
    d = _projections(volume)
    n_pos = len({round(v, 2) for v in d})
    assert volume.n_frames % n_pos == 0, "time points of unequal size"
    first = d[:n_pos]
    assert all(b > a for a, b in itertools.pairwise(first)), "not monotonic"
    for t in range(volume.n_frames // n_pos):
        assert d[t * n_pos : (t + 1) * n_pos] == pytest.approx(first, abs=0.02)
    if n_pos > 1:
        assert volume.slice_spacing_mm is not None and volume.slice_spacing_mm > 0
        assert volume.slice_spacing_mm == pytest.approx(
            (first[-1] - first[0]) / (n_pos - 1), rel=0.05
        )
    assert np.isfinite(volume.pixels).all()
    assert all(s > 0 for s in volume.slices[0].geometry.pixel_spacing)
    return n_pos, volume.n_frames // n_pos


FOLDERS = ("dcm_qa_enh", "dcm_qa_fmap", "dcm_qa_frag", "dcm_qa_nih", "dcm_qa_ts", "dcm_qa_xa30")
EXPECTED_VOLUMES = {
    "dcm_qa_enh": 2,
    "dcm_qa_fmap": 8,
    "dcm_qa_frag": 2,
    "dcm_qa_nih": 8,
    "dcm_qa_ts": 9,
    "dcm_qa_xa30": 20,  # 21 series; the Phoenix report (Enhanced SR) has no pixels
}


@pytest.mark.parametrize(
    "folder",
    [pytest.param(f, marks=pytest.mark.slow) if f == "dcm_qa_xa30" else f for f in FOLDERS],
)
def test_every_realdata_series_loads_with_plausible_geometry(realdata: Path, folder: str) -> None:
    files = sorted(p for p in (realdata / folder).rglob("*") if p.is_file())
    t0 = time.perf_counter()
    loaded = scan_study(files)
    elapsed = time.perf_counter() - t0
    # Only the folders' README/PDF/text files may fail, and only as "not DICOM".
    assert all(p.series_uid is None and p.path.suffix in {".txt", ".pdf"} for p in loaded.problems)
    assert len(loaded.volumes) == EXPECTED_VOLUMES[folder]
    lines = []
    for v in loaded.volumes:
        n_pos, n_t = _check_geometry(v)
        lines.append(f"  #{v.series_number} {tuple(v.pixels.shape)} {n_pos}x{n_t}")
    print(f"\n{folder}: {len(files)} files, {len(loaded.volumes)} volumes, {elapsed:.2f} s")
    print("\n".join(lines))


def test_one_series_in_nine_transfer_syntaxes_decodes_identically(realdata: Path) -> None:
    files = sorted((realdata / "dcm_qa_ts").rglob("*.dcm")) or sorted(
        p for p in (realdata / "dcm_qa_ts").rglob("*") if p.is_file()
    )
    loaded = scan_study(files)
    assert loaded.problems == ()
    uids = {v.series_uid for v in loaded.volumes}
    assert len(uids) == 1  # one SeriesInstanceUID, split by SeriesNumber
    assert [v.series_number for v in loaded.volumes] == list(range(1, 10))
    syntaxes = {h.transfer_syntax_uid for h in loaded.headers}
    assert len(syntaxes) >= 7
    ref = loaded.volumes[0].pixels
    for v in loaded.volumes[1:]:
        np.testing.assert_array_equal(v.pixels, ref)
    # The 384x384 mosaic holds 35 slices of 64x64; first position and step as nibabel's
    # MosaicWrapper computes them for this file (checked once by hand).
    volume = loaded.volumes[0]
    assert volume.pixels.shape == (35, 64, 64)
    assert volume.slices[0].geometry.position == pytest.approx((-104.0, -144.86809, -62.68517))
    assert volume.slice_spacing_mm == pytest.approx(3.6)
    assert _check_geometry(volume) == (35, 1)


def test_realdata_time_series_keep_all_time_points(realdata: Path) -> None:
    dwi = sorted(p for p in (realdata / "dcm_qa_xa30" / "In" / "10_DWI_dir80_PA").rglob("*"))
    loaded = scan_study([p for p in dwi if p.is_file()])
    (volume,) = loaded.volumes
    assert volume.pixels.shape == (21 * 39, 72, 72)
    assert _check_geometry(volume) == (39, 21)
    assert {s.frame_number for s in volume.slices} == set(range(1, 40))


@pytest.mark.slow
def test_cmd_process_on_realdata_xa30(
    realdata: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # cmd_process configures logging on the live stderr: keep that from leaking to other tests.
    monkeypatch.setattr(study_cli, "configure", lambda **_kw: None)
    args = ProcessArgs(
        directory=realdata / "dcm_qa_xa30", rules=tmp_path / "none.yaml", out=tmp_path / "out"
    )
    assert cmd_process(args) == 0
    out = capsys.readouterr().out
    print(out)
    assert "1 study(ies), 93 DICOM file(s), 1 other file(s) skipped" in out
    assert "DWI_dir80_PA_ColFA" in out and "Enhanced MR Color Image" in out
    assert "21 series, 93 instances, 0 decode error(s)" in out
    assert len(list((tmp_path / "out").glob("*/audit.json"))) == 1

"""Every result object passes dciodvfy without errors; dcentvfy finds no inconsistency."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from node.config import OutputSettings
from node.report.sc import build_heatmap_images
from node.report.sr import build_sr, reencode_sr
from tests.conftest import system_tool
from tests.unit.test_report import make_result, mr_small, xa30_t1

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]


def _objects(source: Path, frames: tuple[int | None, ...]) -> list[tuple[str, Dataset]]:
    result = make_result(source, frames)
    scs = build_heatmap_images(result, OutputSettings(heatmaps_per_series=3), uid_root=None)
    sr3d = build_sr(result, scs, uid_root=None, sop_class="comprehensive3d")
    reopened = make_result(source, frames, extra_series=("1.2.826.0.1.3680043.10.9.1",))
    objects: list[tuple[str, Dataset]] = [(f"sc{i}", sc) for i, sc in enumerate(scs)]
    objects += [
        ("sr3d", sr3d),
        ("sr", build_sr(result, scs, uid_root=None, sop_class="comprehensive")),
        (
            "sr_enh",
            build_sr(result, scs, uid_root="1.2.826.0.1.3680043.10.1234", sop_class="enhanced"),
        ),
        ("sr_reencoded", reencode_sr(sr3d, "enhanced", uid_root=None)),
        ("sr_pred", build_sr(reopened, scs, uid_root=None, predecessor=sr3d)),
    ]
    return objects


def _save(objects: list[tuple[str, Dataset]], tmp: Path) -> list[Path]:
    paths = []
    for name, ds in objects:
        path = tmp / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _sources() -> list[tuple[str, Path, tuple[int | None, ...]]]:
    return [("classic", mr_small(), (None,)), ("enhanced", xa30_t1(), (30, 48, 60))]


@pytest.mark.parametrize("case", ["classic", "enhanced"])
def test_dciodvfy_no_errors(case: str, tmp_path: Path, dciodvfy: str) -> None:
    (_, source, frames) = next(s for s in _sources() if s[0] == case)
    paths = _save(_objects(source, frames), tmp_path)
    assert len(paths) >= 6
    for path in paths:
        out = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True)
        text = out.stdout + out.stderr
        errors = [line for line in text.splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"
        assert ("SCImage" in text) == path.name.startswith("sc")  # the IOD it recognised


@pytest.mark.parametrize("case", ["classic", "enhanced"])
def test_dcentvfy_source_and_results_consistent(case: str, tmp_path: Path) -> None:
    dcentvfy = system_tool("dcentvfy")
    if dcentvfy is None:
        pytest.skip("dcentvfy is not installed (apt-get install dicom3tools)")
    (_, source, frames) = next(s for s in _sources() if s[0] == case)
    paths = _save(_objects(source, frames), tmp_path)
    out = subprocess.run([dcentvfy, str(source), *map(str, paths)], capture_output=True, text=True)
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert errors == [], errors
    # A deliberately inconsistent object must be caught, so the check above can fail.
    bad = _objects(source, frames)[0][1]
    bad.PatientID = "SOMEONE-ELSE"
    bad_path = tmp_path / "bad.dcm"
    bad.save_as(bad_path, enforce_file_format=True)
    out = subprocess.run([dcentvfy, str(source), str(bad_path)], capture_output=True, text=True)
    assert "Error" in out.stdout + out.stderr

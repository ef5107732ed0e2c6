"""Every synthetic file passes dicom3tools' dciodvfy: one study per vendor, classic and enhanced."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from node.lab.synth import VENDORS, write_studies

pytestmark = pytest.mark.integration


def _errors(dciodvfy: str, path: Path) -> list[str]:
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_every_file_passes_dciodvfy(dciodvfy: str, tmp_path: Path, enhanced: bool) -> None:
    write_studies(
        tmp_path, studies=4, seed=13, vendors=list(VENDORS), size=48, slices=6, enhanced=enhanced
    )
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) > (40 if enhanced else 200)
    failures = {str(f.relative_to(tmp_path)): e for f in files if (e := _errors(dciodvfy, f))}
    assert failures == {}


@pytest.mark.parametrize("ts", ["rle", "jpeg-ls", "jpeg2000"])
def test_compressed_files_pass_dciodvfy(dciodvfy: str, tmp_path: Path, ts: str) -> None:
    write_studies(
        tmp_path, studies=1, seed=2, vendors=["ge"], size=48, slices=4, transfer_syntax=ts
    )
    files = sorted(tmp_path.rglob("*.dcm"))
    failures = {str(f.relative_to(tmp_path)): e for f in files[::5] if (e := _errors(dciodvfy, f))}
    assert failures == {}


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_style_b_and_randomised_files_pass_dciodvfy(
    dciodvfy: str, tmp_path: Path, enhanced: bool
) -> None:
    write_studies(
        tmp_path,
        studies=4,
        seed=17,
        vendors=list(VENDORS),
        size=32,
        slices=4,
        enhanced=enhanced,
        styles=["a", "b"],
        randomise=True,
        distractors=False,
    )
    files = sorted(tmp_path.rglob("*.dcm"))
    failures = {str(f.relative_to(tmp_path)): e for f in files[::3] if (e := _errors(dciodvfy, f))}
    assert failures == {}

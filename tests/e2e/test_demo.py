"""The README's first command: `neuronode demo --out DIR`, with Orthanc and without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from node.lab.orthanc import orthanc_binary
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.22",
}


def _check_outputs(out: Path, printed: str) -> None:
    assert "NOT FOR CLINICAL USE" in printed
    assert "findings (NOT FOR CLINICAL USE" in printed or "classify sequences only" in printed
    audit_line = next(line for line in printed.splitlines() if line.startswith("audit: "))
    assert Path(audit_line.removeprefix("audit: ")).is_file()
    if "delivered to" not in printed or " 0 heatmap images" in printed:
        return  # no specialist bundle shipped yet: nothing to deliver
    sr = pydicom.dcmread(out / "sr.dcm")
    assert str(sr.SOPClassUID) in SR_CLASSES
    scs = sorted((out / "heatmaps").glob("*.dcm"))
    assert scs and all(pydicom.dcmread(p).StudyInstanceUID == sr.StudyInstanceUID for p in scs)
    assert (out / "heatmap.png").read_bytes()[:8] == PNG_MAGIC
    assert f"1 SR + {len(scs)} heatmap images" in printed


def test_demo_with_orthanc_as_the_pacs(tmp_path: Path) -> None:
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    out = tmp_path / "demo-out"
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "starting Orthanc" in done.stdout and "Orthanc forwards it" in done.stdout
    _check_outputs(out, done.stdout)
    assert "Orthanc instance" in done.stdout or "classify sequences only" in done.stdout


def test_demo_without_orthanc_uses_its_own_storage_scp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli.lab import DemoArgs
    from node.lab import demo

    monkeypatch.setattr(demo, "orthanc_binary", lambda: None)
    monkeypatch.setattr(demo, "configure", lambda *_a, **_kw: None)  # keep pytest's logging
    out = tmp_path / "demo-out"
    args = DemoArgs(out=out, seed=7, phenotype="tsc", keep_running=False)
    assert demo.cmd_demo(args) == 0
    printed = capsys.readouterr().out
    assert "a storage SCP of our own stands in" in printed
    _check_outputs(out, printed)

"""A study with distinctive patient data goes through receive, quarantine, rejection and
processing: none of its patient values may appear in any log line or any spool file other than
the stored instances themselves."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from tests.conftest import REPO, pydicom_file
from tests.integration.conftest import NodeProc

pytestmark = pytest.mark.integration

PHI = {
    "PatientName": "ZZTESTPHI^SENTINEL",
    "PatientID": "ZZPID8765309",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ZZACC55501",
}
STUDY = "1.2.826.0.1.3680043.9.7777.2"


def _write(dest: Path, sop: str, series: str = f"{STUDY}.1", name: str | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
        for k, v in PHI.items():
            setattr(ds, k, v)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        path = dest / (name or f"{sop}.dcm")
        ds.save_as(path, enforce_file_format=True)
    return path


def _needles() -> tuple[bytes, ...]:
    # Names also as DICOM writes them without the caret, and in both cases.
    values = [*PHI.values(), "ZZTESTPHI", "SENTINEL"]
    return tuple(v.encode() for v in values) + tuple(v.lower().encode() for v in values)


def test_patient_data_in_no_log_and_no_spool_file(
    node_factory: Callable[..., NodeProc], dcmtk: Callable[[str], str], tmp_path: Path
) -> None:
    node = node_factory(logging={"format": "json", "level": "debug"})
    node.start()
    src = tmp_path / "src"
    src.mkdir()
    files = [_write(src, f"{STUDY}.1.{i}") for i in range(1, 6)]
    bad = _write(src, f"{STUDY}.1.99", series="1.2.BAD", name="bad.dcm")
    tool = dcmtk("storescu")
    base = ["-nh", "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    sent = subprocess.run(
        [tool, "-aet", "STORESCU", *base, *map(str, [*files, bad])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    rejected = subprocess.run(
        [tool, "-aet", "INTRUDER", *base, str(files[0])], capture_output=True, timeout=60
    )
    assert rejected.returncode != 0
    node.wait_for(lambda: node.query("SELECT state FROM studies")[0][0] == "done")
    status = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--rules", str(node.rules_path), "--json"],
        capture_output=True,
        cwd=REPO,
        timeout=60,
    )
    assert status.returncode == 0
    assert json.loads(status.stdout)["studies"]["done"] == 1
    assert node.stop() == 0

    logs = node.logs().encode()
    assert b"association_summary" in logs and b"job_finished" in logs  # the logs are real
    assert b"association_rejected" in logs and b"instance_quarantined" in logs
    for needle in _needles():
        assert needle not in logs, f"{needle!r} in node log output"
        assert needle not in status.stdout + status.stderr

    # Every spool file except the received instances themselves (which must keep the data).
    stored = {p for p in (node.spool / "instances").rglob("*.dcm")}
    stored |= set((node.spool / "quarantine").glob("*.dcm"))
    assert len(stored) == 6
    assert all(PHI["PatientName"].encode() in p.read_bytes() for p in stored)
    others = [p for p in node.spool.rglob("*") if p.is_file() and p not in stored]
    names = {p.name for p in others}
    assert "index.sqlite" in names and "audit.json" in names and "log.key" in names
    assert any(n.endswith(".reason.json") for n in names)
    for p in others:
        data = p.read_bytes()
        for needle in _needles():
            assert needle not in data, f"{needle!r} in {p.relative_to(node.spool)}"


# Values pydicom cannot parse: its errors and warnings quote them ("Unable to convert
# 'ZZDOB0203' to 'DA'", "Invalid value for VR DA: ..."), so they test every path a header value
# could take into a log line, stderr, the audit, status, the index or the outbox.
BAD_PHI = {
    "PatientName": "ZZBADNAME\\ZZSECOND^^^^^^^ZZX",
    "PatientID": "ZZBADPID" + "7" * 70,
    "PatientBirthDate": "ZZDOB0203",
}


def _write_bad(dest: Path, sop: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY, f"{STUDY}.1", sop
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        path = dest / f"{sop}.dcm"
        ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    for keyword, value in BAD_PHI.items():  # raw bytes: pydicom would refuse to write them
        new = value.encode()
        new += b" " * (len(new) % 2)
        tag = pydicom.datadict.tag_for_keyword(keyword)
        assert tag is not None
        group, elem = tag >> 16, tag & 0xFFFF
        vr = pydicom.datadict.dictionary_VR(tag).encode()
        head = struct.pack("<HH", group, elem) + vr
        at = data.index(head)
        length = struct.unpack("<H", data[at + 6 : at + 8])[0]
        data = data[:at] + head + struct.pack("<H", len(new)) + new + data[at + 8 + length :]
    path.write_bytes(data)
    return path


def test_unparseable_patient_values_leave_no_trace(
    node_factory: Callable[..., NodeProc], dcmtk: Callable[[str], str], tmp_path: Path
) -> None:
    node = node_factory(logging={"format": "json", "level": "debug"})
    node.start(env={"PYTHONWARNINGS": "always"})
    src = tmp_path / "src"
    src.mkdir()
    files = [_write_bad(src, f"{STUDY}.1.{i}") for i in range(1, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert str(pydicom.dcmread(files[0]).PatientBirthDate) == "ZZDOB0203"
    tool = dcmtk("storescu")
    sent = subprocess.run(
        [
            tool,
            "-nh",
            "-aet",
            "STORESCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    node.wait_for(lambda: node.query("SELECT state FROM studies")[0][0] == "done")
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == 3
    status = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--rules", str(node.rules_path), "--json"],
        capture_output=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "always"},
    )
    assert status.returncode == 0
    assert node.stop() == 0
    logs = node.logs().encode()
    assert b"job_finished" in logs
    needles = [b"ZZBADNAME", b"ZZSECOND", b"ZZBADPID", b"ZZDOB0203", b"zzdob0203", b"zzbadname"]
    for needle in needles:
        assert needle not in logs, f"{needle!r} in node log output"
        assert needle not in status.stdout + status.stderr
    stored = set((node.spool / "instances").rglob("*.dcm"))
    assert len(stored) == 3
    for p in (p for p in node.spool.rglob("*") if p.is_file() and p not in stored):
        data = p.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle!r} in {p.relative_to(node.spool)}"

"""dcmtk storescu against a real `neuronode serve`: every transfer syntax, policy, quarantine.

Each file is sent in its own transfer syntax (storescu -R plus the matching --propose option),
so the node receives and stores exactly what a scanner would have sent, and the stored file's
transfer syntax and decoded pixels are compared with the source file's.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import UID

from node.ingest.receive import TRANSFER_SYNTAXES, storage_sop_classes
from node.ingest.spool import is_valid_uid
from tests.conftest import pydicom_file
from tests.integration.conftest import NodeProc

pytestmark = pytest.mark.integration

# storescu option that proposes each transfer syntax (with -R: only what the files need).
PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}

SENDERS = 4

# A receive-only node: nothing becomes ready while these tests run.
# Files dcmtk refuses to read (e.g. pydicom's deliberately mis-encoded samples): never sent.
IGNORED_BY_DCMTK: set[Path] = set()
# pydicom samples that storescu refuses to read (truncated or mis-encoded on purpose).
DCMTK_UNREADABLE = frozenset(
    {
        "MR_truncated.dcm",
        "SC_rgb_jpeg.dcm",
        "rtdose_rle.dcm",
        "rtdose_rle_1frame.dcm",
        "rtplan_truncated.dcm",
    }
)

# Samples whose pixel data cannot be read to the end: refused into quarantine, never acked.
UNPARSEABLE = frozenset({"badVR.dcm"})  # NumberOfFrames '1A': its pixels cannot be decoded

RECEIVE_ONLY = {"completion": {"quiet_period_s": 3600, "use_expected_counts": False}}


def storescu(
    tool: str,
    node: NodeProc,
    files: Iterable[Path],
    *,
    aet: str = "STORESCU",
    opts: tuple[str, ...] = (),
) -> tuple[subprocess.CompletedProcess[str], dict[Path, bool]]:
    """Send files with dcmtk storescu; return the process and, per file, whether it was acked."""
    cmd = [
        tool,
        "-v",
        "-nh",
        *opts,
        "-aet",
        aet,
        "-aec",
        node.ae_title,
        "127.0.0.1",
        str(node.port),
    ]
    out = subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=300)
    acked: dict[Path, bool] = {}
    current: Path | None = None
    for line in (out.stdout + out.stderr).splitlines():
        m = re.match(r"I: Sending file: (.*)$", line)
        ignored = re.search(r"file: (.*), ignoring file$", line)
        if ignored:  # dcmtk itself cannot parse it: never sent (recorded as None)
            IGNORED_BY_DCMTK.add(Path(ignored.group(1)))
        if m:
            current = Path(m.group(1))
            acked[current] = False
        elif "Received Store Response (Success)" in line and current is not None:
            acked[current] = True
    return out, acked


def _header(path: Path) -> pydicom.Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            return None


def _sendable(paths: Iterable[Path]) -> list[tuple[Path, pydicom.Dataset]]:
    """Files with a storage SOP class, a transfer syntax we accept and valid UIDs."""
    classes = set(storage_sop_classes())
    out = []
    for p in paths:
        ds = _header(p)
        if ds is None or "SOPClassUID" not in ds:
            continue
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        uids = (ds.get(k) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"))
        if (
            str(ds.SOPClassUID) in classes
            and ts in TRANSFER_SYNTAXES
            and all(u is not None and is_valid_uid(str(u)) for u in uids)
        ):
            out.append((p, ds))
    return out


def _pixels(path: Path) -> np.ndarray | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds:
                return None
            return np.asarray(ds.pixel_array)
        except Exception:
            return None


def _send_and_check(
    tool: str, node: NodeProc, batch: list[tuple[Path, pydicom.Dataset]]
) -> tuple[int, int]:
    """Send a batch (unique SOP UIDs) grouped by transfer syntax; check index, TS and pixels."""
    by_ts: dict[str, list[Path]] = collections.defaultdict(list)
    for p, ds in batch:
        by_ts[str(ds.file_meta.TransferSyntaxUID)].append(p)
    for ts, files in by_ts.items():
        # pynetdicom answers one association at ~20 small instances/s (latency, not CPU):
        # several senders at once, as a PACS would do, keep the test fast.
        chunks = [files[i::SENDERS] for i in range(SENDERS) if files[i::SENDERS]]
        results: list[tuple[subprocess.CompletedProcess[str], dict[Path, bool]]] = []

        def send(chunk: list[Path]) -> None:
            results.append(storescu(tool, node, chunk, opts=("-R", PROPOSE[ts])))  # noqa: B023

        threads = [threading.Thread(target=send, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == len(chunks)
        acked = {p: ok for _, a in results for p, ok in a.items()}
        out = results[0][0]
        not_acked = [
            str(p)
            for p in files
            if not acked.get(p) and p not in IGNORED_BY_DCMTK and p.name not in UNPARSEABLE
        ]
        assert not any(acked.get(p) for p in files if p.name in UNPARSEABLE)
        assert not not_acked, f"{UID(ts).name}: not acknowledged {not_acked}\n{out.stdout[-3000:]}"
    rows = {
        r[0]: r[1:]
        for r in node.query("SELECT sop_instance_uid, path, transfer_syntax_uid FROM instances")
    }
    decoded = undecodable = 0
    for p, ds in batch:
        if p in IGNORED_BY_DCMTK:
            continue
        sop = str(ds.SOPInstanceUID)
        if p.name in UNPARSEABLE:
            assert sop not in rows, f"{p.name} cannot be parsed to its end but was stored"
            continue
        assert sop in rows, f"{p.name} acknowledged but not indexed"
        stored = node.spool / rows[sop][0]
        assert rows[sop][1] == str(ds.file_meta.TransferSyntaxUID), p.name
        assert str(
            pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID
        ) == str(ds.file_meta.TransferSyntaxUID), f"{p.name}: transfer syntax changed in transit"
        got = _pixels(stored)
        if got is None:
            # Only acceptable where the source has no pixel data (SR, PDF) or does not decode.
            assert _pixels(p) is None, f"{p.name}: stored copy does not decode"
            undecodable += 1
            continue
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            source = _pixels(p)
            assert source is not None and np.array_equal(got, source), p.name
        decoded += 1
    return decoded, undecodable


@pytest.mark.slow
def test_pydicom_testdata_arrives_indexed_and_decodes(
    node_factory: Callable[..., NodeProc], dcmtk: Callable[[str], str]
) -> None:
    tool = dcmtk("storescu")
    files = _sendable(Path(p) for p in get_testdata_files())
    # pydicom ships the same SOP instance in several transfer syntaxes: a node stores a SOP
    # instance once, so each copy goes to a fresh node (round k = k-th copy of each instance).
    rounds: list[list[tuple[Path, pydicom.Dataset]]] = []
    seen: collections.Counter[str] = collections.Counter()
    for p, ds in sorted(files, key=lambda x: x[0].name):
        k = seen[str(ds.SOPInstanceUID)]
        seen[str(ds.SOPInstanceUID)] += 1
        while len(rounds) <= k:
            rounds.append([])
        rounds[k].append((p, ds))
    tss = {str(ds.file_meta.TransferSyntaxUID) for _, ds in files}
    for ts in (
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.70",
    ):
        assert ts in tss, f"no test file in {UID(ts).name}"
    decoded = undecodable = 0
    for i, batch in enumerate(rounds):
        node = node_factory(f"round{i}", **RECEIVE_ONLY)
        node.start()
        d, u = _send_and_check(tool, node, batch)
        decoded, undecodable = decoded + d, undecodable + u
        assert node.stop() == 0
    assert len(files) > 100
    assert {p.name for p in IGNORED_BY_DCMTK} <= DCMTK_UNREADABLE
    assert decoded >= 80, (decoded, undecodable)  # 56 samples carry no pixel data (RT, SR)


@pytest.mark.slow
def test_realdata_arrives_indexed_and_decodes(
    node_factory: Callable[..., NodeProc], dcmtk: Callable[[str], str], realdata: Path
) -> None:
    tool = dcmtk("storescu")
    files = _sendable(p for p in sorted(realdata.rglob("*")) if p.is_file())
    unique: dict[str, tuple[Path, pydicom.Dataset]] = {}
    for p, ds in files:
        unique.setdefault(str(ds.SOPInstanceUID), (p, ds))
    node = node_factory("real", **RECEIVE_ONLY)
    node.start()
    decoded, undecodable = _send_and_check(tool, node, list(unique.values()))
    assert len(unique) > 1400
    assert decoded == len(unique) - undecodable and undecodable <= 10, undecodable
    n_indexed = node.query("SELECT COUNT(*) FROM instances")[0][0]
    assert n_indexed == len(unique)
    assert node.stop() == 0


def _mr_copy(dest: Path, study: str, series: str, sop: str, **attrs: object) -> Path:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    path = dest / f"{sop.replace('.', '_')}.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def test_unknown_caller_is_rejected(
    node: NodeProc, dcmtk: Callable[[str], str], tmp_path: Path
) -> None:
    f = _mr_copy(tmp_path, "1.2.3", "1.2.3.1", "1.2.3.1.1")
    out, acked = storescu(dcmtk("storescu"), node, [f], aet="INTRUDER")
    assert out.returncode != 0
    assert "Calling AE Title Not Recognized" in out.stdout + out.stderr
    assert not any(acked.values())
    node.wait_for(lambda: "association_rejected" in node.logs())
    lines = [json.loads(x) for x in node.logs().splitlines() if "association_rejected" in x]
    assert lines[0]["calling_ae"] == "INTRUDER" and lines[0]["peer_host"] == "127.0.0.1"
    assert lines[0]["reason"] == "calling AE title not recognised"
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    ok, acked = storescu(dcmtk("storescu"), node, [f], aet="STORESCU")
    assert ok.returncode == 0 and acked == {f: True}


def test_malformed_file_is_quarantined_while_association_goes_on(
    node: NodeProc, dcmtk: Callable[[str], str], tmp_path: Path
) -> None:
    good1 = _mr_copy(tmp_path, "1.2.3", "1.2.3.1", "1.2.3.1.1")
    bad_uid = _mr_copy(tmp_path, "1.2.3", "1.2.3.ABC", "1.2.3.1.2")
    no_study = _mr_copy(tmp_path, "1.2.3", "1.2.3.1", "1.2.3.1.3", StudyInstanceUID=None)
    good2 = _mr_copy(tmp_path, "1.2.3", "1.2.3.1", "1.2.3.1.4")
    out, acked = storescu(dcmtk("storescu"), node, [good1, bad_uid, no_study, good2])
    assert acked == {good1: True, bad_uid: False, no_study: False, good2: True}, out.stdout
    sops = {r[0] for r in node.query("SELECT sop_instance_uid FROM instances")}
    assert sops == {"1.2.3.1.1", "1.2.3.1.4"}
    reasons = sorted(
        json.loads(p.read_text())["reason"]
        for p in (node.spool / "quarantine").glob("*.reason.json")
    )
    assert reasons == ["invalid SeriesInstanceUID", "missing StudyInstanceUID"]
    assert len(list((node.spool / "quarantine").glob("*.dcm"))) == 2
    node.wait_for(lambda: "association_summary" in node.logs())
    (summary,) = [json.loads(x) for x in node.logs().splitlines() if "association_summary" in x]
    assert (summary["n_stored"], summary["n_quarantined"], summary["n_failed"]) == (2, 2, 0)


def test_two_senders_at_once_both_succeed(
    node: NodeProc, dcmtk: Callable[[str], str], tmp_path: Path
) -> None:
    tool = dcmtk("storescu")
    batches = {}
    for aet, study in (("STORESCU", "1.2.10"), ("SENDER2", "1.2.20")):
        d = tmp_path / aet
        d.mkdir()
        batches[aet] = [_mr_copy(d, study, f"{study}.1", f"{study}.1.{i}") for i in range(1, 16)]
    results: dict[str, tuple[subprocess.CompletedProcess[str], dict[Path, bool]]] = {}

    def send(aet: str) -> None:
        results[aet] = storescu(tool, node, batches[aet], aet=aet)

    threads = [threading.Thread(target=send, args=(aet,)) for aet in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for aet, (out, acked) in results.items():
        assert out.returncode == 0, out.stdout
        assert sum(acked.values()) == 15, aet
    counts = dict(node.query("SELECT study_uid, n_instances FROM studies"))
    assert counts == {"1.2.10": 15, "1.2.20": 15}


@pytest.mark.slow
def test_kill_9_under_four_senders_loses_no_acknowledged_instance(
    node_factory: Callable[..., NodeProc], dcmtk: Callable[[str], str], tmp_path: Path
) -> None:
    """Four storescu associations at once (the group commit shares fsyncs and index
    transactions between them), kill -9 mid-transfer: every instance a sender was told is
    stored is on disk, parses, and is indexed after the restart."""
    tool = dcmtk("storescu")
    node = node_factory(**RECEIVE_ONLY)
    node.start()
    batches = []
    for k in range(4):
        d = tmp_path / f"sender{k}"
        d.mkdir()
        study = f"1.2.{40 + k}"
        batches.append([_mr_copy(d, study, f"{study}.1", f"{study}.1.{i}") for i in range(150)])
    results: list[tuple[subprocess.CompletedProcess[str], dict[Path, bool]]] = []

    def send(batch: list[Path]) -> None:
        results.append(storescu(tool, node, batch, aet="STORESCU"))

    threads = [threading.Thread(target=send, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    node.wait_for(lambda: node.query("SELECT COUNT(*) FROM instances")[0][0] >= 60)
    node.kill()
    for t in threads:
        t.join()
    acked = {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for _, per_file in results
        for path, ok in per_file.items()
        if ok
    }
    assert 0 < len(acked) < 600, len(acked)  # the kill came mid-transfer
    node.start()
    indexed = dict(node.query("SELECT sop_instance_uid, path FROM instances"))
    for sop in acked:
        assert sop in indexed, f"acknowledged {sop} lost"
        assert pydicom.dcmread(node.spool / indexed[sop]).SOPInstanceUID == sop
    assert list((node.spool / "tmp").iterdir()) == []
    assert node.stop() == 0

"""Seeded mutated data sets against a real `neuronode serve`, on every run.

Each mutation (truncation, huge lengths, wrong VR lengths, byte flips, implicit/explicit
mismatch, broken pixel data) is sent as raw bytes (pynetdicom streams the file without decoding
it). For each one the node must answer either a failure and keep the bytes in quarantine with a
reason, or success and store an instance whose full parse (pixel data included) succeeds. Then
the study, bad instances and all, must still be processed once. NEURONODE_FUZZ_N sets the count
(default 240); the `heavy` test sends 2,000.
"""

from __future__ import annotations

import io
import os
import random
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from tests.conftest import pydicom_file
from tests.integration.conftest import NodeProc

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.9.7777.14"
SUCCESS = 0x0000
QUARANTINE_STATUSES = {0xC000, 0xA900}


def _placeholder(k: int) -> str:
    """A base SOP Instance UID that a per-mutation UID of the same length replaces."""
    return f"{STUDY}.9.{k}.199999999"


def _base(ts: str, sop: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, f"{STUDY}.{ts[-1]}"
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
        if ts == RLELossless:
            ds.compress(RLELossless)
        else:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(ts)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True, implicit_vr=ts == ImplicitVRLittleEndian)
    return buf.getvalue()


def _meta_end(data: bytes) -> int:
    """Offset of the data set after the preamble and the file meta group."""
    group_len = int(struct.unpack("<I", data[140:144])[0])
    return 144 + group_len


def _mutate(data: bytes, other: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of `data`; `other` is the same instance in the other VR encoding."""
    start = _meta_end(data)
    body = bytearray(data[start:])
    kind = rng.choice(
        ["truncate", "huge_length", "vr_length", "flip", "ts_mismatch", "pixels", "pixels"]
    )
    if kind == "truncate":
        body = body[: rng.randrange(1, len(body))]
    elif kind == "huge_length":
        at = rng.randrange(0, max(1, len(body) - 8))
        body[at + 4 : at + 8] = struct.pack("<I", rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 10**8]))
    elif kind == "vr_length":
        at = rng.randrange(0, min(len(body) - 8, 600))
        body[at + 6 : at + 8] = struct.pack("<H", rng.randrange(0, 0xFFFF))
    elif kind == "flip":
        for _ in range(rng.randrange(1, 8)):
            at = rng.randrange(0, min(len(body), 800))
            body[at] ^= 1 << rng.randrange(8)
    elif kind == "ts_mismatch":  # the file meta says one encoding, the data set is the other
        return kind, bytes(data[:start]) + other[_meta_end(other) :]
    else:  # broken pixel data: cut, pad or corrupt its length or items
        at = bytes(body).rfind(b"\xe0\x7f\x10\x00")
        choice = rng.randrange(3)
        if choice == 0:
            body = body[: at + rng.randrange(8, max(9, len(body) - at - 1))]
        elif choice == 1:
            body[at + 8 : at + 12] = struct.pack("<I", rng.randrange(0, 9000) * 2)
        else:
            for _ in range(6):
                pos = rng.randrange(at + 8, min(len(body), at + 40))
                body[pos] = rng.randrange(256)
    return kind, bytes(data[:start]) + bytes(body)


TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC"}
TEXT_VRS |= {"UI", "UR", "UT"}


def _convert(ds: pydicom.Dataset) -> None:
    """Every element converts; a text value that does not (IS '1A') is the value's problem."""
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
        except ValueError:
            assert str(ds.get_item(tag).VR) in TEXT_VRS
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                _convert(item)


def full_parse(path: Path) -> None:
    """What a reader of the stored instance does: every element and the pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        _convert(ds)
        if "PixelData" not in ds:  # a flipped tag may leave an object without pixels
            return
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            n = int(ds.get("NumberOfFrames", 1) or 1)
            assert len(list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=n))) == n
        else:
            assert ds.pixel_array.size > 0


def _fuzz(node: NodeProc, tmp_path: Path, n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    syntaxes = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)
    bases = [_base(ts, _placeholder(k)) for k, ts in enumerate(syntaxes)]
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for ts in syntaxes:
        ae.add_requested_context(MRImageStorage, ts)
    _config.STORE_SEND_CHUNKED_DATASET = True
    tally = {"success": 0, "quarantined": 0, "other": 0}
    qdir = node.spool / "quarantine"
    src = tmp_path / "fuzz"
    src.mkdir()
    assoc = None
    try:
        for i in range(n):
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
                assert assoc.is_established
            k = i % len(bases)
            sop = f"{STUDY}.9.{k}.1{i:08d}"
            base = bases[k].replace(_placeholder(k).encode(), sop.encode())
            other = bases[1 - k if k < 2 else 0].replace(
                _placeholder(1 - k if k < 2 else 0).encode(), sop.encode()
            )
            kind, data = _mutate(base, other, rng)
            path = src / f"{i}.dcm"
            path.write_bytes(data)
            before = len(list(qdir.glob("*.reason.json")))
            try:
                rsp = assoc.send_c_store(path)
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            except Exception:  # our own file meta did not parse: nothing was sent
                status = None
            if status is None:
                if assoc.is_aborted or not assoc.is_established:
                    assoc = None
                tally["other"] += 1
                continue
            if status == SUCCESS:
                tally["success"] += 1
                rows = node.query("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop,))
                if rows:  # not a duplicate of an earlier identical mutation
                    try:
                        full_parse(node.spool / rows[0][0])
                    except Exception as exc:
                        raise AssertionError(
                            f"mutation {i} ({kind}) acknowledged but does not parse: {exc!r}"
                        ) from exc
            else:
                assert status in QUARANTINE_STATUSES, (i, kind, hex(status))
                tally["quarantined"] += 1
                after = list(qdir.glob("*.reason.json"))
                # A new reason file, or the same bytes quarantined before (identical mutation).
                assert len(after) >= before and after, (i, kind)
        if assoc is not None:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return tally


RULES = {"completion": {"quiet_period_s": 1.0, "use_expected_counts": False}}


def _run(node_factory: Callable[..., NodeProc], tmp_path: Path, n: int) -> None:
    node = node_factory(**RULES)
    node.start()
    tally = _fuzz(node, tmp_path, n, seed=1400)
    assert tally["quarantined"] > n // 10 and tally["success"] > 0, tally
    for reason in (node.spool / "quarantine").glob("*.reason.json"):
        assert '"reason": "' in reason.read_text()
    # The study, with every bad instance among its good ones, is processed once and done.
    node.wait_for(
        lambda: (
            node.query("SELECT state FROM studies WHERE study_uid = ?", (STUDY,))[0][0] == "done"
        ),
        timeout_s=60,
    )
    jobs = node.query("SELECT state, attempts FROM jobs")
    assert jobs and all(state == "done" and attempts == 1 for state, attempts in jobs), jobs
    assert "Traceback" not in node.logs()


def test_fuzzed_instances_are_refused_or_fully_parseable(
    node_factory: Callable[..., NodeProc], tmp_path: Path
) -> None:
    _run(node_factory, tmp_path, int(os.environ.get("NEURONODE_FUZZ_N", "240")))


@pytest.mark.heavy
def test_fuzz_heavy(node_factory: Callable[..., NodeProc], tmp_path: Path) -> None:
    _run(node_factory, tmp_path, 2000)

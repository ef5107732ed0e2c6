"""The tag rules and the two commands on the real scanner series in ../shared/realdata."""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from node.headers import read_series_headers
from node.records import SequenceLabel, SeriesHeader
from node.sequence import classify_headers
from node.sequence_cli import cmd_classify, cmd_evaluate_sequences, read_labels
from tests.conftest import REALDATA

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUTABLE = {label for label in SequenceLabel if label is not SequenceLabel.OTHER}


@pytest.fixture(scope="module")
def realdata_headers() -> tuple[SeriesHeader, ...]:
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is not beside the repo")
    return read_series_headers([REALDATA])


def _truth() -> dict[str, SequenceLabel]:
    with (REALDATA / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return {row["series_uid"]: SequenceLabel(row["label"]) for row in csv.DictReader(fh)}


def test_headers_of_every_labelled_series_are_read(
    realdata_headers: tuple[SeriesHeader, ...],
) -> None:
    uids = {h.series_uid for h in realdata_headers}
    assert set(_truth()) <= uids
    # dcm_qa_ts: one SeriesInstanceUID under nine SeriesNumbers -> nine series.
    per_uid = Counter(h.series_uid for h in realdata_headers)
    assert max(per_uid.values()) == 9


def test_tag_rules_meet_the_realdata_targets(realdata_headers: tuple[SeriesHeader, ...]) -> None:
    truth = _truth()
    decisions = classify_headers(realdata_headers)
    by_uid: dict[str, set[SequenceLabel]] = {}
    for h, d in zip(realdata_headers, decisions, strict=True):
        by_uid.setdefault(h.series_uid, set()).add(d.label)
    misses = {
        uid: labels for uid, labels in by_uid.items() if uid in truth and labels != {truth[uid]}
    }
    accuracy = 1 - len(misses) / len(truth)
    assert accuracy >= 0.95, misses
    leaked = [
        uid
        for uid, labels in by_uid.items()
        if truth.get(uid) is SequenceLabel.OTHER and labels & ROUTABLE
    ]
    assert leaked == []


def test_classify_prints_a_row_per_series(capsys: pytest.CaptureFixture[str]) -> None:
    folder = REALDATA / "dcm_qa_xa30" / "In"
    if not folder.is_dir():
        pytest.skip("dcm_qa_xa30 is not in ../shared/realdata")
    args = argparse.Namespace(directory=folder, no_cnn=False, json=False)
    assert cmd_classify(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sequence CNN bundle not available:") or out[0].startswith(
        "sequence CNN "
    )
    rows = [line.split() for line in out[2:]]
    assert len(rows) == 21  # 20 image series + the Phoenix document
    by_number = {row[0]: row for row in rows}
    assert by_number["5"][2] == "T1"
    assert by_number["11"][2] == "ADC"
    assert by_number["12"][2] == "DWI"
    assert by_number["7"][2] == "OTHER"


def test_classify_json(capsys: pytest.CaptureFixture[str]) -> None:
    folder = REALDATA / "dcm_qa_fmap" / "In" / "Siemens"
    if not folder.is_dir():
        pytest.skip("dcm_qa_fmap is not in ../shared/realdata")
    assert cmd_classify(argparse.Namespace(directory=folder, no_cnn=True, json=True)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cnn"].startswith("sequence CNN disabled")
    assert [s["label"] for s in doc["series"]] == ["OTHER"] * 4
    assert all(s["method"] == "tags" and s["cnn_label"] is None for s in doc["series"])


def test_evaluate_sequences_writes_metrics(tmp_path: Path) -> None:
    folder = REALDATA / "dcm_qa_xa30" / "In"
    if not folder.is_dir():
        pytest.skip("dcm_qa_xa30 is not in ../shared/realdata")
    args = argparse.Namespace(
        directory=folder, labels=REALDATA / "labels.csv", out=tmp_path, no_cnn=True
    )
    assert cmd_evaluate_sequences(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # Labels of other folders and the unlabelled Phoenix document are skipped.
    assert metrics["n_series"] == 20
    assert metrics["accuracy"] >= 0.95
    assert metrics["other_as_routable"] == 0
    assert sum(sum(row.values()) for row in metrics["confusion"].values()) == metrics["n_series"]
    assert len(metrics["errors"]) == metrics["n_series"] - round(
        metrics["accuracy"] * metrics["n_series"]
    )
    assert metrics["confusion"]["ADC"] == {"ADC": 2}
    assert set(metrics["methods"]) == {"tags", "fused"}  # no CNN: never invented
    assert len(read_labels(REALDATA / "labels.csv")) == 40  # one Philips UID listed twice

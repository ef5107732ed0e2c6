"""Scoring the sequence classifier: labels per folder, one series per (folder, UID)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.classify.evaluate import (
    _Prediction,
    per_series,
    read_label_file,
    read_labels,
    score,
    series_units,
)
from node.errors import ConfigError
from node.records import SequenceLabel as L
from node.records import SeriesHeader


def _header(uid: str, number: int) -> SeriesHeader:
    return SeriesHeader(
        series_uid=uid,
        study_uid="1.2.3",
        series_number=number,
        series_description="",
        protocol_name="",
        sequence_name="",
        manufacturer="siemens",
        model="",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        modality="MR",
        image_type=(),
        scanning_sequence=(),
        sequence_variant=(),
        scan_options=(),
        mr_acquisition_type="2D",
    )


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_one_uid_in_two_folders_is_two_series_and_one_uid_renumbered_is_one() -> None:
    headers = [_header("9.9", 1), _header("9.9", 2), _header("9.9", 3), _header("8.8", 4)]
    folders = [Path("a/x"), Path("a/x"), Path("b/y"), Path("a/x")]
    units = series_units(headers, folders)
    assert units == [("a/x", "9.9"), ("a/x", "9.9"), ("b/y", "9.9"), ("a/x", "8.8")]
    predictions = [
        _Prediction(label=L.T1, reason="r1"),
        _Prediction(label=L.T1, reason="r2"),
        _Prediction(label=L.OTHER, reason="r3"),
        _Prediction(label=L.T2, reason="r4"),
    ]
    numbers = [h.series_number for h in headers]
    merged = per_series(units, numbers, predictions)
    assert set(merged) == {("a/x", "9.9"), ("b/y", "9.9"), ("a/x", "8.8")}
    assert merged[("a/x", "9.9")][0].label is L.T1
    assert merged[("a/x", "9.9")][1] == "1,2"
    truth = {("a/x", "9.9"): L.T1, ("b/y", "9.9"): L.T1, ("a/x", "8.8"): L.T2}
    result = score(truth, merged, {})
    assert (result["n_series"], result["n_correct"]) == (3, 2)
    assert [(e["folder"], e["series_uid"]) for e in result["errors"]] == [("b/y", "9.9")]


def test_labels_name_their_folder_and_match_from_any_root(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "series_dir,series_uid,label\n"
        "site1/In/Philips,1.2,OTHER\n"
        "site2/In/fmap,1.2,T1\n"
        ",3.4,FLAIR\n",
    )
    labels = read_label_file(path)
    # Evaluated from the archive root or from inside one site's folder: the row still matches.
    assert labels.label_of(Path("/data/site1/In/Philips"), "1.2") is L.OTHER
    assert labels.label_of(Path("site2/In/fmap/echo1"), "1.2") is L.T1
    assert labels.label_of(Path("In/fmap"), "1.2") is None  # no row ends this path
    assert labels.label_of(Path("anywhere"), "3.4") is L.FLAIR
    # A UID labelled two ways has no folder-free label; the agreeing one keeps it.
    assert read_labels(path) == {"3.4": L.FLAIR}


def test_a_uid_labelled_twice_without_folders_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "series_uid,label\n1.2,T1\n1.2,T2\n")
    with pytest.raises(ConfigError, match="labelled twice"):
        read_label_file(path)
    same = _write(tmp_path, "series_dir,series_uid,label\nx,1.2,T1\nx,1.2,T2\n")
    with pytest.raises(ConfigError, match="in x is labelled twice"):
        read_label_file(same)

"""The tag rules and the two commands on the real scanner series in ../shared/realdata."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from node import __version__
from node.classify.evaluate import read_labels
from node.classify.sequence import classify_headers
from node.cli.study import (
    ClassifyArgs,
    EvaluateSequencesArgs,
    cmd_classify,
    cmd_evaluate_sequences,
)
from node.dicom.headers import read_series_headers
from node.records import SequenceLabel, SeriesHeader
from tests.conftest import REALDATA

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUTABLE = {label for label in SequenceLabel if label is not SequenceLabel.OTHER}
NO_RULES = Path("/nonexistent/rules.yaml")  # no rule file: the built-in defaults


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
    args = ClassifyArgs(directory=folder, no_cnn=False, json=False, rules=NO_RULES)
    assert cmd_classify(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sequence CNN bundle not available:") or out[0].startswith(
        "sequence CNN "
    )
    rows = [line.split() for line in out[2:]]
    # One study laid out one folder per series: its 20 image series. Its Phoenix document (a
    # non-image object in a folder of its own) is set aside, as the node sets it aside; before
    # folders were grouped by study UID it was listed as a study of its own.
    assert len(rows) == 20
    by_number = {row[0]: row for row in rows}
    assert by_number["5"][2] == "T1"
    assert by_number["11"][2] == "ADC"
    assert by_number["12"][2] == "DWI"
    assert by_number["7"][2] == "OTHER"


def test_classify_json(capsys: pytest.CaptureFixture[str]) -> None:
    folder = REALDATA / "dcm_qa_fmap" / "In" / "Siemens"
    if not folder.is_dir():
        pytest.skip("dcm_qa_fmap is not in ../shared/realdata")
    assert cmd_classify(ClassifyArgs(directory=folder, no_cnn=True, json=True, rules=NO_RULES)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cnn"].startswith("sequence CNN disabled")
    assert [s["label"] for s in doc["series"]] == ["OTHER"] * 4
    assert all(s["method"] == "tags" and s["cnn_label"] is None for s in doc["series"])


def test_evaluate_sequences_writes_metrics(tmp_path: Path) -> None:
    folder = REALDATA / "dcm_qa_xa30" / "In"
    if not folder.is_dir():
        pytest.skip("dcm_qa_xa30 is not in ../shared/realdata")
    args = EvaluateSequencesArgs(
        directory=folder,
        labels=REALDATA / "labels.csv",
        out=tmp_path,
        no_cnn=True,
        rules=NO_RULES,
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
    # every labelled series in exactly one cell of each breakdown (this folder: one vendor,
    # a 1 mm MPRAGE among thicker 2D series)
    for breakdown in ("by_acquisition", "by_vendor", "by_thickness", "by_cell"):
        cells = metrics[breakdown]
        assert sum(c["tags"]["n"] for c in cells.values()) == metrics["n_series"], breakdown
        assert all(set(c) == {"tags", "fused"} for c in cells.values())
    assert set(metrics["by_vendor"]) == {"siemens"}
    assert set(metrics["by_cell"]) == {f"siemens {cell}" for cell in metrics["by_acquisition"]}
    assert {"thin (<= 2.5 mm)", "thick"} <= set(metrics["by_thickness"])
    assert len(read_labels(REALDATA / "labels.csv")) == 40  # one Philips UID listed twice
    rows = list(csv.DictReader((tmp_path / "series.csv").open(encoding="utf-8")))
    labelled = [r for r in rows if r["true"]]
    assert len({r["series_uid"] for r in labelled}) == 20
    assert all(r["cnn"] == "" for r in rows)  # --no-cnn: no CNN column invented
    assert sum(r["fused"] == r["true"] for r in labelled) >= 0.95 * len(labelled)
    assert all(r["folder"] and not r["folder"].startswith("/") for r in rows)  # under the root


def test_one_uid_in_two_study_folders_is_scored_as_two_series(tmp_path: Path) -> None:
    """The Philips field map is in dcm_qa_enh and again in dcm_qa_fmap under one
    SeriesInstanceUID: two series (41 labelled in all), each found under its own folder."""
    folders = ("dcm_qa_enh", "dcm_qa_fmap")
    if not all((REALDATA / f).is_dir() for f in folders):
        pytest.skip("dcm_qa_enh and dcm_qa_fmap are not in ../shared/realdata")
    root = tmp_path / "data"
    root.mkdir()
    for f in folders:
        shutil.copytree(REALDATA / f, root / f)
    args = EvaluateSequencesArgs(
        directory=root, labels=REALDATA / "labels.csv", out=tmp_path, no_cnn=True, rules=NO_RULES
    )
    assert cmd_evaluate_sequences(args) == 0
    rows = list(csv.DictReader((tmp_path / "series.csv").open(encoding="utf-8")))
    shared = "1.3.46.670589.11.17240.5.0.8932.2018052615250908935"
    assert {r["folder"] for r in rows if r["series_uid"] == shared} == {
        "dcm_qa_enh/In/Philips",
        "dcm_qa_fmap/In/Philips/fmap",
    }
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    truth = _truth()
    labelled_dirs = {
        (row["series_dir"], row["series_uid"])
        for row in csv.DictReader((REALDATA / "labels.csv").open(encoding="utf-8"))
        if row["series_dir"].startswith(folders)
    }
    assert metrics["n_series"] == len(labelled_dirs) > len({u for _, u in labelled_dirs})
    assert all(uid in truth for _, uid in labelled_dirs)


def test_cnn_path_runs_a_bundle_and_fuses(tmp_path: Path) -> None:
    """With a (random-weight) sequence bundle present, every image series gets CNN votes."""
    torch = pytest.importorskip("torch")
    from node.bundles.bundle import build_network, load_bundle, write_bundle
    from node.classify.study import classify_folder
    from node.config import SequenceSettings
    from node.lab.train import recipes
    from node.records import DecisionMethod

    folder = REALDATA / "dcm_qa_fmap" / "In" / "Siemens"
    if not folder.is_dir():
        pytest.skip("dcm_qa_fmap is not in ../shared/realdata")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    # A random network in a bundle written by the lab's own bundle writer (the sequence recipe).
    recipe = recipes.get_recipe("sequence")
    files = recipes.bundle_metadata(recipe, temperature=1.0, training={}, metrics={})
    network = build_network(recipe.network_name, recipe.network_args)
    bundle = write_bundle(tmp_path / "sequence", files, network.state_dict(), "test card")
    settings = SequenceSettings(slices_per_series=5)
    run = classify_folder(folder, settings, bundle=load_bundle(bundle))
    assert run.cnn_note.startswith(f"sequence CNN sequence {__version__}: ran on 4 of 4 series")
    assert run.cnn_verdicts is not None
    for verdict in run.cnn_verdicts:
        assert verdict is not None
        assert verdict.n_slices == 5
        assert sum(n for _, n in verdict.votes) == 5
        assert 0 < verdict.confidence <= 1
    for d in run.decisions:
        # The tags are sure these are field maps; a random CNN never makes them routable.
        assert d.label is SequenceLabel.OTHER
        assert d.cnn_label is not None and d.cnn_votes
        assert d.method in (DecisionMethod.FUSED, DecisionMethod.TAGS)


def test_fused_with_the_shipped_cnn_is_never_below_tags(
    realdata_headers: tuple[SeriesHeader, ...],
) -> None:
    """With the repository's sequence bundle, fused >= tags alone, and every labelled series
    right (no CNN vote overturns a confident tag label, a tag OTHER stays OTHER)."""
    pytest.importorskip("torch")
    from node.classify.study import classify_folder, load_sequence_bundle
    from node.config import SequenceSettings

    settings = SequenceSettings()
    bundle, why = load_sequence_bundle(settings)
    if bundle is None:
        pytest.skip(why)
    run = classify_folder(REALDATA, settings, bundle=bundle)
    truth = _truth()
    headers = run.headers
    labelled = [i for i, h in enumerate(headers) if h.series_uid in truth]
    right_tags = sum(run.tags_only[i].label is truth[headers[i].series_uid] for i in labelled)
    right_fused = sum(run.decisions[i].label is truth[headers[i].series_uid] for i in labelled)
    assert right_fused >= right_tags
    assert right_fused == len(labelled), [
        (headers[i].series_description, run.decisions[i].reasons)
        for i in labelled
        if run.decisions[i].label is not truth[headers[i].series_uid]
    ]

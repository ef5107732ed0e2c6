"""`neuronode calibrate`: a bundle's calibration refitted on labelled data it was not trained on,
written to inference.json with the weights untouched, recorded in metadata.json and the card."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from node.bundles import bundle as bundles
from node.lab.train import metrics
from node.lab.train.calibration import (
    SEQUENCE_METHOD,
    calibrate_bundle,
    score,
    series_outputs,
)
from node.lab.train.data import DataError, SeriesItem
from node.records import SequenceLabel, SeriesVolume
from tests.unit.test_bundles import make_bundle, make_volume

torch.set_num_threads(1)

SEQUENCES = ("T1", "T2", "FLAIR", "DWI", "OTHER")


def _item(i: int, sequence: str, label: str | None = None) -> SeriesItem:
    return SeriesItem(
        group=f"p{i // 2}",
        study_uid=f"1.{i}",
        series_uid=f"1.{i}.1",
        sequence=SequenceLabel(sequence),
        label=label,
        paths=(Path(f"/x/{i}.dcm"),),
    )


def _volume(item: SeriesItem) -> SeriesVolume:
    """A phantom whose brightness and texture depend on the series, so logits differ."""
    i = int(item.study_uid.split(".")[1])
    v = make_volume(n=6 + i % 5, rows=40, cols=40, seed=i)
    pix = v.pixels * (1.0 + 0.3 * (i % 4))
    if item.label == "gbm":
        pix[:, 8:16, 8:16] += 2000
    return dataclasses.replace(v, pixels=pix.astype(np.float32))


def _sequence_items(n: int = 20) -> list[SeriesItem]:
    return [_item(i, SEQUENCES[i % len(SEQUENCES)]) for i in range(n)]


def _files(bundle_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(bundle_dir.rglob("*")) if p.is_file()}


# --- the fit (pure) ------------------------------------------------------------------------------


def test_series_mean_probabilities_average_each_series_slices() -> None:
    z = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
    p = metrics.series_mean_probabilities(z, [0, 0, 1], temperature=2.0)
    soft = np.exp(z / 2.0) / np.exp(z / 2.0).sum(axis=1, keepdims=True)
    assert np.allclose(p, [soft[:2].mean(axis=0), soft[2]])
    assert np.allclose(p.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="every series index"):
        metrics.series_mean_probabilities(z, [0, 0, 2])
    with pytest.raises(ValueError, match="temperature"):
        metrics.series_mean_probabilities(z, [0, 0, 1], temperature=0.0)


def test_series_temperature_recovers_the_temperature_the_labels_were_drawn_with() -> None:
    rng = np.random.default_rng(0)
    n, k, true_t = 3000, 4, 2.5
    z = rng.normal(0, 4, (n, k))  # one slice per series: plain temperature scaling
    p = np.exp(z / true_t) / np.exp(z / true_t).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    fitted = metrics.fit_series_temperature(z, np.arange(n), y)
    assert fitted == pytest.approx(true_t, rel=0.1)
    assert fitted == pytest.approx(metrics.fit_temperature(z, y), rel=1e-3)
    # several slices per series: the fit is a minimum of the series log-loss
    series = np.arange(n) // 3
    labels = y[::3]
    t = metrics.fit_series_temperature(z, series, labels)

    def loss(temp: float) -> float:
        return metrics.probability_nll(metrics.series_mean_probabilities(z, series, temp), labels)

    assert loss(t) <= min(loss(t * 1.05), loss(t / 1.05))


def test_top_label_ece_is_the_gap_between_confidence_and_accuracy() -> None:
    probs = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0] * 6 + [1] * 4)  # 60% right at 90% confidence
    assert metrics.top_label_ece(probs, labels) == pytest.approx(0.3)


# --- a bundle -----------------------------------------------------------------------------------


def test_sequence_calibration_is_written_recorded_and_served(tmp_path: Path) -> None:
    out = make_bundle(tmp_path, "sequence")  # temperature 1.5, untrained weights
    weights = out / "models" / "model.pt"
    digest = bundles.sha256_file(weights)
    weight_bytes = weights.read_bytes()
    items = _sequence_items()
    held = [_item(100 + i, SEQUENCES[i % len(SEQUENCES)]) for i in range(10)]
    fit = calibrate_bundle(
        out, items, data="unit phantoms", held_out=[("held-out phantoms", held)], load=_volume
    )
    # inference.json holds the new temperature, and only it changed there
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert inference["postprocessing"]["temperature"] == fit.temperature != 1.5
    assert inference["postprocessing"]["calibration_bias"] == 0.0  # multi-class: temperature
    # the weights are the same bytes with the same checksum, and the bundle still loads
    assert weights.read_bytes() == weight_bytes
    b = bundles.load_bundle(out)
    assert b.weights_sha256 == digest
    assert b.metadata.temperature == fit.temperature
    # metadata.json says where the calibration came from
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    record = meta["calibration"]
    assert record["method"] == SEQUENCE_METHOD and record["applied"] is True
    assert record["fitted_on"]["data"] == "unit phantoms"
    assert record["fitted_on"]["n_series"] == len(items)
    assert record["fitted_on"]["n_patients"] == len(items) // 2
    assert record["fitted_on"]["before"]["temperature"] == 1.5
    assert record["fitted_on"]["after"]["nll"] <= record["fitted_on"]["before"]["nll"]
    assert [h["data"] for h in record["held_out"]] == ["held-out phantoms"]
    assert record["held_out"][0]["n_series"] == len(held)
    assert "temperature" not in meta  # one place for the number
    # the recorded after-figures are those of the served path (classify_slices)
    probs, labels = [], []
    for it in items:
        sc = bundles.classify_slices(b, _volume(it), b.metadata.slice_n)
        probs.append(sc.probabilities.mean(axis=0))
        labels.append(b.labels.index(it.sequence.value))
    served = np.stack(probs).astype(np.float64)
    assert metrics.probability_nll(served, labels) == pytest.approx(
        record["fitted_on"]["after"]["nll"], abs=2e-4
    )
    assert metrics.top_label_ece(served, labels) == pytest.approx(
        record["fitted_on"]["after"]["ece"], abs=2e-4
    )
    # the card is rewritten from the record
    card = (out / "docs" / "README.md").read_text()
    assert "refitted after training" in card and "unit phantoms" in card
    assert f"Temperature {fit.temperature:.3f}" in card and "It replaced temperature 1.500" in card
    assert "held out: held-out phantoms" in card
    nll = record["fitted_on"]
    assert f"{nll['before']['nll']:.3f} -> {nll['after']['nll']:.3f}" in card
    assert "no longer holds" not in card
    assert "neuronode calibrate sequence --data CALIBRATION_DIR" in card
    # a hand edit of inference.json afterwards: the card says the record is not what is served
    bundles.write_calibration(out, temperature=2.0, calibration_bias=0.0)
    from node.lab.train.evaluate import model_card

    assert "no longer holds the refit" in model_card(bundles.read_bundle_config(out))


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = make_bundle(tmp_path, "sequence")
    before = _files(out)
    fit = calibrate_bundle(
        out, _sequence_items(10), data="d", apply=False, record=False, load=_volume
    )
    assert not fit.applied and not fit.recorded and fit.temperature > 0
    assert _files(out) == before
    with pytest.raises(ValueError, match="recorded"):
        calibrate_bundle(out, _sequence_items(4), data="d", record=False, load=_volume)


def test_record_only_documents_a_refit_but_keeps_serving_the_old_calibration(
    tmp_path: Path,
) -> None:
    out = make_bundle(tmp_path, "sequence")
    inference = (out / "configs" / "inference.json").read_bytes()
    weights = (out / "models" / "model.pt").read_bytes()
    fit = calibrate_bundle(out, _sequence_items(10), data="style z", apply=False, load=_volume)
    assert not fit.applied and fit.recorded
    assert (out / "configs" / "inference.json").read_bytes() == inference
    assert (out / "models" / "model.pt").read_bytes() == weights
    assert bundles.load_bundle(out).metadata.temperature == 1.5
    record = json.loads((out / "configs" / "metadata.json").read_text())["calibration"]
    assert record["applied"] is False and record["temperature"] == fit.temperature
    card = (out / "docs" / "README.md").read_text()
    assert "Temperature 1.500" in card  # what is served
    assert "**not applied**" in card and f"temperature {fit.temperature:.3f}" in card
    assert "style z" in card and "neuronode calibrate" not in card.split("## Reproduce")[1]


def test_task_bundle_gets_platt_scaling_on_its_labelled_series(tmp_path: Path) -> None:
    out = make_bundle(tmp_path, "gbm_pcnsl_t1c")
    digest = bundles.sha256_file(out / "models" / "model.pt")
    items = [_item(i, "T1C", "gbm" if i % 2 else "pcnsl") for i in range(16)]
    items += [_item(50, "T2", "gbm"), _item(51, "T1C", None)]  # not read / not labelled
    b = bundles.load_bundle(out)
    outputs = series_outputs(b, items, load=_volume)
    assert not outputs.multiclass and outputs.n_series == 16
    fit = calibrate_bundle(out, items, data="unit phantoms", load=_volume)
    record = json.loads((out / "configs" / "metadata.json").read_text())["calibration"]
    assert record["fitted_on"]["n_series"] == 16
    assert record["fitted_on"]["after"]["nll"] <= record["fitted_on"]["before"]["nll"] + 1e-9
    served = bundles.load_bundle(out)
    assert served.weights_sha256 == digest
    assert (served.metadata.temperature, served.metadata.calibration_bias) == (
        fit.temperature,
        fit.calibration_bias,
    )
    # the served probability is the recorded calibration of the series mean logit
    z = outputs.logits[0]
    expected = metrics.sigmoid(z / fit.temperature + fit.calibration_bias)
    assert bundles.predict_series(served, _volume(items[0])).probability == pytest.approx(
        float(expected), rel=1e-6, abs=1e-9
    )
    after = score(outputs, fit.temperature, fit.calibration_bias)
    assert after.nll == pytest.approx(record["fitted_on"]["after"]["nll"], abs=1e-4)


def test_refuses_data_without_a_series_the_bundle_reads(tmp_path: Path) -> None:
    out = make_bundle(tmp_path, "gbm_pcnsl_t1c")
    with pytest.raises(DataError, match="no labelled series"):
        calibrate_bundle(out, [_item(1, "T2", "gbm")], data="d", load=_volume)
    with pytest.raises(DataError, match="not one of"):
        calibrate_bundle(out, [_item(1, "T1C", "lgg")], data="d", load=_volume)


@pytest.mark.slow
def test_cli_calibrates_a_bundle_on_synthetic_studies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main

    synth = ["--studies", "1", "--size", "64", "--slices", "8", "--no-distractors"]
    assert main(["synth", "--out", str(tmp_path / "cal"), "--seed", "3", *synth]) == 0
    assert main(["synth", "--out", str(tmp_path / "test"), "--seed", "4", *synth]) == 0
    capsys.readouterr()  # synth's log lines
    out = make_bundle(tmp_path / "b", "sequence")
    before = _files(out)
    common = ["calibrate", "sequence", "--bundle", str(out), "--data", str(tmp_path / "cal")]
    assert main([*common, "--test", str(tmp_path / "test"), "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recorded"] is False and shown["applied"] is False and _files(out) == before
    assert len(shown["held_out"]) == 1 and "n=1" in shown["held_out"][0]["data"]
    assert main(common) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recorded"] is True and shown["applied"] is True
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["calibration"]["fitted_on"]["data"].startswith("node/lab/synth studies (n=1")
    assert meta["calibration"]["held_out"] == []
    assert bundles.load_bundle(out).metadata.temperature == shown["temperature"]
    assert math.isfinite(shown["fitted_on"]["after"]["ece"])


def test_cli_calibrate_options() -> None:
    from node.cli import build_parser

    args = build_parser().parse_args(
        ["calibrate", "sequence", "--data", "c", "--test", "b", "--test", "a", "--record-only"]
    )
    assert (args.name, args.data, args.test) == ("sequence", [Path("c")], [Path("b"), Path("a")])
    assert args.record_only and not args.dry_run and args.bundle is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["calibrate", "sequence", "--data", "c", "--dry-run", "--record-only"]
        )

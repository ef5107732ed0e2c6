"""The shipped bundles on synthetic studies: they load, run, explain, and (heavy) train/evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from node.bundles import bundle as bundles
from node.bundles import gradcam as explain
from node.records import SequenceLabel

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
SHIPPED = (
    sorted(p.name for p in MODELS.iterdir() if (p / "configs").is_dir()) if MODELS.is_dir() else []
)

pytestmark = pytest.mark.integration

torch.set_num_threads(1)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_bundle_loads_and_is_documented(name: str) -> None:
    path = MODELS / name
    b = bundles.load_model(path)  # a network bundle or a detector
    assert b.model_id == name
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 20 * 1024 * 1024
    card = (path / "docs" / "README.md").read_text()
    assert "NOT FOR CLINICAL USE" in card
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    assert meta["not_for_clinical_use"] is True
    assert meta["training"]["wall_time_s"] > 0
    assert "test" in meta["metrics"], "held-out evaluation not recorded in the card"


@pytest.fixture(scope="module")
def synth_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    synth = pytest.importorskip("node.lab.synth.study")
    out = tmp_path_factory.mktemp("synth")
    synth.write_studies(out, studies=2, seed=777, phenotypes=["gbm", "pcnsl"], size=128, slices=16)
    return out


@pytest.mark.slow
def test_specialists_and_gradcam_on_a_synth_study(synth_study: Path) -> None:
    if "gbm_pcnsl_t1c" not in SHIPPED or "sequence" not in SHIPPED:
        pytest.skip("bundles not shipped")
    from node.lab.train.data import load_items, load_volume

    seq = bundles.load_bundle(MODELS / "sequence")
    task = bundles.load_bundle(MODELS / "gbm_pcnsl_t1c")
    items = load_items(synth_study, "gbm_pcnsl")
    t1c = [it for it in items if it.sequence is SequenceLabel.T1C]
    assert len(t1c) == 2
    for it in t1c:
        volume = load_volume(it)
        verdict = bundles.classify_series(seq, volume, 9)
        # The T1 family: pre- or post-contrast is the tags' and study context's to decide (a
        # lesion-free slice looks alike before and after gadolinium; docs/sequence.md, row 7).
        assert verdict.label in (SequenceLabel.T1, SequenceLabel.T1C)
        pred = explain.with_heatmaps(task, volume, bundles.predict_series(task, volume), top_k=3)
        truth = 1 if it.label == "gbm" else 0
        assert (pred.probability >= 0.5) == bool(truth)
        assert len(pred.heatmaps) == 3
        for h in pred.heatmaps:
            assert h.cam.shape == volume.pixels.shape[1:]
            assert np.isclose(h.cam.max(), 1.0)


@pytest.mark.heavy
def test_train_and_evaluate_cli_on_synth(tmp_path: Path) -> None:
    synth = pytest.importorskip("node.lab.synth.study")
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    kw = {"phenotypes": ["tsc", "normal"], "size": 128, "slices": 16, "distractors": False}
    synth.write_studies(train_dir, studies=16, seed=31, **kw)
    synth.write_studies(test_dir, studies=8, seed=32, **kw)
    bundle = tmp_path / "tubers_flair"
    cmd = [sys.executable, "-m", "node.cli"]
    run = subprocess.run(
        [*cmd, "train", "tubers", "--data", str(train_dir), "--out", str(bundle), "--epochs", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "epoch 2/2" in run.stderr
    out = tmp_path / "eval"
    run = subprocess.run(
        [
            *cmd,
            "evaluate",
            "tubers",
            "--data",
            str(test_dir),
            "--bundle",
            str(bundle),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patients"] == 8
    assert {"auc", "auc_ci", "ece"} <= set(metrics)
    assert (out / "roc.png").stat().st_size > 1000
    assert (out / "reliability.png").stat().st_size > 1000


@pytest.mark.slow
def test_fit_and_evaluate_the_ensemble_from_the_command_line(
    synth_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not {"gbm_pcnsl_t1c", "gbm_pcnsl_adc"} <= set(SHIPPED):
        pytest.skip("bundles not shipped")
    from node import cli

    rules = REPO / "routing_rules" / "default.yaml"
    common = ["--data", str(synth_study), "--rules", str(rules), "--models-dir", str(MODELS)]
    assert cli.main(["fit-ensemble", "gbm_pcnsl", *common, "--out", str(tmp_path / "fit")]) == 0
    printed = capsys.readouterr().out
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert set(fit["weights"]) == {"gbm_pcnsl_t1c", "gbm_pcnsl_adc"}
    assert max(fit["weights"].values()) == 1.0 and fit["temperature"] > 0
    assert fit["n_studies"] == 2 and fit["log_loss_fitted"] <= fit["log_loss_with_rules"] + 1e-9
    assert f"temperature: {fit['temperature']:g}" in printed
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "gbm_pcnsl", "--ensemble", *common, "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_patients"] == 2 and report["n_not_assessable"] == 0
    assert set(report["single_models"]) == {"gbm_pcnsl_t1c", "gbm_pcnsl_adc"}
    assert report["comparison"]["n_patients"] == 2
    for folder in (out, out / "gbm_pcnsl_t1c", out / "gbm_pcnsl_adc"):
        assert (folder / "roc.png").stat().st_size > 1000

"""The shipped detector bundles through `neuronode process`: the lesion gate measures a synthetic
glioblastoma, its maps sit on the lesion and say what they are, and a normal brain is gated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.cli import main

REPO = Path(__file__).resolve().parents[2]


def _study(folder: Path, seed: int, phenotype: str) -> dict[str, object]:
    from node.lab.synth import write_studies

    manifest = write_studies(
        folder,
        studies=1,
        seed=seed,
        phenotypes=[phenotype],
        vendors=["siemens"],
        size=128,
        slices=16,
        distractors=False,
    )
    return dict(manifest.studies[0])


def _process(tmp_path: Path, name: str, phenotype: str, seed: int) -> tuple[dict, Path]:  # type: ignore[type-arg]
    src = tmp_path / name
    _study(src, seed, phenotype)
    out = tmp_path / f"{name}-out"
    assert main(["process", str(src), "--out", str(out)]) == 0
    (audit_path,) = out.glob("*/audit.json")
    return json.loads(audit_path.read_text()), audit_path.parent


@pytest.mark.parametrize("seed", [5])
def test_the_gate_measures_a_glioblastoma_and_maps_the_lesion(
    tmp_path: Path, seed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    audit, folder = _process(tmp_path, "gbm", "gbm", seed)
    assert "warning" not in capsys.readouterr().out  # every bundle (detectors too) serves
    preds = {p["model_id"]: p for p in audit["predictions"]}
    assert preds["tumour_flair_detector"]["probability"] > 0.5
    assert preds["tumour_t1c_detector"]["probability"] > 0.5
    findings = {f["task"]: f for f in audit["findings"]}
    assert findings["tumour"]["status"] == "present"
    assert findings["gbm_pcnsl"]["status"] != "no-lesion"
    maps = []
    for path in sorted((folder / "objects").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if str(ds.get("DerivationDescription", "")).startswith("Lesion map of tumour_"):
            maps.append(ds)
    assert maps, "the gate's detectors drew no lesion map"
    for ds in maps:
        assert "measured bright region, not a diagnosis" in str(ds.ImageComments)
        assert "NOT FOR DIAGNOSTIC USE" in str(ds.ImageComments)
        rgb = ds.pixel_array.astype(int)
        # The map is drawn in colour somewhere on the slice (grey elsewhere).
        assert np.any(np.abs(rgb[..., 0] - rgb[..., 2]) > 60)


def test_a_gate_that_finds_no_lesion_stops_the_diagnoses(tmp_path: Path) -> None:
    """Served path of the gate: with a band that calls this glioblastoma 'absent', gbm_pcnsl and
    glioma_grade say no lesion found, with no probability and no heatmaps of their own."""
    import yaml

    rules = yaml.safe_load((REPO / "routing_rules" / "default.yaml").read_text())
    rules["models_dir"] = str(REPO / "models")
    rules["tasks"]["tumour"]["indeterminate_band"] = [0.999999, 0.9999999]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    src = tmp_path / "gbm"
    _study(src, 5, "gbm")
    out = tmp_path / "out"
    assert main(["process", str(src), "--out", str(out), "--rules", str(path)]) == 0
    (audit_path,) = out.glob("*/audit.json")
    audit = json.loads(audit_path.read_text())
    findings = {f["task"]: f for f in audit["findings"]}
    assert findings["tumour"]["status"] == "absent"
    for task in ("gbm_pcnsl", "glioma_grade"):
        assert findings[task]["status"] == "no-lesion"
        assert findings[task]["probability"] is None
    captions = [
        str(pydicom.dcmread(p).get("DerivationDescription", ""))
        for p in (audit_path.parent / "objects").glob("*.dcm")
    ]
    assert not any("gbm_pcnsl" in c or "glioma_grade" in c for c in captions)

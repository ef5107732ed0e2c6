"""Bundles: load/verify/refuse, preprocessing, series prediction, sequence slice labels."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from node.bundles import bundle as bundles
from node.errors import InferenceError, ModelUnavailable
from node.lab.train import recipes
from node.records import SequenceLabel, SeriesVolume, SliceGeometry, SliceRef

torch.set_num_threads(1)


def make_bundle(
    tmp_path: Path, name: str = "gbm_pcnsl_t1c", seed: int = 0, variant: str = "small"
) -> Path:
    """A tiny trained-looking bundle written by the production writer."""
    recipe = recipes.get_recipe(name, variant)
    torch.manual_seed(seed)
    net = bundles.build_network(recipe.network_name, recipe.network_args)
    meta = recipes.bundle_metadata(recipe, temperature=1.5, training={"seed": seed}, metrics={})
    return bundles.write_bundle(tmp_path / name, meta, net.state_dict(), "# card\n")


def make_volume(n: int = 12, rows: int = 40, cols: int = 48, seed: int = 0) -> SeriesVolume:
    """A phantom series: a bright disc on slices 2..n-3, empty outer slices."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(5, 1, (n, rows, cols)).astype(np.float32)
    yy, xx = np.mgrid[:rows, :cols]
    disc = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (min(rows, cols) / 3) ** 2
    for i in range(2, n - 2):
        vol[i][disc] += 800
    geom = SliceGeometry(
        position=(0.0, 0.0, 0.0),
        orientation=(1, 0, 0, 0, 1, 0),
        pixel_spacing=(1.0, 1.0),
        slice_thickness=1.0,
    )
    slices = tuple(
        SliceRef(
            path=Path(f"/x/{i}.dcm"),
            sop_class_uid="1.2",
            sop_instance_uid=f"1.2.{i}",
            frame_number=None,
            geometry=geom,
        )
        for i in range(n)
    )
    return SeriesVolume(
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        series_number=1,
        pixels=vol,
        slices=slices,
        slice_spacing_mm=1.0,
        n_instances=n,
        n_frames=n,
    )


def test_load_roundtrip_gives_saved_weights(tmp_path: Path) -> None:
    path = make_bundle(tmp_path)
    b = bundles.load_bundle(path)
    saved = torch.load(path / "models" / "model.pt", weights_only=True)
    for k, v in b.network.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert b.metadata.task == "gbm_pcnsl"
    assert b.metadata.labels == ("pcnsl", "gbm")
    assert b.metadata.sequences == (SequenceLabel.T1C,)
    assert b.metadata.temperature == 1.5
    assert not b.network.training
    assert (path / "configs" / "inference.json").is_file()
    assert (path / "docs" / "README.md").is_file()


def test_refuses_missing_dir_and_files(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="directory not found"):
        bundles.load_bundle(tmp_path / "nope")
    path = make_bundle(tmp_path)
    (path / "models" / "model.pt").unlink()
    with pytest.raises(ModelUnavailable, match=r"weights models/model\.pt are missing"):
        bundles.load_bundle(path)
    path2 = make_bundle(tmp_path, "tubers_flair")
    (path2 / "configs" / "metadata.json").unlink()
    with pytest.raises(ModelUnavailable, match=r"metadata\.json is missing"):
        bundles.load_bundle(path2)


def test_refuses_invalid_metadata(tmp_path: Path) -> None:
    path = make_bundle(tmp_path)
    meta_path = path / "configs" / "metadata.json"
    good = json.loads(meta_path.read_text())
    meta_path.write_text("{not json")
    with pytest.raises(ModelUnavailable, match="not valid JSON"):
        bundles.load_bundle(path)
    cases = {
        "task": ("Not A Task!", "not a task name"),
        "not_for_clinical_use": (False, "not_for_clinical_use"),
        "labels": (["only"], "labels"),
        "copyright": (None, "copyright"),
    }
    for key, (value, message) in cases.items():
        bad = dict(good, **{key: value})
        meta_path.write_text(json.dumps(bad))
        with pytest.raises(ModelUnavailable, match=message):
            bundles.load_bundle(path)
    for key in ("numpy_version", "description", "authors", "network_data_format"):
        meta_path.write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        with pytest.raises(ModelUnavailable, match=f"metadata has no '{key}'"):
            bundles.load_bundle(path)


def _edit_inference(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    inf_path = path / "configs" / "inference.json"
    config = json.loads(inf_path.read_text())
    change(config)
    inf_path.write_text(json.dumps(config))


def test_refuses_invalid_inference_config(tmp_path: Path) -> None:
    path = make_bundle(tmp_path)
    good = (path / "configs" / "inference.json").read_text()
    cases: dict[str, Callable[[dict[str, Any]], None]] = {
        "temperature": lambda c: c["postprocessing"].update(temperature=-1),
        "calibration_bias": lambda c: c["postprocessing"].update(calibration_bias="x"),
        "series_aggregation": lambda c: c["postprocessing"].update(series_aggregation="max"),
        "download": lambda c: c["network_def"].update(pretrained=True),
        "runs no code": lambda c: c["network_def"].update(block="$__import__('os').getcwd()"),
        "not a MONAI class": lambda c: c["preprocessing"]["transforms"].append(
            {"_target_": "subprocess.Popen", "args": ["true"]}
        ),
        "dictionary transform": lambda c: c["preprocessing"]["transforms"].append(
            {"_target_": "ScaleIntensityd", "keys": "image"}
        ),
        r"gives \(1, 64, 64\)": lambda c: c["preprocessing"]["transforms"][1].update(
            spatial_size=[64, 64]
        ),
        "has no 'network_def'": lambda c: c.pop("network_def"),
    }
    for message, change in cases.items():
        (path / "configs" / "inference.json").write_text(good)
        _edit_inference(path, change)
        with pytest.raises(ModelUnavailable, match=message):
            bundles.load_bundle(path)


def test_refuses_checksum_mismatch(tmp_path: Path) -> None:
    path = make_bundle(tmp_path)
    weights = path / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailable, match="SHA-256"):
        bundles.load_bundle(path)


def test_refuses_build_failure_and_state_mismatch(tmp_path: Path) -> None:
    path = make_bundle(tmp_path)
    good = (path / "configs" / "inference.json").read_text()
    _edit_inference(path, lambda c: c["network_def"].update(no_such_arg=3))
    with pytest.raises(ModelUnavailable, match="cannot be built"):
        bundles.load_bundle(path)
    (path / "configs" / "inference.json").write_text(good)
    _edit_inference(path, lambda c: c["network_def"].update(block_inplanes=[4, 8, 16, 32]))
    with pytest.raises(ModelUnavailable, match="do not match the network"):
        bundles.load_bundle(path)
    (path / "configs" / "inference.json").write_text(good)
    meta_path = path / "configs" / "metadata.json"
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), cam_layer="layer9")))
    with pytest.raises(ModelUnavailable, match="layer9"):
        bundles.load_bundle(path)


def test_slice_selection() -> None:
    vol = make_volume(n=12).pixels
    assert bundles.brain_slices(vol) == tuple(range(2, 10))
    assert bundles.select_slices(vol, "brain_range", 16) == tuple(range(2, 10))
    thinned = bundles.select_slices(vol, "brain_range", 4)
    assert len(thinned) == 4 and thinned[0] == 2 and thinned[-1] == 9
    assert bundles.select_slices(vol, "brain_range", 16, max_slices=2) == (2, 9)
    assert bundles.select_slices(vol, "central_window", 3) == (5, 6, 4)
    with pytest.raises(InferenceError):
        bundles.select_slices(vol, "bogus", 3)


def test_normalisation_uses_native_range() -> None:
    vol = np.linspace(0, 4000, 1000, dtype=np.float32).reshape(10, 10, 10)
    out = bundles.normalise_volume(vol, 0.5, 99.5)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.allclose(bundles.normalise_volume(vol * 3 + 100, 0.5, 99.5), out, atol=1e-5)
    assert not bundles.normalise_volume(np.zeros((2, 3, 3)), 0.5, 99.5).any()


def test_predict_series(tmp_path: Path) -> None:
    b = bundles.load_bundle(make_bundle(tmp_path))
    volume = make_volume()
    pred = bundles.predict_series(b, volume)
    assert pred.task == "gbm_pcnsl" and pred.model_id == "gbm_pcnsl_t1c"
    assert pred.series_uid == volume.series_uid
    assert pred.slice_indices == tuple(range(2, 10))
    assert len(pred.slice_probabilities) == 8
    assert 0.0 < pred.probability < 1.0
    # mean logit then temperature
    x = bundles.prepare_slices(volume.pixels, pred.slice_indices, b.metadata)
    with torch.no_grad():
        z = b.network(x)
    mean_logit = float((z[:, 1] - z[:, 0]).mean())
    assert pred.probability == pytest.approx(1 / (1 + np.exp(-mean_logit / 1.5)), rel=1e-4)
    biased = dataclasses.replace(b, metadata=dataclasses.replace(b.metadata, calibration_bias=0.7))
    expected = 1 / (1 + np.exp(-(mean_logit / 1.5 + 0.7)))
    assert bundles.predict_series(biased, volume).probability == pytest.approx(expected, rel=1e-4)
    # scaling the native values does not change the answer
    scaled = make_volume()
    object.__setattr__(scaled, "pixels", scaled.pixels * 7 + 30)
    assert bundles.predict_series(b, scaled).probability == pytest.approx(
        pred.probability, rel=1e-3
    )
    with pytest.raises(InferenceError, match="classify_slices"):
        seq = bundles.load_bundle(make_bundle(tmp_path, "sequence"))
        bundles.predict_series(seq, volume)


def test_classify_slices_and_copy(tmp_path: Path) -> None:
    b = bundles.load_bundle(make_bundle(tmp_path, "sequence"))
    assert b.metadata.labels == tuple(label.value for label in SequenceLabel)
    out = bundles.classify_slices(b, make_volume(), 5)
    assert out.slice_indices[0] in (5, 6) and len(out.slice_indices) == 5
    assert len(out.labels) == 5 and all(isinstance(x, SequenceLabel) for x in out.labels)
    assert np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert out.confidences == tuple(float(r.max()) for r in out.probabilities)
    c = b.copy()
    assert c.network is not b.network
    p0 = next(c.network.parameters())
    assert p0 is not next(b.network.parameters())
    with torch.no_grad():
        p0.add_(1.0)
    assert not torch.equal(p0, next(b.network.parameters()))
    task_bundle = bundles.load_bundle(make_bundle(tmp_path, "tubers_flair"))
    with pytest.raises(InferenceError, match="not a sequence classifier"):
        bundles.classify_slices(task_bundle, make_volume(), 3)


def test_classify_series_majority_vote(tmp_path: Path) -> None:
    b = bundles.load_bundle(make_bundle(tmp_path, "sequence"))
    volume = make_volume()
    sc = bundles.classify_slices(b, volume, 5)
    verdict = bundles.classify_series(b, volume, 5)
    assert verdict.n_slices == 5
    assert sum(n for _, n in verdict.votes) == 5
    top = max(n for _, n in verdict.votes)
    assert sc.labels.count(verdict.label) == top
    col = b.metadata.labels.index(verdict.label.value)
    expected = top / 5 * float(sc.probabilities[:, col].mean())
    assert verdict.confidence == pytest.approx(expected, rel=1e-5)


def sagittal_volume(n: int = 10, rows: int = 40, cols: int = 48) -> SeriesVolume:
    """make_volume's phantom acquired sagittal (rows head to foot, columns front to back,
    slices left to right, 4 mm apart): its canonical axial slices differ from its own."""
    vol = make_volume(n, rows, cols)
    geom = SliceGeometry(
        position=(0.0, 0.0, 0.0),
        orientation=(0, 1, 0, 0, 0, -1),
        pixel_spacing=(1.0, 1.0),
        slice_thickness=4.0,
    )
    slices = tuple(
        dataclasses.replace(s, geometry=dataclasses.replace(geom, position=(4.0 * i, 0.0, 0.0)))
        for i, s in enumerate(vol.slices)
    )
    return dataclasses.replace(vol, slices=slices, slice_spacing_mm=4.0)


def _slice_probabilities(b: bundles.Bundle, pixels: np.ndarray, n: int) -> np.ndarray:
    idx = bundles.select_slices(pixels, "central_window", n)
    logits = bundles.forward_logits(b, bundles.prepare_slices(pixels, idx, b.metadata))
    out: np.ndarray = torch.softmax(logits / b.metadata.temperature, dim=1).numpy()
    return out


def test_sequence_bundle_reads_the_plane_its_metadata_names(tmp_path: Path) -> None:
    from node.dicom.canonical import canonical_axial

    assert bundles.load_bundle(make_bundle(tmp_path, "sequence")).metadata.slice_plane == (
        "canonical_axial"  # the small recipe's, as shipped
    )
    path = make_bundle(tmp_path / "planes", "sequence", variant="planes")
    volume = sagittal_volume()
    acquired = bundles.load_bundle(path)
    assert acquired.metadata.slice_plane == "acquired"  # the planes recipe's
    sc = bundles.classify_slices(acquired, volume, 5)
    assert sc.slice_indices == bundles.select_slices(volume.pixels, "central_window", 5)
    np.testing.assert_allclose(
        sc.probabilities, _slice_probabilities(acquired, volume.pixels, 5), atol=1e-5
    )
    # a bundle without the key reads canonical axial slices, as every bundle did before
    meta_path = path / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["input"]["slice_selection"]["plane"]
    meta_path.write_text(json.dumps(meta))
    axial = bundles.load_bundle(path)
    assert axial.metadata.slice_plane == "canonical_axial"
    canon = canonical_axial(volume).pixels
    assert canon.shape[0] != volume.pixels.shape[0]
    sc_axial = bundles.classify_slices(axial, volume, 5)
    np.testing.assert_allclose(
        sc_axial.probabilities, _slice_probabilities(axial, canon, 5), atol=1e-5
    )


def test_refuses_an_unknown_plane_and_the_acquired_plane_for_a_task_bundle(
    tmp_path: Path,
) -> None:
    for name, plane, message in (
        ("sequence", "oblique", "plane must be one of"),
        ("gbm_pcnsl_t1c", "acquired", "only the sequence bundle reads the acquired plane"),
    ):
        path = make_bundle(tmp_path, name)
        meta_path = path / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta["input"]["slice_selection"]["plane"] = plane
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ModelUnavailable, match=message):
            bundles.load_bundle(path)


def _time_series(blocks: list[float], n: int = 6) -> SeriesVolume:
    """Time points of n slices each (time-major, as node.dicom.volumes stores them), scaled."""
    base = make_volume(n)
    pixels = np.concatenate([base.pixels * f for f in blocks]).astype(np.float32)
    slices = tuple(
        dataclasses.replace(
            s,
            sop_instance_uid=f"{s.sop_instance_uid}.{t}",
            geometry=dataclasses.replace(s.geometry, position=(0.0, 0.0, 2.0 * k)),
        )
        for t in range(len(blocks))
        for k, s in enumerate(base.slices)
    )
    return dataclasses.replace(base, pixels=pixels, slices=slices, n_frames=len(slices))


def test_acquired_slices_of_a_time_series_are_its_darkest_time_point() -> None:
    # a DWI series: b0 images first, then the diffusion-weighted (darker) ones, or the reverse
    for blocks, darkest in (([1.0, 0.3], 1), ([0.3, 1.0], 0), ([1.0, 0.5, 0.2], 2)):
        volume = _time_series(blocks)
        got = bundles.acquired_slices(volume)
        assert got.shape == (6, *volume.pixels.shape[1:])
        np.testing.assert_array_equal(got, volume.pixels[6 * darkest : 6 * darkest + 6])
    single = make_volume()  # one stack: every stored slice
    assert bundles.acquired_slices(single) is single.pixels
    # no geometry (nominal positions, no spacing): file order kept, nothing dropped
    flat = dataclasses.replace(_time_series([1.0, 0.3]), slice_spacing_mm=None)
    assert bundles.acquired_slices(flat) is flat.pixels

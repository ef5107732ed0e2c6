"""The lesion detector (node.bundles.lesion) and detector bundles (node.bundles.detector)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.bundles.bundle import load_bundle, load_model, predict_series
from node.bundles.config import recipe_preprocessing
from node.bundles.detector import Detector, load_detector, predict_detector
from node.bundles.lesion import DetectorSpec, key_slices, measure_lesion
from node.errors import ModelUnavailable
from node.lab.train.detector import StudyMeasure, calibrate, write_detector
from node.records import SequenceLabel, SeriesVolume, SliceGeometry, SliceRef

N, SIZE = 12, 96


def _head(rng: np.random.Generator, *, scalp: bool = True) -> np.ndarray:
    """A noisy head phantom: brain tissue ~ 400, a bright scalp rim ~ 900, air ~ 5."""
    _zz, yy, xx = np.mgrid[0:N, 0:SIZE, 0:SIZE]
    r = np.hypot((yy - SIZE / 2) / 40.0, (xx - SIZE / 2) / 34.0)
    vol = np.full((N, SIZE, SIZE), 5.0)
    vol[r < 1.0] = 400.0
    if scalp:
        vol[(r >= 0.93) & (r < 1.0)] = 900.0
    vol += rng.normal(0.0, 12.0, vol.shape) * (r < 1.0)
    return vol.astype(np.float32)


def _with_lesion(vol: np.ndarray, radius: float = 7.0, value: float = 650.0) -> np.ndarray:
    out = vol.copy()
    zz, yy, xx = np.mgrid[0:N, 0:SIZE, 0:SIZE]
    ball = ((zz - 6) * 3.0) ** 2 + (yy - 40) ** 2 + (xx - 55) ** 2 < radius**2
    out[ball] = value
    return out


def _measure(vol: np.ndarray, spec: DetectorSpec | None = None, **kw: bool):  # type: ignore[no-untyped-def]
    scaled = recipe_preprocessing(low=0.5, high=99.5).scale(vol)
    return measure_lesion(vol, scaled, spec or DetectorSpec(), **kw)


def test_no_lesion_gives_the_floor_and_a_lesion_its_volume() -> None:
    rng = np.random.default_rng(0)
    head = _head(rng)
    clean = _measure(head)
    assert clean.fraction < 1e-3
    found = _measure(_with_lesion(head), keep_map=True)
    assert found.fraction > 0.005
    assert found.logit > clean.logit + 1.0
    assert found.component is not None and found.zmap is not None
    # The component is the ball, not the scalp rim.
    assert found.component[6, 40, 55] and not found.component[6, 48, 48 + 33]
    assert float(found.zmap[~found.component].max()) == 0.0


def test_speckle_is_opened_away() -> None:
    rng = np.random.default_rng(1)
    head = _head(rng)
    speckled = head.copy()
    idx = rng.integers(30, 66, size=(400, 2))
    speckled[rng.integers(0, N, 400), idx[:, 0], idx[:, 1]] = 900.0
    assert _measure(speckled).fraction < 1e-3
    unopened = _measure(speckled, DetectorSpec(opening=0.0))
    assert unopened.fraction > 0.0  # the opening is what removes them


@settings(max_examples=15, deadline=None)
@given(scale=st.floats(0.05, 40.0), offset=st.floats(-200.0, 2000.0))
def test_the_measure_is_relative_to_the_series_own_tissue(scale: float, offset: float) -> None:
    rng = np.random.default_rng(2)
    vol = _with_lesion(_head(rng))
    base = _measure(vol).fraction
    moved = _measure(vol * np.float32(scale) + np.float32(offset)).fraction
    assert moved == pytest.approx(base, rel=0.05, abs=1e-4)


def test_key_slices_are_the_largest_cross_sections() -> None:
    comp = np.zeros((5, 8, 8), dtype=bool)
    comp[1, :2, :2] = True
    comp[3, :4, :4] = True
    comp[2, :3, :3] = True
    assert key_slices(comp, 2) == (3, 2)
    assert key_slices(comp, 9) == (3, 2, 1)


def test_spec_refuses_bad_entries() -> None:
    assert DetectorSpec.from_json(DetectorSpec(z=3.0).to_json()) == DetectorSpec(z=3.0)
    for bad in (
        {"method": "x"},
        {**DetectorSpec().to_json(), "z": -1},
        {**DetectorSpec().to_json(), "opening": "a"},
    ):
        with pytest.raises(ValueError):
            DetectorSpec.from_json(bad)


def test_calibration_slope_must_be_positive() -> None:
    good = [
        StudyMeasure(study_uid=str(i), truth=int(i % 2), logit=-4 + 1.0 * (i % 2) + 0.3 * (i % 7))
        for i in range(20)
    ]
    t, b = calibrate(good)
    assert t > 0 and math.isfinite(b)
    from node.lab.train.data import DataError

    backwards = [
        StudyMeasure(study_uid=m.study_uid, truth=1 - m.truth, logit=m.logit) for m in good
    ]
    with pytest.raises(DataError):
        calibrate(backwards)


def _bundle(tmp_path: Path) -> Detector:
    return write_detector(
        tmp_path / "tumour_flair_detector",
        name="tumour_flair_detector",
        task="tumour",
        sequence="FLAIR",
        spec=DetectorSpec(),
        temperature=0.5,
        bias=4.0,
        training={"data": "test"},
        metrics={},
    )


def _volume(pixels: np.ndarray, tmp_path: Path) -> SeriesVolume:
    refs = tuple(
        SliceRef(
            path=tmp_path / f"{i}.dcm",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            sop_instance_uid=f"1.2.3.{i}",
            frame_number=None,
            geometry=SliceGeometry(
                position=(0.0, 0.0, 3.0 * i),
                orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                pixel_spacing=(1.0, 1.0),
                slice_thickness=3.0,
            ),
        )
        for i in range(pixels.shape[0])
    )
    return SeriesVolume(
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        series_number=4,
        pixels=pixels,
        slices=refs,
        slice_spacing_mm=3.0,
        n_instances=pixels.shape[0],
        n_frames=pixels.shape[0],
    )


def test_detector_bundle_round_trip_and_served_path(tmp_path: Path) -> None:
    det = _bundle(tmp_path)
    assert isinstance(load_model(det.path), Detector)
    with pytest.raises(ModelUnavailable, match="is a detector"):
        load_bundle(det.path)
    card = (det.path / "docs" / "README.md").read_text()
    assert "NOT FOR CLINICAL USE" in card and "No network" in card
    rng = np.random.default_rng(3)
    lesion = _volume(_with_lesion(_head(rng)), tmp_path)
    normal = _volume(_head(rng), tmp_path)
    p_lesion = predict_series(det, lesion, sequence=SequenceLabel.FLAIR)
    p_normal = predict_series(det, normal, sequence=SequenceLabel.FLAIR)
    assert p_lesion.probability > 0.5 > p_normal.probability
    assert p_lesion.weights_sha256 == det.weights_sha256 and len(det.weights_sha256) == 64
    shown = predict_detector(det, lesion, sequence=SequenceLabel.FLAIR, top_k=2)
    assert shown.probability == p_lesion.probability
    assert [h.slice_index for h in shown.heatmaps] == [6, 5] or shown.heatmaps[0].slice_index == 6
    hm = shown.heatmaps[0]
    assert hm.cam.shape == (SIZE, SIZE) and hm.cam[40, 55] > 0.5 and hm.cam[10, 10] == 0.0
    assert predict_detector(det, normal, top_k=2).heatmaps == ()


def test_a_detector_edited_without_refitting_is_refused(tmp_path: Path) -> None:
    det = _bundle(tmp_path)
    path = det.path / "configs" / "inference.json"
    inference = json.loads(path.read_text())
    inference["detector"]["z"] = 1.0
    path.write_text(json.dumps(inference))
    with pytest.raises(ModelUnavailable, match="edited without refitting"):
        load_detector(det.path)
    inference["detector"]["z"] = 2.5
    inference["postprocessing"]["calibration_bias"] = 9.0
    path.write_text(json.dumps(inference))
    with pytest.raises(ModelUnavailable, match="edited without refitting"):
        load_model(det.path)


@pytest.mark.parametrize("name", ["tumour_flair_detector", "tumour_t1c_detector"])
def test_shipped_detectors_load_and_say_not_for_clinical_use(name: str) -> None:
    det = load_model(Path(__file__).resolve().parents[2] / "models" / name)
    assert isinstance(det, Detector) and det.task == "tumour"
    assert det.labels == ("absent", "present")
    card = (det.path / "docs" / "README.md").read_text()
    assert "NOT FOR CLINICAL USE" in card
    assert "a style never used" in card  # the held-out figure is on the card


def test_beyond_largest_counts_the_foci_not_the_lesion() -> None:
    rng = np.random.default_rng(4)
    head = _head(rng)
    one_lesion = _with_lesion(head)
    foci = head.copy()
    for r, c in ((35, 35), (60, 62), (40, 62), (58, 36)):
        foci[4:8, r - 3 : r + 3, c - 3 : c + 3] = 700.0
    spec = DetectorSpec(measure="beyond_largest", opening=1 / 96)
    assert _measure(one_lesion, spec).fraction < 1e-3
    many = _measure(foci, spec, keep_map=True)
    assert many.fraction > 1e-3 and many.component is not None
    # three of the four foci (the opening rounds their corners); the largest is left out
    assert 3 * 4 * 28 <= many.component.sum() <= 3 * 4 * 36
    assert DetectorSpec.from_json(spec.to_json()) == spec
    assert "measure" not in DetectorSpec().to_json()  # shipped digests stay valid


def test_the_served_measure_scales_slice_by_slice_to_the_same_values(tmp_path: Path) -> None:
    """measure_series reads the scaled series a slice at a time (config.ScaledSlices): each
    slice is the whole-series scaling's, so the measure, its component and map are the same
    as from a scaled copy of the series, which is never made."""
    import tracemalloc

    from node.bundles.detector import detector_scaling, measure_series

    rng = np.random.default_rng(4)
    vol = _with_lesion(_head(rng))
    vol.flags.writeable = False  # a job's decoded series
    pre = detector_scaling()
    whole = pre.scale(vol)
    lazy = pre.scaled_slices(vol)
    assert lazy.shape == whole.shape
    for k in (*range(N), -1):
        np.testing.assert_array_equal(lazy[k], whole[k])
    served = measure_series(DetectorSpec(), _volume(vol, tmp_path), keep_map=True)
    ref = measure_lesion(vol, whole, DetectorSpec(), keep_map=True)
    assert (served.fraction, served.logit) == (ref.fraction, ref.logit) and served.fraction > 0
    assert served.component is not None and ref.component is not None
    np.testing.assert_array_equal(served.component, ref.component)
    assert served.zmap is not None and ref.zmap is not None
    np.testing.assert_array_equal(served.zmap, ref.zmap)
    tracemalloc.start()
    try:
        for k in range(N):
            lazy[k]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < whole.nbytes // 4  # one slice at a time, not the scaled series

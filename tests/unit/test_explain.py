"""Grad-CAM: maps on the source grid, 0..1, not inverted, hooks removed, key slices chosen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from node.bundles import bundle as bundles
from node.bundles import gradcam as explain
from node.records import SequenceLabel, SeriesPrediction
from tests.unit.test_bundles import make_bundle, make_volume

torch.set_num_threads(1)


class Evidence(nn.Module):
    """Logit of class 1 = mean feature; class 0 = its negative (evidence = brightness)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 1, kernel_size=1, bias=False)
        nn.init.constant_(self.features.weight, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.features(x).mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)


def _evidence_bundle(tmp_path: Path) -> bundles.Bundle:
    real = bundles.load_bundle(make_bundle(tmp_path))
    meta = dataclasses.replace(real.metadata, cam_layer="features")
    return bundles.Bundle(path=real.path, metadata=meta, network=Evidence().eval())


def _hooks(module: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        for m in module.modules()
    )


def test_map_peaks_at_the_evidence_on_the_source_grid(tmp_path: Path) -> None:
    b = _evidence_bundle(tmp_path)
    volume = make_volume(n=6, rows=40, cols=60)
    pix = np.full((6, 40, 60), 10.0, dtype=np.float32)
    pix[:, 28:36, 44:56] = 1000.0  # evidence in the lower right
    object.__setattr__(volume, "pixels", pix)
    pred = bundles.predict_series(b, volume)
    assert pred.probability > 0.5
    maps = explain.explain_series(b, volume, pred, top_k=2)
    assert len(maps) == 2
    for h in maps:
        assert h.cam.shape == (40, 60)
        assert h.cam.dtype == np.float32
        assert h.cam.min() == pytest.approx(0.0) and h.cam.max() == pytest.approx(1.0)
        r, c = np.unravel_index(int(np.argmax(h.cam)), h.cam.shape)
        assert 26 <= r <= 37 and 42 <= c <= 57
        assert h.cam[5, 5] < 0.1  # background is low: the map is not inverted
        assert h.source is volume.slices[h.slice_index]
        assert np.array_equal(h.image, pix[h.slice_index])
    assert _hooks(b.network) == 0
    assert all(p.grad is None for p in b.network.parameters())


def test_negative_class_without_evidence_is_flat_zero(tmp_path: Path) -> None:
    b = _evidence_bundle(tmp_path)
    x = torch.rand(2, 1, 16, 16)
    layer = bundles.resolve_layer(b.network, "features")
    cams = explain.grad_cam(b.network, layer, x, class_index=0)
    assert cams.shape == (2, 16, 16)
    assert float(cams.abs().max()) == 0.0
    assert _hooks(b.network) == 0


def test_real_bundle_key_slices_and_no_hooks(tmp_path: Path) -> None:
    b = bundles.load_bundle(make_bundle(tmp_path)).copy()
    volume = make_volume(n=10, rows=30, cols=34)
    pred = bundles.predict_series(b, volume)
    out = explain.with_heatmaps(b, volume, pred, top_k=3)
    assert len(out.heatmaps) == 3
    probs = dict(zip(pred.slice_indices, pred.slice_probabilities, strict=True))
    chosen = [h.slice_index for h in out.heatmaps]
    ranked = sorted(probs, key=lambda i: -probs[i] if pred.probability >= 0.5 else probs[i])
    assert chosen == ranked[:3]
    for h in out.heatmaps:
        assert h.cam.shape == (30, 34)
        assert float(h.cam.min()) >= 0.0 and float(h.cam.max()) <= 1.0
    assert _hooks(b.network) == 0
    assert not b.network.training
    assert explain.explain_series(b, volume, pred, top_k=0) == ()


def test_key_slices_chosen_before_the_maps_give_the_same_heatmaps(tmp_path: Path) -> None:
    """INFER names an axial series' key slices without maps (the SR goes out first) and
    HEATMAPS computes them later: the maps must be the ones computed in one go."""
    b = bundles.load_bundle(make_bundle(tmp_path)).copy()
    volume = make_volume(n=10, rows=30, cols=34)
    pred = bundles.predict_series(b, volume)
    chosen = explain.key_slices(volume, pred, top_k=3)
    at_once = explain.explain_series(b, volume, pred, top_k=3)
    assert chosen == tuple(h.slice_index for h in at_once)
    planned = explain.planned_heatmaps(volume, chosen)
    assert [h.explained for h in planned] == [False] * 3 and all(h.explained for h in at_once)
    for p, h in zip(planned, at_once, strict=True):
        assert p.source == h.source and np.array_equal(p.image, h.image)
        assert p.cam.shape == h.cam.shape and not p.cam.any()
    later = explain.explain_series(b, volume, pred, top_k=3, chosen=chosen)
    for a, h in zip(later, at_once, strict=True):
        assert a.slice_index == h.slice_index and np.array_equal(a.cam, h.cam)
    assert explain.key_slices(volume, pred, top_k=0) == ()


def test_a_sagittal_series_key_slices_wait_for_its_maps() -> None:
    from tests.unit.test_canonical import _patient_volume, _sagittal

    volume = _sagittal(_patient_volume())
    pred = SeriesPrediction(
        task="t",
        model_id="m",
        model_version="1",
        series_uid=volume.series_uid,
        sequence=SequenceLabel.T1C,
        probability=0.9,
        slice_indices=(1, 2),
        slice_probabilities=(0.8, 0.9),
    )
    assert explain.key_slices(volume, pred, top_k=2) is None  # the 3-D map decides

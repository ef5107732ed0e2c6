"""Tumour-centred region: found on a bright lesion, whole head without one, same in training
and inference, and Grad-CAM maps placed back inside it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from node.bundles import bundle as bundles
from node.bundles import gradcam as explain
from node.bundles.roi import RoiSpec, lesion_box
from node.lab.train import recipes
from node.lab.train.data import series_slices
from tests.unit.test_bundles import make_bundle, make_volume
from tests.unit.test_explain import Evidence

torch.set_num_threads(1)


def head(n: int = 12, size: int = 128, seed: int = 0) -> np.ndarray:
    """A noisy head: a bright scalp ring (fat) around a mid-grey brain on black background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    slice_ = np.where(r < 0.45 * size, 400.0, 0.0)
    slice_ = np.where((r >= 0.40 * size) & (r < 0.45 * size), 900.0, slice_)  # scalp fat
    vol = np.repeat(slice_[None], n, axis=0) + rng.normal(0, 15, (n, size, size))
    return np.clip(vol, 0, None).astype(np.float32)


def scaled(pixels: np.ndarray) -> np.ndarray:
    return bundles.normalise_volume(pixels, 0.5, 99.5)


def test_box_surrounds_a_bright_lesion_and_is_square() -> None:
    vol = head()
    vol[3:8, 30:44, 70:86] += 700.0  # an enhancing tumour, upper right
    box = lesion_box(scaled(vol), RoiSpec(z=4.0))
    assert box.found
    assert box.contains(37, 78)
    assert box.r1 - box.r0 == box.c1 - box.c0  # square: no distortion when resized
    assert (box.r1 - box.r0) < 0.6 * 128  # a region, not the whole slice
    assert not box.contains(100, 20)  # the opposite hemisphere is outside
    assert 0 <= box.r0 < box.r1 <= 128 and 0 <= box.c0 < box.c1 <= 128


def test_box_is_clamped_inside_the_image_for_a_lesion_at_the_edge() -> None:
    vol = head()
    vol[:, 14:24, 40:60] += 700.0  # just inside the scalp at the top
    box = lesion_box(scaled(vol), RoiSpec(z=4.0, margin=2.0))
    assert box.found and box.r0 == 0 and box.contains(18, 50)


def test_without_a_lesion_the_region_is_the_head() -> None:
    vol = head()
    box = lesion_box(scaled(vol), RoiSpec(z=4.0))
    assert not box.found
    assert box.r1 - box.r0 > 0.85 * 128 and box.c1 - box.c0 > 0.85 * 128


def test_scalp_fat_alone_never_becomes_the_region() -> None:
    vol = head()
    vol[:, 60:62, 60:62] += 700.0  # a few bright voxels: below min_fraction
    box = lesion_box(scaled(vol), RoiSpec(z=4.0, min_fraction=0.01))
    assert not box.found


def test_roi_spec_round_trips_and_rejects_unknown_methods() -> None:
    spec = RoiSpec(z=3.0, margin=0.4)
    assert RoiSpec.from_json(spec.to_json()) == spec
    assert RoiSpec.from_json(None) is None
    with pytest.raises(ValueError, match="bright_lesion_box"):
        RoiSpec.from_json({"method": "manual"})


def test_glioma_bundle_reads_the_region_the_same_way_in_training_and_inference(
    tmp_path: Path,
) -> None:
    recipe = recipes.get_recipe("glioma_grade_t1c")
    assert recipe.roi is not None and recipes.get_recipe("gbm_pcnsl_t1c").roi is None
    b = bundles.load_bundle(make_bundle(tmp_path, "glioma_grade_t1c"))
    assert b.metadata.roi == recipe.roi
    vol = head(n=16)
    vol[5:11, 30:44, 70:86] += 700.0
    volume = dataclasses.replace(make_volume(n=16, rows=128, cols=128), pixels=vol)
    idx = bundles.select_slices(vol, b.metadata.slice_mode, b.metadata.slice_n)
    served = bundles.prepare_slices(vol, idx, b.metadata)
    trained_idx, trained = series_slices(vol, recipe)
    assert trained_idx == idx
    assert torch.equal(served, trained)
    whole = bundles.preprocess(vol, idx, size=(128, 128), channels=1, low=0.5, high=99.5)
    assert not torch.equal(served, whole)  # the region is magnified, not the whole slice
    assert bundles.predict_series(b, volume).slice_indices == idx


def test_gradcam_map_lies_inside_the_region_on_the_source_grid(tmp_path: Path) -> None:
    real = bundles.load_bundle(make_bundle(tmp_path, "glioma_grade_t1c"))
    meta = dataclasses.replace(real.metadata, cam_layer="features")
    b = bundles.Bundle(path=real.path, metadata=meta, network=Evidence().eval())
    vol = head(n=16)
    vol[5:11, 30:44, 70:86] += 700.0
    volume = dataclasses.replace(make_volume(n=16, rows=128, cols=128), pixels=vol)
    box = bundles.series_box(vol, meta)
    assert box is not None and box.found
    pred = bundles.predict_series(b, volume)
    assert pred.region == (box.r0, box.r1, box.c0, box.c1)  # explain reuses it
    maps = explain.explain_series(b, volume, pred, top_k=2)
    for h in maps:
        assert h.cam.shape == (128, 128)
        outside = np.ones((128, 128), dtype=bool)
        outside[box.r0 : box.r1, box.c0 : box.c1] = False
        assert float(h.cam[outside].max()) == 0.0
        r, c = (int(i) for i in np.unravel_index(int(np.argmax(h.cam)), h.cam.shape))
        assert box.contains(r, c) and 26 <= r <= 48 and 66 <= c <= 90  # on the lesion


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_and_taxicab_erosion_equal_scipys(seed: int) -> None:
    """The faster mask steps of eroded_head give scipy's binary_fill_holes and iterated
    binary_erosion exactly, on blobby masks with holes, touching the border or not."""
    from scipy import ndimage

    from node.bundles.roi import erode_taxicab, fill_holes

    rng = np.random.default_rng(seed)
    for _ in range(40):
        rows, cols = (int(x) for x in rng.integers(3, 80, 2))
        noise = ndimage.gaussian_filter(rng.random((rows, cols)), rng.uniform(0.5, 4.0))
        mask = noise > rng.uniform(0.4, 0.6)
        iterations = int(rng.integers(1, 12))
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
        np.testing.assert_array_equal(
            erode_taxicab(mask, iterations), ndimage.binary_erosion(mask, iterations=iterations)
        )

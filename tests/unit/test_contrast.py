"""Image evidence of contrast between two co-registered T1 volumes, on a synthetic head."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from node.classify.contrast import judge_contrast


def head(seed: int, *, vessels: float = 1.0, scale: float = 1.0) -> npt.NDArray[np.float64]:
    """An ellipsoid 'brain' with a smooth bias field and noise; vessels scaled by ``vessels``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:32, :80, :80]
    brain = ((z - 16) / 14) ** 2 + ((y - 40) / 34) ** 2 + ((x - 40) / 28) ** 2 < 1
    image = np.where(brain, 400.0 + 40.0 * np.sin(x / 7.0), 0.0)
    # midline sinus and a transverse vessel: a few percent of the brain
    vessel = brain & ((np.abs(x - 40) < 2) | ((np.abs(y - 25) < 1.5) & (np.abs(z - 16) < 3)))
    image[vessel] *= vessels
    return np.abs(image + rng.normal(0.0, 12.0, image.shape)) * scale


def test_enhanced_vessels_on_the_later_run_are_post_contrast() -> None:
    evidence = judge_contrast(head(0), head(1, vessels=3.0, scale=1.7))
    assert evidence.post_contrast is True
    assert evidence.enhanced_fraction > 0.02 and evidence.darkened_fraction < 0.001
    assert evidence.score == pytest.approx(
        evidence.enhanced_fraction - evidence.darkened_fraction, abs=1e-4
    )
    assert evidence.reason.startswith("enhancement:")


def test_a_repeat_with_other_noise_and_scaling_is_not_post_contrast() -> None:
    evidence = judge_contrast(head(0), head(2, scale=0.6))
    assert evidence.post_contrast is False
    assert evidence.enhanced_fraction < 0.004
    assert evidence.reason.startswith("no enhancement")


def test_a_one_voxel_shift_is_not_contrast() -> None:
    # Each voxel is compared with its neighbourhood on the other run: a voxel of motion (or of
    # resampling) between the runs moves edges, and moved edges are no enhancement at all.
    shifted = np.roll(head(3), 1, axis=2)
    evidence = judge_contrast(head(0), shifted)
    assert evidence.post_contrast is False
    assert evidence.reason.startswith("no enhancement")
    assert evidence.enhanced_fraction < 0.004
    exact = judge_contrast(head(0), shifted, neighbourhood=1)  # voxel by voxel: edges count
    assert exact.enhanced_fraction > 0.004 and exact.darkened_fraction > 0.004


def test_misregistration_brightens_and_darkens_alike_so_it_is_not_contrast() -> None:
    shifted = np.roll(head(3), 4, axis=2)  # beyond the neighbourhood
    evidence = judge_contrast(head(0), shifted)
    assert evidence.post_contrast is False
    assert evidence.enhanced_fraction > 0.004  # edges move both ways...
    assert evidence.reason.startswith("no one-sided enhancement")  # ...so the tails cancel


def test_enhancement_survives_a_one_voxel_shift() -> None:
    moved = np.roll(head(1, vessels=3.0, scale=1.7), 1, axis=1)
    evidence = judge_contrast(head(0), moved)
    assert evidence.post_contrast is True and evidence.darkened_fraction < 0.001


def test_the_order_matters_an_earlier_enhanced_run_is_not_pre() -> None:
    evidence = judge_contrast(head(1, vessels=3.0), head(0))
    assert evidence.post_contrast is False and evidence.score < 0


def test_two_dimensional_images_work_too() -> None:
    evidence = judge_contrast(head(0)[16], head(1, vessels=3.0)[16])
    assert evidence.post_contrast is True


def test_blank_or_tiny_volumes_cannot_tell() -> None:
    blank = judge_contrast(np.zeros((8, 8, 8)), head(0)[:8, :8, :8])
    assert blank.post_contrast is None and "blank" in blank.reason
    tiny = judge_contrast(head(0)[:2, 30:40, 30:40], head(1)[:2, 30:40, 30:40])
    assert tiny.post_contrast is None and tiny.n_voxels < 2000


def test_arguments_are_checked() -> None:
    a = head(0)
    with pytest.raises(TypeError, match="earlier"):
        judge_contrast(a.tolist(), a)
    with pytest.raises(ValueError, match="one grid"):
        judge_contrast(a, a[:-1])
    with pytest.raises(ValueError, match="later"):
        judge_contrast(a, np.zeros(5))
    with pytest.raises(TypeError, match="real-valued"):
        judge_contrast(a, a.astype(np.complex64))
    with pytest.raises(ValueError, match="ratio_threshold"):
        judge_contrast(a, a, ratio_threshold=1.0)
    with pytest.raises(ValueError, match="min_enhanced_fraction"):
        judge_contrast(a, a, min_enhanced_fraction=0.0)
    with pytest.raises(ValueError, match="min_tail_ratio"):
        judge_contrast(a, a, min_tail_ratio=0.5)

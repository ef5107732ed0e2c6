"""Image evidence of gadolinium: is the later of two co-registered T1 volumes post-contrast?

Pure: two arrays in, a ContrastEvidence out (numpy only; no DICOM, files or torch). Gadolinium
shortens T1, so on a T1-weighted run after injection the vessels, dural sinuses, choroid plexus,
pituitary and enhancing lesions are several times brighter than before, while the parenchyma
barely changes. After robust normalisation (each volume divided by its median head intensity),
a post-contrast volume therefore has a tail of voxels much brighter than on the earlier one and
no matching tail of darker voxels. Noise, a different receiver scaling, ND/NORM filtering or
small misregistration change voxels both ways about equally, so the darker tail measures what
chance gives; the score is the brighter tail minus the darker tail.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from node.records import ContrastEvidence

RATIO_THRESHOLD = 1.5  # post/pre intensity ratio beyond which a voxel counts as enhanced
MIN_ENHANCED_FRACTION = 0.004  # of head voxels: vessels and plexus alone exceed this post-Gd
MIN_TAIL_RATIO = 3.0  # the brighter tail must be this many times the darker tail (noise)
MIN_HEAD_VOXELS = 2000  # fewer: too little head in common to judge
_HEAD_LEVEL = 0.3  # of the median head intensity: below is background or skull/air
_EPS = 0.05  # added to both before the ratio, so near-zero voxels give no wild ratios


def _as_volume(name: str, value: Any) -> npt.NDArray[np.float64]:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: a numpy array is needed, not {type(value).__name__}")
    if value.ndim not in (2, 3) or value.size == 0:
        raise ValueError(f"{name}: a 2D or 3D image is needed, got shape {value.shape}")
    if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
        raise TypeError(f"{name}: real-valued pixels are needed, not {value.dtype}")
    return np.asarray(value, dtype=np.float64)


def _normalised(volume: npt.NDArray[np.float64]) -> npt.NDArray[np.float64] | None:
    """The volume divided by its median head intensity (None for a blank volume)."""
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return None
    high = float(np.percentile(finite, 99.0))
    if high <= 0:
        return None
    head = finite[finite > 0.1 * high]
    median = float(np.median(head)) if head.size else 0.0
    if median <= 0:
        return None
    return np.where(np.isfinite(volume), volume / median, 0.0)


def judge_contrast(
    earlier: npt.NDArray[Any],
    later: npt.NDArray[Any],
    *,
    ratio_threshold: float = RATIO_THRESHOLD,
    min_enhanced_fraction: float = MIN_ENHANCED_FRACTION,
    min_tail_ratio: float = MIN_TAIL_RATIO,
) -> ContrastEvidence:
    """Whether ``later`` is post-contrast relative to ``earlier`` (same protocol, same grid).

    Both arrays must have one shape (slices, rows, cols) or (rows, cols) and hold the same
    anatomy voxel for voxel: the caller resamples one onto the other's grid when the two
    series were not acquired on one grid. Modality LUT (rescale) applied or not, alike on both.
    """
    pre = _as_volume("earlier", earlier)
    post = _as_volume("later", later)
    if pre.shape != post.shape:
        raise ValueError(f"earlier {pre.shape} and later {post.shape}: put both on one grid first")
    if not ratio_threshold > 1:
        raise ValueError(f"ratio_threshold: {ratio_threshold} must be above 1")
    if not 0 < min_enhanced_fraction < 1:
        raise ValueError(f"min_enhanced_fraction: {min_enhanced_fraction} is not in (0, 1)")
    if not min_tail_ratio >= 1:
        raise ValueError(f"min_tail_ratio: {min_tail_ratio} must be at least 1")
    pre_n, post_n = _normalised(pre), _normalised(post)
    if pre_n is None or post_n is None:
        return ContrastEvidence(
            post_contrast=None,
            score=0.0,
            enhanced_fraction=0.0,
            darkened_fraction=0.0,
            n_voxels=0,
            reason="a volume is blank: cannot compare",
        )
    # Head voxels: bright enough on either run, so a vessel dark before and bright after counts.
    head = (pre_n > _HEAD_LEVEL) | (post_n > _HEAD_LEVEL)
    n = int(head.sum())
    if n < MIN_HEAD_VOXELS:
        return ContrastEvidence(
            post_contrast=None,
            score=0.0,
            enhanced_fraction=0.0,
            darkened_fraction=0.0,
            n_voxels=n,
            reason=f"only {n} head voxels in common: cannot compare",
        )
    ratio = (post_n[head] + _EPS) / (pre_n[head] + _EPS)
    enhanced = float(np.mean(ratio > ratio_threshold))
    darkened = float(np.mean(ratio < 1.0 / ratio_threshold))
    score = enhanced - darkened
    post_contrast = enhanced >= min_enhanced_fraction and enhanced >= min_tail_ratio * darkened
    facts = (
        f"{enhanced:.2%} of {n} head voxels over {ratio_threshold:g}x brighter on the later run, "
        f"{darkened:.2%} as much darker"
    )
    if post_contrast:
        reason = f"enhancement: {facts}"
    elif enhanced < min_enhanced_fraction:
        reason = f"no enhancement: {facts} (needs {min_enhanced_fraction:.2%})"
    else:
        reason = f"no one-sided enhancement: {facts} (brighter tail under {min_tail_ratio:g}x)"
    return ContrastEvidence(
        post_contrast=post_contrast,
        score=round(score, 5),
        enhanced_fraction=round(enhanced, 5),
        darkened_fraction=round(darkened, 5),
        n_voxels=n,
        reason=reason,
    )

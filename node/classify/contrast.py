"""Image evidence of gadolinium: is the later of two co-registered T1 volumes post-contrast?

Pure: two arrays in, a ContrastEvidence out (numpy only; no DICOM, files or torch). Gadolinium
shortens T1, so on a T1-weighted run after injection the vessels, dural sinuses, choroid plexus,
pituitary and enhancing lesions are several times brighter than before, while the parenchyma
barely changes. After robust normalisation (each volume divided by its median head intensity),
a post-contrast volume therefore has a tail of voxels much brighter than on the earlier one and
no matching tail of darker voxels. Noise, a different receiver scaling, ND/NORM filtering or
small misregistration change voxels both ways about equally, so the darker tail measures what
chance gives; the score is the brighter tail minus the darker tail.

A voxel is compared with the brightest voxel of its 3x3x3 neighbourhood on the other run (3x3 for
a 2D image), not with its own position only: a patient who moved by a voxel between the runs, or
two runs resampled onto one grid, put edges a voxel apart, and an edge voxel is then no brighter
than the other run's neighbourhood. Enhancement (a vessel, plexus or lesion several times
brighter than anything near it before) survives the comparison.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from node.percentiles import median_above, series_percentiles, voxel_slabs
from node.records import ContrastEvidence

RATIO_THRESHOLD = 1.5  # post/pre intensity ratio beyond which a voxel counts as enhanced
MIN_ENHANCED_FRACTION = 0.004  # of head voxels: vessels and plexus alone exceed this post-Gd
MIN_TAIL_RATIO = 3.0  # the brighter tail must be this many times the darker tail (noise)
MIN_HEAD_VOXELS = 2000  # fewer: too little head in common to judge
_HEAD_LEVEL = 0.3  # of the median head intensity: below is background or skull/air
# A tail voxel is at least the head's median intensity on its brighter run (see _tails).
_TAIL_LEVEL = 1.0
_EPS = 0.05  # added to both before the ratio, so near-zero voxels give no wild ratios


_CHUNK_VOXELS = 1 << 20  # voxels per slab of the voxel-wise part (a few MB of float64)
NEIGHBOURHOOD = 3  # voxels per side of the neighbourhood a voxel is compared with (misregistration)


def _as_volume(name: str, value: Any) -> npt.NDArray[Any]:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: a numpy array is needed, not {type(value).__name__}")
    if value.ndim not in (2, 3) or value.size == 0:
        raise ValueError(f"{name}: a 2D or 3D image is needed, got shape {value.shape}")
    if not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
        raise TypeError(f"{name}: real-valued pixels are needed, not {value.dtype}")
    return value


def _median_head(volume: npt.NDArray[Any]) -> float | None:
    """The volume's median head intensity, in float64 (None for a blank volume): voxels above
    a tenth of the 99th percentile, their median.

    A finite float32 volume (a decoded series) is read where it is: the percentile and the
    median are numpy's on a float64 copy, bit for bit, from order statistics (node.percentiles)
    with no copy of a long series. Anything else: one float64 copy of the volume, partitioned
    in place by the percentile and the median."""
    if volume.dtype == np.float32 and volume.ndim == 3 and _all_finite(volume):
        if volume.size == 0:
            return None
        high = float(series_percentiles(volume, [99.0], dtype=np.float64)[0])
        if high <= 0:
            return None
        median = median_above(volume, 0.1 * high) or 0.0
        return median if median > 0 else None
    values = np.array(volume, dtype=np.float64).ravel()
    finite_mask = np.isfinite(values)
    if not finite_mask.all():
        values = values[finite_mask]
    del finite_mask
    if values.size == 0:
        return None
    high = float(np.percentile(values, 99.0, overwrite_input=True))
    if high <= 0:
        return None
    head = values[values > 0.1 * high]
    del values
    median = float(np.median(head, overwrite_input=True)) if head.size else 0.0
    return median if median > 0 else None


def _all_finite(volume: npt.NDArray[Any]) -> bool:
    """Whether every voxel is finite, checked a slab at a time."""
    return all(bool(np.isfinite(slab).all()) for slab in voxel_slabs(volume))


def _normalised(volume: npt.NDArray[Any], median: float) -> npt.NDArray[np.float64]:
    """Part of a volume divided by its median head intensity, non-finite voxels 0."""
    out = np.array(volume, dtype=np.float64)
    finite = np.isfinite(out)
    out /= median
    if not finite.all():
        out[~finite] = 0.0
    return out


def _neighbourhood_max(volume: npt.NDArray[Any], size: int) -> npt.NDArray[Any]:
    """Each voxel's brightest neighbour within ``size`` voxels per side, in the volume's own
    dtype (one more copy of the slab, not a float64 one); non-finite voxels count as 0."""
    if np.issubdtype(volume.dtype, np.floating) and not np.isfinite(volume).all():
        volume = np.where(np.isfinite(volume), volume, 0)
    if size <= 1:
        return volume
    from scipy import ndimage  # here, not at the top: importing scipy.ndimage loads socket

    out: npt.NDArray[Any] = ndimage.maximum_filter(volume, size=size, mode="nearest")
    return out


def _tails(
    pre: npt.NDArray[Any],
    post: npt.NDArray[Any],
    medians: tuple[float, float],
    ratio_threshold: float,
    neighbourhood: int = NEIGHBOURHOOD,
) -> tuple[int, int, int]:
    """(head voxels, enhanced, darkened) counted over both volumes a slab of slices (about a
    million voxels) at a time, each slab's neighbourhoods taken with the slices around it, so
    the counts are those of the whole volumes and memory stays a few slabs. A voxel is enhanced
    when it is brighter than every voxel of its neighbourhood on the earlier run by the ratio
    and at least the head's median later, darkened when the earlier run's voxel is brighter
    than every voxel of its neighbourhood later by the ratio and at least the median before."""
    pre3 = pre if pre.ndim == 3 else pre[np.newaxis]
    post3 = post if post.ndim == 3 else post[np.newaxis]
    slices, rows, cols = pre3.shape
    per_slab = max(1, _CHUNK_VOXELS // max(1, rows * cols))
    halo = neighbourhood // 2 if pre.ndim == 3 else 0
    n = enhanced = darkened = 0
    for z0 in range(0, slices, per_slab):
        z1 = min(slices, z0 + per_slab)
        lo, hi = max(0, z0 - halo), min(slices, z1 + halo)
        inner = slice(z0 - lo, z0 - lo + (z1 - z0))
        pre_near = _neighbourhood_max(pre3[lo:hi], neighbourhood)[inner].reshape(-1)
        post_near = _neighbourhood_max(post3[lo:hi], neighbourhood)[inner].reshape(-1)
        pre_n = _normalised(pre3[z0:z1].reshape(-1), medians[0])
        post_n = _normalised(post3[z0:z1].reshape(-1), medians[1])
        # Head voxels: bright enough on either run, so a vessel dark before and bright after
        # counts.
        head = (pre_n > _HEAD_LEVEL) | (post_n > _HEAD_LEVEL)
        n += int(head.sum())
        pre_max = _normalised(pre_near, medians[0])[head]
        post_max = _normalised(post_near, medians[1])[head]
        # Gadolinium makes a voxel bright, not merely brighter than a dark neighbourhood: a
        # tail voxel must reach the head's median on the brighter run. Noise in dark voxels
        # (CSF, low SNR) gives large ratios both ways and hid a glioblastoma's enhancement.
        post_h, pre_h = post_n[head], pre_n[head]
        enhanced += int(
            np.count_nonzero(
                ((post_h + _EPS) > ratio_threshold * (pre_max + _EPS)) & (post_h >= _TAIL_LEVEL)
            )
        )
        darkened += int(
            np.count_nonzero(
                ((pre_h + _EPS) > ratio_threshold * (post_max + _EPS)) & (pre_h >= _TAIL_LEVEL)
            )
        )
    return n, enhanced, darkened


def judge_contrast(
    earlier: npt.NDArray[Any],
    later: npt.NDArray[Any],
    *,
    ratio_threshold: float = RATIO_THRESHOLD,
    min_enhanced_fraction: float = MIN_ENHANCED_FRACTION,
    min_tail_ratio: float = MIN_TAIL_RATIO,
    neighbourhood: int = NEIGHBOURHOOD,
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
    if neighbourhood < 1 or neighbourhood % 2 == 0:
        raise ValueError(f"neighbourhood: {neighbourhood} must be an odd number of voxels")
    pre_median = _median_head(pre)
    post_median = _median_head(post) if pre_median is not None else None
    if pre_median is None or post_median is None:
        return ContrastEvidence(
            post_contrast=None,
            score=0.0,
            enhanced_fraction=0.0,
            darkened_fraction=0.0,
            n_voxels=0,
            reason="a volume is blank: cannot compare",
        )
    n, n_enhanced, n_darkened = _tails(
        pre, post, (pre_median, post_median), ratio_threshold, neighbourhood
    )
    if n < MIN_HEAD_VOXELS:
        return ContrastEvidence(
            post_contrast=None,
            score=0.0,
            enhanced_fraction=0.0,
            darkened_fraction=0.0,
            n_voxels=n,
            reason=f"only {n} head voxels in common: cannot compare",
        )
    enhanced = n_enhanced / n
    darkened = n_darkened / n
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

"""Percentiles and medians of a long float32 series without copying it (issue 15: memory).

``np.percentile`` and ``np.median`` sort (partition) a copy of the whole array: for a series of
160 slices of 256 x 256 that is 40 MB more in float32, 80 MB for a float64 copy, at the peak of
a study job. Here the order statistics come from a radix selection instead, two passes over the
array a slab of slices at a time, counting the upper then the lower 16 bits of each value's
sort key: a few MB of temporaries whatever the series' length, and faster than the partition.

The values are numpy's, bit for bit: the order statistics are the array's own values, and the
interpolation between them repeats numpy 2's arithmetic step by step (``_quantile``, ``_lerp``
and ``_median`` in numpy/lib/_function_base_impl.py, method 'linear'), in the dtype numpy
would interpolate in. Arrays this does not cover (another dtype, NaN values) go to numpy itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

SELECT_VOXELS = 1 << 18  # voxels keyed at a time (a few MB of temporaries)
_KEY_HALF = 1 << 16  # a 32-bit sort key is found 16 bits at a time
_SIGN = np.uint32(0x80000000)


def voxel_slabs(vol: npt.NDArray[Any], voxels: int = SELECT_VOXELS) -> Iterator[npt.NDArray[Any]]:
    """The array a few slices (about ``voxels`` values) at a time, along its first axis."""
    per = max(1, voxels // max(1, int(np.prod(vol.shape[1:]))))
    for start in range(0, vol.shape[0], per):
        yield vol[start : start + per]


def _sort_keys(part: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """Unsigned 32-bit keys in the order of the float32 values (IEEE bits, sign folded): one
    new array and a mask, the values' own bits read in place."""
    bits = np.ascontiguousarray(part).view(np.uint32).ravel()
    keys: npt.NDArray[np.uint32] = bits | _SIGN
    np.invert(bits, out=keys, where=bits >= _SIGN)
    return keys


def _key_value(key: int) -> np.float32:
    """The float32 value of a sort key (the inverse of ``_sort_keys``)."""
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return np.float32(np.array(bits, dtype=np.uint32).view(np.float32)[()])


def _picked(slab: npt.NDArray[np.float32], above: float | None) -> npt.NDArray[np.float32]:
    """The slab's values above ``above`` (compared in float64), or the whole slab."""
    if above is None:
        return slab
    picked: npt.NDArray[np.float32] = slab[slab > np.float64(above)]
    return picked


def count_above(vol: npt.NDArray[np.float32], above: float) -> int:
    """How many values are above ``above`` (compared in float64, as on a float64 copy)."""
    return sum(int(np.count_nonzero(slab > np.float64(above))) for slab in voxel_slabs(vol))


def order_statistics(
    vol: npt.NDArray[np.float32], ranks: Iterable[int], *, above: float | None = None
) -> dict[int, np.float32]:
    """The values at these 0-based ranks of a float32 array's sorted values (NaN-free; with
    ``above``, of its values above that, compared in float64), without sorting or copying it.
    They are the array's own values: what ``np.partition`` puts at those ranks (+0.0 and -0.0,
    equal for a partition, rank -0.0 first here)."""
    wanted = sorted(set(ranks))
    counts = np.zeros(_KEY_HALF, dtype=np.int64)
    for slab in voxel_slabs(vol):
        keys = _sort_keys(_picked(slab, above))
        np.right_shift(keys, 16, out=keys)
        counts += np.bincount(keys, minlength=_KEY_HALF)
    below = np.cumsum(counts)
    n = int(below[-1])
    if any(r < 0 or r >= n for r in wanted):
        raise ValueError(f"ranks must be in [0, {n}), got {wanted}")
    high = {r: int(np.searchsorted(below, r, side="right")) for r in wanted}
    lows = {h: np.zeros(_KEY_HALF, dtype=np.int64) for h in set(high.values())}
    for slab in voxel_slabs(vol):
        keys = _sort_keys(_picked(slab, above))
        top = keys >> 16
        for h, low in lows.items():
            low += np.bincount(keys[top == h] & 0xFFFF, minlength=_KEY_HALF)
    out: dict[int, np.float32] = {}
    for r, h in high.items():
        within = r - (int(below[h - 1]) if h else 0)
        low_key = int(np.searchsorted(np.cumsum(lows[h]), within, side="right"))
        out[r] = _key_value((h << 16) | low_key)
    return out


def _has_nan(vol: npt.NDArray[np.float32]) -> bool:
    return any(bool(np.isnan(slab).any()) for slab in voxel_slabs(vol))


def series_percentiles(
    vol: npt.NDArray[Any], q: Sequence[float], *, dtype: type[np.floating[Any]] = np.float32
) -> npt.NDArray[np.float64]:
    """``np.percentile(vol.astype(dtype), q)`` (method 'linear', q a sequence) for a float32
    array, the same float64 values bit for bit, without numpy's sorted copy of the array.

    ``dtype`` is what numpy would interpolate in: float32 for the array itself, float64 for a
    float64 copy of it (the order statistics are the same values; the difference between
    neighbours is taken in that dtype). Another array dtype, or NaN values, go to
    ``np.percentile`` itself."""
    arr = np.asarray(vol)
    quantiles = np.true_divide(np.asarray(q, dtype=np.float64), 100)
    if quantiles.ndim != 1 or ((quantiles < 0) | (quantiles > 1)).any():
        raise ValueError(f"q must be a sequence of percentages in [0, 100], got {q}")
    if arr.dtype != np.float32 or arr.ndim == 0 or arr.size == 0 or _has_nan(arr):
        found: npt.NDArray[np.float64] = np.asarray(
            np.percentile(arr.astype(dtype, copy=False), q), dtype=np.float64
        )
        return found
    n = int(arr.size)
    virtual = (n - 1) * quantiles
    before = np.floor(virtual)
    after = before + 1
    above = virtual >= n - 1
    before[above] = -1
    after[above] = -1
    under = virtual < 0
    before[under] = 0
    after[under] = 0
    before_i = before.astype(np.intp)
    after_i = after.astype(np.intp)
    gamma = np.asarray(virtual - before_i, dtype=virtual.dtype)
    stats = order_statistics(arr, (int(i) % n for i in (*before_i, *after_i)))
    a = np.array([stats[int(i) % n] for i in before_i], dtype=dtype)
    b = np.array([stats[int(i) % n] for i in after_i], dtype=dtype)
    diff_b_a = b - a
    result: npt.NDArray[np.float64] = np.add(a, diff_b_a * gamma)
    np.subtract(
        b,
        diff_b_a * (1 - gamma),
        out=result,
        where=gamma >= 0.5,
        casting="unsafe",
        dtype=result.dtype,
    )
    return result


def median_above(vol: npt.NDArray[np.float32], above: float) -> float | None:
    """``np.median`` of a float32 array's values above ``above``, as numpy gives it on a
    float64 copy of them (compared and averaged in float64); None when no value is above.
    The array must be NaN-free."""
    m = count_above(vol, above)
    if m == 0:
        return None
    middle = m // 2
    ranks = (middle,) if m % 2 else (middle - 1, middle)
    stats = order_statistics(vol, ranks, above=above)
    values = np.array([stats[r] for r in ranks], dtype=np.float64)
    return float(np.mean(values))

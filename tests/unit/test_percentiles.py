"""Percentiles of a long series without a copy of it (node.percentiles, issue 15): numpy's and
MONAI's values bit for bit, and a peak of a few MB where numpy's sorted copy is the array's
own size (tracemalloc counts numpy's allocations: deterministic, not timed)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from node.bundles import bundle as bundles
from node.bundles import config
from node.bundles.config import recipe_preprocessing
from node.classify import contrast
from node.percentiles import median_above, order_statistics, series_percentiles

torch.set_num_threads(1)


def volumes(seed: int) -> list[np.ndarray[Any, Any]]:
    """Float32 arrays of the kinds a series holds: integer-valued with many ties and a zero
    background, continuous, signed, huge, a single value, 1-D and a transposed view."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(40):
        shape = (int(rng.integers(1, 6)), int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        kind = t % 6
        if kind == 0:
            v: np.ndarray[Any, Any] = rng.normal(0.0, 1000.0, shape)
        elif kind == 1:
            v = rng.integers(-50, 50, shape)
        elif kind == 2:
            v = rng.gamma(2.0, 300.0, shape) * 1.37
        elif kind == 3:
            v = np.where(rng.random(shape) < 0.6, 0.0, rng.lognormal(3.0, 2.0, shape))
        elif kind == 4:
            v = rng.uniform(-1e30, 1e30, shape)
        else:
            v = np.full(shape, 7.0)
        out.append(v.astype(np.float32))
    ramp = np.arange(1000, dtype=np.float32)
    ramp[::7] = np.inf
    ramp[::11] = -np.inf
    strided = rng.normal(size=(3, 50, 40)).astype(np.float32)[:, ::2]
    out += [ramp, out[2].transpose(2, 0, 1), strided]
    return out


QS = ([0.5, 99.5], [99.0, 1.0], [0.0, 100.0], [50.0], [12.345, 67.89, 99.999])


def same_bits(a: Any, b: Any) -> bool:
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a64.shape == b64.shape and np.array_equal(a64.view(np.int64), b64.view(np.int64))


@pytest.mark.parametrize("q", QS)
def test_series_percentiles_are_numpys_bit_for_bit(q: list[float]) -> None:
    for vol in volumes(len(q)):
        with np.errstate(invalid="ignore"):  # inf - inf, in numpy as here
            ref = np.percentile(vol, q)
            got = series_percentiles(vol, q)
            ref64 = np.percentile(vol.astype(np.float64), q)
            got64 = series_percentiles(vol, q, dtype=np.float64)
        assert got.dtype == np.float64
        assert same_bits(got, ref), (vol.shape, q, ref, got)
        # Interpolated in float64, as numpy does on a float64 copy (the median head of
        # node.classify.contrast).
        assert same_bits(got64, ref64)


def test_the_order_statistics_are_the_sorted_values() -> None:
    rng = np.random.default_rng(5)
    vol = rng.normal(0.0, 3.0, (4, 30, 20)).astype(np.float32)
    ordered = np.sort(vol, axis=None)
    ranks = (0, 1, 17, 1200, ordered.size - 1)
    stats = order_statistics(vol, ranks)
    assert [stats[r] for r in ranks] == [ordered[r] for r in ranks]
    above = ordered[ordered > 1.0]
    picked = order_statistics(vol, (0, above.size - 1), above=1.0)
    assert (picked[0], picked[above.size - 1]) == (above[0], above[-1])
    with pytest.raises(ValueError, match="ranks"):
        order_statistics(vol, (ordered.size,))


def test_nan_and_other_dtypes_go_to_numpy() -> None:
    vol = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    vol[1, 2, 3] = np.nan
    assert np.isnan(series_percentiles(vol, [1.0, 99.0])).all()
    ints = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    assert same_bits(series_percentiles(ints, [1.0, 99.0]), np.percentile(ints, [1.0, 99.0]))
    with pytest.raises(ValueError, match="percentages"):
        series_percentiles(vol, [101.0])


def test_median_above_is_numpys_median_of_the_float64_values_above() -> None:
    for vol in volumes(9)[:30]:
        values = vol.astype(np.float64).ravel()
        for above in (0.0, float(np.percentile(values, 40.0))):
            head = values[values > above]
            expected = float(np.median(head)) if head.size else None
            assert median_above(vol, above) == expected


def test_the_median_head_of_contrast_is_unchanged() -> None:
    """contrast._median_head reads a float32 series in place; its value is the one of the
    float64 copy it partitioned before (that path is kept for other arrays)."""
    rng = np.random.default_rng(2)
    for k in range(12):
        vol = (rng.gamma(2.0, 300.0, (6, 40, 33)) * (k + 1) / 3).astype(np.float32)
        vol[:, :5] = 0.0
        ref = contrast._median_head(vol.astype(np.float64))  # the float64-copy path
        assert ref is not None and contrast._median_head(vol) == ref
    assert contrast._median_head(np.zeros((3, 8, 8), dtype=np.float32)) is None


@pytest.mark.parametrize("lower,upper", [(0.5, 99.5), (1.0, 99.0), (0.0, 100.0)])
def test_series_bounds_are_monais_percentile_bit_for_bit(lower: float, upper: float) -> None:
    """Above a million voxels MONAI's percentile is np.percentile over a copy; the bounds from
    order statistics are the same float32 tensor, as one call and as MONAI's two."""
    from monai.transforms.utils_pytorch_numpy_unification import percentile

    rng = np.random.default_rng(int(upper))
    vol = (rng.gamma(2.0, 300.0, size=(17, 256, 256)) * 1.37).astype(np.float32)
    vol[:, :40] = 0.0
    assert vol.size > config.MONAI_NUMPY_PERCENTILE_ABOVE
    tensor = torch.from_numpy(vol)
    bounds = config._series_bounds(vol, lower, upper)
    both = percentile(tensor, [lower, upper])
    assert isinstance(both, torch.Tensor)
    assert bounds.dtype == both.dtype == torch.float32
    assert torch.equal(bounds, both)
    low, high = percentile(tensor, lower), percentile(tensor, upper)  # as _normalize takes them
    assert isinstance(low, torch.Tensor) and isinstance(high, torch.Tensor)
    assert torch.equal(bounds[0], low) and torch.equal(bounds[1], high)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Numpy's peak allocation during ``fn`` above what was allocated before it."""
    fn()  # imports and caches first
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def long_series() -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(11)
    vol = np.round(rng.gamma(2.0, 300.0, size=(96, 256, 256))).astype(np.float32)
    vol[:, :30] = 0.0
    vol.flags.writeable = False  # a job's decoded series
    return vol


def test_no_copy_of_the_series_is_made() -> None:
    """numpy's percentile makes a sorted copy (the series' size, 24 MB here); order statistics
    need a few MB of temporaries (about 6 MB) whatever the series' length."""
    vol = long_series()
    size = vol.nbytes
    assert peak_bytes(lambda: np.percentile(vol, [0.5, 99.5])) >= size  # the reference copies
    assert peak_bytes(lambda: series_percentiles(vol, [0.5, 99.5])) < size // 3
    assert peak_bytes(lambda: series_percentiles(vol, [99.0], dtype=np.float64)) < size // 3
    assert peak_bytes(lambda: config._series_bounds(vol, 0.5, 99.5)) < size // 3
    assert peak_bytes(lambda: bundles._brain_slices(vol)) < size // 3
    assert peak_bytes(lambda: contrast._median_head(vol)) < size // 3


def test_scaling_a_long_series_keeps_monais_values_with_one_copy() -> None:
    """The scaled slices are MONAI's whole-series transform's; scaling a few slices of a series
    whose bounds are known costs those slices, not a copy of the series."""
    vol = long_series()
    pre = recipe_preprocessing(low=0.5, high=99.5)
    monai_whole = np.asarray(pre.series(vol), dtype=np.float32)
    np.testing.assert_array_equal(pre.scale(vol), monai_whole)
    indices = (0, 47, 95)
    assert peak_bytes(lambda: pre.scale_slices(vol, indices)) < vol.nbytes // 3
    np.testing.assert_array_equal(pre.scale_slices(vol, indices), monai_whole[list(indices)])
    assert bundles.brain_slices(vol) == bundles._brain_slices(vol)

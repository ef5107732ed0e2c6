"""A job's decoded series (node.pipeline.series_cache): each series decoded once per job within a
byte budget, read-only, only the routed series kept after ROUTE; and the statistics that
normalisation reuses for read-only pixels (node.bundles.config.frozen_digest)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.bundles import bundle as bundles
from node.bundles import config as bundle_config
from node.dicom import volumes as dicom_volumes
from node.dicom.volumes import SeriesId, read_study, volume_id
from node.pipeline.series_cache import SeriesCache
from node.records import SeriesLayout

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[SeriesLayout, ...]:
    """The series layouts of a small synthetic study (six series with pixels)."""
    from node.lab.synth import write_studies

    root = tmp_path_factory.mktemp("cache")
    write_studies(root, studies=1, seed=3, size=32, slices=6, distractors=False)
    load, _ = read_study(sorted(root.rglob("*.dcm")))
    assert len(load.layouts) >= 4
    return load.layouts


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[SeriesId]:
    """How many times each series is decoded from its files."""
    counts: Counter[SeriesId] = Counter()
    real = dicom_volumes._decode_series

    def counted(layout: SeriesLayout) -> Any:
        counts[volume_id(layout)] += 1
        return real(layout)

    monkeypatch.setattr(dicom_volumes, "_decode_series", counted)
    return counts


def _size(layout: SeriesLayout) -> int:
    n, rows, cols = layout.shape
    return n * rows * cols * 4  # float32


def test_a_series_read_again_is_not_decoded_again(
    layouts: tuple[SeriesLayout, ...], decodes: Counter[SeriesId]
) -> None:
    cache = SeriesCache(layouts)
    keys = [volume_id(layout) for layout in layouts]
    first = [cache.get(k) for k in keys]
    again = [cache.get(k) for k in reversed(keys)]
    assert all(v is not None for v in first)
    assert list(reversed(again)) == first  # the very same volumes
    assert decodes == Counter(keys)  # once each
    assert cache.kept_bytes == sum(_size(layout) for layout in layouts)


def test_kept_pixels_cannot_be_written(layouts: tuple[SeriesLayout, ...]) -> None:
    volume = SeriesCache(layouts).get(volume_id(layouts[0]))
    assert volume is not None
    with pytest.raises(ValueError, match="read-only"):
        volume.pixels[0, 0, 0] = 1.0


def test_the_budget_keeps_the_most_recently_read_series(
    layouts: tuple[SeriesLayout, ...], decodes: Counter[SeriesId]
) -> None:
    same = [layout for layout in layouts if layout.shape == layouts[1].shape][:3]
    assert len(same) == 3
    a, b, c = (volume_id(layout) for layout in same)
    cache = SeriesCache(layouts, budget_bytes=2 * _size(same[0]))
    cache.get(a)
    cache.get(b)
    cache.get(a)  # a is now the most recently read
    cache.get(c)  # no room for three: b goes
    assert cache.kept() == (a, c)
    cache.get(b)
    assert decodes[b] == 2 and decodes[a] == 1 and decodes[c] == 1
    assert cache.kept_bytes <= 2 * _size(same[0])


def test_a_series_larger_than_the_budget_is_never_kept(
    layouts: tuple[SeriesLayout, ...], decodes: Counter[SeriesId]
) -> None:
    key = volume_id(layouts[1])
    cache = SeriesCache(layouts, budget_bytes=_size(layouts[1]) - 1)
    assert cache.get(key) is not None and cache.get(key) is not None
    assert decodes[key] == 2 and cache.kept() == ()


def test_keep_only_drops_the_others_and_keeps_no_new_one(
    layouts: tuple[SeriesLayout, ...], decodes: Counter[SeriesId]
) -> None:
    keys = [volume_id(layout) for layout in layouts]
    cache = SeriesCache(layouts)
    for k in keys[:3]:
        cache.get(k)
    cache.keep_only([keys[1], keys[3]])
    assert cache.kept() == (keys[1],)
    cache.get(keys[0])  # not routed: read once more, not kept
    cache.get(keys[3])  # routed, read for the first time: kept
    assert cache.kept() == (keys[1], keys[3])
    cache.clear()
    assert cache.kept() == () and cache.kept_bytes == 0
    cache.get(keys[1])
    assert cache.kept() == () and decodes[keys[1]] == 2


def test_a_negative_budget_is_refused(layouts: tuple[SeriesLayout, ...]) -> None:
    with pytest.raises(ValueError, match="budget_bytes"):
        SeriesCache(layouts, budget_bytes=-1)


# --- statistics of read-only pixels ---------------------------------------------------------


def _frozen(shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, np.dtype[np.float32]]:
    arr = np.random.default_rng(seed).random(shape, dtype=np.float32)
    arr.flags.writeable = False
    return arr


def test_frozen_pixels_are_hashed_once_per_view(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = bundle_config.content_digest

    def counted(arr: Any) -> bytes:
        calls.append(tuple(arr.shape))
        return real(arr)

    monkeypatch.setattr(bundle_config, "content_digest", counted)
    arr = _frozen((4, 8, 8))
    first = bundle_config.frozen_digest(arr)
    assert first == real(arr)
    assert bundle_config.frozen_digest(arr) == first
    assert bundle_config.frozen_digest(np.transpose(arr, (0, 1, 2))) == first  # a view, same
    assert calls == [(4, 8, 8)]
    flipped = np.flip(arr, axis=1)  # another view: other values in C order
    assert bundle_config.frozen_digest(flipped) == real(np.ascontiguousarray(flipped)) != first
    assert len(calls) == 2


def test_pixels_that_can_change_are_never_taken_by_identity() -> None:
    writable = np.zeros((2, 4, 4), dtype=np.float32)
    assert bundle_config.frozen_digest(writable) is None
    view = writable[:]
    view.flags.writeable = False  # read-only here, but its owner can still change it
    assert bundle_config.frozen_digest(view) is None
    from_buffer = np.frombuffer(bytes(64), dtype=np.float32)  # memory owned by bytes
    assert bundle_config.frozen_digest(from_buffer) is None


def test_scaling_frozen_pixels_gives_the_values_of_a_writable_copy() -> None:
    pre = bundle_config.recipe_preprocessing(low=1.0, high=99.0)
    arr = _frozen((6, 16, 16), seed=4)
    first = pre.scale(arr)
    np.testing.assert_array_equal(first, pre.scale(np.array(arr)))
    np.testing.assert_array_equal(pre.scale(arr), first)  # the second read: the kept bounds
    np.testing.assert_array_equal(pre.scale_slices(arr, [1, 4]), first[[1, 4]])


def test_brain_slices_of_frozen_pixels_equal_those_computed_afresh() -> None:
    arr = np.zeros((10, 16, 16), dtype=np.float32)
    arr[2:7, 4:12, 4:12] = 100.0
    arr.flags.writeable = False
    expected = bundles._brain_slices(np.array(arr))
    assert expected == (2, 3, 4, 5, 6)
    assert bundles.brain_slices(arr) == expected
    assert bundles.brain_slices(arr) == expected  # from the memo


def test_a_frozen_series_is_read_by_torch_without_a_warning() -> None:
    """torch warns once per process when a read-only array becomes a tensor (the warning would
    reach the node's log): a fresh interpreter, with every warning an error, scales one."""
    code = (
        "import numpy as np\n"
        "from node.bundles.config import recipe_preprocessing\n"
        "arr = np.random.default_rng(1).random((3, 8, 8), dtype=np.float32)\n"
        "arr.flags.writeable = False\n"
        "pre = recipe_preprocessing(low=1.0, high=99.0)\n"
        "out = pre.scale_slices(arr, [0, 2])\n"
        "assert out.shape == (2, 8, 8)\n"
        "pre.scale(arr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]

"""The series volumes of one study job, each decoded once and shared by the stages that read it.

CLASSIFY (the sequence CNN, the T1 image comparison), INFER (every bundle routed to a series)
and HEATMAPS (the Grad-CAM maps left for after the SR) read the same routed series; decoding
each anew (pydicom, file by file) was a third of the job's decoding time and on the SR's path.
A job keeps the series it decoded, within a byte budget, so memory stays bounded whatever the
study's size (issue 15: peak growth <= 150 MB from a 200- to a 2,000-instance study):

- A series larger than the budget is never kept (decoded each time, as before); otherwise the
  least recently read series go first when the budget is full.
- After ROUTE only the routed series are kept (``keep_only``); the job drops the rest at the end
  of HEATMAPS (``clear``).
- Kept pixels are read-only: a stage that wrote into a shared volume would change what the next
  one reads, so it fails loudly instead. Read-only arrays also let normalisation reuse a series'
  statistics by identity instead of hashing its pixels again (node.bundles.config).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from node.dicom.volumes import LazyVolumes, SeriesId
from node.records import DecodeProblem, SeriesLayout, SeriesVolume

# 64 MB holds every series of a 200-instance study (256x256, about 9 MB each) and one long
# series of a large one (160 x 256 x 256: 42 MB), so the cache adds about as much to a small
# study's peak as to a large one's: the growth from one to the other hardly moves.
CACHE_BUDGET_BYTES = 64 * 1024 * 1024


class SeriesCache:
    """Series volumes by (SeriesInstanceUID, SeriesNumber), decoded on first read and kept
    within ``budget_bytes`` (a ``VolumeSource`` like node.dicom.volumes.LazyVolumes)."""

    def __init__(
        self, layouts: Iterable[SeriesLayout], *, budget_bytes: int = CACHE_BUDGET_BYTES
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, not {budget_bytes}")
        self._lazy = LazyVolumes(layouts)
        self._budget = budget_bytes
        self._kept: OrderedDict[SeriesId, SeriesVolume] = OrderedDict()
        self._only: frozenset[SeriesId] | None = None  # after keep_only: nothing else is kept
        self.n_decoded = 0  # series decodes so far (the audit's stage times show the saving)

    @property
    def problems(self) -> list[DecodeProblem]:
        """The files whose pixels failed so far (each once)."""
        return self._lazy.problems

    @property
    def kept_bytes(self) -> int:
        """Bytes of pixels held now."""
        return sum(v.pixels.nbytes for v in self._kept.values())

    def kept(self) -> tuple[SeriesId, ...]:
        """The series held now, least recently read first."""
        return tuple(self._kept)

    def layouts(self, original: Iterable[SeriesLayout]) -> tuple[SeriesLayout, ...]:
        """``original`` with the layouts of series laid out again (or dropped) on decoding."""
        return self._lazy.layouts(original)

    def get(self, key: SeriesId, /) -> SeriesVolume | None:
        """The series' volume (None: no such series, or no file of it decodes)."""
        hit = self._kept.get(key)
        if hit is not None:
            self._kept.move_to_end(key)
            return hit
        volume = self._lazy.get(key)
        if volume is None:
            return None
        self.n_decoded += 1
        # The volume owns its pixels (decoded into one new array): read-only from now on.
        volume.pixels.flags.writeable = False
        size = volume.pixels.nbytes
        if size <= self._budget and (self._only is None or key in self._only):
            while self._kept and self.kept_bytes + size > self._budget:
                self._kept.popitem(last=False)
            self._kept[key] = volume
        return volume

    def keep_only(self, keys: Iterable[SeriesId]) -> None:
        """Drop every series but these, and keep no other from now on."""
        self._only = frozenset(keys)
        for key in [k for k in self._kept if k not in self._only]:
            del self._kept[key]

    def clear(self) -> None:
        """Drop every series and keep none from now on (the job is done with its pixels)."""
        self.keep_only(())

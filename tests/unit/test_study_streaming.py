"""A study job decodes one series at a time and normalises only the slices a model reads
(issue 15); its results must be those of the eager path (every series decoded at LOAD and
kept, headers read again for the series records and the SR, the whole series normalised),
which this test rebuilds in the same run and compares field by field."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from node.bundles.config import Preprocessing, recipe_preprocessing
from node.config import Rules
from node.dicom.headers import read_series_headers
from node.dicom.volumes import SeriesId, decode_series, read_study, scan_study, volume_id
from node.pipeline import runner, stages
from node.pipeline.context import OBJECTS_DIR, Stage, StudyContext
from node.pipeline.runner import process_study
from node.records import DecodeProblem, SeriesLayout, SeriesVolume, StudyJob
from tests.conftest import REALDATA

REPO = Path(__file__).resolve().parents[2]
_TIMING = {"started_at", "finished_at", "duration_ms", "stages"}


class EagerVolumes:
    """The old LOAD behaviour: every series decoded up front and kept for the whole job."""

    def __init__(self, layouts: Any) -> None:
        self.problems: list[DecodeProblem] = []
        self._volumes: dict[SeriesId, SeriesVolume] = {}
        for layout in layouts:
            volume, problems = decode_series(layout)
            self.problems.extend(problems)
            if volume is not None:
                self._volumes[volume_id(volume)] = volume

    def get(self, key: SeriesId, /) -> SeriesVolume | None:
        return self._volumes.get(key)

    def layouts(self, original: tuple[SeriesLayout, ...]) -> tuple[SeriesLayout, ...]:
        return original

    def keep_only(self, keys: Any) -> None:
        """Every volume stays for the whole job."""

    def clear(self) -> None:
        """Every volume stays for the whole job."""


def _eager_load(ctx: StudyContext) -> StudyContext:
    """LOAD, then the series records read again from the image files (the old second read)."""
    ctx = stages.stage_load(ctx)
    assert ctx.loaded is not None
    again = read_series_headers(stages._image_paths(ctx))
    return replace(ctx, loaded=replace(ctx.loaded, series_headers=again))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, tuple[Path, ...]]:
    """A synthetic glioblastoma study with distractor series, planes drawn at random."""
    from node.lab.synth import write_studies

    root = tmp_path_factory.mktemp("streaming")
    manifest = write_studies(
        root,
        studies=1,
        seed=21,
        phenotypes=["gbm"],
        vendors=["siemens"],
        size=64,
        slices=12,
        randomise=True,
    )
    entry = manifest.studies[0]
    return str(entry["study_uid"]), tuple(sorted(root.rglob("*.dcm")))


def _rules() -> Rules:
    rules = Rules(models_dir=REPO / "models")
    tasks = {name: t.model_copy(update={"enabled": True}) for name, t in rules.tasks.items()}
    return rules.model_copy(update={"tasks": tasks})


def _run(uid: str, paths: tuple[Path, ...], out: Path) -> tuple[dict[str, Any], list[Any]]:
    job = StudyJob(job_id=1, study_uid=uid, instance_paths=paths, attempt=1)
    outcome = process_study(job, _rules(), out_dir=out)
    audit = json.loads(outcome.audit_path.read_text(encoding="utf-8"))
    objects = sorted((outcome.audit_path.parent / OBJECTS_DIR).glob("*.dcm"))
    return audit, [pydicom.dcmread(p) for p in objects]


def _comparable(audit: dict[str, Any]) -> dict[str, Any]:
    """The audit without timings, result objects named by file (the two runs write to two
    folders)."""
    out = {k: v for k, v in audit.items() if k not in _TIMING}
    out["objects"] = [{**o, "file": Path(o["file"]).name} for o in audit["objects"]]
    return out


def test_streamed_job_gives_the_eager_results(
    study: tuple[str, tuple[Path, ...]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid, paths = study
    streamed_audit, streamed_objects = _run(uid, paths, tmp_path / "streamed")

    # The eager reference, in this same run: every volume decoded at LOAD and kept (no shared
    # read-only cache), headers read again, the whole series normalised, the SR's series
    # numbers read from the files.
    monkeypatch.setattr(stages, "SeriesCache", EagerVolumes)
    monkeypatch.setattr(stages, "_series_numbers", lambda _ctx: ())
    monkeypatch.setattr(
        Preprocessing, "scale_slices", lambda self, pixels, idx: self.scale(pixels)[list(idx)]
    )
    eager_stages = tuple(
        (stage, _eager_load if stage is Stage.LOAD else fn) for stage, fn in stages.STAGES
    )
    monkeypatch.setattr(runner, "STAGES", eager_stages)
    eager_audit, eager_objects = _run(uid, paths, tmp_path / "eager")

    assert streamed_audit["status"] == "done"
    # The study was routed and assessed: the comparison covers specialists and heatmaps.
    assert any(f["status"] != "not_assessable" for f in streamed_audit["findings"])
    assert {o.Modality for o in streamed_objects} == {"SR", "OT"}
    assert _comparable(streamed_audit) == _comparable(eager_audit)
    assert [o.SOPInstanceUID for o in streamed_objects] == [o.SOPInstanceUID for o in eager_objects]
    for a, b in zip(streamed_objects, eager_objects, strict=True):
        if "PixelData" in a:
            np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
        else:
            assert a.ContentSequence == b.ContentSequence


def test_series_records_from_one_read_equal_a_second_read(
    study: tuple[str, tuple[Path, ...]],
) -> None:
    _, paths = study
    load, ignored = read_study(paths)
    assert ignored == 0
    assert load.series_headers == read_series_headers(paths)
    assert len(load.series_headers) == len(load.layouts) > 5


def test_layouts_decode_to_the_volumes_of_a_full_scan(
    study: tuple[str, tuple[Path, ...]],
) -> None:
    _, paths = study
    load, _ = read_study(paths)
    full = {volume_id(v): v for v in scan_study(paths).volumes}
    for layout in load.layouts:
        volume, problems = decode_series(layout)
        assert problems == ()
        assert volume is not None
        ref = full[volume_id(layout)]
        assert volume.pixels.shape == layout.shape == ref.pixels.shape
        np.testing.assert_array_equal(volume.pixels, ref.pixels)
        assert volume.slices == ref.slices == layout.slices


@pytest.mark.parametrize("shape", [(3, 40, 40), (19, 256, 256)])  # torch and numpy percentile
def test_scaling_chosen_slices_equals_scaling_the_series(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    pixels = (rng.gamma(2.0, 300.0, size=shape) * 1.37).astype(np.float32)
    pre = recipe_preprocessing(low=0.5, high=99.5)
    indices = (shape[0] // 2, 0, shape[0] - 1)
    # The reference is MONAI's own whole-series transform from the bundle config.
    monai_whole = np.asarray(pre.series(pixels), dtype=np.float32)
    whole = pre.scale(pixels)  # percentiles of the whole series, applied 8 slices at a time
    np.testing.assert_array_equal(whole, monai_whole)
    np.testing.assert_array_equal(pre.scale_slices(pixels, indices), monai_whole[list(indices)])
    assert whole.min() == 0.0 and whole.max() == 1.0  # the percentiles did clip


def test_a_constant_series_scales_alike() -> None:
    pixels = np.full((4, 8, 8), 7.0, dtype=np.float32)
    pre = recipe_preprocessing(low=0.5, high=99.5)
    monai_whole = np.asarray(pre.series(pixels), dtype=np.float32)
    np.testing.assert_array_equal(pre.scale(pixels), monai_whole)
    np.testing.assert_array_equal(pre.scale_slices(pixels, (1, 2)), monai_whole[[1, 2]])


def test_contrast_counted_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from node.classify import contrast

    rng = np.random.default_rng(3)
    pre = rng.gamma(2.0, 100.0, (7, 33, 31)).astype(np.float32)
    post = (pre * rng.uniform(0.6, 2.2, pre.shape)).astype(np.float32)
    pre.reshape(-1)[:40] = np.nan  # non-finite voxels count as background
    one_pass = contrast.judge_contrast(pre, post)
    monkeypatch.setattr(contrast, "_CHUNK_VOXELS", 997)  # chunks that split slices and rows
    assert contrast.judge_contrast(pre, post) == one_pass
    assert one_pass.n_voxels > contrast.MIN_HEAD_VOXELS and one_pass.enhanced_fraction > 0


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is not on this machine")
def test_header_records_folded_one_at_a_time_equal_those_of_all_datasets() -> None:
    """Real scanner series (enhanced, mosaics, field maps, split UIDs, every vendor's private
    tags): folding each header as it is read gives the records of the datasets all at once."""
    from node.dicom.headers import SeriesHeaderBuilder, _files, _read

    datasets = [ds for ds in map(_read, _files([REALDATA])) if ds is not None]
    builder = SeriesHeaderBuilder()
    for ds in datasets:
        builder.add(ds)
    expected = _whole_series_headers(datasets)
    assert len(expected) > 30
    assert builder.build() == expected


def _whole_series_headers(datasets: list[Any]) -> tuple[Any, ...]:
    """The reference: every series' datasets grouped first, then folded at once
    (header_from_datasets), as the header records were made before the streaming builder."""
    from dataclasses import replace

    from node.dicom.headers import (
        _series_number,
        _text,
        group_key,
        header_from_datasets,
        set_aside_non_images,
    )

    by_uid: dict[str, list[Any]] = {}
    for ds in datasets:
        if "SeriesInstanceUID" in ds and "SOPClassUID" in ds:
            by_uid.setdefault(_text(ds.SeriesInstanceUID), []).append(ds)
    headers = []
    for uid, found in by_uid.items():
        images, n_set_aside = set_aside_non_images(found)
        numbers = {_series_number(ds) for ds in images}
        groups: dict[str, list[Any]] = {}
        for ds in images:
            groups.setdefault(group_key(uid, _series_number(ds), numbers), []).append(ds)
        for group in groups.values():
            header = header_from_datasets(group)
            headers.append(replace(header, n_set_aside=header.n_set_aside + n_set_aside))
    headers.sort(key=lambda h: (h.study_uid, h.series_number or 0, h.series_uid))
    return tuple(headers)


def _reference_lesion_box(vol: Any, spec: Any) -> Any:
    """The region as it was found before the memory work: whole-volume copies throughout."""
    from scipy import ndimage

    from node.bundles.roi import Box, _square

    n, rows, cols = vol.shape
    head = vol > 0.1
    if not head.any():
        return Box(0, rows, 0, cols, False)
    hr = np.flatnonzero(head.any(axis=(0, 2)))
    hc = np.flatnonzero(head.any(axis=(0, 1)))
    head_box = Box(int(hr[0]), int(hr[-1]) + 1, int(hc[0]), int(hc[-1]) + 1, False)
    erode = max(1, round(0.06 * min(rows, cols)))
    inner = np.zeros_like(head)
    for k in range(n):
        inner[k] = ndimage.binary_erosion(ndimage.binary_fill_holes(head[k]), iterations=erode)
    values = vol[inner]
    if values.size < 50:
        return head_box
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * 1.4826
    if mad <= 0:
        return head_box
    candidate = inner & (vol > med + spec.z * mad)
    labels, count = ndimage.label(candidate, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return head_box
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes))
    if sizes[best] < spec.min_fraction * values.size:
        return head_box
    _k, r, c = np.nonzero(labels == best + 1)
    r0, r1, c0, c1 = int(r.min()), int(r.max()) + 1, int(c.min()), int(c.max()) + 1
    grow = spec.margin * max(r1 - r0, c1 - c0)
    side = max(round(max(r1 - r0, c1 - c0) + 2 * grow), round(spec.min_side * min(rows, cols)))
    return _square(r0, r1, c0, c1, side, rows, cols)


@pytest.mark.parametrize("seed", range(6))
def test_lesion_region_equals_the_whole_volume_computation(seed: int) -> None:
    from node.bundles.roi import RoiSpec, lesion_box

    rng = np.random.default_rng(seed)
    vol = (rng.random((10, 72, 64)) * 0.5).astype(np.float32)
    vol[:, 8:64, 6:58] += 0.4  # a head
    z0, r0, c0 = rng.integers(1, 7), rng.integers(12, 40), rng.integers(10, 36)
    vol[z0 : z0 + 3, r0 : r0 + 12, c0 : c0 + 9] += 0.5  # a bright lesion
    vol[z0 + 1, 50:53, 12:40] += 0.6  # and a smaller bright streak
    found = 0
    for z in (0.5, 2.0, 3.0):
        for fraction in (0.0005, 0.002, 0.05):
            spec = RoiSpec(z=z, min_fraction=fraction)
            box = lesion_box(vol.copy(), spec)
            assert box == _reference_lesion_box(vol.copy(), spec)
            found += box.found
    assert found > 0


def test_classify_folder_compares_each_t1_pair_once(
    study: tuple[str, tuple[Path, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its two runs (with and without the CNN) share the image contrast evidence (issue 12)."""
    from node.classify import study as classify
    from node.classify.sequence import contrast_questions
    from node.config import SequenceSettings

    calls: list[int] = []
    judge = classify.judge_contrast  # type: ignore[attr-defined]  # the name the module calls

    def counted(pre: Any, post: Any) -> Any:
        calls.append(1)
        return judge(pre, post)

    monkeypatch.setattr(classify, "judge_contrast", counted)
    folder = study[1][0].parents[2]
    bundle, why = classify.load_sequence_bundle(SequenceSettings(), REPO / "models")
    assert bundle is not None, why
    run = classify.classify_folder(folder, SequenceSettings(), bundle=bundle)
    pairs = set(contrast_questions(run.decisions, run.headers))
    pairs |= set(contrast_questions(run.tags_only, run.headers))
    assert len(pairs) >= 1
    assert len(calls) == len(pairs)

"""One classification path for a study's series: what the pipeline, `classify`, `explain` and
`evaluate-sequences` all call, so they give the same label for the same series.

Tag rules read every header; the sequence CNN (when its bundle loads) votes over canonical axial
slices of every series with pixels, each series decoded when its turn comes (a
``VolumeSource``); the two are fused physics first (node.classify.fusion); study context then
decides contrast state, and where two runs of one T1 protocol leave it open, their images are
compared on one grid (node.classify.contrast).
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from node.classify.contrast import judge_contrast
from node.classify.sequence import classify_headers, contrast_questions
from node.config import SequenceSettings
from node.dicom.canonical import canonical_axial, resample_onto
from node.errors import NodeError
from node.log import get_logger, uid_key
from node.records import (
    CnnVerdict,
    ContrastEvidence,
    ContrastPair,
    FusionPolicy,
    InstanceHeader,
    SequenceDecision,
    SeriesHeader,
    SeriesVolume,
)

if TYPE_CHECKING:
    from node.bundles.bundle import Bundle

log = get_logger(__name__)

_REPO_MODELS = Path(__file__).resolve().parents[2] / "models"

SeriesKey = tuple[str, int | None]  # (SeriesInstanceUID, SeriesNumber)


class VolumeSource(Protocol):
    """Series volumes by key: a dict, or node.dicom.volumes.LazyVolumes (decoded when asked)."""

    def get(self, key: SeriesKey, /) -> SeriesVolume | None:
        """The series' volume, or None when it has none."""
        ...


# What a T1 pair's images said (None: no common grid), kept across the classify_study calls of
# one study so the images are compared once.
ContrastCache = MutableMapping[ContrastPair, ContrastEvidence | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyClassification:
    """The sequence decision of every series, the CNN's verdicts and what became of the CNN."""

    decisions: tuple[SequenceDecision, ...]
    cnn_verdicts: tuple[CnnVerdict | None, ...] | None  # None: the CNN did not run at all
    cnn_note: str
    contrast: tuple[tuple[ContrastPair, ContrastEvidence], ...] = ()


def policy_from_settings(settings: SequenceSettings) -> FusionPolicy:
    """The fusion policy the rule file's `sequence:` section asks for (docs/sequence.md)."""
    unsure: dict[str, Literal["tags", "cnn_if_abstain", "cnn"]] = {
        "prefer_tags": "tags",
        "other": "cnn_if_abstain",
        "prefer_cnn": "cnn",
    }
    return FusionPolicy(
        min_confidence=settings.min_confidence,
        min_cnn_confidence=settings.min_cnn_confidence,
        unsure_tags=unsure[settings.disagreement],
        cnn_decides_contrast=settings.cnn_decides_contrast,
    )


def cnn_verdicts(
    bundle: Bundle,
    headers: Sequence[SeriesHeader],
    volumes: VolumeSource,
    slices_per_series: int,
) -> tuple[tuple[CnnVerdict | None, ...], str]:
    """The sequence CNN's vote on every series with a volume, and a line saying how it went."""
    from node.bundles.bundle import classify_series

    verdicts: list[CnnVerdict | None] = []
    failed = 0
    for h in headers:
        volume = None  # the previous series' pixels go before the next one is decoded
        volume = volumes.get((h.series_uid, h.series_number))
        if volume is None or volume.pixels.ndim != 3:
            verdicts.append(None)
            continue
        try:
            verdicts.append(classify_series(bundle, volume, slices_per_series))
        except NodeError as exc:
            failed += 1
            log.warning(
                "sequence_cnn_failed",
                series_key=uid_key(h.series_uid),
                error_type=type(exc).__name__,
            )
            verdicts.append(None)
    ran = sum(v is not None for v in verdicts)
    meta = bundle.metadata
    note = f"sequence CNN {meta.name} {meta.version}: ran on {ran} of {len(headers)} series"
    if failed:
        note += f" ({failed} failed)"
    return tuple(verdicts), note


def _judge_pair(pair: ContrastPair, volumes: VolumeSource) -> ContrastEvidence | None:
    """The images' answer for one T1 pair on one grid, or None when they cannot be compared."""
    earlier = volumes.get((pair.earlier_uid, pair.earlier_number))
    if earlier is None:
        return None
    fixed = canonical_axial(earlier)
    del earlier
    later = volumes.get((pair.later_uid, pair.later_number))
    if later is None:
        return None
    on_grid = resample_onto(canonical_axial(later), fixed)
    del later, fixed
    if on_grid is None:
        return None  # no common geometry: the images cannot be compared voxel by voxel
    pre, post = on_grid
    return judge_contrast(pre, post)


def image_evidence(
    decisions: Sequence[SequenceDecision],
    headers: Sequence[SeriesHeader],
    volumes: VolumeSource,
    cache: ContrastCache | None = None,
) -> tuple[tuple[ContrastPair, ContrastEvidence], ...]:
    """For each T1 pair whose contrast state is open, the images' answer on one grid (pairs
    already in ``cache`` are not compared again; new answers are added to it)."""
    known: ContrastCache = cache if cache is not None else {}
    answers: list[tuple[ContrastPair, ContrastEvidence]] = []
    for pair in contrast_questions(decisions, headers):
        if pair not in known:
            known[pair] = _judge_pair(pair, volumes)
        evidence = known[pair]
        if evidence is not None:
            answers.append((pair, evidence))
    return tuple(answers)


def classify_study(
    headers: Sequence[SeriesHeader],
    volumes: VolumeSource,
    settings: SequenceSettings,
    bundle: Bundle | None,
    *,
    unavailable: str = "sequence CNN not run",
    contrast_cache: ContrastCache | None = None,
) -> StudyClassification:
    """Label every series: tags, the CNN vote (when `bundle` is given), fusion, study context
    and image evidence of contrast. `unavailable` says why there is no bundle;
    `contrast_cache` shares the image comparisons between calls on one study."""
    policy = policy_from_settings(settings)
    verdicts: tuple[CnnVerdict | None, ...] | None = None
    note = unavailable
    if bundle is not None:
        verdicts, note = cnn_verdicts(bundle, headers, volumes, settings.slices_per_series)
    decisions = classify_headers(headers, verdicts, policy)
    contrast = image_evidence(decisions, headers, volumes, contrast_cache)
    if contrast:
        decisions = classify_headers(headers, verdicts, policy, image_evidence=dict(contrast))
    return StudyClassification(
        decisions=decisions, cnn_verdicts=verdicts, cnn_note=note, contrast=contrast
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderClassification:
    """Every series of every study under a folder, classified study by study."""

    headers: tuple[SeriesHeader, ...]
    decisions: tuple[SequenceDecision, ...]  # what the node routes on
    tags_only: tuple[SequenceDecision, ...]  # the same path without the CNN
    cnn_verdicts: tuple[CnnVerdict | None, ...] | None
    cnn_note: str
    n_studies: int
    n_skipped: int  # files that are not DICOM (or have no StudyInstanceUID)
    # The folder holding each series' files (as headers): a SeriesInstanceUID found in two
    # folders is two series to score (node.classify.evaluate.series_units).
    folders: tuple[Path, ...]
    n_shared_study_uids: int = 0  # study UIDs copied in several top-level folders (kept apart)


def load_sequence_bundle(
    settings: SequenceSettings, models_dir: Path | None = None
) -> tuple[Bundle | None, str]:
    """The sequence CNN bundle, or None and why not (models_dir: default ./models, then the
    repository's)."""
    from node.bundles.bundle import load_bundle

    if models_dir is not None:
        path = models_dir / settings.bundle
    else:
        local = Path("models") / settings.bundle
        path = local if local.is_dir() else _REPO_MODELS / settings.bundle
    try:
        return load_bundle(path), ""
    except NodeError as exc:
        return None, f"sequence CNN bundle not available: {exc}"


def classify_folder(
    directory: Path,
    settings: SequenceSettings,
    *,
    bundle: Bundle | None,
    unavailable: str = "sequence CNN not run",
    progress: Callable[[int, int], None] | None = None,
) -> FolderClassification:
    """Classify a folder study by study (one series' volume in memory at a time)."""
    from node.dicom.folder import scan_folder
    from node.dicom.volumes import LazyVolumes, read_study

    scan = scan_folder(directory)
    headers: list[SeriesHeader] = []
    fused: list[SequenceDecision] = []
    tags: list[SequenceDecision] = []
    verdicts: list[CnnVerdict | None] = []
    folders: list[Path] = []
    note = unavailable
    for i, (_, paths) in enumerate(scan.studies):
        # One header read per file; pixels decoded one series at a time, when a model reads them.
        load, _ = read_study(paths)
        study_headers = load.series_headers
        folders.extend(series_folders(load.headers, study_headers))
        volumes = LazyVolumes(load.layouts)
        cache: ContrastCache = {}  # the image contrast evidence, computed once for both runs
        result = classify_study(
            study_headers,
            volumes,
            settings,
            bundle,
            unavailable=unavailable,
            contrast_cache=cache,
        )
        alone = classify_study(study_headers, volumes, settings, None, contrast_cache=cache)
        headers.extend(study_headers)
        fused.extend(result.decisions)
        tags.extend(alone.decisions)
        verdicts.extend(result.cnn_verdicts or (None,) * len(study_headers))
        del volumes
        if progress is not None:
            progress(i + 1, len(scan.studies))
    if bundle is not None:
        meta = bundle.metadata
        ran = sum(v is not None for v in verdicts)
        note = f"sequence CNN {meta.name} {meta.version}: ran on {ran} of {len(headers)} series"
    return FolderClassification(
        headers=tuple(headers),
        decisions=tuple(fused),
        tags_only=tuple(tags),
        cnn_verdicts=tuple(verdicts) if bundle is not None else None,
        cnn_note=note,
        n_studies=len(scan.studies),
        n_skipped=scan.n_skipped,
        n_shared_study_uids=len(scan.shared_uids),
        folders=tuple(folders),
    )


def series_folders(
    instances: Sequence[InstanceHeader], series: Sequence[SeriesHeader]
) -> tuple[Path, ...]:
    """The folder holding each series' files (their deepest common folder), as ``series``."""
    parents: dict[tuple[str, int | None], set[str]] = {}
    for h in instances:
        parents.setdefault((h.series_uid, h.series_number), set()).add(str(h.path.parent))
    out = []
    for s in series:
        found = parents.get((s.series_uid, s.series_number))
        if not found:  # a series whose number the headers merged: any file of its UID
            found = {p for (uid, _), ps in parents.items() if uid == s.series_uid for p in ps}
        out.append(Path(os.path.commonpath(sorted(found))) if found else Path())
    return tuple(out)

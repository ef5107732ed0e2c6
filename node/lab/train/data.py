"""Training data: labelled series from a synth folder (its manifest) or a DICOM folder + CSV.

A DICOM folder from a hospital archive is labelled per study with a CSV of
``StudyInstanceUID,label`` (task bundles) or per series with ``series_uid,label`` (the sequence
bundle). Which series of a study a task bundle reads is decided by the node's own tag rules,
the same way the running node routes them. Splits are patient-disjoint: PatientID is read only
to form a keyed hash used as the split group, never logged or stored.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from node.bundles.bundle import acquired_slices, preprocess, roi_box, select_slices
from node.dicom.canonical import CanonicalVolume, canonical_axial, canonical_index
from node.errors import NodeError
from node.lab.train.recipes import NORM_HIGH, NORM_LOW, Recipe
from node.records import SequenceLabel, SeriesVolume

_NOT_APPLICABLE = ("", "none", "null", "na", "n/a")
# Manifest lesion kinds that carry each task's evidence.
EVIDENCE_KINDS: dict[str, tuple[str, ...]] = {
    "gbm_pcnsl": ("gbm", "pcnsl"),
    "glioma_grade": ("lgg", "hgg", "gbm"),
    "tubers": ("tuber", "subependymal_nodule"),
    "tumour": ("gbm", "pcnsl", "lgg", "hgg"),
}
Loaded = npt.NDArray[Any] | SeriesVolume


class DataError(NodeError):
    """The training or evaluation data cannot be used as given (the message says why)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesItem:
    """One labelled series on disk."""

    group: str  # split group: a patient (hashed PatientID) or the study when unknown
    study_uid: str
    series_uid: str
    sequence: SequenceLabel  # what the series is
    label: str | None  # the study's label for the task (None: not labelled for this task)
    paths: tuple[Path, ...]
    # Task lesions as (centre slice index, radius mm) when the data says where they are (synth);
    # then slices away from every lesion get an uninformative target instead of the study label.
    lesions: tuple[tuple[int, float], ...] = ()
    lesion_voxels: tuple[tuple[float, float, float], ...] = ()  # centres (slice, row, column)
    lesions_known: bool = False


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SliceSet:
    """Network-ready slices of many series with their labels and provenance."""

    x: torch.Tensor  # (n, channels, H, W) float16 to save memory; cast per batch
    y: torch.Tensor  # (n,) int64 class index (the series label)
    target: torch.Tensor  # (n, n_classes) float32 training target (soft away from lesions)
    series: torch.Tensor  # (n,) int64 index into series_labels/series_groups
    series_labels: tuple[int, ...]
    series_groups: tuple[str, ...]
    series_uids: tuple[str, ...]


def read_csv_labels(
    path: Path, key_columns: Sequence[str], label_columns: Sequence[str] = ("label",)
) -> dict[str, str]:
    """UID -> label from a CSV: the first key and label columns found (case-insensitive)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = {f.strip().lower(): f for f in reader.fieldnames or ()}
            key = next((fields[k.lower()] for k in key_columns if k.lower() in fields), None)
            lab = next((fields[k.lower()] for k in label_columns if k.lower() in fields), None)
            if key is None or lab is None:
                raise DataError(
                    f"{path}: needs a '{key_columns[0]}' column and a '{label_columns[0]}' "
                    f"column (found {sorted(fields)})"
                )
            out = {}
            for row in reader:
                uid = (row.get(key) or "").strip()
                label = (row.get(lab) or "").strip()
                if uid and label.lower() not in _NOT_APPLICABLE:
                    out[uid] = label
            return out
    except OSError as exc:
        raise DataError(f"{path}: cannot read labels ({exc})") from exc


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _hashed(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _patient_group(path: Path, study_uid: str) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        pid = str(ds.get("PatientID", "") or "").strip()
    except (OSError, ValueError, TypeError, EOFError):
        pid = ""
    return "p" + _hashed(pid) if pid else "s" + _hashed(study_uid)


def scan_dicom_folder(
    root: Path, *, sequence_of: Mapping[str, str] | None = None
) -> tuple[SeriesItem, ...]:
    """Every image series under root, labelled with its sequence (given, or by the tag rules)."""
    from node.classify.sequence import classify_headers
    from node.dicom.headers import read_series_headers
    from node.dicom.volumes import read_headers

    files = _files(root)
    if not files:
        raise DataError(f"{root}: no files")
    headers, _problems = read_headers(files)
    by_series: dict[str, list[Path]] = defaultdict(list)
    study_of: dict[str, str] = {}
    for h in headers:
        if h.has_pixels:
            by_series[h.series_uid].append(h.path)
            study_of[h.series_uid] = h.study_uid
    if sequence_of is None:
        series_headers = read_series_headers(files)
        decisions = classify_headers(series_headers)
        labels = {d.series_uid: d.label.value for d in decisions}
    else:
        labels = dict(sequence_of)
    group_of_study: dict[str, str] = {}
    items = []
    for series_uid, paths in sorted(by_series.items()):
        if series_uid not in labels:
            continue
        study = study_of[series_uid]
        if study not in group_of_study:
            group_of_study[study] = _patient_group(paths[0], study)
        items.append(
            SeriesItem(
                group=group_of_study[study],
                study_uid=study,
                series_uid=series_uid,
                sequence=SequenceLabel(labels[series_uid]),
                label=None,
                paths=tuple(sorted(paths)),
            )
        )
    return tuple(items)


def tumour_label(labels: Mapping[str, Any]) -> str:
    """Lesion presence from a study's task labels: a glioma or a lymphoma is a tumour."""
    tumour = str(labels.get("gbm_pcnsl") or "") in ("gbm", "pcnsl") or str(
        labels.get("glioma_grade") or ""
    ) in ("low", "high")
    return "present" if tumour else "absent"


def _manifest_studies(manifest: Any) -> list[Mapping[str, Any]]:
    studies = manifest.get("studies") if isinstance(manifest, Mapping) else manifest
    if not isinstance(studies, list):
        raise DataError("manifest.json has no 'studies' list")
    return [s for s in studies if isinstance(s, Mapping)]


def load_synth(root: Path, task: str) -> tuple[SeriesItem, ...]:
    """Series of a `neuronode synth` folder, labelled from its manifest.json."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{root}: manifest.json cannot be read ({exc})") from exc
    items = []
    for study in _manifest_studies(manifest):
        study_uid = str(study.get("study_uid") or study.get("StudyInstanceUID") or "")
        labels = study.get("labels") or {}
        if task == "tumour" and "tumour" not in labels:
            labels = {**labels, "tumour": tumour_label(labels)}
        raw_label = labels.get(task) if task != "sequence" else None
        label = None
        if raw_label is not None and str(raw_label).lower() not in _NOT_APPLICABLE:
            label = str(raw_label)
        group = str(study.get("patient_key") or study.get("patient_id") or study_uid)
        kinds = EVIDENCE_KINDS.get(task, ())
        for series in study.get("series", []):
            if not isinstance(series, Mapping):
                continue
            # Each routed series carries its lesions on its own grid (randomised planes);
            # older manifests only have the study's, on the one shared grid.
            found = [
                les
                for les in series.get("lesions", study.get("lesions", []))
                if isinstance(les, Mapping) and les.get("kind") in kinds
            ]
            lesions = tuple((int(les["center_voxel"][0]), float(les["radius_mm"])) for les in found)
            voxels = tuple(
                (float(v[0]), float(v[1]), float(v[2]))
                for v in (les["center_voxel"] for les in found)
                if len(v) == 3
            )
            seq = series.get("label") or series.get("sequence")
            try:
                sequence = SequenceLabel(str(seq))
            except ValueError:
                sequence = SequenceLabel.OTHER
            files = series.get("files") or series.get("paths") or []
            paths = tuple(sorted(root / str(f) for f in files))
            folder = series.get("folder") or series.get("dir")
            if not paths and folder:
                paths = tuple(_files(root / str(folder)))
            items.append(
                SeriesItem(
                    group="s" + _hashed(group),
                    study_uid=study_uid,
                    series_uid=str(series.get("series_uid") or series.get("uid") or ""),
                    sequence=sequence,
                    label=label,
                    paths=paths,
                    lesions=lesions,
                    lesion_voxels=voxels if len(voxels) == len(lesions) else (),
                    lesions_known=task in EVIDENCE_KINDS,
                )
            )
    if not items:
        raise DataError(f"{root}: manifest.json lists no series")
    if any(not it.paths for it in items):
        # Manifest without file lists: find each series' files from the headers.
        scanned = {
            it.series_uid: it.paths
            for it in scan_dicom_folder(
                root, sequence_of={it.series_uid: it.sequence.value for it in items}
            )
        }
        items = [
            it if it.paths else _with_paths(it, scanned.get(it.series_uid, ())) for it in items
        ]
    return tuple(items)


def _with_paths(item: SeriesItem, paths: tuple[Path, ...]) -> SeriesItem:
    return dataclasses.replace(item, paths=paths)


def parse_label_map(text: str | None) -> dict[str, str]:
    """`--label-map GBM=gbm,PCNSL=pcnsl`: a site's archive labels to the task's labels."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for part in text.split(","):
        source, sep, target = part.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise DataError(f"--label-map: '{part}' is not SITE_LABEL=task_label")
        if source.strip() in mapping:
            raise DataError(f"--label-map: '{source.strip()}' is mapped twice")
        mapping[source.strip()] = target.strip()
    return mapping


def load_items(
    root: Path,
    task: str,
    labels_csv: Path | None = None,
    label_map: Mapping[str, str] | None = None,
) -> tuple[SeriesItem, ...]:
    """Labelled series for a task (or 'sequence') from a synth folder or a DICOM folder + CSV;
    `label_map` turns the CSV's own label values into the task's."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if labels_csv is None and (root / "manifest.json").is_file():
        return load_synth(root, task)
    if labels_csv is None:
        raise DataError(f"{root}: no manifest.json; give --labels CSV")
    if task == "sequence":
        series_labels = read_csv_labels(labels_csv, ("series_uid", "SeriesInstanceUID"))
        return scan_dicom_folder(root, sequence_of=series_labels)
    study_labels = read_csv_labels(labels_csv, ("StudyInstanceUID", "study_uid"), ("label", task))
    mapping = dict(label_map or {})
    if mapping:
        unknown = sorted({v for v in study_labels.values() if v not in mapping})
        if unknown:
            raise DataError(
                f"{labels_csv}: labels {unknown} are not in --label-map (map every value)"
            )
        study_labels = {uid: mapping[v] for uid, v in study_labels.items()}
    return tuple(_with_label(it, study_labels.get(it.study_uid)) for it in scan_dicom_folder(root))


def _with_label(item: SeriesItem, label: str | None) -> SeriesItem:
    return dataclasses.replace(item, label=label)


def select_items(items: Iterable[SeriesItem], recipe: Recipe) -> tuple[SeriesItem, ...]:
    """The series a recipe trains on: its sequences with a task label (all for sequence)."""
    if recipe.task == "sequence":
        return tuple(items)
    wanted = set(recipe.sequences)
    out = []
    for it in items:
        if it.sequence.value not in wanted or it.label is None:
            continue
        if it.label not in recipe.labels:
            raise DataError(
                f"label '{it.label}' is not one of {recipe.labels} for task {recipe.task}"
            )
        out.append(it)
    return tuple(out)


def _groups_by_label(
    items: Sequence[SeriesItem], label_of: Callable[[SeriesItem], str]
) -> dict[str, list[str]]:
    """Patient groups by the label of each group's first item, groups in sorted order."""
    first: dict[str, str] = {}
    for it in items:
        first.setdefault(it.group, label_of(it))
    by_label: dict[str, list[str]] = defaultdict(list)
    for g, label in sorted(first.items()):
        by_label[label].append(g)
    return by_label


def split_groups(
    items: Sequence[SeriesItem],
    *,
    val_fraction: float,
    seed: int,
    label_of: Callable[[SeriesItem], str],
) -> tuple[tuple[SeriesItem, ...], tuple[SeriesItem, ...]]:
    """Patient-disjoint (train, validation), stratified by each group's first label."""
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be between 0 and 1")
    by_label = _groups_by_label(items, label_of)
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for _label, gs in sorted(by_label.items()):
        order = list(rng.permutation(len(gs)))
        n_val = max(1, round(len(gs) * val_fraction)) if len(gs) > 1 else 0
        val_groups.update(gs[i] for i in order[:n_val])
    train = tuple(it for it in items if it.group not in val_groups)
    val = tuple(it for it in items if it.group in val_groups)
    return train, val


def fold_groups(
    items: Sequence[SeriesItem], *, folds: int, seed: int, label_of: Callable[[SeriesItem], str]
) -> tuple[frozenset[str], ...]:
    """Patient groups of k folds for cross-validation, stratified by each group's first label
    (each label's groups are shuffled and dealt round-robin, so fold sizes differ by <= 1)."""
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    by_label = _groups_by_label(items, label_of)
    n_groups = sum(len(gs) for gs in by_label.values())
    if n_groups < folds:
        raise DataError(f"{n_groups} patients cannot fill {folds} folds")
    rng = np.random.default_rng(seed)
    out: list[set[str]] = [set() for _ in range(folds)]
    dealt = 0
    for _label, gs in sorted(by_label.items()):
        for i in rng.permutation(len(gs)):
            out[dealt % folds].add(gs[int(i)])
            dealt += 1
    return tuple(frozenset(f) for f in out)


def class_index(item: SeriesItem, recipe: Recipe) -> int:
    """The training target of a series: its sequence or its task label, as a class index."""
    name = item.sequence.value if recipe.task == "sequence" else item.label
    if name not in recipe.labels:
        raise DataError(f"series label '{name}' is not one of {recipe.labels}")
    return recipe.labels.index(name)


def series_slices(
    pixels: npt.NDArray[Any], recipe: Recipe, *, n: int | None = None
) -> tuple[tuple[int, ...], torch.Tensor]:
    """The slices a bundle of this recipe reads from one series, prepared like inference."""
    idx = select_slices(pixels, recipe.slice_mode, n or recipe.slice_n)
    box = roi_box(pixels, recipe.roi, NORM_LOW, NORM_HIGH)
    x = preprocess(
        pixels,
        idx,
        size=recipe.size,
        channels=recipe.channels,
        low=NORM_LOW,
        high=NORM_HIGH,
        box=box,
    )
    return idx, x


def slice_targets(
    item: SeriesItem,
    indices: Sequence[int],
    n_classes: int,
    target: int,
    spacing_mm: float | None,
) -> torch.Tensor:
    """Per-slice target distributions: the series label, or uniform on lesion-free slices.

    With known lesions, a slice cutting a task lesion in a section of at least 3 mm radius
    carries the study label; other slices of a study that has lesions carry no evidence either
    way and get a uniform target (teaching logit 0 there, which keeps the series mean logit
    honest). A study without task lesions (a normal control) keeps its label on every slice."""
    out = torch.zeros(len(indices), n_classes)
    out[:, target] = 1.0
    if not item.lesions_known or not item.lesions or spacing_mm is None or spacing_mm <= 0:
        return out
    for j, i in enumerate(indices):
        # the lesion's cross-section on this slice is at least 3 mm in radius (visible)
        near = any(((i - k) * spacing_mm) ** 2 <= r * r - 9.0 for k, r in item.lesions)
        if not near:
            out[j] = 1.0 / n_classes
    return out


def build_slice_set(
    items: Sequence[SeriesItem],
    recipe: Recipe,
    *,
    load: Callable[[SeriesItem], Loaded] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SliceSet:
    """Load every series, take its slices and stack them with their labels and targets."""
    load = load or load_volume
    xs, ys, ts, ss = [], [], [], []
    labels, groups, uids = [], [], []
    k = len(recipe.labels)
    for i, it in enumerate(items):
        target = class_index(it, recipe)
        loaded = load(it)
        item = it
        if isinstance(loaded, SeriesVolume) and recipe.slice_plane == "acquired":
            # The stored slices, as the node reads them at inference for this recipe.
            pixels, spacing = acquired_slices(loaded), loaded.slice_spacing_mm
        elif isinstance(loaded, SeriesVolume):
            # The same canonical axial slices the node reads at inference.
            canon = canonical_axial(loaded)
            pixels, spacing = canon.pixels, loaded.slice_spacing_mm
            if not canon.identity:
                spacing = canon.spacing_mm[0]
                item = _lesions_on_canonical(it, canon)
        else:
            pixels, spacing = loaded, None
        idx, x = series_slices(pixels, recipe)
        xs.append(x.half())
        ys.append(torch.full((x.shape[0],), target, dtype=torch.int64))
        ts.append(slice_targets(item, idx, k, target, spacing))
        ss.append(torch.full((x.shape[0],), i, dtype=torch.int64))
        labels.append(target)
        groups.append(it.group)
        uids.append(it.series_uid)
        if progress is not None:
            progress(i + 1, len(items))
    if not xs:
        raise DataError("no series to build slices from")
    return SliceSet(
        x=torch.cat(xs),
        y=torch.cat(ys),
        target=torch.cat(ts),
        series=torch.cat(ss),
        series_labels=tuple(labels),
        series_groups=tuple(groups),
        series_uids=tuple(uids),
    )


def _lesions_on_canonical(item: SeriesItem, canon: CanonicalVolume) -> SeriesItem:
    """The item with its lesions' slice indices on the canonical grid (unknown: none known)."""
    if not item.lesions:
        return item
    if len(item.lesion_voxels) != len(item.lesions):
        return dataclasses.replace(item, lesions_known=False)
    lesions = tuple(
        (round(canonical_index(v, canon)[0]), r)
        for v, (_, r) in zip(item.lesion_voxels, item.lesions, strict=True)
    )
    return dataclasses.replace(item, lesions=lesions)


def load_volume(item: SeriesItem) -> SeriesVolume:
    """The series as the node would load it (node.dicom.volumes)."""
    from node.dicom.volumes import load_series

    return load_series(item.paths)


def load_pixels(item: SeriesItem) -> npt.NDArray[Any]:
    """The series' pixels (slices, rows, cols) in native values via node.dicom.volumes."""
    from node.dicom.volumes import load_series

    return load_series(item.paths).pixels

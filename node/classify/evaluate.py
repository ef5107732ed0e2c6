"""Scoring the sequence classifier against labels: accuracy, confusion, misses per method."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import ConfigError
from node.log import get_logger
from node.records import SequenceLabel, SeriesHeader

log = get_logger(__name__)

_ROUTABLE = frozenset(label for label in SequenceLabel if label is not SequenceLabel.OTHER)


# --- evaluation ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelFile:
    """A labels CSV: series_uid -> label, and, where a row names its folder (column
    ``series_dir``), (folder, series_uid) -> label, so one UID found in two folders (a copy
    re-sent, two anonymisations) is two labelled series."""

    by_uid: Mapping[str, SequenceLabel]  # UIDs whose rows all agree
    by_folder: Mapping[tuple[str, str], SequenceLabel]  # (series_dir, uid) where given

    def label_of(self, folder: Path, uid: str) -> SequenceLabel | None:
        """The label of the series ``uid`` whose files are in ``folder``: the row naming the
        longest series_dir that ends ``folder``'s path (so any root may be evaluated), else
        the UID's label."""
        path = "/" + folder.as_posix().strip("/") + "/"
        best: tuple[int, SequenceLabel] | None = None
        for (where, u), label in self.by_folder.items():
            if u == uid and f"/{where}/" in path and (best is None or len(where) > best[0]):
                best = (len(where), label)
        return best[1] if best is not None else self.by_uid.get(uid)


def read_labels(path: Path) -> dict[str, SequenceLabel]:
    """series_uid -> label from a labels CSV (columns series_uid, label; others ignored)."""
    return dict(read_label_file(path).by_uid)


def read_label_file(path: Path) -> LabelFile:
    """A labels CSV (columns series_uid and label; series_dir optional; others ignored).
    A UID labelled differently in two rows is an error unless both rows name their folder."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = set(reader.fieldnames or ())
            if not {"series_uid", "label"} <= fields:
                raise ConfigError(f"{path}: needs the columns series_uid and label")
            by_uid: dict[str, SequenceLabel] = {}
            by_folder: dict[tuple[str, str], SequenceLabel] = {}
            disagree: set[str] = set()
            for line, row in enumerate(reader, start=2):
                uid = (row.get("series_uid") or "").strip()
                text = (row.get("label") or "").strip().upper()
                where = (row.get("series_dir") or "").strip().strip("/")
                if not uid:
                    continue
                try:
                    label = SequenceLabel(text)
                except ValueError as exc:
                    allowed = ", ".join(s.value for s in SequenceLabel)
                    raise ConfigError(
                        f"{path}:{line}: label {text!r} is not one of {allowed}"
                    ) from exc
                if where:
                    if by_folder.get((where, uid), label) is not label:
                        raise ConfigError(
                            f"{path}:{line}: series {uid} in {where} is labelled twice, differently"
                        )
                    by_folder[(where, uid)] = label
                elif uid in by_uid and by_uid[uid] is not label:
                    raise ConfigError(f"{path}:{line}: series {uid} is labelled twice, differently")
                if uid in by_uid and by_uid[uid] is not label:
                    disagree.add(uid)
                by_uid.setdefault(uid, label)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the labels file: {exc}") from exc
    for uid in disagree:
        del by_uid[uid]
    return LabelFile(by_uid=by_uid, by_folder=by_folder)


# One scored series: the folder holding its files and its SeriesInstanceUID.
SeriesUnit = tuple[str, str]


def series_units(headers: Sequence[SeriesHeader], folders: Sequence[Path]) -> list[SeriesUnit]:
    """The scored series of each header: (folder, SeriesInstanceUID). Several series numbers
    of one UID in one folder (one series re-sent under new numbers) are one series; the same
    UID in two folders is two."""
    return [(f.as_posix(), h.series_uid) for h, f in zip(headers, folders, strict=True)]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Prediction:
    label: SequenceLabel | None  # None: this method gave no answer (CNN did not run)
    reason: str


def per_series(
    units: Sequence[SeriesUnit],
    numbers: Sequence[int | None],
    predictions: Sequence[_Prediction],
) -> dict[SeriesUnit, tuple[_Prediction, str]]:
    """One prediction per scored series: a unit split into several series numbers takes the
    majority label of its parts."""
    parts: dict[SeriesUnit, list[tuple[int | None, _Prediction]]] = {}
    for unit, number, p in zip(units, numbers, predictions, strict=True):
        parts.setdefault(unit, []).append((number, p))
    out: dict[SeriesUnit, tuple[_Prediction, str]] = {}
    for unit, items in parts.items():
        shown = ",".join(str(n) for n, _ in items)
        if len(items) == 1:
            out[unit] = (items[0][1], shown)
            continue
        counts = Counter(p.label for _, p in items)
        label, n = counts.most_common(1)[0]
        reason = next(p.reason for _, p in items if p.label == label)
        out[unit] = (_Prediction(label=label, reason=f"{n} of {len(items)} parts: {reason}"), shown)
    return out


def score(
    truth: Mapping[SeriesUnit, SequenceLabel],
    predicted: Mapping[SeriesUnit, tuple[_Prediction, str]],
    descriptions: Mapping[SeriesUnit, str],
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall, confusion and the misses, series-level."""
    confusion: dict[str, dict[str, int]] = {}
    errors: list[dict[str, Any]] = []
    correct = 0
    n = 0
    other_as_routable = 0
    for unit, true in sorted(truth.items()):
        if unit not in predicted:
            continue
        prediction, numbers = predicted[unit]
        guess = prediction.label.value if prediction.label is not None else "NONE"
        n += 1
        row = confusion.setdefault(true.value, {})
        row[guess] = row.get(guess, 0) + 1
        if guess == true.value:
            correct += 1
            continue
        if true is SequenceLabel.OTHER and prediction.label in _ROUTABLE:
            other_as_routable += 1
        errors.append(
            {
                "folder": unit[0],
                "series_uid": unit[1],
                "series_number": numbers,
                "description": descriptions.get(unit, ""),
                "true": true.value,
                "predicted": guess,
                "reason": prediction.reason,
            }
        )
    per_class: dict[str, dict[str, float | int | None]] = {}
    for label in SequenceLabel:
        tp = confusion.get(label.value, {}).get(label.value, 0)
        support = sum(confusion.get(label.value, {}).values())
        predicted_n = sum(row.get(label.value, 0) for row in confusion.values())
        if support == 0 and predicted_n == 0:
            continue
        per_class[label.value] = {
            "precision": round(tp / predicted_n, 4) if predicted_n else None,
            "recall": round(tp / support, 4) if support else None,
            "support": support,
        }
    return {
        "accuracy": round(correct / n, 4) if n else None,
        "n_series": n,
        "n_correct": correct,
        "other_as_routable": other_as_routable,
        "per_class": per_class,
        "confusion": confusion,
        "errors": errors,
    }

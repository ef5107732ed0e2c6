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


def read_labels(path: Path) -> dict[str, SequenceLabel]:
    """series_uid -> label from a labels CSV (columns series_uid, label; others ignored)."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = set(reader.fieldnames or ())
            if not {"series_uid", "label"} <= fields:
                raise ConfigError(f"{path}: needs the columns series_uid and label")
            labels: dict[str, SequenceLabel] = {}
            for line, row in enumerate(reader, start=2):
                uid = (row.get("series_uid") or "").strip()
                text = (row.get("label") or "").strip().upper()
                if not uid:
                    continue
                try:
                    label = SequenceLabel(text)
                except ValueError as exc:
                    allowed = ", ".join(s.value for s in SequenceLabel)
                    raise ConfigError(
                        f"{path}:{line}: label {text!r} is not one of {allowed}"
                    ) from exc
                if uid in labels and labels[uid] is not label:
                    raise ConfigError(f"{path}:{line}: series {uid} is labelled twice, differently")
                labels[uid] = label
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the labels file: {exc}") from exc
    return labels


@dataclass(frozen=True, slots=True, kw_only=True)
class _Prediction:
    label: SequenceLabel | None  # None: this method gave no answer (CNN did not run)
    reason: str


def _per_uid(
    headers: Sequence[SeriesHeader], predictions: Sequence[_Prediction]
) -> dict[str, tuple[_Prediction, str]]:
    """One prediction per SeriesInstanceUID: a UID split into several series numbers (one
    series re-sent under new numbers) takes the majority label of its parts."""
    parts: dict[str, list[tuple[SeriesHeader, _Prediction]]] = {}
    for h, p in zip(headers, predictions, strict=True):
        parts.setdefault(h.series_uid, []).append((h, p))
    out: dict[str, tuple[_Prediction, str]] = {}
    for uid, items in parts.items():
        numbers = ",".join(str(h.series_number) for h, _ in items)
        if len(items) == 1:
            out[uid] = (items[0][1], numbers)
            continue
        counts = Counter(p.label for _, p in items)
        label, n = counts.most_common(1)[0]
        reason = next(p.reason for _, p in items if p.label == label)
        out[uid] = (
            _Prediction(label=label, reason=f"{n} of {len(items)} parts: {reason}"),
            numbers,
        )
    return out


def score(
    truth: Mapping[str, SequenceLabel],
    predicted: Mapping[str, tuple[_Prediction, str]],
    descriptions: Mapping[str, str],
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall, confusion and the misses, series-level."""
    confusion: dict[str, dict[str, int]] = {}
    errors: list[dict[str, Any]] = []
    correct = 0
    n = 0
    other_as_routable = 0
    for uid, true in sorted(truth.items()):
        if uid not in predicted:
            continue
        prediction, numbers = predicted[uid]
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
                "series_uid": uid,
                "series_number": numbers,
                "description": descriptions.get(uid, ""),
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

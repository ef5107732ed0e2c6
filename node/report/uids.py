"""Result UIDs derived from the source UIDs and model versions.

A study pushed twice yields the same objects, so the PACS does not collect duplicates; new
weights (a different digest) give new UIDs.
"""

from __future__ import annotations

import hashlib
import re

from node.records import Heatmap, SeriesPrediction, StudyResult
from node.report.codes import SrClass


def result_uid(kind: str, *parts: str, uid_root: str | None) -> str:
    """A UID fixed by its inputs: 2.25.<128-bit hash> or <root>.<hash digits>, at most 64 chars."""
    if not kind:
        raise ValueError("kind must not be empty")
    digest = hashlib.sha256("\x1f".join((kind, *parts)).encode()).digest()
    if uid_root is None:
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"
    if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", uid_root) or len(uid_root) > 40:
        raise ValueError(f"uid_root {uid_root!r} is not a UID root of at most 40 characters")
    room = 64 - len(uid_root) - 1
    digits = str(int.from_bytes(digest, "big"))[:room].lstrip("0") or "1"
    return f"{uid_root}.{digits}"


def model_parts(result: StudyResult) -> tuple[str, ...]:
    """Sorted model identities (name, version, weights digest): new weights give new UIDs."""
    return tuple(
        sorted(
            {
                f"{p.model_id}@{p.model_version}#{p.weights_sha256}"
                for f in result.findings
                for p in f.contributions
            }
        )
    )


def _probability(value: float | None) -> str:
    """A probability as the UIDs see it: 4 decimals, so float noise never changes a UID."""
    return "-" if value is None else f"{value:.4f}"


def content_parts(result: StudyResult) -> tuple[str, ...]:
    """What the SR says, in short: each task's answer and each series' probability. A result
    that changes (a re-opened study) changes these, and so gets a new UID."""
    return tuple(
        sorted(
            f"{f.task}:{f.status.value}:{_probability(f.probability)}:"
            + ",".join(
                sorted(f"{p.series_uid}={_probability(p.probability)}" for p in f.contributions)
            )
            for f in result.findings
        )
    )


def heatmap_uid(
    study_uid: str, pred: SeriesPrediction, hm: Heatmap, *, uid_root: str | None
) -> str:
    """A heatmap image's SOP Instance UID: fixed by its source slice, task, model weights and
    the series' probability (a series that changed gives new maps under new UIDs)."""
    return result_uid(
        "sc",
        study_uid,
        hm.source.sop_instance_uid,
        str(hm.source.frame_number or 0),
        pred.task,
        pred.model_id,
        pred.model_version,
        pred.weights_sha256,
        _probability(pred.probability),
        uid_root=uid_root,
    )


def sr_uid(
    result: StudyResult,
    sop_class: SrClass,
    *,
    uid_root: str | None,
    predecessor_uid: str | None = None,
) -> str:
    """The SR's SOP Instance UID: fixed by study, its series set, model versions, what it says,
    the SR class and the SR it supersedes. The same study and result give the same UID (no
    duplicates in the PACS); a changed result gives a new one (never two contents under one)."""
    series = sorted(
        {d.series_uid for d in result.sequences}
        | {p.series_uid for f in result.findings for p in f.contributions}
    )
    return result_uid(
        "sr",
        result.study_uid,
        *series,
        *model_parts(result),
        *content_parts(result),
        sop_class,
        *((f"supersedes:{predecessor_uid}",) if predecessor_uid else ()),
        uid_root=uid_root,
    )

"""Sequence classification of a study: slice vote, tag rules + fusion per series, study context.

Pure: records in, records out; no torch, DICOM reading, sockets or files (a unit test checks the
imports). The tag rules live in node/classify/tags.py, the tag/CNN fusion table in
node/classify/fusion.py (and docs/sequence.md), the image contrast evidence in
node/classify/contrast.py. Study context tells pre- from post-contrast T1 runs of one protocol,
and only on evidence: a contrast agent tag, a description, or image evidence; never on the
acquisition order alone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from node.classify.fusion import fuse
from node.classify.tags import (
    CONTRAST_WORDS,
    PRE_WORDS,
    classify_by_tags,
    contrast_evidence,
    description_text,
    fmt_number,
    normalise_text,
)
from node.records import (
    CnnVerdict,
    ContrastEvidence,
    ContrastPair,
    DecisionMethod,
    EvidenceKind,
    FusionPolicy,
    SequenceDecision,
    SequenceLabel,
    SeriesHeader,
)

L = SequenceLabel


_LABEL_ORDER = {label: i for i, label in enumerate(SequenceLabel)}


def vote_slices(
    labels: Sequence[SequenceLabel],
) -> tuple[SequenceLabel, tuple[tuple[SequenceLabel, int], ...], float]:
    """Majority vote over per-slice labels: (winner, votes most first, winner's fraction).

    Ties go to the label declared first in SequenceLabel, so the result is deterministic.
    """
    if not labels:
        raise ValueError("labels: at least one slice label is needed for a vote")
    counts = Counter(SequenceLabel(label) for label in labels)
    votes = tuple(sorted(counts.items(), key=lambda kv: (-kv[1], _LABEL_ORDER[kv[0]])))
    winner, n = votes[0]
    return winner, votes, n / len(labels)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Candidate:
    index: int
    header: SeriesHeader
    decision: SequenceDecision
    evidence: str | None  # why the headers say post-contrast (agent tag, words), or None
    evidence_kind: EvidenceKind


def _protocol_keys(h: SeriesHeader) -> tuple[tuple[str, ...], ...]:
    """What makes two series runs of one protocol: the same protocol name (contrast words
    stripped, so "T1 SE" and "T1 SE +C" are one), or the same acquisition physics (sequence,
    TR, TE, TI, flip angle, 2D/3D and plane): an operator may rename the post-contrast run
    ("T1 AX" on a sagittal 3D run, or no name at all) but not change what the scanner played.
    """
    keys: list[tuple[str, ...]] = []
    protocol = normalise_text(h.protocol_name).strip()
    protocol = re.sub(CONTRAST_WORDS, " ", f" {protocol} ")
    protocol = re.sub(PRE_WORDS, " ", protocol)
    protocol = " ".join(protocol.split())
    if protocol:
        keys.append((h.study_uid, "protocol", protocol))
    physics = (
        h.sequence_name,
        fmt_number(h.repetition_time_ms),
        fmt_number(h.echo_time_ms),
        fmt_number(h.inversion_time_ms),
        fmt_number(h.flip_angle_deg),
        h.mr_acquisition_type,
        h.orientation,
    )
    # A named series joins a differently named one only on known timing; an unnamed series has
    # nothing else to go by.
    if not protocol or (h.repetition_time_ms is not None and h.echo_time_ms is not None):
        keys.append((h.study_uid, "physics", *physics))
    return tuple(keys)


def _start_time(h: SeriesHeader) -> tuple[float, int]:
    first = h.acquisition_times[0] if h.acquisition_times else float("inf")
    return (first, h.series_number or 0)


def _acquired_after(earlier: SeriesHeader, later: SeriesHeader) -> bool:
    """Whether the later run started after the earlier ended (an injection fits in between)."""
    if earlier.acquisition_times is None or later.acquisition_times is None:
        return True  # times unknown: the images alone must say
    return later.acquisition_times[0] > earlier.acquisition_times[1]


_INJECTION_GAP_S = 120.0  # a repeat for motion follows at once; a post-contrast run does not


def _injection_gap(
    earlier: SeriesHeader, later: SeriesHeader, headers: Sequence[SeriesHeader]
) -> bool:
    """Whether the later series started long enough after the earlier, or after other series."""
    if earlier.acquisition_times is None or later.acquisition_times is None:
        return False
    end, start = earlier.acquisition_times[1], later.acquisition_times[0]
    if start <= end:
        return False
    if start - end >= _INJECTION_GAP_S:
        return True
    return any(
        h.study_uid == earlier.study_uid
        and h.acquisition_times is not None
        and end < h.acquisition_times[0] < start
        for h in headers
    )


def _check_aligned(decisions: Sequence[SequenceDecision], headers: Sequence[SeriesHeader]) -> None:
    if len(decisions) != len(headers):
        raise ValueError("decisions and headers must be aligned (same length and order)")
    for d, h in zip(decisions, headers, strict=True):
        if d.series_uid != h.series_uid:
            raise ValueError(f"decision for {d.series_uid} is not aligned with its header")


def _t1_groups(
    decisions: Sequence[SequenceDecision], headers: Sequence[SeriesHeader]
) -> list[list[_Candidate]]:
    """T1/T1C series grouped by study and protocol, two or more per group, earliest first.

    Two series are in one group when they share a protocol name or the acquisition physics
    (`_protocol_keys`), transitively.
    """
    members: list[_Candidate] = []
    for i, (d, h) in enumerate(zip(decisions, headers, strict=True)):
        if d.label not in (L.T1, L.T1C):
            continue
        evidence = contrast_evidence(h)
        kind = EvidenceKind.TAGS if h.contrast_agent else EvidenceKind.DESCRIPTION
        members.append(
            _Candidate(index=i, header=h, decision=d, evidence=evidence, evidence_kind=kind)
        )
    parent = list(range(len(members)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[str, ...], int] = {}
    for i, c in enumerate(members):
        for key in _protocol_keys(c.header):
            j = first_with.setdefault(key, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[_Candidate]] = {}
    for i, c in enumerate(members):
        groups.setdefault(root(i), []).append(c)
    return [sorted(m, key=lambda c: _start_time(c.header)) for m in groups.values() if len(m) > 1]


def _pair(earlier: SeriesHeader, later: SeriesHeader) -> ContrastPair:
    return ContrastPair(
        earlier_uid=earlier.series_uid,
        earlier_number=earlier.series_number,
        later_uid=later.series_uid,
        later_number=later.series_number,
    )


def contrast_questions(
    decisions: Sequence[SequenceDecision], headers: Sequence[SeriesHeader]
) -> tuple[ContrastPair, ...]:
    """The T1 pairs whose images could tell pre- from post-contrast: the earliest run of each
    T1 protocol with every later, separately acquired run of it.

    The caller loads both series, puts them on one grid, asks
    ``node.classify.contrast.judge_contrast(earlier, later)`` and passes the answers, keyed by
    these pairs, to ``classify_headers(..., image_evidence=...)``.
    """
    _check_aligned(decisions, headers)
    pairs: list[ContrastPair] = []
    for members in _t1_groups(decisions, headers):
        earliest = members[0].header
        for later in members[1:]:
            if _acquired_after(earliest, later.header):
                pairs.append(_pair(earliest, later.header))
    return tuple(pairs)


def _relabel(
    c: _Candidate, label: SequenceLabel, confidence: float, evidence: EvidenceKind, why: str
) -> SequenceDecision:
    return replace(
        c.decision,
        label=label,
        confidence=round(confidence, 3),
        method=DecisionMethod.STUDY_CONTEXT,
        evidence=evidence,
        reasons=(*c.decision.reasons, why),
    )


def _by_images(
    members: list[_Candidate],
    image_evidence: Mapping[ContrastPair, ContrastEvidence],
    out: list[SequenceDecision],
) -> bool:
    """Settle one T1 protocol group by image evidence; False when there is none to use."""
    earliest = members[0]
    judged = [(c, image_evidence.get(_pair(earliest.header, c.header))) for c in members[1:]]
    judged = [(c, ev) for c, ev in judged if ev is not None and ev.post_contrast is not None]
    if not judged:
        return False
    n = len(members)
    enhanced = False
    for c, ev in judged:
        assert ev is not None  # narrowed above
        if ev.post_contrast:
            enhanced = True
            out[c.index] = _relabel(
                c,
                L.T1C,
                max(0.8, c.decision.confidence),
                EvidenceKind.ORDER_IMAGE,
                f"study context: later of {n} series of one T1 protocol and enhanced relative "
                f"to the earliest ({ev.reason}): post-contrast",
            )
        elif c.header.contrast_agent and not earliest.header.contrast_agent:
            out[c.index] = replace(
                out[c.index],
                reasons=(
                    *out[c.index].reasons,
                    f"study context: images show no enhancement relative to the earliest "
                    f"({ev.reason}), but the contrast agent tag on this run alone is kept",
                ),
            )
        elif c.decision.label is L.T1C:
            # Absence of enhancement is weak evidence (a normal brain enhances little beyond its
            # vessels, and phantoms not at all): it never overrules the header's contrast words.
            out[c.index] = replace(
                out[c.index],
                reasons=(
                    *out[c.index].reasons,
                    f"study context: images show no enhancement relative to the earliest run "
                    f"({ev.reason}); the header's contrast evidence is kept",
                ),
            )
    if enhanced and earliest.decision.label is L.T1C:
        out[earliest.index] = _relabel(
            earliest,
            L.T1,
            max(0.7, earliest.decision.confidence - 0.1),
            EvidenceKind.ORDER_IMAGE,
            f"study context: earliest of {n} series of one T1 protocol and a later run is "
            "enhanced relative to it: pre-contrast",
        )
    return True


def _by_headers(
    members: list[_Candidate], headers: Sequence[SeriesHeader], out: list[SequenceDecision]
) -> None:
    """Settle one T1 protocol group from the agent tag and descriptions, never from order alone."""
    n = len(members)
    first_post = next((k for k, c in enumerate(members) if c.evidence), None)
    if first_post is None:
        for c in members[1:]:
            out[c.index] = replace(
                out[c.index],
                reasons=(
                    *out[c.index].reasons,
                    f"study context: later of {n} series of one T1 protocol, but no contrast "
                    "evidence (agent tag, description or images): not assumed post-contrast",
                ),
            )
        return
    if first_post == 0 and n == 2:
        earlier, later = members
        tag_only = all(
            c.header.contrast_agent and not re.search(CONTRAST_WORDS, description_text(c.header))
            for c in members
        )
        if tag_only and _injection_gap(earlier.header, later.header, headers):
            # The agent tag on both runs of one T1 protocol is an exam-level entry: the
            # earlier run, after a gap, is taken as the pre-contrast one.
            out[earlier.index] = _relabel(
                earlier,
                L.T1,
                0.6,
                EvidenceKind.TAGS,
                "study context: contrast tag on both runs of one T1 protocol (entered for the "
                "whole exam); the earlier run is taken as pre-contrast",
            )
        return
    if first_post == 0:
        return  # the earliest already has evidence: nothing to tell apart
    if not all(c.evidence for c in members[first_post:]):
        return  # evidence comes and goes: not a clean pre/post pair
    for k, c in enumerate(members):
        label = L.T1 if k < first_post else L.T1C
        if c.decision.label is label:
            continue
        why = (
            f"study context: {'later' if label is L.T1C else 'earlier'} of {n} series of one "
            f"T1 protocol; {c.evidence or 'no contrast evidence'}"
        )
        kind = c.evidence_kind if c.evidence else members[first_post].evidence_kind
        out[c.index] = _relabel(c, label, max(0.7, c.decision.confidence), kind, why)


def apply_study_context(
    decisions: Sequence[SequenceDecision],
    headers: Sequence[SeriesHeader],
    image_evidence: Mapping[ContrastPair, ContrastEvidence] | None = None,
) -> tuple[SequenceDecision, ...]:
    """Tell pre- from post-contrast among two or more T1 series of one protocol, on evidence.

    ``decisions[i]`` must belong to ``headers[i]``. Image evidence (``contrast_questions`` and
    ``node.classify.contrast.judge_contrast``) decides a group when it is given: a later run
    enhanced relative to the earliest is T1C and the earliest T1; a later run without
    enhancement keeps T1 whatever its description says (a contrast agent tag on it alone is
    kept). Without image evidence, the agent tag or a post-contrast description on the later
    run(s), absent on the earlier, splits the group; the order of acquisition alone never makes
    a series T1C.
    """
    _check_aligned(decisions, headers)
    out = list(decisions)
    for members in _t1_groups(decisions, headers):
        if image_evidence and _by_images(members, image_evidence, out):
            continue
        _by_headers(members, headers, out)
    return tuple(out)


def classify_headers(
    headers: Sequence[SeriesHeader],
    cnn: Sequence[CnnVerdict | None] | None = None,
    policy: FusionPolicy | None = None,
    image_evidence: Mapping[ContrastPair, ContrastEvidence] | None = None,
) -> tuple[SequenceDecision, ...]:
    """Classify every series of a study (or folder): tag rules, fusion with the CNN, context."""
    if cnn is not None and len(cnn) != len(headers):
        raise ValueError("cnn: one verdict (or None) per header is needed")
    decisions = tuple(
        fuse(h.series_uid, classify_by_tags(h), cnn[i] if cnn is not None else None, policy)
        for i, h in enumerate(headers)
    )
    return apply_study_context(decisions, headers, image_evidence)


def cnn_verdict(labels: Sequence[SequenceLabel], confidences: Sequence[float]) -> CnnVerdict:
    """The series-level CNN opinion from per-slice labels and their calibrated probabilities.

    Confidence is the winner's vote fraction times the mean probability of the slices that
    voted for it, so a narrow, hesitant majority gives a low confidence.
    """
    if len(labels) != len(confidences):
        raise ValueError("labels and confidences must have one entry per slice")
    winner, votes, fraction = vote_slices(labels)
    winning = [c for label, c in zip(labels, confidences, strict=True) if label == winner]
    mean_prob = sum(winning) / len(winning)
    return CnnVerdict(
        label=winner,
        confidence=round(fraction * mean_prob, 4),
        votes=votes,
        n_slices=len(labels),
    )

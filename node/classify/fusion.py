"""Tag/CNN fusion for one series, physics first: the table in docs/sequence.md.

Pure: records in, a record out. Whatever the policy, a confident tag label is never overturned
by the CNN, a tag OTHER (fMRI, field map, ASL, localizer, derived map, SWI/phase) is absolute,
and a CNN vote below its calibrated confidence counts for nothing. The CNN may decide when the
tags abstain, raise or lower a confidence, and (only if the policy allows it) choose between
the routable labels the tags leave open, such as T1 or T1C when the headers say nothing of
contrast.
"""

from __future__ import annotations

from node.records import (
    CnnVerdict,
    DecisionMethod,
    EvidenceKind,
    FusionPolicy,
    SequenceDecision,
    SequenceLabel,
    TagVerdict,
)

L = SequenceLabel


def _cnn_text(cnn: CnnVerdict) -> str:
    votes = ", ".join(f"{label}:{n}" for label, n in cnn.votes)
    return f"CNN {cnn.label} ({cnn.confidence:.2f}; votes {votes} of {cnn.n_slices} slices)"


def _tag_text(tag: TagVerdict) -> str:
    if tag.label is None:
        return f"tags abstained: {tag.reason}"
    return f"tags {tag.label} ({tag.confidence:.2f}, rule {tag.rule}): {tag.reason}"


def _combined(a: float, b: float) -> float:
    """Two agreeing opinions: 1 - (1 - a)(1 - b), capped at 0.99 (nothing is certain)."""
    return round(min(0.99, 1.0 - (1.0 - a) * (1.0 - b)), 3)


def fuse(
    series_uid: str,
    tag: TagVerdict | None,
    cnn: CnnVerdict | None,
    policy: FusionPolicy | None = None,
) -> SequenceDecision:
    """Combine the tag verdict and the CNN verdict of one series into its decision."""
    policy = policy or FusionPolicy()
    tag_label = tag.label if tag is not None else None
    reasons: list[str] = []
    if tag is not None:
        reasons.append(_tag_text(tag))
    reasons.append(_cnn_text(cnn) if cnn is not None else "CNN not run")
    counts = cnn is not None and cnn.confidence >= policy.min_cnn_confidence
    if cnn is not None and not counts:
        reasons.append(
            f"CNN vote below its calibrated confidence {policy.min_cnn_confidence:g}: ignored"
        )

    def decide(
        label: SequenceLabel,
        confidence: float,
        method: DecisionMethod,
        evidence: EvidenceKind,
        why: str | None,
    ) -> SequenceDecision:
        return SequenceDecision(
            series_uid=series_uid,
            label=label,
            confidence=round(confidence, 3),
            method=method,
            reasons=(*reasons, why) if why else tuple(reasons),
            tag_label=tag_label,
            cnn_label=cnn.label if cnn is not None else None,
            cnn_votes=cnn.votes if cnn is not None else (),
            evidence=evidence,
        )

    if tag is None or tag_label is None:
        if counts and cnn is not None and policy.unsure_tags != "tags":
            return decide(cnn.label, cnn.confidence, DecisionMethod.CNN, EvidenceKind.CNN, None)
        why = "no usable evidence: OTHER"
        if counts and cnn is not None:
            why = "tags abstained and the policy lets the CNN only confirm: OTHER"
        return decide(L.OTHER, 0.0, DecisionMethod.TAGS, EvidenceKind.NONE, why)

    if tag_label is L.OTHER:
        # The tag veto is absolute: OTHER is never routed, and these series (fMRI, maps,
        # localizers, SWI) would feed a tumour model images it was never meant to see.
        if counts and cnn is not None and cnn.label is L.OTHER:
            confidence = _combined(tag.confidence, cnn.confidence)
            return decide(L.OTHER, confidence, DecisionMethod.FUSED, tag.evidence, "agree")
        return decide(L.OTHER, tag.confidence, DecisionMethod.TAGS, tag.evidence, "tag veto: OTHER")

    confident = tag.confidence >= policy.min_confidence
    if not counts or cnn is None:
        if confident:
            return decide(tag_label, tag.confidence, DecisionMethod.TAGS, tag.evidence, None)
        return decide(
            L.OTHER,
            tag.confidence,
            DecisionMethod.TAGS,
            EvidenceKind.NONE,
            f"tag confidence below {policy.min_confidence:g}: OTHER",
        )

    chooses = policy.cnn_decides_contrast and cnn.confidence >= policy.min_confidence
    if cnn.label in tag.open_labels and chooses:
        return decide(
            cnn.label,
            cnn.confidence,
            DecisionMethod.CNN,
            EvidenceKind.CNN,
            f"the tags leave {tag_label} or {cnn.label} open; the policy lets the CNN choose",
        )
    if cnn.label is tag_label or cnn.label in tag.open_labels:
        confidence = max(tag.confidence, _combined(tag.confidence, cnn.confidence))
        why = (
            "tags and CNN agree"
            if cnn.label is tag_label
            else "tags and CNN agree on the T1 family; contrast decided by the tags and study "
            "context"
        )
        if not confident and confidence < policy.min_confidence:
            return decide(
                L.OTHER,
                confidence,
                DecisionMethod.FUSED,
                EvidenceKind.NONE,
                f"{why}, but still below the minimum confidence {policy.min_confidence:g}: OTHER",
            )
        return decide(tag_label, confidence, DecisionMethod.FUSED, tag.evidence, why)
    if confident:
        lowered = max(policy.min_confidence, tag.confidence * (1.0 - cnn.confidence / 2.0))
        return decide(
            tag_label,
            lowered,
            DecisionMethod.TAGS,
            tag.evidence,
            f"disagreement: a confident tag label is never overturned by the CNN "
            f"(confidence lowered from {tag.confidence:.2f})",
        )
    if policy.unsure_tags == "cnn":
        return decide(
            cnn.label,
            cnn.confidence,
            DecisionMethod.CNN,
            EvidenceKind.CNN,
            f"disagreement with an unsure tag label (below {policy.min_confidence:g}): "
            "the policy lets the CNN decide",
        )
    return decide(
        L.OTHER,
        (1.0 - abs(tag.confidence - cnn.confidence)) / 2,
        DecisionMethod.FUSED,
        EvidenceKind.NONE,
        f"disagreement with an unsure tag label (below {policy.min_confidence:g}): OTHER "
        "(not routed)",
    )

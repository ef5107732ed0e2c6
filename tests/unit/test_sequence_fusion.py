"""The tag/CNN fusion table (docs/sequence.md): every row, exhaustively, and its properties."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("hypothesis", reason="property tests need hypothesis (test extra)")

from hypothesis import given, settings
from hypothesis import strategies as st

from node.classify.fusion import fuse
from node.records import (
    CnnVerdict,
    DecisionMethod,
    EvidenceKind,
    FusionPolicy,
    SequenceLabel,
    TagVerdict,
)

L = SequenceLabel
LABELS = tuple(SequenceLabel)
ROUTABLE = tuple(label for label in SequenceLabel if label is not L.OTHER)
UNSURE = ("tags", "cnn_if_abstain", "cnn")


def tag_verdict(
    label: SequenceLabel | None, confidence: float, open_labels: tuple[SequenceLabel, ...] = ()
) -> TagVerdict:
    return TagVerdict(
        label=label,
        confidence=confidence if label is not None else 0.0,
        rule="r",
        reason="why",
        open_labels=open_labels,
    )


def cnn_verdict(label: SequenceLabel, confidence: float) -> CnnVerdict:
    return CnnVerdict(label=label, confidence=confidence, votes=((label, 9),), n_slices=9)


def table(
    tag: SequenceLabel | None,
    confident: bool,
    open_labels: tuple[SequenceLabel, ...],
    cnn: SequenceLabel | None,
    counts: bool,
    unsure: str,
    cnn_decides_contrast: bool,
) -> SequenceLabel:
    """The fusion table of docs/sequence.md, written out independently of node/classify."""
    if tag is None:  # row 1-2: tags abstain
        return cnn if cnn is not None and counts and unsure != "tags" else L.OTHER
    if tag is L.OTHER:  # row 3: the tag veto is absolute
        return L.OTHER
    if cnn is None or not counts:  # rows 4-5: no CNN, or a vote below its calibrated confidence
        return tag if confident else L.OTHER
    if cnn in open_labels and cnn_decides_contrast:  # row 6
        return cnn
    if cnn is tag or cnn in open_labels:  # row 7: agreement (on the T1 family)
        return tag
    if confident:  # row 8: a confident tag label is never overturned
        return tag
    return cnn if unsure == "cnn" else L.OTHER  # row 9: unsure tag label contradicted


OPEN = {None: ((),), L.T1: ((), (L.T1C,)), L.T1C: ((), (L.T1,))}


def _cases() -> list[tuple[object, ...]]:
    cases: list[tuple[object, ...]] = []
    for tag, cnn, confident, counts, unsure, contrast in itertools.product(
        (None, *LABELS), (None, *LABELS), (True, False), (True, False), UNSURE, (True, False)
    ):
        for open_labels in OPEN.get(tag, ((),)):
            cases.append((tag, confident, open_labels, cnn, counts, unsure, contrast))
    return cases


@pytest.mark.parametrize(
    ("tag", "confident", "open_labels", "cnn", "counts", "unsure", "contrast"), _cases()
)
def test_every_row_of_the_table(
    tag: SequenceLabel | None,
    confident: bool,
    open_labels: tuple[SequenceLabel, ...],
    cnn: SequenceLabel | None,
    counts: bool,
    unsure: str,
    contrast: bool,
) -> None:
    policy = FusionPolicy(
        min_confidence=0.5,
        min_cnn_confidence=0.6,
        unsure_tags=unsure,  # type: ignore[arg-type]
        cnn_decides_contrast=contrast,
    )
    t = tag_verdict(tag, 0.9 if confident else 0.4, open_labels)
    c = cnn_verdict(cnn, 0.8 if counts else 0.3) if cnn is not None else None
    d = fuse("1.2", t, c, policy)
    assert d.label is table(tag, confident, open_labels, cnn, counts, unsure, contrast)
    assert d.tag_label is tag and d.cnn_label is cnn
    assert 0.0 <= d.confidence <= 1.0
    if d.label is L.OTHER and tag is not L.OTHER:
        assert d.evidence in (EvidenceKind.NONE, EvidenceKind.CNN)
    if d.evidence is EvidenceKind.CNN:
        assert d.method is DecisionMethod.CNN and d.label is cnn


# --- properties over random verdicts and policies ----------------------------------------------

confidences = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
labels = st.sampled_from(LABELS)


@st.composite
def policies(draw: st.DrawFn) -> FusionPolicy:
    return FusionPolicy(
        min_confidence=draw(confidences),
        min_cnn_confidence=draw(confidences),
        unsure_tags=draw(st.sampled_from(UNSURE)),
        cnn_decides_contrast=draw(st.booleans()),
    )


@st.composite
def tags(draw: st.DrawFn) -> TagVerdict:
    label = draw(st.one_of(st.none(), labels))
    open_labels = draw(st.sampled_from(OPEN.get(label, ((),))))
    return tag_verdict(label, draw(confidences), open_labels)


cnns = st.one_of(st.none(), st.builds(cnn_verdict, labels, confidences))


@settings(max_examples=400, deadline=None)
@given(tags(), cnns, policies())
def test_a_confident_tag_label_is_never_overturned(
    tag: TagVerdict, cnn: CnnVerdict | None, policy: FusionPolicy
) -> None:
    d = fuse("1.2", tag, cnn, policy)
    if tag.label is L.OTHER:
        assert d.label is L.OTHER  # the veto is absolute
    if tag.label is None or tag.confidence < policy.min_confidence:
        return
    if policy.cnn_decides_contrast and d.label in tag.open_labels:
        assert cnn is not None and d.label is cnn.label  # the one open choice the policy allows
        return
    assert d.label is tag.label  # never OTHER, never the CNN's label


@settings(max_examples=400, deadline=None)
@given(tags(), labels, confidences, policies())
def test_a_cnn_vote_below_its_calibrated_confidence_counts_for_nothing(
    tag: TagVerdict, label: SequenceLabel, confidence: float, policy: FusionPolicy
) -> None:
    if confidence >= policy.min_cnn_confidence:
        return
    alone = fuse("1.2", tag, None, policy)
    with_vote = fuse("1.2", tag, cnn_verdict(label, confidence), policy)
    assert (with_vote.label, with_vote.confidence) == (alone.label, alone.confidence)


@settings(max_examples=400, deadline=None)
@given(tags(), cnns, policies())
def test_the_cnn_moves_confidence_only_as_documented(
    tag: TagVerdict, cnn: CnnVerdict | None, policy: FusionPolicy
) -> None:
    d = fuse("1.2", tag, cnn, policy)
    assert d.label in {tag.label, cnn.label if cnn else None, L.OTHER, *tag.open_labels}
    if tag.label in ROUTABLE and tag.confidence >= policy.min_confidence and d.label is tag.label:
        # lowered at most to the floor (confidences are rounded to 3 decimals)
        assert d.confidence >= policy.min_confidence - 0.0005
        counts = cnn is not None and cnn.confidence >= policy.min_cnn_confidence
        if counts and cnn is not None and cnn.label is tag.label:
            assert d.confidence >= tag.confidence - 0.0005  # agreement raises


series = st.tuples(labels, tags(), cnns)


@settings(max_examples=300, deadline=None)
@given(st.lists(series, min_size=1, max_size=30), policies())
def test_fused_accuracy_is_never_below_tags_alone(
    items: list[tuple[SequenceLabel, TagVerdict, CnnVerdict | None]], policy: FusionPolicy
) -> None:
    """On any set of series whose tag label is confident (or a veto, or absent when the tags
    abstain and alone say OTHER), any CNN verdicts leave fused accuracy >= tags-alone accuracy."""
    policy = FusionPolicy(
        min_confidence=policy.min_confidence,
        min_cnn_confidence=policy.min_cnn_confidence,
        unsure_tags=policy.unsure_tags,
        cnn_decides_contrast=False,
    )
    tags_right = fused_right = 0
    for truth, tag, cnn in items:
        if tag.label is not None and tag.confidence < policy.min_confidence:
            tag = tag_verdict(tag.label, policy.min_confidence, tag.open_labels)
        alone = fuse("1.2", tag, None, policy).label
        fused = fuse("1.2", tag, cnn, policy).label
        if tag.label is not None:
            assert fused is alone  # the fused label is the tag label
        tags_right += alone is truth
        fused_right += fused is truth
    abstained = sum(tag.label is None for _, tag, _ in items)
    # Only where the tags abstain can the CNN change the answer (that is its job).
    assert fused_right >= tags_right - abstained
    if abstained == 0:
        assert fused_right >= tags_right


def test_policy_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="min_confidence"):
        FusionPolicy(min_confidence=1.5)
    with pytest.raises(TypeError, match="min_cnn_confidence"):
        FusionPolicy(min_cnn_confidence="high")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsure_tags"):
        FusionPolicy(unsure_tags="maybe")  # type: ignore[arg-type]

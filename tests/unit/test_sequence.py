"""Tag rules, slice vote, fusion and study context on hand-built headers of every vendor."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from node.classify.fusion import fuse
from node.classify.sequence import (
    apply_study_context,
    classify_headers,
    cnn_verdict,
    contrast_questions,
    vote_slices,
)
from node.classify.tags import classify_by_tags
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
    TagVerdict,
)

L = SequenceLabel
MR = "1.2.840.10008.5.1.4.1.1.4"
ENH_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def hdr(**kw: Any) -> SeriesHeader:
    """A plain single-frame MR series with blank descriptions; tests set the physics."""
    base: dict[str, Any] = {
        "series_uid": "1.2.3.1",
        "study_uid": "1.2.3",
        "series_number": 1,
        "series_description": "",
        "protocol_name": "",
        "sequence_name": "",
        "manufacturer": "siemens",
        "model": "",
        "sop_class_uid": MR,
        "modality": "MR",
        "image_type": ("ORIGINAL", "PRIMARY", "M", "ND"),
        "scanning_sequence": (),
        "sequence_variant": (),
        "scan_options": (),
        "mr_acquisition_type": "2D",
        "n_instances": 24,
        "n_frames": 24,
        "orientation": "axial",
        "orientations": ("axial",),
        "photometric_interpretation": "MONOCHROME2",
    }
    base.update(kw)
    if "echo_time_ms" in kw and "echo_times_ms" not in kw and kw["echo_time_ms"] is not None:
        base["echo_times_ms"] = (kw["echo_time_ms"],)
    return SeriesHeader(**base)


# --- physics per vendor ---------------------------------------------------------------------------

SIEMENS_MPRAGE = {
    "manufacturer": "siemens",
    "sequence_name": "*tfl3d1_16ns",
    "scanning_sequence": ("GR", "IR"),
    "sequence_variant": ("SK", "SP", "MP"),
    "mr_acquisition_type": "3D",
    "repetition_time_ms": 2300.0,
    "echo_time_ms": 2.98,
    "inversion_time_ms": 900.0,
    "flip_angle_deg": 9.0,
    "orientation": "sagittal",
    "orientations": ("sagittal",),
}
GE_T2 = {
    "manufacturer": "ge",
    "scanning_sequence": ("SE",),
    "sequence_variant": ("SK", "OSP"),
    "scan_options": ("FAST_GEMS", "FILTERED_GEMS"),
    "repetition_time_ms": 4800.0,
    "echo_time_ms": 102.0,
    "flip_angle_deg": 90.0,
}
PHILIPS_FLAIR = {
    "manufacturer": "philips",
    "image_type": ("ORIGINAL", "PRIMARY", "M_IR", "M", "IR"),
    "scanning_sequence": ("SE", "IR"),
    "repetition_time_ms": 11000.0,
    "echo_time_ms": 125.0,
    "inversion_time_ms": 2800.0,
}


@pytest.mark.parametrize(
    ("kw", "label", "rule"),
    [
        # Siemens
        (SIEMENS_MPRAGE, L.T1, "t1-ir"),
        ({**SIEMENS_MPRAGE, "contrast_agent": "Gadovist"}, L.T1C, "t1-ir+contrast"),
        (
            {
                "manufacturer": "siemens",
                "sequence_name": "*tir2d1_16",
                "scanning_sequence": ("SE", "IR"),
                "repetition_time_ms": 9000.0,
                "echo_time_ms": 81.0,
                "inversion_time_ms": 2500.0,
            },
            L.FLAIR,
            "flair-ti",
        ),
        (
            {
                "sequence_name": "*ep_b1000t",
                "scanning_sequence": ("EP",),
                "image_type": ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND"),
                "b_values": (0.0, 1000.0),
                "repetition_time_ms": 5000.0,
                "echo_time_ms": 89.0,
            },
            L.DWI,
            "dwi-bvalue",
        ),
        (
            {
                "sequence_name": "*ep_b0_1000",
                "scanning_sequence": ("EP",),
                "image_type": ("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"),
                "repetition_time_ms": 5000.0,
                "echo_time_ms": 89.0,
            },
            L.ADC,
            "adc",
        ),
        (
            {"sequence_name": "*ep_b1000t", "scanning_sequence": ("EP",), "echo_time_ms": 89.0},
            L.DWI,
            "dwi-bvalue",
        ),
        # GE
        (GE_T2, L.T2, "t2-se"),
        (
            {
                "manufacturer": "ge",
                "scanning_sequence": ("SE",),
                "repetition_time_ms": 550.0,
                "echo_time_ms": 12.0,
            },
            L.T1,
            "t1-se",
        ),
        (
            {
                "manufacturer": "ge",
                "sequence_name": "efgre3d",
                "scanning_sequence": ("GR",),
                "scan_options": ("FAST_GEMS", "EDR_GEMS", "IR_GEMS"),
                "repetition_time_ms": 8.2,
                "echo_time_ms": 3.2,
                "inversion_time_ms": 450.0,
                "flip_angle_deg": 12.0,
                "contrast_agent": "MULTIHANCE",
            },
            L.T1C,
            "t1-ir+contrast",
        ),
        (
            {
                "manufacturer": "ge",
                "scanning_sequence": ("EP", "SE"),
                "image_type": ("ORIGINAL", "PRIMARY", "OTHER"),
                "b_values": (0.0, 1000.0),
                "echo_time_ms": 80.0,
            },
            L.DWI,
            "dwi-bvalue",
        ),
        (
            {
                "manufacturer": "ge",
                "series_description": "Apparent Diffusion Coefficient (mm2/s)",
                "scanning_sequence": ("EP", "SE"),
                "image_type": ("DERIVED", "PRIMARY", "OTHER"),
                "echo_time_ms": 80.0,
            },
            L.ADC,
            "epi-description",
        ),
        # Philips
        (PHILIPS_FLAIR, L.FLAIR, "flair-ti"),
        (
            {
                "manufacturer": "philips",
                "image_type": ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
                "scanning_sequence": ("GR",),
                "mr_acquisition_type": "3D",
                "repetition_time_ms": 8.1,
                "echo_time_ms": 3.7,
                "flip_angle_deg": 8.0,
            },
            L.T1,
            "t1-gre",
        ),
        (
            {
                "manufacturer": "philips",
                "image_type": ("ORIGINAL", "PRIMARY", "ADC_SE", "ADC", "SE"),
                "scanning_sequence": ("SE", "EP"),
                "echo_time_ms": 70.0,
            },
            L.ADC,
            "adc",
        ),
        (
            {
                "manufacturer": "philips",
                "image_type": ("ORIGINAL", "PRIMARY", "T1", "MIXED", "FIELD_MAP"),
                "echo_pulse_sequence": "GRADIENT",
                "repetition_time_ms": 3.8,
                "echo_time_ms": 1.5,
            },
            L.OTHER,
            "phase/field-map",
        ),
        # Canon / Toshiba
        (
            {
                "manufacturer": "canon",
                "scanning_sequence": ("SE", "EP"),
                "image_type": ("ORIGINAL", "PRIMARY"),
                "b_values": (0.0, 1000.0),
                "echo_time_ms": 90.0,
            },
            L.DWI,
            "dwi-bvalue",
        ),
        (
            {
                "manufacturer": "canon",
                "scanning_sequence": ("SE",),
                "repetition_time_ms": 4500.0,
                "echo_time_ms": 105.0,
            },
            L.T2,
            "t2-se",
        ),
        # UIH
        (
            {
                "manufacturer": "uih",
                "image_type": ("DERIVED", "PRIMARY", "ADC"),
                "scanning_sequence": ("EP",),
                "echo_time_ms": 75.0,
            },
            L.ADC,
            "adc",
        ),
        (
            {
                "manufacturer": "uih",
                "sequence_name": "fse_ir",
                "scanning_sequence": ("SE", "IR"),
                "repetition_time_ms": 9000.0,
                "echo_time_ms": 100.0,
                "inversion_time_ms": 2400.0,
            },
            L.FLAIR,
            "flair-ti",
        ),
    ],
)
def test_physics_rules_per_vendor(kw: dict[str, Any], label: SequenceLabel, rule: str) -> None:
    verdict = classify_by_tags(hdr(**kw))
    assert verdict.label is label, verdict
    assert verdict.rule == rule
    assert verdict.confidence >= 0.7
    assert verdict.reason


@pytest.mark.parametrize(
    ("kw", "rule"),
    [
        ({"image_type": ("ORIGINAL", "PRIMARY", "FMRI", "NONE"), "echo_time_ms": 30.0}, "fmri"),
        (
            {
                "scanning_sequence": ("EP", "GR"),
                "n_temporal_positions": 200,
                "repetition_time_ms": 2000.0,
                "echo_time_ms": 30.0,
                "series_description": "T2 FLAIR",  # misleading: physics wins
            },
            "time-series",
        ),
        (
            {
                "sequence_name": "epfid2d1_64",
                "image_type": ("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"),
                "scanning_sequence": ("EP",),
                "is_mosaic": True,
                "repetition_time_ms": 3000.0,
                "echo_time_ms": 30.0,
            },
            "epi",
        ),
        (
            {
                "scanning_sequence": ("GR",),
                "repetition_time_ms": 488.0,
                "echo_time_ms": 4.92,
                "echo_times_ms": (4.92, 7.38),
                "flip_angle_deg": 60.0,
            },
            "field-map",
        ),
        (
            {"image_type": ("ORIGINAL", "PRIMARY", "P", "ND"), "echo_time_ms": 7.38},
            "phase/field-map",
        ),
        (
            {"manufacturer": "ge", "sequence_name": "3db0map", "repetition_time_ms": 5.0},
            "field-map",
        ),
        ({"complex_parts": ("PHASE",), "echo_time_ms": 5.0}, "phase/field-map"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "ASL", "NONE")}, "perfusion/ASL"),
        ({"image_type": ("DERIVED", "PRIMARY", "ASL", "RCBF")}, "perfusion/ASL"),
        ({"acquisition_contrast": ("PERFUSION",), "echo_time_ms": 11.0}, "perfusion/ASL"),
        ({"image_type": ("DERIVED", "PRIMARY", "DIFFUSION", "FA")}, "diffusion-map"),
        ({"image_type": ("DERIVED", "PRIMARY", "DIFFUSION", "TENSOR_B0")}, "diffusion-map"),
        ({"image_type": ("DERIVED", "PRIMARY", "DIFFUSION", "EADC")}, "diffusion-map"),
        (
            {"image_type": ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"), "b_values": (0.0,)},
            "diffusion-b0",
        ),
        ({"photometric_interpretation": "RGB", "samples_per_pixel": 3}, "colour"),
        ({**SIEMENS_MPRAGE, "image_type": ("DERIVED", "SECONDARY", "MPR")}, "reformat"),
        ({**SIEMENS_MPRAGE, "image_type": ("DERIVED", "PRIMARY", "MIP", "ND")}, "reformat"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
        ({**GE_T2, "is_localizer": True, "orientations": ("axial", "sagittal")}, "localizer"),
        ({"modality": "SR", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.22"}, "not-mr"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"}, "not-mr-image"),
        (
            {
                "scanning_sequence": ("GR",),
                "repetition_time_ms": 28.0,
                "echo_time_ms": 20.0,
                "flip_angle_deg": 15.0,
            },
            "t2star-gre",
        ),
        (
            {"scanning_sequence": ("SE",), "repetition_time_ms": 3000.0, "echo_time_ms": 12.0},
            "pd-se",
        ),
        ({**SIEMENS_MPRAGE, "series_description": "localizer"}, "description-other"),
        ({**GE_T2, "series_description": "Ax T2 SWAN"}, "description-other"),
        ({**GE_T2, "protocol_name": "3D TOF angio"}, "description-other"),
        ({"series_description": "Survey"}, "description-other"),
        ({**SIEMENS_MPRAGE, "series_description": "t1_mp2rage_INV2"}, "description-other"),
        ({"image_type": ("DERIVED", "PRIMARY", "T1 MAP", "ND")}, "quantitative-map"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "M", "SWI", "ND")}, "susceptibility"),
        (
            {
                "sequence_name": "*fl3d1r_t70",
                "scanning_sequence": ("GR",),
                "repetition_time_ms": 21.0,
                "echo_time_ms": 3.6,
                "flip_angle_deg": 18.0,
            },
            "angiography",
        ),
        ({"image_type": ("ORIGINAL", "PRIMARY", "VELOCITY", "NONE")}, "phase/field-map"),
    ],
)
def test_non_routable_series_are_other(kw: dict[str, Any], rule: str) -> None:
    verdict = classify_by_tags(hdr(**kw))
    assert verdict.label is L.OTHER, verdict
    assert verdict.rule == rule


def test_flair_by_ti_versus_t2_by_te_tr() -> None:
    t2 = classify_by_tags(
        hdr(scanning_sequence=("SE",), repetition_time_ms=6000.0, echo_time_ms=95.0)
    )
    flair = classify_by_tags(
        hdr(
            scanning_sequence=("SE", "IR"),
            repetition_time_ms=9000.0,
            echo_time_ms=95.0,
            inversion_time_ms=2500.0,
        )
    )
    assert (t2.label, flair.label) == (L.T2, L.FLAIR)
    assert "TI 2500" in flair.reason and "TE 95" in t2.reason


def test_t1_flair_with_short_ti_is_t1_not_flair() -> None:
    verdict = classify_by_tags(
        hdr(
            series_description="AX T1 FLAIR",
            scanning_sequence=("SE", "IR"),
            repetition_time_ms=2000.0,
            echo_time_ms=9.0,
            inversion_time_ms=860.0,
        )
    )
    assert verdict.label is L.T1
    assert verdict.reason.endswith("no contrast evidence")


def test_misleading_description_loses_to_physics() -> None:
    verdict = classify_by_tags(hdr(**GE_T2, series_description="t1_mprage_sag"))
    assert verdict.label is L.T2
    assert "description suggests T1 (physics wins)" in verdict.reason
    assert verdict.confidence < classify_by_tags(hdr(**GE_T2)).confidence


def test_agreeing_description_raises_confidence() -> None:
    plain = classify_by_tags(hdr(**GE_T2))
    agreed = classify_by_tags(hdr(**GE_T2, series_description="AX T2 FRFSE"))
    assert agreed.label is L.T2 and agreed.confidence > plain.confidence


def test_description_contrast_words_make_t1c() -> None:
    for text in ("T1 MPRAGE +C", "t1_mprage_post_gd", "T1 KM", "T1W_3D_TFE post", "T1W_3D_TFE+C"):
        verdict = classify_by_tags(hdr(**SIEMENS_MPRAGE, series_description=text))
        assert verdict.label is L.T1C, text
        assert "description says post-contrast" in verdict.reason


def test_pre_contrast_words_keep_t1_and_mag_prep_is_not_pre() -> None:
    pre = classify_by_tags(hdr(**SIEMENS_MPRAGE, series_description="T1 MPRAGE pre +C"))
    prep = classify_by_tags(hdr(**SIEMENS_MPRAGE, series_description="T1 mag prep post"))
    assert pre.label is L.T1
    assert prep.label is L.T1C


def test_contrast_tag_against_pre_description_is_t1c_with_lower_confidence() -> None:
    verdict = classify_by_tags(
        hdr(**SIEMENS_MPRAGE, contrast_agent="Gadovist", series_description="T1 nativ")
    )
    assert verdict.label is L.T1C
    assert verdict.confidence <= 0.7
    assert "although the description says pre-contrast" in verdict.reason


def test_contrast_agent_does_not_change_t2_or_flair() -> None:
    assert classify_by_tags(hdr(**GE_T2, contrast_agent="Gd")).label is L.T2
    assert classify_by_tags(hdr(**PHILIPS_FLAIR, contrast_agent="Gd")).label is L.FLAIR


def test_description_only_when_physics_is_missing() -> None:
    verdict = classify_by_tags(hdr(series_description="AX FLAIR"))
    assert verdict.label is L.FLAIR
    assert verdict.rule == "description"
    assert verdict.confidence == pytest.approx(0.6)


def test_blank_headers_abstain() -> None:
    verdict = classify_by_tags(hdr())
    assert verdict.label is None
    assert verdict.rule == "abstain"
    assert verdict.confidence == 0.0


def test_dti_description_does_not_veto_raw_dwi() -> None:
    verdict = classify_by_tags(
        hdr(
            series_description="DTI_30dir",
            image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"),
            b_values=(0.0, 1000.0),
        )
    )
    assert verdict.label is L.DWI


def test_dixon_pair_is_not_a_field_map() -> None:
    verdict = classify_by_tags(
        hdr(
            image_type=("ORIGINAL", "PRIMARY", "DIXON", "IN_PHASE"),
            scanning_sequence=("GR",),
            repetition_time_ms=6.0,
            echo_time_ms=2.4,
            echo_times_ms=(2.4, 4.8),
            flip_angle_deg=10.0,
        )
    )
    assert verdict.rule != "field-map"


def test_siemens_trace_and_enhanced_diffusion_contrast() -> None:
    trace = classify_by_tags(hdr(image_type=("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW")))
    enhanced = classify_by_tags(
        hdr(sop_class_uid=ENH_MR, acquisition_contrast=("DIFFUSION",), echo_pulse_sequence="SPIN")
    )
    assert trace.label is L.DWI and trace.rule == "dwi-trace"
    assert enhanced.label is L.DWI and enhanced.rule == "dwi-imagetype"


# --- vote ---


def test_vote_majority_and_fraction() -> None:
    label, votes, fraction = vote_slices([L.T1, L.T1, L.T1C, L.T1, L.T2])
    assert label is L.T1
    assert votes == ((L.T1, 3), (L.T1C, 1), (L.T2, 1))
    assert fraction == pytest.approx(0.6)


def test_vote_tie_is_deterministic() -> None:
    assert vote_slices([L.T2, L.T1])[0] is L.T1
    assert vote_slices([L.FLAIR, L.T2, L.FLAIR, L.T2])[0] is L.T2


def test_vote_needs_slices() -> None:
    with pytest.raises(ValueError, match="at least one"):
        vote_slices([])


def test_cnn_verdict_confidence_is_fraction_times_mean_probability() -> None:
    verdict = cnn_verdict([L.FLAIR, L.FLAIR, L.T2, L.FLAIR], [0.9, 0.7, 0.6, 0.8])
    assert verdict.label is L.FLAIR
    assert verdict.n_slices == 4
    assert verdict.confidence == pytest.approx(0.75 * 0.8)
    with pytest.raises(ValueError):
        cnn_verdict([L.T1], [0.5, 0.5])


# --- fusion ---


def tag(label: SequenceLabel | None, conf: float = 0.9) -> TagVerdict:
    return TagVerdict(label=label, confidence=conf if label else 0.0, rule="r", reason="why")


def cnn(label: SequenceLabel, conf: float = 0.8) -> CnnVerdict:
    return CnnVerdict(label=label, confidence=conf, votes=((label, 7), (L.OTHER, 2)), n_slices=9)


def test_fuse_agreement_is_more_confident_than_either() -> None:
    d = fuse("1.2", tag(L.T2, 0.9), cnn(L.T2, 0.8))
    assert d.label is L.T2 and d.method is DecisionMethod.FUSED
    assert d.confidence == pytest.approx(0.98)
    assert d.tag_label is L.T2 and d.cnn_label is L.T2
    assert d.cnn_votes == ((L.T2, 7), (L.OTHER, 2))


def test_fuse_disagreement_keeps_a_confident_tag_label_and_records_both() -> None:
    d = fuse("1.2", tag(L.T1, 0.8), cnn(L.T2, 0.8))
    assert d.label is L.T1 and d.method is DecisionMethod.TAGS
    assert d.confidence == pytest.approx(0.5)  # lowered: 0.8 x (1 - 0.8 / 2) = 0.48, floor 0.5
    assert (d.tag_label, d.cnn_label) == (L.T1, L.T2)
    assert any(r.startswith("tags T1") for r in d.reasons)
    assert any(r.startswith("CNN T2") for r in d.reasons)
    assert "never overturned" in d.reasons[-1]


def test_fuse_unsure_tag_label_contradicted_follows_the_policy() -> None:
    unsure = tag(L.DWI, 0.4)
    assert fuse("1.2", unsure, cnn(L.T2, 0.9)).label is L.OTHER
    prefer_cnn = fuse("1.2", unsure, cnn(L.T2, 0.9), FusionPolicy(unsure_tags="cnn"))
    assert prefer_cnn.label is L.T2 and prefer_cnn.evidence is EvidenceKind.CNN


def test_fuse_cnn_contrast_opinion_counts_only_when_the_policy_says_so() -> None:
    open_t1 = TagVerdict(label=L.T1, confidence=0.9, rule="r", reason="why", open_labels=(L.T1C,))
    family = fuse("1.2", open_t1, cnn(L.T1C, 0.9))
    assert family.label is L.T1 and family.cnn_label is L.T1C
    assert family.method is DecisionMethod.FUSED
    chosen = fuse("1.2", open_t1, cnn(L.T1C, 0.9), FusionPolicy(cnn_decides_contrast=True))
    assert chosen.label is L.T1C and chosen.method is DecisionMethod.CNN
    # a T1C the agent tag decided leaves nothing open: the CNN cannot choose T1
    closed = fuse("1.2", tag(L.T1C, 0.9), cnn(L.T1, 0.9), FusionPolicy(cnn_decides_contrast=True))
    assert closed.label is L.T1C and closed.method is DecisionMethod.TAGS
    assert fuse("1.2", tag(L.T1, 0.9), cnn(L.FLAIR, 0.9)).label is L.T1


def test_fuse_tags_only_and_low_confidence() -> None:
    only = fuse("1.2", tag(L.FLAIR, 0.6), None)
    assert only.label is L.FLAIR and only.method is DecisionMethod.TAGS
    assert only.confidence == pytest.approx(0.6)
    assert only.cnn_label is None and only.cnn_votes == ()
    low = fuse("1.2", tag(L.FLAIR, 0.4), None)
    assert low.label is L.OTHER


def test_fuse_cnn_only_above_threshold() -> None:
    assert fuse("1.2", tag(None), cnn(L.T2, 0.7)).label is L.T2
    assert fuse("1.2", tag(None), cnn(L.T2, 0.7)).method is DecisionMethod.CNN
    assert fuse("1.2", tag(None), cnn(L.T2, 0.5)).label is L.OTHER
    assert fuse("1.2", None, cnn(L.T2, 0.7)).label is L.T2


def test_fuse_nothing_is_other_with_zero_confidence() -> None:
    d = fuse("1.2", tag(None), None)
    assert d.label is L.OTHER and d.confidence == 0.0
    assert d.tag_label is None


def test_fuse_agreement_below_minimum_is_other() -> None:
    d = fuse("1.2", tag(L.T2, 0.3), cnn(L.T2, 0.3))
    assert d.label is L.OTHER


# --- study context ---


def t1_series(uid: str, number: int, start_s: float, **kw: Any) -> SeriesHeader:
    return hdr(
        **{
            **SIEMENS_MPRAGE,
            "series_uid": uid,
            "series_number": number,
            "protocol_name": "t1_mprage_sag",
            "acquisition_times": (start_s, start_s + 300.0),
            **kw,
        }
    )


def test_study_context_pre_post_by_contrast_tag() -> None:
    pre = t1_series("1.1", 3, 36000.0)
    post = t1_series("1.2", 9, 37800.0, contrast_agent="Dotarem")
    decisions = classify_headers([post, pre])  # order in the folder does not matter
    assert [d.label for d in decisions] == [L.T1C, L.T1]


def test_study_context_cnn_t1c_vote_is_no_contrast_evidence() -> None:
    pre = t1_series("1.1", 3, 36000.0)
    post = t1_series("1.2", 9, 37800.0)
    decisions = (
        fuse("1.1", classify_by_tags(pre), cnn(L.T1, 0.8)),
        fuse("1.2", classify_by_tags(post), cnn(L.T1C, 0.8)),
    )
    # tags T1 vs CNN T1C: the CNN agrees on the T1 family and leaves contrast to the tags
    assert decisions[1].label is L.T1 and decisions[1].method is DecisionMethod.FUSED
    assert "contrast decided by the tags" in decisions[1].reasons[-1]
    out = apply_study_context(decisions, [pre, post])
    assert [d.label for d in out] == [L.T1, L.T1]
    assert "not assumed post-contrast" in out[1].reasons[-1]


def test_study_context_leaves_single_or_unmatched_series() -> None:
    pre = t1_series("1.1", 3, 36000.0)
    other_protocol = t1_series(
        "1.2", 9, 37800.0, protocol_name="t1_se_tra", repetition_time_ms=600.0
    )
    decisions = classify_headers([pre, other_protocol])
    assert [d.label for d in decisions] == [L.T1, L.T1]
    assert all(d.method is DecisionMethod.TAGS for d in decisions)
    assert contrast_questions(decisions, [pre, other_protocol]) == ()


@pytest.mark.parametrize("renamed", ["T1 AX", "", "t1_mprage_sag_POST_renamed"])
def test_a_renamed_run_of_the_same_physics_is_one_protocol(renamed: str) -> None:
    # The operator named the post-contrast run differently (or not at all, or misleadingly as
    # another plane): the scanner played the same sequence with the same timing, so the two runs
    # are compared; the images decide.
    pre = t1_series("1.1", 3, 36000.0)
    post = t1_series("1.2", 9, 36900.0, protocol_name=renamed, series_description=renamed)
    pairs = contrast_questions(classify_headers([pre, post]), [pre, post])
    assert pairs == (
        ContrastPair(earlier_uid="1.1", earlier_number=3, later_uid="1.2", later_number=9),
    )
    seen = classify_headers([pre, post], image_evidence={pairs[0]: image(True)})
    assert [d.label for d in seen] == [L.T1, L.T1C]
    assert seen[1].evidence is EvidenceKind.ORDER_IMAGE
    other_flip = t1_series("1.2", 9, 36900.0, protocol_name=renamed, flip_angle_deg=15.0)
    assert contrast_questions(classify_headers([pre, other_flip]), [pre, other_flip]) == ()


def test_study_context_exam_level_contrast_tag_makes_the_earlier_run_pre() -> None:
    a = t1_series("1.1", 3, 36000.0, contrast_agent="Gd")
    b = t1_series("1.2", 9, 37800.0, contrast_agent="Gd")
    decisions = classify_headers([a, b])
    assert [d.label for d in decisions] == [L.T1, L.T1C]
    assert decisions[0].method is DecisionMethod.STUDY_CONTEXT
    assert "entered for the whole exam" in decisions[0].reasons[-1]
    # Words on the series (not just the exam-level tag) are believed as they are.
    c = t1_series("1.3", 3, 36000.0, contrast_agent="Gd", series_description="T1 post")
    d = t1_series("1.4", 9, 37800.0, contrast_agent="Gd", series_description="T1 post")
    assert [x.label for x in classify_headers([c, d])] == [L.T1C, L.T1C]


def test_study_context_needs_aligned_inputs() -> None:
    a = t1_series("1.1", 3, 36000.0)
    d = fuse("9.9", tag(L.T1), None)
    with pytest.raises(ValueError):
        apply_study_context([d], [a])
    with pytest.raises(ValueError):
        apply_study_context([d], [])


def test_study_context_other_studies_are_separate() -> None:
    pre = t1_series("1.1", 3, 36000.0)
    post_elsewhere = replace(t1_series("1.2", 9, 37800.0, contrast_agent="Gd"), study_uid="7.7")
    decisions = classify_headers([pre, post_elsewhere])
    assert decisions[0].label is L.T1 and decisions[0].method is DecisionMethod.TAGS
    assert isinstance(decisions[1], SequenceDecision)


def test_single_shot_t2_with_short_tr_is_t2() -> None:
    verdict = classify_by_tags(
        hdr(sequence_name="*h2d1_320", repetition_time_ms=1000.0, echo_time_ms=91.0)
    )
    assert verdict.label is L.T2 and verdict.rule == "t2-ssfse"


def test_time_of_flight_is_not_a_t1_even_without_description() -> None:
    verdict = classify_by_tags(
        hdr(
            manufacturer="ge",
            scanning_sequence=("GR",),
            scan_options=("TOF_GEMS", "FAST_GEMS"),
            repetition_time_ms=24.0,
            echo_time_ms=3.4,
            flip_angle_deg=20.0,
        )
    )
    assert verdict.label is L.OTHER and verdict.rule == "angiography"


def test_study_context_order_alone_never_makes_t1c() -> None:
    pre = t1_series("1.1", 3, 36000.0)
    post = t1_series("1.2", 9, 36900.0)  # starts 10 min after pre ended, no tag, no words
    decisions = classify_headers([pre, post])
    assert [d.label for d in decisions] == [L.T1, L.T1]
    assert all(d.method is DecisionMethod.TAGS for d in decisions)
    assert "no contrast evidence (agent tag, description or images)" in decisions[1].reasons[-1]


def image(post: bool | None, reason: str = "test") -> ContrastEvidence:
    return ContrastEvidence(
        post_contrast=post,
        score=0.05 if post else 0.0,
        enhanced_fraction=0.05 if post else 0.0,
        darkened_fraction=0.0,
        n_voxels=10000,
        reason=reason,
    )


def test_study_context_image_evidence_splits_pre_and_post() -> None:
    pre = t1_series("1.1", 3, 36000.0)
    post = t1_series("1.2", 9, 36900.0)
    first = classify_headers([pre, post])
    pairs = contrast_questions(first, [pre, post])
    assert pairs == (
        ContrastPair(earlier_uid="1.1", earlier_number=3, later_uid="1.2", later_number=9),
    )
    decisions = classify_headers([pre, post], image_evidence={pairs[0]: image(True, "bright")})
    assert [d.label for d in decisions] == [L.T1, L.T1C]
    assert decisions[1].method is DecisionMethod.STUDY_CONTEXT
    assert decisions[1].evidence is EvidenceKind.ORDER_IMAGE
    assert "bright" in decisions[1].reasons[-1]
    assert decisions[0].evidence is EvidenceKind.TAGS
    undecided = classify_headers([pre, post], image_evidence={pairs[0]: image(None)})
    assert [d.label for d in undecided] == [L.T1, L.T1]


def test_study_context_no_enhancement_never_overrules_the_headers_contrast_evidence() -> None:
    # A normal brain enhances little beyond its vessels (a phantom not at all): the absence of
    # enhancement is weak evidence and keeps the header's word; enhancement found is strong.
    pre = t1_series("1.1", 3, 36000.0)
    named_post = t1_series("1.2", 9, 36900.0, series_description="AX T1 POST")
    pairs = contrast_questions(classify_headers([pre, named_post]), [pre, named_post])
    assert [d.label for d in classify_headers([pre, named_post])] == [L.T1, L.T1C]
    flat = classify_headers([pre, named_post], image_evidence={pairs[0]: image(False)})
    assert [d.label for d in flat] == [L.T1, L.T1C]
    assert "header's contrast evidence is kept" in flat[1].reasons[-1]
    unnamed = t1_series("1.2", 9, 36900.0)
    seen = classify_headers([pre, unnamed], image_evidence={pairs[0]: image(True)})
    assert [d.label for d in seen] == [L.T1, L.T1C]  # silent headers: the images decide
    assert seen[1].evidence is EvidenceKind.ORDER_IMAGE
    tagged = t1_series("1.2", 9, 36900.0, contrast_agent="Gadovist")
    kept = classify_headers([pre, tagged], image_evidence={pairs[0]: image(False)})
    assert [d.label for d in kept] == [L.T1, L.T1C]
    assert "agent tag on this run alone is kept" in kept[1].reasons[-1]


def test_study_context_image_evidence_makes_an_exam_level_tagged_earlier_run_pre() -> None:
    a = t1_series("1.1", 3, 36000.0, contrast_agent="Gd")
    b = t1_series("1.2", 9, 36400.0, contrast_agent="Gd")  # no gap: headers cannot split them
    assert [d.label for d in classify_headers([a, b])] == [L.T1C, L.T1C]
    pair = contrast_questions(classify_headers([a, b]), [a, b])[0]
    out = classify_headers([a, b], image_evidence={pair: image(True)})
    assert [d.label for d in out] == [L.T1, L.T1C]
    assert out[0].evidence is EvidenceKind.ORDER_IMAGE


def test_contrast_questions_skip_copies_of_one_acquisition() -> None:
    pre = t1_series("1.1", 3, 36000.0)
    norm_copy = t1_series("1.3", 5, 36000.0)  # ND and NORM copies: no injection in between
    assert contrast_questions(classify_headers([pre, norm_copy]), [pre, norm_copy]) == ()
    with pytest.raises(ValueError):
        contrast_questions(classify_headers([pre]), [pre, norm_copy])


def test_study_context_immediate_repeat_or_same_acquisition_stays_t1() -> None:
    pre = t1_series("1.1", 3, 36000.0)
    repeat = t1_series("1.2", 4, 36330.0)  # 30 s after pre ended: a motion repeat
    assert [d.label for d in classify_headers([pre, repeat])] == [L.T1, L.T1]
    norm_copy = t1_series("1.3", 5, 36000.0)  # ND and NORM copies of one acquisition
    assert [d.label for d in classify_headers([pre, norm_copy])] == [L.T1, L.T1]


def test_derived_diffusion_without_b_values_is_a_map() -> None:
    derived = ("DERIVED", "PRIMARY", "DIFFUSION", "NONE")
    adc = classify_by_tags(hdr(image_type=derived, series_description="dADC"))
    unknown = classify_by_tags(hdr(image_type=derived))
    original = classify_by_tags(hdr(image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE")))
    assert (adc.label, adc.rule) == (L.ADC, "adc-derived")
    assert (unknown.label, unknown.rule) == (L.OTHER, "diffusion-derived")
    assert (original.label, original.rule) == (L.DWI, "dwi-imagetype")


def test_derived_image_described_as_mpr_is_a_reformat_but_mpr_alone_is_t1() -> None:
    derived = classify_by_tags(
        hdr(image_type=("DERIVED", "PRIMARY", "T1", "NONE"), series_description="t1_MPR_cor")
    )
    original = classify_by_tags(hdr(**SIEMENS_MPRAGE, series_description="T1_MPR_sag"))
    assert (derived.label, derived.rule) == (L.OTHER, "reformat")
    assert original.label is L.T1


def test_enhanced_time_of_flight_and_phase_contrast_flags() -> None:
    tof = classify_by_tags(hdr(scan_options=("TOF",), scanning_sequence=("GR",)))
    pc = classify_by_tags(hdr(scan_options=("PHASE_CONTRAST",)))
    assert (tof.label, tof.rule) == (L.OTHER, "angiography")
    assert (pc.label, pc.rule) == (L.OTHER, "angiography")


@pytest.mark.parametrize(
    ("image_type", "label"),
    [
        (("ORIGINAL", "PRIMARY", "P_FFE", "P", "FFE"), L.OTHER),  # Philips phase
        (("ORIGINAL", "PRIMARY", "R_IR", "R", "IR"), L.OTHER),  # Philips real
        (("DERIVED", "PRIMARY", "EADC_UNSPECIFIED", "EADC"), L.OTHER),  # Philips exponential ADC
        (("DERIVED", "PRIMARY", "FA_UNSPECIFIED", "FA"), L.OTHER),  # Philips FA
        (("ORIGINAL", "PRIMARY", "ADC_UNSPECIFIED", "ADC"), L.ADC),
        (("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), L.T2),  # magnitude: physics decides
    ],
)
def test_philips_image_type_tokens(image_type: tuple[str, ...], label: SequenceLabel) -> None:
    kw = {**GE_T2, "manufacturer": "philips", "image_type": image_type}
    assert classify_by_tags(hdr(**kw)).label is label


def test_ge_exponential_adc_description_is_not_adc() -> None:
    verdict = classify_by_tags(
        hdr(
            manufacturer="ge",
            series_description="Exponential Apparent Diffusion Coefficient",
            scanning_sequence=("EP", "SE"),
            image_type=("DERIVED", "PRIMARY", "OTHER"),
            echo_time_ms=80.0,
        )
    )
    assert verdict.label is L.OTHER

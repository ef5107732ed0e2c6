"""Sequence tag rules: one series' headers in, a TagVerdict out.

Pure: records in, records out; no torch, DICOM reading, sockets or files (a unit test checks the
imports). The rules read the acquisition physics first (ImageType, b-values, scanning sequence,
TR/TE/TI, temporal positions, contrast agent) and use descriptions only as weaker evidence,
because descriptions lie in about one series in ten. A description may always veto to OTHER
(fMRI, field map, ASL, localizer...): OTHER is never routed, so a false OTHER costs a missed
series, while a false routable label would feed a tumour model the wrong images.

Why this module is long: it is the table of tag rules, one small function per rule, read top to
bottom in the order they fire; splitting it would hide that order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from node.records import EvidenceKind, SequenceLabel, SeriesHeader, TagVerdict

L = SequenceLabel

MR_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    }
)

_REFORMAT_TOKENS = frozenset(
    {
        "MPR",
        "CSA MPR",
        "CSAMPR",
        "MPR THICK",
        "CSA MPR THICK",
        "REFORMATTED",
        "RESAMPLED",
        "CSA RESAMPLED",
        "PROJECTION IMAGE",
        "PROJECTION",
        "MIP",
        "MNIP",
        "MINIP",
        "CSA MIP",
        "VOLUME RENDERING",
        "VR",
        "SUB",
        "SUBTRACT",
        "SUBTRACTION",
        "CSAPARALLEL",
        "CSA PARALLEL",
        "3D",
    }
)
_PHASE_TOKENS = frozenset(
    {
        "P",
        "PHASE",
        "PHASE MAP",
        "R",
        "REAL",
        "I",
        "IMAGINARY",
        "FIELD_MAP",
        "B0",
        "B0MAP",
        "B0 MAP",
        "VELOCITY",
        "FLOW_ENCODED",
    }
)
_PERFUSION_TOKENS = frozenset(
    {"ASL", "PERFUSION", "RCBF", "CBF", "RELCBF", "CBV", "RCBV", "MTT", "TTP", "TMAX", "PWI"}
)
_DIFFUSION_DERIVED_OTHER = frozenset(
    {
        "FA",
        "COLFA",
        "COL_FA",
        "FA_SE",
        "TENSOR",
        "TENSOR_B0",
        "TENSOR_TRACEW",
        "EADC",
        "EXP",
        "EXPONENTIAL",
        "EXP_ADC",
        "RA",
        "MD",
        "AD",
        "RD",
        "ISOTROPIC_FA",
    }
)
_REFORMAT_WORDS = r"\b(mpr|mprs|reformat\w*|reconstruct\w*|mip|mnip|minip|curved|thick ?slab)\b"
# Susceptibility-weighted magnitude, phase and minimum-intensity projections: Siemens SWI / MNIP,
# GE SWAN, Philips SWIp frames typed SW_M_FFE / SW_P_FFE (their first part, SW, is matched).
_SUSCEPTIBILITY_TOKENS = frozenset(
    {"SWI", "SW", "SWIP", "SWAN", "MNIP", "MINIP", "T2_STAR", "T2STAR", "R2STAR", "QSM"}
)
_DIXON_TOKENS = frozenset({"DIXON", "IN_PHASE", "OUT_PHASE", "OPP_PHASE", "WATER", "FAT"})

# Description keywords that make a series OTHER whatever its physics (regexes on a normalised
# lower-case text where every run of punctuation is one space).
_OTHER_WORDS: tuple[tuple[str, str], ...] = (
    (r"\b(bold|fmri|f mri|resting|rest\d*|rsfmri|task)\b", "fMRI"),
    (r"\b(field ?map\w*|fmap|b0 ?map|b0map|b0rf|3db0map|b0|shim|phase ?diff\w*)\b", "field map"),
    (
        r"\b(asl|pcasl|pasl|casl|perfusion\w*|perf|cbf|relcbf|rcbf|cbv|rcbv|dsc|dce|ttp|mtt|tmax)\b",
        "ASL",
    ),
    (r"\b(dir|double ?ir|psir|mp2rage|inv1|inv2|t1 ?map\w*|t2 ?map\w*|mapit)\b", "map"),
    (
        r"\b(localizer|localiser|locali[sz]er\w*|scout|survey|3 ?plane|tri ?pilot|aahead\w*)\b",
        "loc",
    ),
    (r"\b(loc|aascout|cal|calibration|coil ?cal|refscan|asset ?cal|sense ?ref)\b", "calibration"),
    (r"\b(swi|swan|swip|sw ?an|t2 ?star|t2\*|hemo|mnip|qsm|venobold|gre ?t2\*?)\b", "T2*/SWI"),
    (r"\b(tof|angio|mra|mrv|pc ?mra|venogra\w*|arteriogra\w*)\b", "angiography"),
    (r"\b(mip|mpr ?thick|reformat\w*|subtract\w*)\b", "reformat/MIP"),
    (
        r"\b(fa|colfa|col fa|tensor\w*|trace ?fa|eadc|exp ?adc|exponential\w*|tractography|"
        r"fibre\w*|fiber\w*)\b",
        "DTI",
    ),
    (r"\b(svs|csi|spectro\w*|mrs|press|steam|chemical ?shift)\b", "spectroscopy"),
    (r"\b(report|phoenix\w*|screen ?save\w*)\b", "document"),
    (r"\b(cine|qflow|csf ?flow|velocity|phase ?contrast)\b", "flow"),
)

_DESC_LABEL: tuple[tuple[str, SequenceLabel], ...] = (
    (r"\b(adc|apparent ?diffusion\w*|dadc)\b", L.ADC),
    (r"\b(dwi|diff\w*|trace\w*|ep2d ?diff|b ?1000|b1000|dti|resolve|dwi\w*)\b", L.DWI),
    (r"\b(t1 ?flair|t1flair|flair ?t1)\b", L.T1),
    (r"\b(flair\w*|tirm\w*|dark ?fluid|darkfluid|space ?flair)\b", L.FLAIR),
    (r"\b(t2\w*|tse ?t2|t2 ?tse|haste|ssfse|space ?t2|cube ?t2|vista ?t2)\b", L.T2),
    (
        r"\b(t1\w*|mprage|mp ?rage|tfl|bravo|spgr|fspgr|tfe|vibe|star ?vibe|flash|mpr|t1c|t1ce)\b",
        L.T1,
    ),
)

CONTRAST_WORDS = (
    # '+C', '+GD', '+KM' may be glued to the word before ('T1W_3D_TFE+C'); the rest are words
    r"(?:\+ ?(?:c|gd|km)|(?<![a-z0-9])(?:c ?\+|gd|gad\w*|gado\w*|post\w*|km|ce|contrast|"
    r"mdc|kontrast\w*|t1c|t1ce|t1 ?c|t1gd|enh\w*|dotarem|gadavist|prohance|magnevist|"
    r"multihance|clariscan))(?![a-z0-9])"
)
PRE_WORDS = (
    r"\b(pre|pre ?contrast|pre ?gd|pre ?gad|pre ?c|pre ?km|nativ|native|noncontrast|"
    r"non ?contrast|without|w o|wo|sans|ohne)\b"
)


def normalise_text(text: str) -> str:
    """Lower-case text with punctuation runs as single spaces (keeps + and * for +C, T2*)."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)  # camelCase -> camel Case
    return " " + re.sub(r"[^a-z0-9+*]+", " ", text.lower()).strip() + " "


def description_text(h: SeriesHeader) -> str:
    """Series description and protocol name, normalised for the keyword patterns."""
    return normalise_text(f"{h.series_description} {h.protocol_name}")


def _matching(tokens: set[str], names: frozenset[str]) -> list[str]:
    """ImageType tokens in ``names``, also in Philips form (ADC_SE, P_FFE, EADC_UNSPECIFIED)."""
    return sorted(t for t in tokens if t in names or t.split("_")[0] in names)


def _abstain(reason: str) -> TagVerdict:
    return TagVerdict(label=None, confidence=0.0, rule="abstain", reason=reason)


def _verdict(
    label: SequenceLabel,
    confidence: float,
    rule: str,
    reason: str,
    evidence: EvidenceKind = EvidenceKind.TAGS,
) -> TagVerdict:
    return TagVerdict(
        label=label, confidence=round(confidence, 3), rule=rule, reason=reason, evidence=evidence
    )


def fmt_number(value: float | None) -> str:
    """A header number for a reason, "?" when absent."""
    return "?" if value is None else f"{value:g}"


def _b_note(h: SeriesHeader) -> str:
    return f" ({h.b_values_note})" if h.b_values_note else ""


def _physics_text(h: SeriesHeader) -> str:
    return (
        f"TR {fmt_number(h.repetition_time_ms)} TE {fmt_number(h.echo_time_ms)} "
        f"TI {fmt_number(h.inversion_time_ms)} flip {fmt_number(h.flip_angle_deg)}"
    )


# --- the rules, in order: each returns a verdict or None (does not apply) ---------------------


def _rule_not_mr_image(h: SeriesHeader) -> TagVerdict | None:
    if h.modality and h.modality != "MR":
        return _verdict(L.OTHER, 0.97, "not-mr", f"modality {h.modality}, not MR")
    if h.sop_class_uid and h.sop_class_uid not in MR_IMAGE_SOP_CLASSES:
        return _verdict(L.OTHER, 0.97, "not-mr-image", f"SOP class {h.sop_class_uid}")
    return None


def _rule_colour(h: SeriesHeader) -> TagVerdict | None:
    photometric = h.photometric_interpretation
    if h.samples_per_pixel > 1 or photometric.startswith(("RGB", "YBR", "PALETTE")):
        return _verdict(L.OTHER, 0.97, "colour", f"colour image ({photometric or 'RGB'})")
    return None


def _rule_localizer(h: SeriesHeader) -> TagVerdict | None:
    if "LOCALIZER" in h.image_type:
        return _verdict(L.OTHER, 0.97, "localizer", "ImageType LOCALIZER")
    if h.is_localizer:
        planes = "/".join(h.orientations)
        return _verdict(L.OTHER, 0.9, "localizer", f"few images in several planes ({planes})")
    return None


def _rule_reformat(h: SeriesHeader) -> TagVerdict | None:
    tokens = set(h.image_type)
    found = sorted(tokens & _REFORMAT_TOKENS - {"3D"})
    if found and ("DERIVED" in tokens or "SECONDARY" in tokens):
        return _verdict(L.OTHER, 0.92, "reformat", f"derived reformat/projection ({found[0]})")
    if {"DERIVED", "SECONDARY"} <= tokens and "3D" in tokens:
        return _verdict(L.OTHER, 0.85, "reformat", "ImageType DERIVED\\SECONDARY 3D reformat")
    if "DERIVED" in tokens and re.search(_REFORMAT_WORDS, description_text(h)):
        return _verdict(L.OTHER, 0.85, "reformat", "derived image described as a reformat")
    return None


def _is_field_map_name(name: str) -> bool:
    n = name.lower().lstrip("*")
    return bool(re.match(r"fm\d", n)) or "b0map" in n or "b0rf" in n or "fieldmap" in n


def _rule_phase_or_field_map(h: SeriesHeader) -> TagVerdict | None:
    tokens = set(h.image_type)
    phase = _matching(tokens, _PHASE_TOKENS)
    if phase:
        return _verdict(L.OTHER, 0.95, "phase/field-map", f"ImageType {'/'.join(phase)}")
    parts = set(h.complex_parts) - {"MAGNITUDE"}
    if parts and "MIXED" not in parts:
        return _verdict(L.OTHER, 0.93, "phase/field-map", f"complex component {sorted(parts)[0]}")
    if _is_field_map_name(h.sequence_name):
        return _verdict(L.OTHER, 0.93, "field-map", f"field-map sequence {h.sequence_name}")
    gre = "GR" in h.scanning_sequence or h.echo_pulse_sequence == "GRADIENT"
    tes = h.echo_times_ms
    tr = h.repetition_time_ms
    dual_echo = len(tes) == 2 and tes[-1] < 15 and 0.5 < tes[1] - tes[0] < 5
    if gre and dual_echo and (tr or 0) >= 100 and not tokens & _DIXON_TOKENS:
        # Dixon pairs have the same echo spacing but a short TR (3D VIBE/mDixon): not a field map.
        return _verdict(
            L.OTHER, 0.85, "field-map", f"dual-echo GRE magnitude, TE {tes[0]:g}/{tes[1]:g}"
        )
    return None


def _rule_maps_and_angiography(h: SeriesHeader) -> TagVerdict | None:
    """Quantitative maps (T1/T2/B1 maps), susceptibility images and time-of-flight angiography."""
    tokens = set(h.image_type)
    maps = sorted(t for t in tokens if t.endswith(("MAP", "_MAP", " MAP")) and t != "FIELD_MAP")
    if maps:
        return _verdict(L.OTHER, 0.93, "quantitative-map", f"ImageType {maps[0]}")
    swi = _matching(tokens, _SUSCEPTIBILITY_TOKENS)
    if swi:
        return _verdict(L.OTHER, 0.93, "susceptibility", f"ImageType {swi[0]}")
    # Enhanced MR AcquisitionContrast (PS3.3 C.8.13.1.1): T2* and time-of-flight are never
    # routable whatever TR/TE say (SWI runs at a T1-like short TR with a low flip angle).
    if "T2_STAR" in h.acquisition_contrast:
        return _verdict(L.OTHER, 0.9, "susceptibility", "AcquisitionContrast T2_STAR")
    if {"TOF", "FLOW_ENCODED"} & set(h.acquisition_contrast):
        return _verdict(L.OTHER, 0.9, "angiography", "AcquisitionContrast TOF/FLOW_ENCODED")
    name = h.sequence_name.lower()
    if "PHASE_CONTRAST" in h.scan_options:
        return _verdict(L.OTHER, 0.9, "angiography", "phase-contrast flow/angiography")
    tof_option = any("TOF" in option for option in h.scan_options)
    if tof_option or "tof" in name or re.search(r"fl3d\d*r?_t\d+", name):
        return _verdict(
            L.OTHER, 0.9, "angiography", f"time-of-flight angiography ({h.sequence_name or 'TOF'})"
        )
    return None


def _rule_perfusion(h: SeriesHeader) -> TagVerdict | None:
    found = _matching(set(h.image_type), _PERFUSION_TOKENS)
    if found:
        return _verdict(L.OTHER, 0.95, "perfusion/ASL", f"ImageType {'/'.join(found)}")
    if "PERFUSION" in h.acquisition_contrast:
        return _verdict(L.OTHER, 0.93, "perfusion/ASL", "AcquisitionContrast PERFUSION")
    return None


def _rule_diffusion(h: SeriesHeader) -> TagVerdict | None:
    tokens = set(h.image_type)
    derived_other = _matching(tokens, _DIFFUSION_DERIVED_OTHER)
    if derived_other:
        return _verdict(
            L.OTHER, 0.95, "diffusion-map", f"diffusion-derived map ({derived_other[0]})"
        )
    adc = sorted(t for t in tokens if t == "ADC" or t.startswith("ADC_") or t == "DADC")
    if adc:
        return _verdict(L.ADC, 0.96, "adc", f"ImageType {adc[0]}")
    max_b = max(h.b_values) if h.b_values else None
    diffusion_type = bool(tokens & {"DIFFUSION", "TRACEW", "TRACE", "ISOTROPIC", "DWI"})
    diffusion_type = diffusion_type or "DIFFUSION" in h.acquisition_contrast
    trace = sorted(tokens & {"TRACEW", "TRACE"})
    if trace:
        return _verdict(
            L.DWI, 0.96, "dwi-trace", f"ImageType {trace[0]}, b {fmt_number(max_b)}{_b_note(h)}"
        )
    m = re.search(r"(?:^|[_*])(?:ep|re|ez|epse)?_?b(\d{2,5})t?\b", h.sequence_name.lower())
    name_b = float(m.group(1)) if m else None
    if max_b is None and name_b is not None:
        max_b = name_b
    if max_b is not None and max_b >= 400:
        return _verdict(L.DWI, 0.95, "dwi-bvalue", f"b-values up to {max_b:g} s/mm2{_b_note(h)}")
    if diffusion_type or (max_b is not None and 0 < max_b < 400):
        if max_b is not None and max_b <= 50:
            return _verdict(
                L.OTHER,
                0.85,
                "diffusion-b0",
                f"diffusion series with b <= {max_b:g} only{_b_note(h)}",
            )
        if max_b is not None:
            return _verdict(
                L.OTHER, 0.7, "diffusion-low-b", f"low b-values only (<= {max_b:g}){_b_note(h)}"
            )
        if "DERIVED" in tokens:
            # A derived diffusion image without b-values is a computed map, not a trace image
            # (trace images carry their b-value): only the description can say which map.
            text = description_text(h)
            said = None if _description_other(text) else _description_label(text)
            if said is L.ADC:
                return _verdict(
                    L.ADC,
                    0.75,
                    "adc-derived",
                    "derived diffusion image, description names ADC",
                    EvidenceKind.DESCRIPTION,
                )
            if said is L.DWI and not _description_other(description_text(h)):
                return _verdict(
                    L.DWI,
                    0.7,
                    "dwi-derived",
                    "derived diffusion image, description names DWI",
                    EvidenceKind.DESCRIPTION,
                )
            return _verdict(
                L.OTHER, 0.7, "diffusion-derived", "derived diffusion image of unknown kind"
            )
        return _verdict(L.DWI, 0.8, "dwi-imagetype", "ImageType DIFFUSION (b-values not recorded)")
    return None


def _rule_time_series(h: SeriesHeader) -> TagVerdict | None:
    if "FMRI" in h.image_type:
        return _verdict(L.OTHER, 0.96, "fmri", "ImageType FMRI")
    if h.n_temporal_positions >= 3:
        return _verdict(
            L.OTHER, 0.92, "time-series", f"{h.n_temporal_positions} temporal positions"
        )
    return None


def _is_epi(h: SeriesHeader) -> bool:
    name = h.sequence_name.lower().lstrip("*")
    return (
        "EP" in h.scanning_sequence
        or "EPI" in h.image_type
        or bool(re.match(r"ep(fid|se|i|2d|3d|_)", name))
        or "epi" in name
        or h.is_mosaic
    )


def _rule_epi_without_diffusion(h: SeriesHeader) -> TagVerdict | None:
    if not _is_epi(h):
        return None
    text = description_text(h)
    said = None if _description_other(text) else _description_label(text)
    if said in (L.DWI, L.ADC):
        # Diffusion EPI whose b-values and ImageType were not recorded (or were stripped): the
        # description is the only evidence left, so it decides with moderate confidence.
        return _verdict(
            said,
            0.7,
            "epi-description",
            f"EPI, description names {said}, no b-values recorded",
            EvidenceKind.DESCRIPTION,
        )
    ti, te = h.inversion_time_ms, h.echo_time_ms
    if ti is not None and ti >= 1400 and te is not None and te >= 70:
        return _verdict(L.FLAIR, 0.7, "epi-flair", f"EPI inversion recovery, {_physics_text(h)}")
    what = "mosaic " if h.is_mosaic else ""
    return _verdict(
        L.OTHER, 0.88, "epi", f"{what}EPI without diffusion weighting (BOLD/perfusion/reference)"
    )


def _family(h: SeriesHeader) -> str:
    """SE (spin echo family), GR (gradient echo) or "" from the standard and vendor tags."""
    scanning = set(h.scanning_sequence)
    if "GR" in scanning or h.echo_pulse_sequence == "GRADIENT":
        return "GR"
    if "SE" in scanning or h.echo_pulse_sequence == "SPIN":
        return "SE"
    name = h.sequence_name.lower().lstrip("*")
    if re.match(r"(tfl|fl\d|fl3d|fl2d|fgre|efgre|spgr|fspgr|bravo|ffe|t1ffe|tfe|gre|vibe)", name):
        return "GR"
    if re.match(r"(tse|ts\d|se\d|tir|spc|h2d|fse|frfse|ssfse|cube|tse|se|ir|vista)", name):
        return "SE"
    return ""


def _is_ir(h: SeriesHeader) -> bool:
    if h.inversion_recovery:
        return True
    if "IR" in h.scanning_sequence or {"IR", "IR_GEMS"} & set(h.scan_options):
        return True
    return h.inversion_time_ms is not None and h.inversion_time_ms > 0


def _rule_structural(h: SeriesHeader) -> TagVerdict | None:
    """T1 / T2 / FLAIR from TR, TE, TI and flip angle (contrast is added afterwards)."""
    tr, te, ti, flip = (
        h.repetition_time_ms,
        h.echo_time_ms,
        h.inversion_time_ms,
        h.flip_angle_deg,
    )
    physics = _physics_text(h)
    family = _family(h)
    if te is None:
        return None
    if len(h.echo_times_ms) >= 3 and family == "GR":
        return _verdict(L.OTHER, 0.85, "multi-echo-gre", f"{len(h.echo_times_ms)}-echo GRE")
    if _is_ir(h) and ti is not None and ti > 0:
        if ti >= 1400 and te >= 60:
            return _verdict(L.FLAIR, 0.93, "flair-ti", f"long-TI inversion recovery, {physics}")
        if 1200 <= ti < 1400 and te >= 80:
            return _verdict(L.FLAIR, 0.8, "flair-ti", f"inversion recovery, {physics}")
        if 300 <= ti < 1400 and te < 30:
            return _verdict(L.T1, 0.92, "t1-ir", f"T1-weighted inversion recovery, {physics}")
        if ti < 300 and te >= 30:
            return _verdict(L.OTHER, 0.75, "stir", f"short-TI inversion recovery (STIR), {physics}")
        return None
    if tr is None:
        return None
    if family == "GR":
        if te >= 15 and tr < 2000:
            return _verdict(L.OTHER, 0.8, "t2star-gre", f"T2*-weighted gradient echo, {physics}")
        if te < 15 and tr < 1000 and (flip is None or flip >= 8):
            return _verdict(L.T1, 0.85, "t1-gre", f"spoiled gradient echo, {physics}")
        return None
    if te >= 60 and tr >= 1500:
        return _verdict(L.T2, 0.9, "t2-se", f"long TE and TR spin echo, {physics}")
    if te >= 80 and tr >= 900 and family == "SE":
        # Single-shot fast spin echo (HASTE/SSFSE) runs at a short TR but is T2-weighted.
        return _verdict(L.T2, 0.8, "t2-ssfse", f"long-TE single-shot spin echo, {physics}")
    if family == "SE" and te < 30 and tr < 1000:
        return _verdict(L.T1, 0.88, "t1-se", f"short TE and TR spin echo, {physics}")
    if family == "SE" and te < 40 and tr >= 1500:
        return _verdict(L.OTHER, 0.75, "pd-se", f"proton-density spin echo, {physics}")
    return None


_PHYSICS_RULES: tuple[Callable[[SeriesHeader], TagVerdict | None], ...] = (
    _rule_not_mr_image,
    _rule_colour,
    _rule_localizer,
    _rule_reformat,
    _rule_maps_and_angiography,
    _rule_perfusion,
    _rule_diffusion,
    _rule_phase_or_field_map,
    _rule_time_series,
    _rule_epi_without_diffusion,
    _rule_structural,
)


def _description_other(text: str) -> str | None:
    for pattern, what in _OTHER_WORDS:
        if re.search(pattern, text):
            return what
    return None


def _description_label(text: str) -> SequenceLabel | None:
    for pattern, label in _DESC_LABEL:
        if re.search(pattern, text):
            return label
    return None


def contrast_evidence(h: SeriesHeader) -> str | None:
    """Why this series looks post-contrast (agent tag or description), or None."""
    if h.contrast_agent:
        return "contrast agent tag present"
    text = description_text(h)
    if re.search(CONTRAST_WORDS, text) and not re.search(PRE_WORDS, text):
        return "description says post-contrast"
    return None


def _with_contrast(h: SeriesHeader, verdict: TagVerdict) -> TagVerdict:
    """Turn a T1 verdict into T1C when the headers show contrast, and say why either way."""
    if verdict.label is not L.T1:
        return verdict
    text = description_text(h)
    pre = re.search(PRE_WORDS, text) is not None
    if h.contrast_agent:
        if pre:
            return replace(
                verdict,
                label=L.T1C,
                confidence=min(verdict.confidence, 0.7),
                reason=f"{verdict.reason}; contrast agent tag ({h.contrast_agent}) although "
                "the description says pre-contrast",
                open_labels=(L.T1,),
            )
        return replace(
            verdict,
            label=L.T1C,
            rule=f"{verdict.rule}+contrast",
            reason=f"{verdict.reason}; contrast agent tag ({h.contrast_agent})",
        )
    if not pre and re.search(CONTRAST_WORDS, text):
        return replace(
            verdict,
            label=L.T1C,
            rule=f"{verdict.rule}+contrast-description",
            confidence=min(verdict.confidence, 0.8),
            reason=f"{verdict.reason}; description says post-contrast",
            evidence=EvidenceKind.DESCRIPTION,
            open_labels=(L.T1,),
        )
    return replace(verdict, reason=f"{verdict.reason}; no contrast evidence", open_labels=(L.T1C,))


def classify_by_tags(h: SeriesHeader) -> TagVerdict:
    """Label one series from its headers: physics rules first, description as weaker evidence."""
    physics: TagVerdict | None = None
    for rule in _PHYSICS_RULES:
        physics = rule(h)
        if physics is not None:
            break
    text = description_text(h)
    other_word = _description_other(text)
    desc_label = _description_label(text)
    if physics is not None and physics.label is L.OTHER:
        return physics
    if physics is not None and physics.label in (L.DWI, L.ADC):
        return physics  # b-values / ImageType are decisive; descriptions often say "DTI"
    if other_word is not None:
        return _verdict(
            L.OTHER,
            0.8,
            "description-other",
            f"description names a non-routable series ({other_word})"
            + (f"; physics alone said {physics.label}" if physics else ""),
            EvidenceKind.DESCRIPTION,
        )
    if physics is not None and physics.label is not None:
        if desc_label is None or desc_label is physics.label:
            verdict = physics
            if desc_label == physics.label:
                verdict = replace(
                    physics,
                    confidence=round(min(0.98, physics.confidence + 0.04), 3),
                    reason=f"{physics.reason}; description agrees",
                )
        else:
            verdict = replace(
                physics,
                confidence=round(max(0.5, physics.confidence - 0.15), 3),
                reason=f"{physics.reason}; description suggests {desc_label} (physics wins)",
            )
        return _with_contrast(h, verdict)
    if desc_label is not None:
        verdict = _verdict(
            desc_label,
            0.6,
            "description",
            f"description only ({h.series_description or h.protocol_name!r}); "
            f"physics inconclusive ({_physics_text(h)})",
            EvidenceKind.DESCRIPTION,
        )
        return _with_contrast(h, verdict)
    return _abstain(f"no decisive tags ({_physics_text(h)}) and no usable description")

"""Sequence classification logic: tag rules, slice vote, tag/CNN fusion and study context.

Pure: records in, records out; no torch, DICOM reading, sockets or files (a unit test checks the
imports). The rules read the acquisition physics first (ImageType, b-values, scanning sequence,
TR/TE/TI, temporal positions, contrast agent) and use descriptions only as weaker evidence,
because descriptions lie in about one series in ten. A description may always veto to OTHER
(fMRI, field map, ASL, localizer...): OTHER is never routed, so a false OTHER costs a missed
series, while a false routable label would feed a tumour model the wrong images.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from node.records import (
    CnnVerdict,
    DecisionMethod,
    FusionPolicy,
    SequenceDecision,
    SequenceLabel,
    SeriesHeader,
    TagVerdict,
)

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
_SUSCEPTIBILITY_TOKENS = frozenset({"SWI", "MNIP", "T2_STAR", "T2STAR", "R2STAR", "QSM", "SWAN"})
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

_CONTRAST_WORDS = (
    # '+C', '+GD', '+KM' may be glued to the word before ('T1W_3D_TFE+C'); the rest are words
    r"(?:\+ ?(?:c|gd|km)|(?<![a-z0-9])(?:c ?\+|gd|gad\w*|gado\w*|post\w*|km|ce|contrast|"
    r"mdc|kontrast\w*|t1c|t1ce|t1 ?c|t1gd|enh\w*|dotarem|gadavist|prohance|magnevist|"
    r"multihance|clariscan))(?![a-z0-9])"
)
_PRE_WORDS = (
    r"\b(pre|pre ?contrast|pre ?gd|pre ?gad|pre ?c|pre ?km|nativ|native|noncontrast|"
    r"non ?contrast|without|w o|wo|sans|ohne)\b"
)


def _norm(text: str) -> str:
    """Lower-case text with punctuation runs as single spaces (keeps + and * for +C, T2*)."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)  # camelCase -> camel Case
    return " " + re.sub(r"[^a-z0-9+*]+", " ", text.lower()).strip() + " "


def _description(h: SeriesHeader) -> str:
    return _norm(f"{h.series_description} {h.protocol_name}")


def _matching(tokens: set[str], names: frozenset[str]) -> list[str]:
    """ImageType tokens in ``names``, also in Philips form (ADC_SE, P_FFE, EADC_UNSPECIFIED)."""
    return sorted(t for t in tokens if t in names or t.split("_")[0] in names)


def _abstain(reason: str) -> TagVerdict:
    return TagVerdict(label=None, confidence=0.0, rule="abstain", reason=reason)


def _verdict(label: SequenceLabel, confidence: float, rule: str, reason: str) -> TagVerdict:
    return TagVerdict(label=label, confidence=round(confidence, 3), rule=rule, reason=reason)


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _physics_text(h: SeriesHeader) -> str:
    return (
        f"TR {_fmt(h.repetition_time_ms)} TE {_fmt(h.echo_time_ms)} "
        f"TI {_fmt(h.inversion_time_ms)} flip {_fmt(h.flip_angle_deg)}"
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
    if "DERIVED" in tokens and re.search(_REFORMAT_WORDS, _description(h)):
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
    swi = sorted(tokens & _SUSCEPTIBILITY_TOKENS)
    if swi:
        return _verdict(L.OTHER, 0.93, "susceptibility", f"ImageType {swi[0]}")
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
        return _verdict(L.DWI, 0.96, "dwi-trace", f"ImageType {trace[0]}, b {_fmt(max_b)}")
    m = re.search(r"(?:^|[_*])(?:ep|re|ez|epse)?_?b(\d{2,5})t?\b", h.sequence_name.lower())
    name_b = float(m.group(1)) if m else None
    if max_b is None and name_b is not None:
        max_b = name_b
    if max_b is not None and max_b >= 400:
        return _verdict(L.DWI, 0.95, "dwi-bvalue", f"b-values up to {max_b:g} s/mm2")
    if diffusion_type or (max_b is not None and 0 < max_b < 400):
        if max_b is not None and max_b <= 50:
            return _verdict(
                L.OTHER, 0.85, "diffusion-b0", f"diffusion series with b <= {max_b:g} only"
            )
        if max_b is not None:
            return _verdict(L.OTHER, 0.7, "diffusion-low-b", f"low b-values only (<= {max_b:g})")
        if "DERIVED" in tokens:
            # A derived diffusion image without b-values is a computed map, not a trace image
            # (trace images carry their b-value): only the description can say which map.
            text = _description(h)
            said = None if _description_other(text) else _description_label(text)
            if said is L.ADC:
                return _verdict(
                    L.ADC, 0.75, "adc-derived", "derived diffusion image, description names ADC"
                )
            if said is L.DWI and not _description_other(_description(h)):
                return _verdict(
                    L.DWI, 0.7, "dwi-derived", "derived diffusion image, description names DWI"
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
    text = _description(h)
    said = None if _description_other(text) else _description_label(text)
    if said in (L.DWI, L.ADC):
        # Diffusion EPI whose b-values and ImageType were not recorded (or were stripped): the
        # description is the only evidence left, so it decides with moderate confidence.
        return _verdict(
            said, 0.7, "epi-description", f"EPI, description names {said}, no b-values recorded"
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


def _contrast_evidence(h: SeriesHeader) -> str | None:
    """Why this series looks post-contrast (agent tag or description), or None."""
    if h.contrast_agent:
        return "contrast agent tag present"
    text = _description(h)
    if re.search(_CONTRAST_WORDS, text) and not re.search(_PRE_WORDS, text):
        return "description says post-contrast"
    return None


def _with_contrast(h: SeriesHeader, verdict: TagVerdict) -> TagVerdict:
    """Turn a T1 verdict into T1C when the headers show contrast, and say why either way."""
    if verdict.label is not L.T1:
        return verdict
    text = _description(h)
    pre = re.search(_PRE_WORDS, text) is not None
    if h.contrast_agent:
        if pre:
            return replace(
                verdict,
                label=L.T1C,
                confidence=min(verdict.confidence, 0.7),
                reason=f"{verdict.reason}; contrast agent tag ({h.contrast_agent}) although "
                "the description says pre-contrast",
            )
        return replace(
            verdict,
            label=L.T1C,
            rule=f"{verdict.rule}+contrast",
            reason=f"{verdict.reason}; contrast agent tag ({h.contrast_agent})",
        )
    if not pre and re.search(_CONTRAST_WORDS, text):
        return replace(
            verdict,
            label=L.T1C,
            rule=f"{verdict.rule}+contrast-description",
            confidence=min(verdict.confidence, 0.8),
            reason=f"{verdict.reason}; description says post-contrast",
        )
    return replace(verdict, reason=f"{verdict.reason}; no contrast evidence")


def classify_by_tags(h: SeriesHeader) -> TagVerdict:
    """Label one series from its headers: physics rules first, description as weaker evidence."""
    physics: TagVerdict | None = None
    for rule in _PHYSICS_RULES:
        physics = rule(h)
        if physics is not None:
            break
    text = _description(h)
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
        )
        return _with_contrast(h, verdict)
    return _abstain(f"no decisive tags ({_physics_text(h)}) and no usable description")


# --- slices, fusion, study context --------------------------------------------------------------


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


def _cnn_text(cnn: CnnVerdict) -> str:
    votes = ", ".join(f"{label}:{n}" for label, n in cnn.votes)
    return f"CNN {cnn.label} ({cnn.confidence:.2f}; votes {votes} of {cnn.n_slices} slices)"


def _tag_text(tag: TagVerdict) -> str:
    if tag.label is None:
        return f"tags abstained: {tag.reason}"
    return f"tags {tag.label} ({tag.confidence:.2f}, rule {tag.rule}): {tag.reason}"


def fuse(
    series_uid: str,
    tag: TagVerdict | None,
    cnn: CnnVerdict | None,
    policy: FusionPolicy | None = None,
) -> SequenceDecision:
    """Combine the tag verdict and the CNN verdict of one series into its decision."""
    policy = policy or FusionPolicy()
    tag_label = tag.label if tag is not None else None
    common = {
        "series_uid": series_uid,
        "tag_label": tag_label,
        "cnn_label": cnn.label if cnn is not None else None,
        "cnn_votes": cnn.votes if cnn is not None else (),
    }
    reasons: list[str] = []
    if tag is not None:
        reasons.append(_tag_text(tag))
    if cnn is not None:
        reasons.append(_cnn_text(cnn))
    else:
        reasons.append("CNN not run")
    if cnn is None:
        if tag is None or tag_label is None:
            return SequenceDecision(
                label=L.OTHER,
                confidence=0.0,
                method=DecisionMethod.TAGS,
                reasons=(*reasons, "no evidence: OTHER"),
                **common,  # type: ignore[arg-type]
            )
        if tag.confidence < policy.min_confidence:
            return SequenceDecision(
                label=L.OTHER,
                confidence=tag.confidence,
                method=DecisionMethod.TAGS,
                reasons=(*reasons, f"tag confidence below {policy.min_confidence}: OTHER"),
                **common,  # type: ignore[arg-type]
            )
        return SequenceDecision(
            label=tag_label,
            confidence=tag.confidence,
            method=DecisionMethod.TAGS,
            reasons=tuple(reasons),
            **common,  # type: ignore[arg-type]
        )
    if tag is None or tag_label is None:
        if cnn.confidence >= policy.min_cnn_confidence:
            return SequenceDecision(
                label=cnn.label,
                confidence=cnn.confidence,
                method=DecisionMethod.CNN,
                reasons=tuple(reasons),
                **common,  # type: ignore[arg-type]
            )
        return SequenceDecision(
            label=L.OTHER,
            confidence=cnn.confidence,
            method=DecisionMethod.CNN,
            reasons=(*reasons, f"CNN alone below {policy.min_cnn_confidence}: OTHER"),
            **common,  # type: ignore[arg-type]
        )
    t1_family = {L.T1, L.T1C}
    family_only = (
        not policy.cnn_decides_contrast
        and tag_label != cnn.label
        and {tag_label, cnn.label} <= t1_family
    )
    if tag_label == cnn.label or family_only:
        confidence = 1.0 - (1.0 - tag.confidence) * (1.0 - cnn.confidence)
        agree = (
            "tags and CNN agree on the T1 family; contrast decided by the tags and study context"
            if family_only
            else "tags and CNN agree"
        )
        if max(tag.confidence, cnn.confidence) < policy.min_confidence:
            return SequenceDecision(
                label=L.OTHER,
                confidence=round(confidence, 3),
                method=DecisionMethod.FUSED,
                reasons=(*reasons, "agreement but both below the minimum confidence: OTHER"),
                **common,  # type: ignore[arg-type]
            )
        return SequenceDecision(
            label=tag_label,
            confidence=round(min(0.99, confidence), 3),
            method=DecisionMethod.FUSED,
            reasons=(*reasons, agree),
            **common,  # type: ignore[arg-type]
        )
    if tag_label in policy.prefer_tags_for and tag.confidence >= policy.prefer_tags_min_confidence:
        return SequenceDecision(
            label=tag_label,
            confidence=tag.confidence,
            method=DecisionMethod.TAGS,
            reasons=(*reasons, f"disagreement: the policy trusts tags for {tag_label}"),
            **common,  # type: ignore[arg-type]
        )
    if not policy.disagreement_to_other:
        winner_is_tag = tag.confidence >= cnn.confidence
        return SequenceDecision(
            label=tag_label if winner_is_tag else cnn.label,
            confidence=max(tag.confidence, cnn.confidence),
            method=DecisionMethod.TAGS if winner_is_tag else DecisionMethod.CNN,
            reasons=(*reasons, "disagreement: the more confident opinion wins (policy)"),
            **common,  # type: ignore[arg-type]
        )
    return SequenceDecision(
        label=L.OTHER,
        confidence=round(1.0 - abs(tag.confidence - cnn.confidence), 3) / 2,
        method=DecisionMethod.FUSED,
        reasons=(*reasons, "disagreement: OTHER (not routed)"),
        **common,  # type: ignore[arg-type]
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Candidate:
    index: int
    header: SeriesHeader
    decision: SequenceDecision
    evidence: str | None


def _protocol_key(h: SeriesHeader) -> tuple[str, ...]:
    """Series of the same protocol: same protocol name, else same sequence and timing."""
    protocol = _norm(h.protocol_name).strip()
    # Strip contrast words so "T1 SE" and "T1 SE +C" count as one protocol.
    protocol = re.sub(_CONTRAST_WORDS, " ", f" {protocol} ")
    protocol = re.sub(_PRE_WORDS, " ", protocol)
    protocol = " ".join(protocol.split())
    if protocol:
        return (h.study_uid, "protocol", protocol)
    return (
        h.study_uid,
        "physics",
        h.sequence_name,
        _fmt(h.repetition_time_ms),
        _fmt(h.echo_time_ms),
        _fmt(h.inversion_time_ms),
        h.orientation,
    )


def _is_t1_family(d: SequenceDecision) -> bool:
    return d.label in (L.T1, L.T1C) or (
        d.label is L.OTHER
        and {d.tag_label, d.cnn_label} <= {L.T1, L.T1C, None}
        and (d.tag_label is not None or d.cnn_label is not None)
    )


def _start_time(h: SeriesHeader) -> tuple[float, int]:
    first = h.acquisition_times[0] if h.acquisition_times else float("inf")
    return (first, h.series_number or 0)


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


def apply_study_context(
    decisions: Sequence[SequenceDecision],
    headers: Sequence[SeriesHeader],
    *,
    time_alone: bool = True,
) -> tuple[SequenceDecision, ...]:
    """Of two or more T1 series of one protocol, the later one(s) with contrast evidence is T1C.

    ``decisions[i]`` must belong to ``headers[i]``. Evidence is the contrast agent tag, a
    post-contrast description, or the CNN's T1C vote, present on the later series and absent on
    the earlier one; the earlier series is then T1 (pre-contrast). With ``time_alone``, a pair
    without any such evidence still splits pre/post when the later run came after a gap or
    other series (an immediate repeat is taken as a motion repeat and left alone).
    """
    if len(decisions) != len(headers):
        raise ValueError("decisions and headers must be aligned (same length and order)")
    for d, h in zip(decisions, headers, strict=True):
        if d.series_uid != h.series_uid:
            raise ValueError(f"decision for {d.series_uid} is not aligned with its header")
    out = list(decisions)
    groups: dict[tuple[str, ...], list[_Candidate]] = {}
    for i, (d, h) in enumerate(zip(decisions, headers, strict=True)):
        if not _is_t1_family(d):
            continue
        evidence = _contrast_evidence(h)
        if evidence is None and d.cnn_label is L.T1C:
            evidence = "CNN sees contrast enhancement"
        groups.setdefault(_protocol_key(h), []).append(
            _Candidate(index=i, header=h, decision=d, evidence=evidence)
        )
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda c: _start_time(c.header))
        first_post = next((k for k, c in enumerate(members) if c.evidence), None)
        if first_post is None and time_alone and len(members) == 2:
            if _injection_gap(members[0].header, members[1].header, headers):
                out[members[1].index] = replace(
                    members[1].decision,
                    label=L.T1C,
                    confidence=0.65,
                    method=DecisionMethod.STUDY_CONTEXT,
                    reasons=(
                        *members[1].decision.reasons,
                        "study context: later of 2 series of one T1 protocol, acquired after a "
                        "gap or other series (no contrast tag or description): assumed "
                        "post-contrast",
                    ),
                )
            continue
        if first_post == 0 and time_alone and len(members) == 2:
            earlier, later = members
            tag_only = all(
                c.header.contrast_agent and not re.search(_CONTRAST_WORDS, _description(c.header))
                for c in members
            )
            if tag_only and _injection_gap(earlier.header, later.header, headers):
                # The agent tag on both runs of one T1 protocol is an exam-level entry: the
                # earlier run, after a gap, is taken as the pre-contrast one.
                out[earlier.index] = replace(
                    earlier.decision,
                    label=L.T1,
                    confidence=0.6,
                    method=DecisionMethod.STUDY_CONTEXT,
                    reasons=(
                        *earlier.decision.reasons,
                        "study context: contrast tag on both runs of one T1 protocol (entered "
                        "for the whole exam); the earlier run is taken as pre-contrast",
                    ),
                )
            continue
        if first_post is None or first_post == 0:
            continue  # no evidence, or the earliest already has it: nothing to tell apart
        if not all(c.evidence for c in members[first_post:]):
            continue  # evidence comes and goes: not a clean pre/post pair
        for k, c in enumerate(members):
            label = L.T1 if k < first_post else L.T1C
            why = (
                f"study context: {'later' if label is L.T1C else 'earlier'} of "
                f"{len(members)} series of one T1 protocol; "
                + (c.evidence or "no contrast evidence")
            )
            if c.decision.label is label:
                continue
            out[c.index] = replace(
                c.decision,
                label=label,
                confidence=round(max(0.7, c.decision.confidence), 3),
                method=DecisionMethod.STUDY_CONTEXT,
                reasons=(*c.decision.reasons, why),
            )
    return tuple(out)


def classify_headers(
    headers: Sequence[SeriesHeader],
    cnn: Sequence[CnnVerdict | None] | None = None,
    policy: FusionPolicy | None = None,
) -> tuple[SequenceDecision, ...]:
    """Classify every series of a study (or folder): tag rules, fusion with the CNN, context."""
    if cnn is not None and len(cnn) != len(headers):
        raise ValueError("cnn: one verdict (or None) per header is needed")
    decisions = tuple(
        fuse(h.series_uid, classify_by_tags(h), cnn[i] if cnn is not None else None, policy)
        for i, h in enumerate(headers)
    )
    return apply_study_context(decisions, headers)


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

"""Synthetic studies end to end: anatomy + phenotype -> contrasts -> vendor headers -> files.

Why this module is long: a study's series list, their acquisition parameters and the domain
randomisation draws are one generative description; split, each draw would have to be threaded
through several modules (lab code, never imported by the node).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import config as dcm_config
from pydicom.dataset import Dataset
from scipy import ndimage

from node.lab.synth.anatomy import (
    PLANES,
    Grid,
    Subject,
    centred_grid,
    plane_of,
    random_subject,
    random_subject_b,
    random_subject_c,
    sample_anatomy,
)
from node.lab.synth.contrast import (
    TISSUES,
    Acquisition,
    Tissue,
    bias_field,
    blur_inplane,
    echo_train_ms,
    flair_null_ti,
    jitter_tissues,
    kspace_apodised,
    kspace_resize,
    motion_ghosts,
    multicoil_noise,
    parallel_imaging_noise,
    render,
    rician,
    signal_b,
    signal_c,
    tissue_maps,
    tissue_maps_c,
    tissue_signal,
    tissue_signal_b,
    tissue_signal_c,
    transmit_field,
    upsample_inplane,
    with_vessels,
)
from node.lab.synth.phenotypes import (
    PHENOTYPES,
    apply_lesions,
    draw_lesions,
    override_tissues,
    randomise_lesions,
    study_labels,
)
from node.lab.synth.randomise import (
    SERIES_GROUPS,
    STYLES,
    Artefacts,
    SeriesPlan,
    draw_acquisition,
    draw_artefacts,
    draw_plane,
    draw_protocol,
    draw_tissues,
    plan_grid,
    plane_name,
    relative_overrides,
    smooth_field,
)
from node.lab.synth.vendors import (
    KIND_LABEL,
    MISLEADING,
    ROUTED_KINDS,
    SCAN_ORDER,
    STYLE_B_NAMES,
    STYLE_B_PLANES,
    STYLE_B_STUDY,
    STYLE_C_FAMILY,
    STYLE_C_NAMES,
    STYLE_C_PLANES,
    STYLE_C_STUDY,
    VENDOR_TABLE,
    VENDORS,
    VOLUME_PROTOCOLS,
    Protocol,
    Vendor,
)
from node.lab.synth.writer import (
    FrameSpec,
    SeriesSpec,
    StudyHeader,
    build_classic,
    build_enhanced,
    check_transfer_syntax,
    encode,
    make_uid,
    write_dataset,
)
from node.log import get_logger, uid_key

FloatArray = npt.NDArray[np.float32]
GENERATOR = "neuronode.synth"
VERSION = "1.0"
_B_VALUE = 1000.0
_STYLE_C_NOMINAL_CSF_T1_MS = 4100.0  # the CSF T1 style c's sites null on FLAIR (subjects vary)
_ANATOMY_MATRIX = 128  # tissue maps are computed at most at this in-plane matrix, then interpolated
# Tissues that make up a lesion proper (oedema excluded): the lesion_fraction volume.
_LESION_TISSUES = ("enhancing", "necrosis", "infiltrative", "lymphoma", "tuber", "nodule", "wmh")
# Share of routed series whose description is blank or misleading.
BAD_DESCRIPTION_FRACTION = 0.1

log = get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SynthSeries:
    """One generated series: its truth and its datasets (not yet encoded)."""

    kind: str  # t1, t1c, t2, flair, dwi, adc, localizer, bold, fieldmap, fa, reformat
    label: str  # T1, T1C, T2, FLAIR, DWI, ADC, OTHER
    description: str
    description_status: str  # ok, blank, misleading
    series_uid: str
    series_number: int
    datasets: tuple[Dataset, ...]
    plane: str = "axial"  # axial, sagittal, coronal (3-plane: the localizer)
    acquisition: str = "2D"  # 2D or 3D (MRAcquisitionType)
    lesions: tuple[dict[str, object], ...] = ()  # lesion truth on this series' own grid
    geometry: dict[str, object] = field(default_factory=dict)  # routed series: the grid
    artefacts: dict[str, object] = field(default_factory=dict)  # randomised or style b


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SynthStudy:
    """One generated study: datasets plus ground truth, and float volumes for fast training."""

    seed: int
    phenotype: str
    vendor: str
    study_uid: str
    patient_id: str
    patient_name: str
    labels: dict[str, str]
    atypical: bool
    lesions: tuple[dict[str, object], ...]  # manifest entries (geometry on `grid`)
    grid: Grid  # geometry shared by the six routed series
    # (slices, rows, cols) on `grid`, before quantisation: t1, t1c, t2, flair, dwi_b0, dwi (b=1000),
    # adc (1e-3 mm^2/s), wm_fraction (normal white matter) and lesion_fraction (lesion tissue
    # without oedema: a segmentation ground truth).
    volumes: dict[str, FloatArray]
    series: tuple[SynthSeries, ...]
    style: str = "a"
    randomised: bool = False
    field_t: float = 1.5
    # The grid of every volume (they differ when planes are drawn); `grid` is the T1C's.
    grids: dict[str, Grid] = field(default_factory=dict)
    subject: Subject | None = None  # the head, to sample anatomy at any patient point (tests)
    tissue_draws: int = 0  # tissue tables drawn until every physical ordering held


def _rng(seed: int, *tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *tag]))


def _time(base_s: float) -> str:
    s = int(base_s) % 86400
    return f"{s // 3600:02d}{(s % 3600) // 60:02d}{s % 60:02d}.000000"


def _quantize(img: FloatArray, vendor: Vendor, slope: float | None) -> npt.NDArray[np.int32]:
    top = 2 ** (vendor.bits_stored - (1 if vendor.signed else 0)) - 1
    q = img / (slope or 1.0)
    out: npt.NDArray[np.int32] = np.clip(np.rint(q), 0, top).astype(np.int32)
    return out


def _header(seed: int, index: int, vendor: Vendor, rng: np.random.Generator) -> StudyHeader:
    """Patient/study/equipment attributes, all from the seed (never the clock)."""
    day = date(2019, 1, 1) + timedelta(days=int(rng.integers(0, 5 * 365)))
    age = int(rng.integers(18, 80))
    birth = date(day.year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    start = 7 * 3600 + int(rng.integers(0, 10 * 3600))
    number = seed % 100000
    return StudyHeader(
        seed=seed,
        study_uid=make_uid(seed, "study"),
        frame_of_reference_uid=make_uid(seed, "for"),
        patient_name=f"SYNTH^CASE{number:05d}",
        patient_id=f"SYN{seed % 10**8:08d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["F", "M"])),
        age=f"{age:03d}Y",
        weight_kg=float(round(rng.uniform(50, 100), 1)),
        study_date=day.strftime("%Y%m%d"),
        study_time=_time(start),
        accession=f"SA{seed % 10**8:08d}",
        study_id=str(index + 1),
        vendor=vendor,
        model=str(rng.choice(vendor.models)),
        field_t=float(rng.choice([1.5, 3.0])),
        serial=f"{int(rng.integers(10000, 99999))}",
    )


def _frames(grid: Grid, times: Sequence[str], **kw: object) -> tuple[FrameSpec, ...]:
    return tuple(
        FrameSpec(
            position=grid.position(k),
            row_dir=grid.row_dir,
            col_dir=grid.col_dir,
            pixel_mm=grid.pixel_mm,
            thickness_mm=grid.thickness_mm,
            slice_mm=grid.slice_mm,
            time=times[k] if k < len(times) else times[-1],
            **kw,  # type: ignore[arg-type]
        )
        for k in range(grid.shape[0])
    )


def _acq(p: Protocol, *, contrast: bool = False, b: float = 0.0) -> Acquisition:
    return Acquisition(
        equation=p.equation,
        tr_ms=p.tr_ms,
        te_ms=p.te_ms,
        ti_ms=p.ti_ms,
        flip_deg=p.flip_deg,
        b_value=b,
        contrast=contrast,
        fat_sat=p.fat_sat,
    )


def generate_study(
    seed: int,
    *,
    phenotype: str,
    vendor: str,
    size: int = 256,
    slices: int = 24,
    enhanced: bool = False,
    distractors: bool = True,
    index: int = 0,
    template_source: str = "auto",
    style: str = "a",
    randomise: bool = False,
    plane: str | None = None,
) -> SynthStudy:
    """Generate one study in memory: pydicom Datasets per series plus ground truth.

    style "a" without randomise or plane gives the studies this generator always gave (same
    seed, same bytes). `randomise` draws planes, 2D/3D, slice thickness, coverage, sequence
    parameters, tissue properties, lesion variation and artefacts per study; `plane` puts every
    routed series in one plane; styles "b" and "c" render with their own anatomy (or its
    deformation), signal model, noise and header conventions (see docs/synth.md).
    """
    if phenotype not in PHENOTYPES:
        raise ValueError(f"phenotype must be one of {PHENOTYPES}, not {phenotype!r}")
    if vendor not in VENDORS:
        raise ValueError(f"vendor must be one of {VENDORS}, not {vendor!r}")
    if not 32 <= size <= 1024:
        raise ValueError(f"size must be 32..1024, not {size}")
    if not 4 <= slices <= 400:
        raise ValueError(f"slices must be 4..400, not {slices}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
    if plane is not None and plane not in PLANES:
        raise ValueError(f"plane must be one of {tuple(PLANES)}, not {plane!r}")
    legacy = style == "a" and not randomise and plane is None
    v = VENDOR_TABLE[vendor]
    if style == "b":
        description, models, software = STYLE_B_STUDY[vendor]
        v = replace(v, models=models, software=software, institution=v.institution + " (B)")
    if style == "c":
        description, models, software, wm_c = STYLE_C_STUDY[vendor]
        v = replace(
            v,
            models=models,
            software=software,
            institution=v.institution + " (C)",
            bits_stored=v.bits_stored if vendor == "philips" else 16,
            signed=False,
            white_matter_level=wm_c,
        )
    rng = _rng(seed, 1)
    rrng = _rng(seed, 5)  # every draw legacy studies do not make
    arng = _rng(seed, 6)  # artefacts of non-legacy studies
    hdr = _header(seed, index, v, _rng(seed, 2))
    if style in ("b", "c"):
        hdr = replace(hdr, study_description=description)
    t1_protocol, t1c_names = v.t1_options[int(rng.integers(len(v.t1_options)))]
    protocols = dict(v.protocols)
    protocols["t1"] = t1_protocol
    # FLAIR: the site's TI nulls CSF at its TR (within a few percent).
    fl = protocols["flair"]
    protocols["flair"] = Protocol(
        **{
            **{f: getattr(fl, f) for f in fl.__slots__},
            "ti_ms": round(flair_null_ti(fl.tr_ms) * float(rng.uniform(0.98, 1.03))),
        }
    )

    # Reference geometry (the routed series' geometry unless planes are drawn): axial, tilted a
    # few degrees to the AC-PC line. Lesions are placed on it.
    tilt = math.radians(float(rng.uniform(-10, 10)))
    coverage = 140.0
    slice_mm = round(coverage / slices, 2)
    thickness = round(slice_mm * (0.85 if slice_mm >= 3 else 1.0), 2)
    fov = float(rng.choice([220.0, 230.0, 240.0]))
    centre = (float(rng.uniform(-3, 3)), float(rng.uniform(-6, 6)), float(rng.uniform(-4, 6)))
    row_dir = (1.0, 0.0, 0.0)
    col_dir = (0.0, math.cos(tilt), -math.sin(tilt))
    ref = {
        "centre": centre,
        "row_dir": row_dir,
        "col_dir": col_dir,
        "fov_mm": fov,
        "slice_mm": slice_mm,
        "thickness_mm": thickness,
    }
    am = min(size, _ANATOMY_MATRIX)
    ref_grid = centred_grid(shape=(slices, size, size), **ref)  # type: ignore[arg-type]
    ref_agrid = centred_grid(shape=(slices, am, am), **ref)  # type: ignore[arg-type]

    subject = random_subject(rng, template_source)
    if style == "b":
        subject = random_subject_b(rrng)
    elif style == "c":
        subject = random_subject_c(rrng, template_source)
    # Plain style a keeps its anatomy without vessels: it is what the shipped bundles were
    # trained on (docs/synth.md); every other study's blood enhances after gadolinium.
    vessels = not legacy
    anatomy = sample_anatomy(subject, ref_agrid, vessels=vessels)
    draw = draw_lesions(rng, phenotype, ref_agrid, anatomy)
    if randomise:
        draw = randomise_lesions(rrng, draw, ref_agrid, anatomy)
    ref_fractions = apply_lesions(anatomy, draw.lesions, ref_agrid)
    tissues = override_tissues(jitter_tissues(rng, TISSUES), draw.tissue_overrides)
    texture = (
        1.0
        + 0.05
        * ndimage.gaussian_filter(
            rng.standard_normal(ref_agrid.shape).astype(np.float32), (0.5, 1.5, 1.5)
        )
        * 3.0
    ).astype(np.float32)

    plans = _plans(
        legacy=legacy,
        rng=rrng,
        vendor=vendor,
        v=v,
        protocols=protocols,
        t1c_names=t1c_names,
        plane=plane,
        randomise=randomise,
        style=style,
        field_t=hdr.field_t,
        size=size,
        slices=slices,
        ref=(ref_grid, ref_agrid),
        keep_inside=draw.lesions[0].center_mm if draw.lesions else None,
    )
    cphys = _style_c_physics(rrng, hdr.field_t) if style == "c" else None
    if cphys is not None:
        # The site's FLAIR TI nulls a nominal CSF T1 for its own sequence: the inversion
        # efficiency and the recovery shortened by the echo train move the null point.
        fp = plans["flair"].protocol
        rec = fp.tr_ms - echo_train_ms(fp.tr_ms, fp.echo_train)
        eta, csf_t1 = cphys["inversion_eff"], _STYLE_C_NOMINAL_CSF_T1_MS
        ti = csf_t1 * math.log((1 + eta) / (1 + eta * math.exp(-rec / csf_t1)))
        plans["flair"] = replace(
            plans["flair"],
            protocol=replace(fp, ti_ms=round(ti * float(rrng.uniform(0.98, 1.02)))),
        )

    def mk(p: Protocol, *, contrast: bool = False, b: float = 0.0) -> Acquisition:
        """The series' Acquisition; style c adds its scanner physics (field, refocusing ...)."""
        acq = _acq(p, contrast=contrast, b=b)
        if cphys is None:
            return acq
        multislice_se = p.acquisition_type == "2D" and p.equation in ("se", "ir") and p.te_ms > 50
        return replace(
            acq,
            field_t=hdr.field_t,
            echo_train=p.echo_train,
            refocus_deg=cphys["refocus_deg"],
            inversion_eff=cphys["inversion_eff"],
            mt=cphys["mt"] if multislice_se else 0.0,
        )

    acqs = {
        "t1": mk(plans["t1"].protocol),
        "t1c": mk(plans["t1"].protocol, contrast=True),
        "t2": mk(plans["t2"].protocol),
        "flair": mk(plans["flair"].protocol),
        "dwi": mk(plans["dwi"].protocol, b=_B_VALUE),
    }
    tissue_draws = 0
    if not legacy and (randomise or style != "a"):
        tissues, tissue_draws = draw_tissues(rrng, style=style, field_t=hdr.field_t, acqs=acqs)
        tissues = relative_overrides(tissues, draw.tissue_overrides)
    if vessels:
        tissues = with_vessels(tissues)

    # Acquisition order and times.
    kinds = [k for k in SCAN_ORDER if k in ROUTED_KINDS or distractors]
    t0 = (
        float(
            int(hdr.study_time[:2]) * 3600
            + int(hdr.study_time[2:4]) * 60
            + int(hdr.study_time[4:6])
        )
        + 60
    )
    times: dict[str, float] = {}
    t = t0
    for k in kinds:
        times[k] = t
        t += float(rng.uniform(90, 300)) + (300 if k == "t1" else 0)  # contrast injection after T1
    numbers = {k: (i + 1) * v.series_base + v.series_offset for i, k in enumerate(kinds)}
    if v.series_base > 1:
        numbers["adc"] = numbers["dwi"] + 1  # Philips numbers the derived ADC after its DWI
    if style == "b" and vendor != "philips":
        numbers = {k: i + 2 for i, k in enumerate(kinds)}
        # GE numbers a derived ADC 100 x its DWI; others the next number.
        numbers["adc"] = numbers["dwi"] * 100 if vendor == "ge" else numbers["dwi"] + 1
    if style == "c" and vendor != "philips":
        numbers = {k: 100 * (i + 1) for i, k in enumerate(kinds)}
        numbers["adc"] = numbers["dwi"] + 1

    freq = 42.577 * hdr.field_t
    wm_level = float(rng.uniform(*v.white_matter_level))
    slope = float(round(rng.uniform(*v.rescale_slope), 4)) if v.rescale_slope else None
    if randomise and slope is None and rrng.random() < 0.35:
        slope = float(round(rrng.uniform(0.5, 4.0), 4))
    nrng = _rng(seed, 3)
    volumes: dict[str, FloatArray] = {}
    grids: dict[str, Grid] = {}
    pixels: dict[str, npt.NDArray[np.int32]] = {}
    frames: dict[str, tuple[FrameSpec, ...]] = {}
    slopes: dict[str, float | None] = {}
    artefacts: dict[str, Artefacts] = {}
    sig = {"b": tissue_signal_b, "c": tissue_signal_c}.get(style, tissue_signal)

    def inputs(plan: SeriesPlan) -> tuple[dict[str, FloatArray], FloatArray, FloatArray]:
        """Tissue fractions on the plan's anatomy grid and two texture fields."""
        if legacy:
            return ref_fractions, texture, texture
        f = apply_lesions(
            sample_anatomy(subject, plan.agrid, vessels=vessels), draw.lesions, plan.agrid
        )
        if style == "b":
            return (
                f,
                smooth_field(rrng, plan.agrid.shape, 0.04),
                smooth_field(rrng, plan.agrid.shape, 0.05),
            )
        if style == "c":  # proton-density heterogeneity, and the acquisition's transmit field
            return (
                f,
                smooth_field(rrng, plan.agrid.shape, 0.03),
                transmit_field(rrng, plan.agrid.shape, hdr.field_t),
            )
        noise = rrng.standard_normal(plan.agrid.shape).astype(np.float32)
        tex = (1.0 + 0.15 * ndimage.gaussian_filter(noise, (0.5, 1.5, 1.5))).astype(np.float32)
        return f, tex, tex

    def acquire(
        plan: SeriesPlan,
        inp: tuple[dict[str, FloatArray], FloatArray, FloatArray],
        acq: Acquisition,
        level: float,
        bias: FloatArray,
        sigma_ref: float,
        art: Artefacts,
        coil_seed: int,
    ) -> FloatArray:
        fr, tex1, tex2 = inp
        p = plan.protocol
        if style == "b":
            maps = tissue_maps(fr, tissues, contrast=acq.contrast)
            maps["r1"] = maps["r1"] * tex1
            maps["r2"] = maps["r2"] * tex2
            img = signal_b(maps, acq)
            img = np.maximum(kspace_resize(img, size, size, art.kspace_keep * p.resolution), 0)
        elif style == "c":
            maps = tissue_maps_c(fr, tissues, contrast=acq.contrast)
            maps["pd"] = maps["pd"] * tex1
            maps["aniso"] = np.clip(fr["wm"], 0.0, 1.0)
            img = signal_c(maps, acq, b1=tex2)
            img = kspace_apodised(img, size, size, art.kspace_keep * p.resolution)
        else:
            img = render(fr, acq, tissues) * tex1
            img = upsample_inplane(img, size, size)
            img = blur_inplane(img, 0.5 * (1.0 / p.resolution - 1.0) * size / 256 * 2)
            if art.kspace_keep < 1.0:
                img = np.maximum(kspace_resize(img, size, size, art.kspace_keep), 0)
        scale = level / max(sig(tissues["wm"], mk(p)), 1e-6)
        img = img * bias * np.float32(scale)
        if art.motion_share > 0 and acq.equation != "epi":
            img = motion_ghosts(arng, img, art.motion_share, art.motion_px)
        sigma = sigma_ref * scale / (p.snr * art.snr_factor)
        if style == "b":
            out = multicoil_noise(nrng, img, sigma, art.coils, coil_seed)
        elif style == "c":
            out = parallel_imaging_noise(nrng, img, sigma, art.accel)
        else:
            out = rician(nrng, img, sigma)
        if art.gamma != 1.0:
            out = (np.float32(level) * (out / np.float32(level)) ** np.float32(art.gamma)).astype(
                np.float32
            )
        return out

    def artefacts_for(group: str) -> Artefacts:
        art = draw_artefacts(arng, style=style, field_t=hdr.field_t, randomise=randomise)
        if legacy or not randomise:
            art = replace(art, bias=0.35 if group == "t1" else 0.3)
        return art

    # T1 and T1C: same protocol and scaling; T1C after gadolinium.
    plan = plans["t1"]
    p1 = plan.protocol
    inp = inputs(plan)
    art = artefacts_for("t1")
    bias_t1 = _bias(nrng, plan.grid.shape, art.bias, style, legacy)
    gm_ref = sig(tissues["gm"], mk(p1))
    coil_seed = int(arng.integers(2**31))
    for kind, contrast in (("t1", False), ("t1c", True)):
        volumes[kind] = acquire(
            plan, inp, mk(p1, contrast=contrast), wm_level, bias_t1, gm_ref, art, coil_seed
        )
        grids[kind] = plan.grid
        artefacts[kind] = art
    t1_inputs = inp
    for kind in ("t2", "flair"):
        plan = plans[kind]
        p = plan.protocol
        lvl = wm_level * float(rng.uniform(0.8, 1.6))
        art = artefacts_for(kind)
        inp = inputs(plan)
        volumes[kind] = acquire(
            plan,
            inp,
            mk(p),
            lvl,
            _bias(nrng, plan.grid.shape, art.bias, style, legacy),
            sig(tissues["gm"], mk(p)),
            art,
            int(arng.integers(2**31)),
        )
        grids[kind] = plan.grid
        artefacts[kind] = art
    plan = plans["dwi"]
    pd = plan.protocol
    art = replace(artefacts_for("dwi"), motion_share=0.0)  # single-shot EPI: no ghosts
    inp = inputs(plan)
    bias_d = _bias(nrng, plan.grid.shape, art.bias, style, legacy)
    lvl = wm_level * float(rng.uniform(0.8, 1.5))
    b0ref = sig(tissues["gm"], mk(pd, b=0.0))
    coil_seed = int(arng.integers(2**31))
    b0 = acquire(plan, inp, mk(pd, b=0.0), lvl * 1.0, bias_d, b0ref, art, coil_seed)
    # The b=1000 image is scaled like b=0 (same scale) so the ADC is physical.
    if legacy:
        s0wm = tissue_signal(tissues["wm"], mk(pd))
        img = render(ref_fractions, mk(pd, b=_B_VALUE), tissues) * texture
        img = upsample_inplane(img, size, size)
        img = blur_inplane(img, 0.5 * (1.0 / pd.resolution - 1.0) * size / 256 * 2)
        scale = lvl / max(s0wm, 1e-6)
        b1000 = rician(nrng, img * bias_d * np.float32(scale), b0ref * scale / pd.snr)
    else:
        b1000 = acquire(
            plan, inp, mk(pd, b=_B_VALUE), lvl, bias_d, b0ref, replace(art, gamma=1.0), coil_seed
        )
        if art.gamma != 1.0:  # the same monotone remapping on b=0 would bias the ADC: undo
            b0 = acquire(
                plan, inp, mk(pd, b=0.0), lvl, bias_d, b0ref, replace(art, gamma=1.0), coil_seed
            )
    brain = ndimage.binary_erosion(b0 > 0.25 * lvl, iterations=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(np.maximum(b0, 1e-3) / np.maximum(b1000, 1e-3)) / _B_VALUE * 1e3  # 1e-3 mm2/s
    adc_map: FloatArray = np.where(brain, np.clip(adc, 0.0, 4.0), 0.0).astype(np.float32)
    volumes["dwi_b0"] = b0
    volumes["dwi"] = b1000
    volumes["adc"] = adc_map
    for kind in ("dwi_b0", "dwi", "adc"):
        grids[kind] = plan.grid
    artefacts["dwi"] = artefacts["adc"] = art
    # Normal-appearing white matter (lesion tissue excluded), for checks and training masks, and
    # the lesion tissue without oedema (segmentation truth): on the T1/T1C grid.
    frac_t1 = t1_inputs[0]
    volumes["wm_fraction"] = np.clip(upsample_inplane(frac_t1["wm"], size, size), 0.0, 1.0)
    solid = sum(
        (frac_t1[t] for t in _LESION_TISSUES if t in frac_t1),
        np.zeros(plans["t1"].agrid.shape, np.float32),
    )
    volumes["lesion_fraction"] = np.clip(upsample_inplane(solid, size, size), 0.0, 1.0)
    grids["wm_fraction"] = grids["lesion_fraction"] = plans["t1"].grid

    label_slope = slope if slope else None
    top = 2 ** (v.bits_stored - (1 if v.signed else 0)) - 1
    for kind in ("t1", "t1c", "t2", "flair", "dwi", "adc"):
        s = label_slope
        if not legacy and kind != "adc":
            # Scanners scale each series to fit the stored range.
            peak = float(np.percentile(volumes[kind], 99.9))
            if peak / (s or 1.0) > 0.9 * top:
                s = float(round(peak / (0.9 * top), 4))
        slopes[kind] = s
    routed_times = {
        k: [_time(times[k] + 2.0 * i) for i in range(grids[k].shape[0])] for k in ROUTED_KINDS
    }
    for kind in ("t1", "t1c", "t2", "flair"):
        pixels[kind] = _quantize(volumes[kind], v, slopes[kind])
        frames[kind] = _frames(grids[kind], routed_times[kind])
    pixels["dwi"] = np.concatenate(
        [_quantize(b0, v, slopes["dwi"]), _quantize(b1000, v, slopes["dwi"])]
    )
    seqname = {"siemens": ("*ep_b0", "*ep_b1000t")}.get(vendor, (None, None))
    frames["dwi"] = _frames(
        grids["dwi"], routed_times["dwi"], b_value=0.0, sequence_name=seqname[0]
    ) + _frames(grids["dwi"], routed_times["dwi"], b_value=_B_VALUE, sequence_name=seqname[1])
    pixels["adc"] = np.clip(
        np.rint(adc_map * 1000.0 / (label_slope or 1.0)),
        0,
        top,
    ).astype(np.int32)
    frames["adc"] = _frames(grids["adc"], routed_times["adc"])
    protocols.update({g: plans[g].protocol for g in SERIES_GROUPS})
    protocols["t1c"] = protocols["t1"]
    if distractors:
        _distractors(
            seed,
            subject,
            draw.lesions,
            tissues,
            protocols,
            ref_grid,
            size,
            times,
            pixels,
            frames,
            v,
            label_slope,
            nrng,
            rng,
        )

    # Descriptions: vendor convention, with ~10% blank or misleading.
    t1c_desc = str(rng.choice(plans["t1"].t1c_names or t1c_names))
    agent = str(rng.choice(v.contrast_agents)) if rng.random() < 0.6 else None
    group_of = {k: g for g, ks in SERIES_GROUPS.items() for k in ks}
    series_list = []
    drng = _rng(seed, 4)
    for kind in kinds:
        p = protocols[kind]
        plan_k = plans.get(group_of.get(kind, ""))
        desc = t1c_desc if kind == "t1c" else p.description
        protocol_name = None
        if plan_k is not None and not legacy:
            desc = plane_name(desc, plan_k.plane)
            if style == "b":
                protocol_name = desc
                names = STYLE_B_NAMES[vendor][f"{kind}/{plan_k.acquisition}"]
                abbrev = STYLE_B_PLANES[vendor][plan_k.plane]
                desc = str(rrng.choice(names)).format(P=abbrev)
            elif style == "c":
                protocol_name = f"BRAIN_TUMOUR_{hdr.field_t:g}T"
                names_c = STYLE_C_NAMES[f"{kind}/{plan_k.acquisition}"]
                desc = str(rrng.choice(names_c)).format(
                    P=STYLE_C_PLANES[plan_k.plane], **STYLE_C_FAMILY[vendor]
                )
        status = "ok"
        if kind in ROUTED_KINDS and drng.random() < BAD_DESCRIPTION_FRACTION:
            if drng.random() < 0.5:
                desc, status = "", "blank"
            else:
                desc, status = str(drng.choice(MISLEADING[kind])), "misleading"
        s_uid = make_uid(seed, "series", kind)
        slope_k = slopes.get(kind, label_slope)
        if style == "b" and slope_k is None:
            slope_k = 1.0  # style b writes RescaleSlope/Intercept on every image
        spec = SeriesSpec(
            kind=kind,
            protocol=p,
            description=desc,
            series_uid=s_uid,
            series_number=numbers[kind],
            series_time=_time(times[kind]),
            frames=frames[kind],
            pixels=pixels[kind],
            rescale_slope=slope_k if kind not in ("fieldmap",) else None,
            contrast_agent=agent if kind == "t1c" else None,
            temporal_positions=3 if kind == "bold" else None,
            imaging_frequency_mhz=freq,
            standard_b_value=not (style == "b" and vendor in ("siemens", "ge")),
            window=not (style == "b" and vendor in ("philips", "generic")),
            protocol_name=protocol_name,
        )
        # Values are built by this module to fit their VRs: skip pydicom's per-value checks.
        with dcm_config.disable_value_validation():
            if enhanced and kind != "localizer":
                datasets = build_enhanced(hdr, spec)
            else:
                datasets = build_classic(hdr, spec)
        g = grids.get(kind)
        series_list.append(
            SynthSeries(
                kind=kind,
                label=KIND_LABEL.get(kind, "OTHER"),
                description=desc,
                description_status=status,
                series_uid=s_uid,
                series_number=spec.series_number,
                datasets=datasets,
                plane=plan_k.plane if plan_k is not None else _frames_plane(frames[kind]),
                acquisition=p.acquisition_type if plan_k is None else plan_k.acquisition,
                lesions=tuple(les.truth(g) for les in draw.lesions) if g is not None else (),
                geometry=_geometry(g) if g is not None else {},
                artefacts=artefacts[kind].as_json() if kind in artefacts and not legacy else {},
            )
        )
    lesions = tuple(les.truth(grids["t1c"]) for les in draw.lesions)
    return SynthStudy(
        seed=seed,
        phenotype=phenotype,
        vendor=vendor,
        study_uid=hdr.study_uid,
        patient_id=hdr.patient_id,
        patient_name=hdr.patient_name,
        labels=study_labels(phenotype),
        atypical=draw.atypical,
        lesions=lesions,
        grid=grids["t1c"],
        volumes=volumes,
        series=tuple(series_list),
        style=style,
        randomised=randomise,
        field_t=hdr.field_t,
        grids=grids,
        subject=subject,
        tissue_draws=tissue_draws,
    )


def _bias(
    rng: np.random.Generator, shape: tuple[int, int, int], strength: float, style: str, legacy: bool
) -> FloatArray:
    """Style a's smooth receive field; style b's shading comes from its coil model instead,
    style c's from its transmit field (its receive side is prescan-normalised)."""
    if style in ("b", "c"):
        return np.ones(shape, dtype=np.float32)
    return bias_field(rng, shape, strength)


def _style_c_physics(rng: np.random.Generator, field_t: float) -> dict[str, float]:
    """Style c's scanner side, per study: refocusing angle (SAR-limited at 3 T), inversion
    efficiency and the magnetisation-transfer saturation of multi-slice spin-echo trains."""
    high = field_t >= 2.0
    return {
        "refocus_deg": float(rng.uniform(120, 155) if high else rng.uniform(150, 180)),
        "inversion_eff": float(rng.uniform(0.92, 0.99)),
        "mt": float(rng.uniform(0.25, 0.45) if high else rng.uniform(0.12, 0.3)),
    }


def _frames_plane(frames: tuple[FrameSpec, ...]) -> str:
    """plane of a distractor series ('3-plane' for the localizer)."""
    planes = {plane_of(f.row_dir, f.col_dir) for f in frames}
    return planes.pop() if len(planes) == 1 else "3-plane"


def _geometry(g: Grid) -> dict[str, object]:
    """The manifest's geometry of a routed series."""
    return {
        "shape": list(g.shape),
        "pixel_mm": [round(x, 4) for x in g.pixel_mm],
        "spacing_mm": round(g.slice_mm, 4),
        "slice_thickness_mm": round(g.thickness_mm, 4),
        "row_dir": [round(x, 4) for x in g.row_dir],
        "col_dir": [round(x, 4) for x in g.col_dir],
    }


def _plans(
    *,
    legacy: bool,
    rng: np.random.Generator,
    vendor: str,
    v: Vendor,
    protocols: dict[str, Protocol],
    t1c_names: tuple[str, ...],
    plane: str | None,
    randomise: bool,
    style: str,
    field_t: float,
    size: int,
    slices: int,
    ref: tuple[Grid, Grid],
    keep_inside: tuple[float, float, float] | None,
) -> dict[str, SeriesPlan]:
    """Plane, 2D/3D, grids and protocol of each acquisition group."""
    out = {}
    for group in SERIES_GROUPS:
        base = protocols[group]
        names = t1c_names if group == "t1" else ()
        if legacy:
            out[group] = SeriesPlan(
                group=group,
                plane="axial",
                acquisition=base.acquisition_type,
                grid=ref[0],
                agrid=ref[1],
                protocol=base,
                t1c_names=names,
            )
            continue
        acq = draw_acquisition(rng, group) if randomise else base.acquisition_type
        if acq == "3D" and base.acquisition_type != "3D":
            base, vnames = VOLUME_PROTOCOLS[vendor][group]
            names = vnames or names
        elif acq == "2D" and base.acquisition_type == "3D":
            base, names = v.t1_options[0]
        pl = plane or (draw_plane(rng, group, acq) if randomise else "axial")
        if randomise or style != "a":
            base = draw_protocol(rng, base, group, field_t, TISSUES["csf"].t1_ms)
        grid, agrid = plan_grid(
            rng,
            plane=pl,
            acquisition=acq,
            size=size,
            slices=slices,
            anatomy_matrix=_ANATOMY_MATRIX,
            randomise=randomise,
            keep_inside=keep_inside,
        )
        out[group] = SeriesPlan(
            group=group,
            plane=pl,
            acquisition=acq,
            grid=grid,
            agrid=agrid,
            protocol=base,
            t1c_names=names,
        )
    return out


def _distractors(
    seed: int,
    subject: object,
    lesions: tuple[object, ...],
    tissues: dict[str, Tissue],
    protocols: dict[str, Protocol],
    grid: Grid,
    size: int,
    times: dict[str, float],
    pixels: dict[str, npt.NDArray[np.int32]],
    frames: dict[str, tuple[FrameSpec, ...]],
    v: Vendor,
    slope: float | None,
    nrng: np.random.Generator,
    rng: np.random.Generator,
) -> None:
    """Localizer, BOLD, field map, FA map and coronal reformat: small, all labelled OTHER."""
    from node.lab.synth.anatomy import Subject
    from node.lab.synth.phenotypes import Lesion

    assert isinstance(subject, Subject)
    les = tuple(x for x in lesions if isinstance(x, Lesion))
    small = max(32, min(size // 2, 128))
    top = 2 ** (v.bits_stored - (1 if v.signed else 0)) - 1

    def fractions(g: Grid) -> dict[str, FloatArray]:
        return apply_lesions(sample_anatomy(subject, g, vessels="vessels" in tissues), les, g)

    def image(g: Grid, p: Protocol, level: float) -> npt.NDArray[np.int32]:
        f = fractions(g)
        acq = _acq(p)
        img = render(f, acq, tissues)
        scale = level / max(tissue_signal(tissues["wm"], acq), 1e-6)
        img = rician(
            nrng, img * np.float32(scale), tissue_signal(tissues["gm"], acq) * scale / p.snr
        )
        return _quantize(img, v, slope)

    level = float(rng.uniform(*v.white_matter_level))
    # 3-plane localizer: one axial, one sagittal, one coronal image.
    planes = (((1, 0, 0), (0, 1, 0)), ((0, 1, 0), (0, 0, -1)), ((1, 0, 0), (0, 0, -1)))
    loc_imgs: list[npt.NDArray[np.int32]] = []
    loc_frames: list[FrameSpec] = []
    for rd, cd in planes:
        g = centred_grid(
            centre=(0.0, 0.0, 10.0),
            row_dir=rd,
            col_dir=cd,
            shape=(1, small, small),
            fov_mm=260,
            slice_mm=8,
            thickness_mm=8,
        )
        loc_imgs.append(image(g, protocols["localizer"], level)[0])
        loc_frames.extend(_frames(g, [_time(times["localizer"])]))
    pixels["localizer"] = np.stack(loc_imgs)
    frames["localizer"] = tuple(loc_frames)
    # BOLD: 64x64, 6 slices, 3 time points, slice order repeated per volume.
    g = centred_grid(
        centre=grid.centre(),  # the head, not the corner of the slice
        row_dir=grid.row_dir,
        col_dir=grid.col_dir,
        shape=(6, 64, 64),
        fov_mm=220,
        slice_mm=4.0,
        thickness_mm=3.6,
    )
    base = image(g, protocols["bold"], level * 0.5).astype(np.float32)
    vols: list[npt.NDArray[np.int32]] = []
    fr: list[FrameSpec] = []
    for tp in range(3):
        vols.append(
            np.clip(base * (1 + 0.01 * nrng.standard_normal(base.shape)), 0, top).astype(np.int32)
        )
        fr.extend(_frames(g, [_time(times["bold"] + 2.0 * tp)], temporal_index=tp + 1))
    pixels["bold"] = np.concatenate(vols)
    frames["bold"] = tuple(fr)
    # Field map: a smooth phase image (stored 0..4095 around 2048) masked to the head.
    g = centred_grid(
        centre=grid.centre(),  # the head, not the corner of the slice
        row_dir=grid.row_dir,
        col_dir=grid.col_dir,
        shape=(6, 64, 64),
        fov_mm=220,
        slice_mm=5.0,
        thickness_mm=4.0,
    )
    f = fractions(g)
    head = (f["scalp"] + f["skull"] + f["csf"] + f["gm"] + f["wm"]) > 0.3
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in g.shape), indexing="ij")
    phase = 2048 + 600 * (0.8 * xx * yy + 0.6 * zz**2 - 0.4 * yy) + nrng.normal(0, 20, g.shape)
    pixels["fieldmap"] = np.where(head, np.clip(phase, 0, 4095), 0).astype(np.int32)
    frames["fieldmap"] = _frames(g, [_time(times["fieldmap"])])
    # FA map: high in white matter, x1000.
    g = centred_grid(
        centre=grid.centre(),  # the head, not the corner of the slice
        row_dir=grid.row_dir,
        col_dir=grid.col_dir,
        shape=(6, small, small),
        fov_mm=230,
        slice_mm=grid.slice_mm,
        thickness_mm=grid.thickness_mm,
    )
    f = fractions(g)
    fa = (0.12 * f["gm"] + 0.55 * f["wm"] + 0.08 * f["csf"]) * (
        1 + 0.1 * nrng.standard_normal(g.shape)
    )
    pixels["fa"] = np.clip(np.rint(fa * 1000 / (slope or 1.0)), 0, top).astype(np.int32)
    frames["fa"] = _frames(g, [_time(times["fa"])])
    # Coronal reformat of the T1.
    g = centred_grid(
        centre=(0.0, 0.0, 10.0),
        row_dir=(1.0, 0.0, 0.0),
        col_dir=(0.0, 0.0, -1.0),
        shape=(5, small, small),
        fov_mm=240,
        slice_mm=10.0,
        thickness_mm=3.0,
    )
    pixels["reformat"] = image(g, protocols["t1"], level)
    frames["reformat"] = _frames(g, [_time(times["reformat"])])


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What write_studies wrote: the parsed manifest.json (ground truth) and where it lives."""

    root: Path
    seed: int
    studies: tuple[dict[str, object], ...]

    @property
    def path(self) -> Path:
        return self.root / "manifest.json"

    def as_json(self) -> dict[str, object]:
        """The manifest.json content."""
        return {
            "generator": GENERATOR,
            "version": VERSION,
            "seed": self.seed,
            "studies": list(self.studies),
        }

    @classmethod
    def load(cls, root: Path) -> Manifest:
        """Read OUT/manifest.json back."""
        data = json.loads((root / "manifest.json").read_text())
        return cls(root=root, seed=int(data["seed"]), studies=tuple(data["studies"]))


def study_plan(
    studies: int, seed: int, phenotypes: Sequence[str] | None, vendors: Sequence[str] | None
) -> tuple[tuple[int, str, str], ...]:
    """(study seed, phenotype, vendor) per study: a deterministic cycle permuted by the seed."""
    phs = tuple(phenotypes) if phenotypes else PHENOTYPES
    vds = tuple(vendors) if vendors else VENDORS
    for ph in phs:
        if ph not in PHENOTYPES:
            raise ValueError(f"phenotype must be one of {PHENOTYPES}, not {ph!r}")
    for vd in vds:
        if vd not in VENDORS:
            raise ValueError(f"vendor must be one of {VENDORS}, not {vd!r}")
    rng = _rng(seed, 0)
    ph_order = [phs[i] for i in rng.permutation(len(phs))]
    vd_order = [vds[i] for i in rng.permutation(len(vds))]
    out = []
    for i in range(studies):
        sseed = int(np.random.SeedSequence([seed & 0xFFFFFFFF, 7, i]).generate_state(1)[0])
        ph = ph_order[i % len(ph_order)]
        vd = vd_order[(i + i // len(ph_order)) % len(vd_order)]
        out.append((sseed, ph, vd))
    return tuple(out)


def write_studies(
    out: Path,
    *,
    studies: int,
    seed: int,
    phenotypes: Sequence[str] | None = None,
    vendors: Sequence[str] | None = None,
    size: int = 256,
    slices: int = 24,
    enhanced: bool = False,
    transfer_syntax: str = "explicit",
    distractors: bool = True,
    styles: Sequence[str] | None = None,
    randomise: bool = False,
    plane: str | None = None,
) -> Manifest:
    """Write OUT/<study>/<series>/<n>.dcm plus manifest.json, labels.csv and study_labels.csv.

    `styles` (default ("a",)) are cycled study by study; see generate_study for `randomise` and
    `plane`.
    """
    if studies < 1:
        raise ValueError(f"studies must be >= 1, not {studies}")
    style_cycle = tuple(styles) if styles else ("a",)
    for st_name in style_cycle:
        if st_name not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, not {st_name!r}")
    if plane is not None and plane not in PLANES:
        raise ValueError(f"plane must be one of {tuple(PLANES)}, not {plane!r}")
    ts = check_transfer_syntax(transfer_syntax)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    label_rows = []
    study_rows = []
    for i, (sseed, ph, vd) in enumerate(study_plan(studies, seed, phenotypes, vendors)):
        t0 = time.perf_counter()
        st = generate_study(
            sseed,
            phenotype=ph,
            vendor=vd,
            size=size,
            slices=slices,
            enhanced=enhanced,
            distractors=distractors,
            index=i,
            style=style_cycle[i % len(style_cycle)],
            randomise=randomise,
            plane=plane,
        )
        folder = f"study_{i + 1:04d}"
        series_entries = []
        for j, s in enumerate(st.series):
            sfolder = f"series_{j + 1:03d}"
            for n, ds in enumerate(s.datasets):
                write_dataset(encode(ds, ts), out / folder / sfolder / f"{n + 1}.dcm")
            series_entries.append(
                {
                    "series_uid": s.series_uid,
                    "series_number": s.series_number,
                    "folder": f"{folder}/{sfolder}",
                    "label": s.label,
                    "description": s.description,
                    "description_status": s.description_status,
                    "kind": s.kind,
                    "n_instances": len(s.datasets),
                    "n_frames": sum(int(getattr(d, "NumberOfFrames", 1)) for d in s.datasets),
                    "style": st.style,
                    "plane": s.plane,
                    "acquisition": s.acquisition,
                    "field_strength_t": st.field_t,
                    "vendor": vd,
                    **({"geometry": s.geometry, "lesions": list(s.lesions)} if s.geometry else {}),
                    **({"artefacts": s.artefacts} if s.artefacts else {}),
                }
            )
            label_rows.append((s.series_uid, s.label, st.study_uid, s.description))
        entries.append(
            {
                "study_uid": st.study_uid,
                "folder": folder,
                "seed": sseed,
                "phenotype": ph,
                "vendor": vd,
                "patient_id": st.patient_id,
                "atypical": st.atypical,
                "style": st.style,
                "randomised": st.randomised,
                "field_strength_t": st.field_t,
                "labels": st.labels,
                "lesions": list(st.lesions),
                "series": series_entries,
            }
        )
        study_rows.append(
            (
                st.study_uid,
                ph,
                st.labels["gbm_pcnsl"],
                st.labels["glioma_grade"],
                st.labels["tubers"],
            )
        )
        log.info(
            "synth_study_written",
            study_key=uid_key(st.study_uid),
            n_series=len(st.series),
            duration_ms=round((time.perf_counter() - t0) * 1000),
        )
    manifest = Manifest(root=out, seed=seed, studies=tuple(entries))
    (out / "manifest.json").write_text(json.dumps(manifest.as_json(), indent=1) + "\n")
    with (out / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(("series_uid", "label", "study_uid", "description"))
        w.writerows(label_rows)
    with (out / "study_labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(("StudyInstanceUID", "phenotype", "gbm_pcnsl", "glioma_grade", "tubers"))
        w.writerows(study_rows)
    return manifest

"""Domain randomisation (as SynthSeg does): per study, draw what a scanner and a site would vary.

Planes, 2D/3D, slice thickness and coverage, sequence parameters, tissue properties (within
ranges that keep each sequence's physical ordering), lesion tissue relative to the subject's
own white and grey matter, and the artefacts. Every draw comes from the caller's generator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from node.lab.synth.anatomy import Grid, centred_grid, plane_directions
from node.lab.synth.contrast import (
    TISSUES,
    Acquisition,
    Tissue,
    flair_null_ti,
    tissue_signal,
    tissue_signal_b,
    tissue_signal_c,
)
from node.lab.synth.vendors import VOLUME_PROTOCOLS, Protocol

STYLES = ("a", "b", "c")
# Series that share one acquisition: T1 and T1C (same protocol), DWI and its ADC map.
SERIES_GROUPS = {"t1": ("t1", "t1c"), "t2": ("t2",), "flair": ("flair",), "dwi": ("dwi", "adc")}
# Extent of the head along each plane's slice normal (mm) that a full-coverage stack spans.
_COVERAGE_MM = {"axial": 140.0, "sagittal": 150.0, "coronal": 170.0}
# Lesion tissues and the normal tissue their properties are drawn relative to.
LESION_TISSUES = ("edema", "enhancing", "necrosis", "infiltrative", "lymphoma", "tuber", "nodule")


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesPlan:
    """How one acquisition (a SERIES_GROUPS key) is made: plane, 2D/3D, its grids, protocol."""

    group: str
    plane: str  # axial, sagittal, coronal
    acquisition: str  # 2D or 3D
    grid: Grid  # the written geometry
    agrid: Grid  # the same stack at the anatomy matrix (<= 128)
    protocol: Protocol
    t1c_names: tuple[str, ...] = ()


def plane_name(description: str, plane: str) -> str:
    """A vendor description with its plane token (tra, Ax, AX, ax) replaced for another plane."""
    if plane == "axial":
        return description
    sub = {
        "tra": {"sagittal": "sag", "coronal": "cor"},
        "Ax": {"sagittal": "Sag", "coronal": "Cor"},
        "AX": {"sagittal": "SAG", "coronal": "COR"},
        "ax": {"sagittal": "sag", "coronal": "cor"},
    }
    return re.sub(
        r"(?<![A-Za-z])(tra|Ax|AX|ax)(?![A-Za-z])",
        lambda m: sub[m.group(1)][plane],
        description,
    )


def draw_plane(rng: np.random.Generator, group: str, acquisition: str) -> str:
    """The plane sites use for this acquisition: 3D T1 mostly sagittal, DWI axial or coronal."""
    if group == "dwi":
        return "axial" if rng.random() < 0.88 else "coronal"
    if acquisition == "3D":
        p = (0.3, 0.55, 0.15) if group == "t1" else (0.35, 0.45, 0.2)
    else:
        p = (0.7, 0.12, 0.18)
    return str(rng.choice(("axial", "sagittal", "coronal"), p=p))


def draw_acquisition(rng: np.random.Generator, group: str) -> str:
    """2D or 3D: 3D for about half of T1 protocols, a third of FLAIR, a quarter of T2."""
    share = {"t1": 0.5, "t2": 0.25, "flair": 0.35, "dwi": 0.0}[group]
    return "3D" if rng.random() < share else "2D"


def plan_grid(
    rng: np.random.Generator,
    *,
    plane: str,
    acquisition: str,
    size: int,
    slices: int,
    anatomy_matrix: int,
    randomise: bool,
    keep_inside: tuple[float, float, float] | None,
) -> tuple[Grid, Grid]:
    """The written grid and the anatomy grid of one series in a plane.

    Without randomisation: `slices` slices covering the head's extent along the normal at the
    reference field of view. With it: 2D slices 3-6 mm thick with a 0-30% gap, 3D slices
    0.9-1.6 mm contiguous; a stack covers the head unless the slice budget (`slices` for 2D,
    2x for 3D) or a drawn partial coverage (15%) runs out first, and then it is shifted so that
    `keep_inside` (the first lesion) stays inside. Small oblique angles, +-6 deg.
    """
    coverage = _COVERAGE_MM[plane]
    if not randomise:
        slice_mm = round(coverage / slices, 2)
        thickness = round(slice_mm * (0.85 if slice_mm >= 3 else 1.0), 2)
        fov = float(rng.choice([220.0, 230.0, 240.0]) + (20.0 if plane != "axial" else 0.0))
        angles = (float(rng.uniform(-6, 6)), 0.0, 0.0)
        n = slices
    else:
        if acquisition == "3D":
            thickness = float(rng.uniform(0.9, 1.6))
            slice_mm = thickness * (0.5 if rng.random() < 0.1 else 1.0)
            budget = 2 * slices
        else:
            thickness = float(rng.uniform(3.0, 6.0))
            slice_mm = thickness * (1.0 + float(rng.choice([0.0, rng.uniform(0.05, 0.3)])))
            budget = slices
        if rng.random() < 0.15:
            coverage *= float(rng.uniform(0.45, 0.8))
        n = int(max(4, min(budget, math.ceil(coverage / slice_mm))))
        fov = float(rng.uniform(200.0, 260.0))
        angles = (
            float(rng.uniform(-6, 6)),
            float(rng.uniform(-3, 3)),
            float(rng.uniform(-3, 3)),
        )
    rd, cd = plane_directions(plane, angles)
    normal = np.cross(rd, cd)
    centre = np.array(
        [float(rng.uniform(-3, 3)), float(rng.uniform(-6, 6)), float(rng.uniform(-4, 6))]
    )
    half = (n - 1) / 2 * slice_mm
    if keep_inside is not None and randomise:
        # Shift the stack along its normal until the lesion lies inside it (margin 4 mm).
        off = float(np.dot(np.asarray(keep_inside) - centre, normal))
        room = max(half - 4.0, 0.0)
        if abs(off) > room:
            centre = centre + normal * (off - math.copysign(room, off))
            centre = centre + normal * float(rng.uniform(-0.3, 0.3)) * room
    am = min(size, anatomy_matrix)
    common = {
        "centre": centre,
        "row_dir": rd,
        "col_dir": cd,
        "fov_mm": fov,
        "slice_mm": slice_mm,
        "thickness_mm": thickness,
    }
    return (
        centred_grid(shape=(n, size, size), **common),  # type: ignore[arg-type]
        centred_grid(shape=(n, am, am), **common),  # type: ignore[arg-type]
    )


def volume_protocol(vendor: str, group: str) -> tuple[Protocol, tuple[str, ...]]:
    """The vendor's 3D protocol for a group (and T1C descriptions for the T1 group)."""
    return VOLUME_PROTOCOLS[vendor][group]


def draw_protocol(
    rng: np.random.Generator, p: Protocol, group: str, field_t: float, csf_t1_ms: float
) -> Protocol:
    """Sequence parameters drawn per study around the protocol's own (TR, TE, TI, flip)."""
    tr, te, ti, flip = p.tr_ms, p.te_ms, p.ti_ms, p.flip_deg
    if p.equation == "se" and group == "t1":
        tr, te = rng.uniform(380, 720), rng.uniform(7, 16)
    elif p.equation == "ir" and group == "t1" and p.te_ms < 10:
        tr, te, ti = rng.uniform(1700, 2500), rng.uniform(2.0, 4.0), rng.uniform(750, 1100)
    elif p.equation == "ir" and group == "t1":
        tr, te, ti = rng.uniform(1800, 2600), rng.uniform(8, 14), rng.uniform(700, 1000)
    elif p.equation == "gre" and group == "t1":
        tr, te, flip = rng.uniform(6, 12), rng.uniform(2.5, 5.0), rng.uniform(8, 15)
    elif group == "t2":
        tr, te = rng.uniform(2800, 6500), rng.uniform(80, 125)
    elif group == "flair":
        tr = rng.uniform(4800, 7000) if p.acquisition_type == "3D" else rng.uniform(6500, 11000)
        te = rng.uniform(85, 140)
        # The site's TI nulls a nominal CSF T1; the subject's CSF differs by a few percent.
        ti = flair_null_ti(tr, csf_t1_ms) * rng.uniform(0.97, 1.03)
    elif group == "dwi":
        tr, te = rng.uniform(3000, 8000), rng.uniform(60, 100)
    return replace(
        p,
        tr_ms=round(float(tr), 1),
        te_ms=round(float(te), 2),
        ti_ms=None if ti is None else round(float(ti)),
        flip_deg=round(float(flip), 1),
    )


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def draw_normal_tissues(rng: np.random.Generator, style: str, field_t: float) -> dict[str, Tissue]:
    """Scalp, skull, CSF, GM and WM properties from wide ranges, by field strength.

    T1 lengthens with field (about 20% from 1.5 T to 3 T), T2 shortens slightly; grey matter is
    drawn relative to white matter so T1 GM > WM, T2 GM > WM and PD GM > WM always hold.
    """
    high = field_t >= 2.0
    base = TISSUES
    if style == "b":
        wm_t1 = _u(rng, 560, 760) * (1.25 if high else 1.0)
        wm_t2 = _u(rng, 62, 88) * (0.93 if high else 1.0)
        csf_t1 = _u(rng, 3300, 4800)
    elif style == "c":
        # A power law in the field (T1 ~ B^0.3-0.4, T2 ~ B^-0.1) from 1.5 T values.
        ratio = field_t / 1.5
        wm_t1 = _u(rng, 620, 820) * ratio ** _u(rng, 0.3, 0.4)
        wm_t2 = _u(rng, 68, 92) * ratio**-0.1
        csf_t1 = _u(rng, 3800, 4500)
    else:
        wm_t1 = base["wm"].t1_ms * _u(rng, 0.8, 1.15) * (1.12 if high else 0.92)
        wm_t2 = base["wm"].t2_ms * _u(rng, 0.85, 1.15)
        csf_t1 = base["csf"].t1_ms * _u(rng, 0.85, 1.12)
    wm_pd = _u(rng, 0.62, 0.75)
    wm_adc = _u(rng, 0.6, 0.85)
    return {
        "scalp": Tissue(
            pd=_u(rng, 0.75, 1.0),
            t1_ms=_u(rng, 250, 420),
            t2_ms=_u(rng, 60, 110),
            adc=0.1,
            gd_r1=_u(rng, 0.1, 0.5),
            fat=True,
        ),
        "skull": Tissue(
            pd=_u(rng, 0.02, 0.12), t1_ms=_u(rng, 300, 600), t2_ms=_u(rng, 8, 25), adc=0.1
        ),
        "csf": Tissue(
            pd=_u(rng, 0.95, 1.0), t1_ms=csf_t1, t2_ms=_u(rng, 1000, 2500), adc=_u(rng, 2.8, 3.3)
        ),
        "gm": Tissue(
            pd=wm_pd * _u(rng, 1.1, 1.3),
            t1_ms=wm_t1 * _u(rng, 1.35, 1.9),
            t2_ms=wm_t2 * _u(rng, 1.1, 1.45),
            adc=wm_adc * _u(rng, 1.04, 1.3),
        ),
        "wm": Tissue(pd=wm_pd, t1_ms=wm_t1, t2_ms=wm_t2, adc=wm_adc),
    }


def draw_lesion_tissues(rng: np.random.Generator, normal: dict[str, Tissue]) -> dict[str, Tissue]:
    """Lesion tissues as multiples of this subject's white (or grey) matter.

    The radiological signs are relative: oedema and infiltrative tumour T2/FLAIR-bright with
    raised ADC; enhancing tumour T1-dark before and bright after gadolinium; necrosis near CSF;
    lymphoma T2 iso-to-mildly-bright with restricted diffusion (ADC 0.55-0.82 x white matter);
    tubers FLAIR-bright relative to the cortex they sit in.
    """
    wm, gm = normal["wm"], normal["gm"]

    def rel(
        ref: Tissue, pd: tuple[float, float], t1: tuple[float, float], t2: tuple[float, float]
    ) -> tuple[float, float, float]:
        return ref.pd * _u(rng, *pd), wm.t1_ms * _u(rng, *t1), ref.t2_ms * _u(rng, *t2)

    out: dict[str, Tissue] = {}
    pd, t1, t2 = rel(wm, (1.15, 1.35), (1.6, 2.4), (2.2, 3.6))
    out["edema"] = Tissue(pd=pd, t1_ms=t1, t2_ms=t2, adc=wm.adc * _u(rng, 1.6, 2.3), gd_r1=0.05)
    pd, t1, t2 = rel(wm, (1.1, 1.3), (1.6, 2.3), (1.3, 2.0))
    out["enhancing"] = Tissue(
        pd=pd, t1_ms=t1, t2_ms=t2, adc=wm.adc * _u(rng, 1.2, 1.75), gd_r1=_u(rng, 1.8, 4.5)
    )
    pd, t1, t2 = rel(wm, (1.3, 1.45), (2.8, 4.2), (3.5, 6.0))
    out["necrosis"] = Tissue(pd=min(pd, 1.0), t1_ms=t1, t2_ms=t2, adc=wm.adc * _u(rng, 2.4, 3.6))
    pd, t1, t2 = rel(wm, (1.2, 1.4), (1.8, 2.4), (2.4, 3.6))
    out["infiltrative"] = Tissue(pd=pd, t1_ms=t1, t2_ms=t2, adc=wm.adc * _u(rng, 1.6, 2.2))
    pd, t1, t2 = rel(wm, (1.05, 1.25), (1.45, 1.9), (0.95, 1.35))
    out["lymphoma"] = Tissue(
        pd=pd, t1_ms=t1, t2_ms=t2, adc=wm.adc * _u(rng, 0.55, 0.82), gd_r1=_u(rng, 1.8, 4.5)
    )
    pd, t1, t2 = rel(gm, (1.0, 1.15), (1.8, 2.3), (1.7, 2.5))
    out["tuber"] = Tissue(pd=pd, t1_ms=t1, t2_ms=t2, adc=wm.adc * _u(rng, 1.3, 1.7))
    pd, t1, t2 = rel(wm, (0.95, 1.05), (0.85, 1.0), (0.75, 0.95))
    out["nodule"] = Tissue(pd=pd, t1_ms=t1, t2_ms=t2, adc=wm.adc * _u(rng, 1.0, 1.2))
    pd, t1, t2 = rel(wm, (1.15, 1.3), (1.5, 2.0), (1.8, 2.6))
    out["wmh"] = Tissue(pd=pd, t1_ms=t1, t2_ms=t2, adc=wm.adc * _u(rng, 1.2, 1.5))
    return out


def ordering_violations(
    tissues: dict[str, Tissue], acqs: dict[str, Acquisition], style: str
) -> tuple[str, ...]:
    """The physical orderings a tissue draw breaks for this study's acquisitions (none: ok).

    T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF < half of WM, GM > WM, oedema,
    infiltrative tumour, tubers and WM lesions brighter than WM (tubers also than GM);
    T1C: enhancing tissue and lymphoma brighter than WM, darker than WM before contrast;
    ADC: CSF > GM >= WM, lymphoma below and necrosis above WM; DWI b=1000: lymphoma above WM.
    """
    sig = {"b": tissue_signal_b, "c": tissue_signal_c}.get(style, tissue_signal)

    def s(name: str, kind: str) -> float:
        return sig(tissues[name], acqs[kind])

    bad = []
    if not s("wm", "t1") > 1.05 * s("gm", "t1") > 1.1 * s("csf", "t1"):
        bad.append("t1: wm > gm > csf")
    if not s("csf", "t2") > 1.1 * s("gm", "t2") > 1.05 * s("wm", "t2"):
        bad.append("t2: csf > gm > wm")
    if not s("csf", "flair") < 0.5 * s("wm", "flair"):
        bad.append("flair: csf dark")
    if not s("gm", "flair") > 1.03 * s("wm", "flair"):
        bad.append("flair: gm > wm")
    for name in ("edema", "infiltrative", "tuber", "wmh"):
        if name in tissues and not s(name, "flair") > 1.2 * s("wm", "flair"):
            bad.append(f"flair: {name} > wm")
    if "tuber" in tissues and not s("tuber", "flair") > 1.1 * s("gm", "flair"):
        bad.append("flair: tuber > gm")
    t1c = acqs["t1c"]
    for name in ("enhancing", "lymphoma"):
        if name in tissues:
            if not sig(tissues[name], t1c) > 1.2 * sig(tissues["wm"], t1c):
                bad.append(f"t1c: {name} > wm")
            if not s(name, "t1") < s("wm", "t1"):
                bad.append(f"t1: {name} < wm")
    a = {k: t.adc for k, t in tissues.items()}
    if not a["csf"] > a["gm"] >= a["wm"]:
        bad.append("adc: csf > gm >= wm")
    if "lymphoma" in a and not a["lymphoma"] < 0.9 * a["wm"]:
        bad.append("adc: lymphoma < wm")
    if "necrosis" in a and not a["necrosis"] > 1.5 * a["wm"]:
        bad.append("adc: necrosis > wm")
    if "lymphoma" in tissues and not s("lymphoma", "dwi") > s("wm", "dwi"):
        bad.append("dwi: lymphoma > wm")
    return tuple(bad)


def draw_tissues(
    rng: np.random.Generator,
    *,
    style: str,
    field_t: float,
    acqs: dict[str, Acquisition],
    tries: int = 40,
) -> tuple[dict[str, Tissue], int]:
    """A tissue table that keeps every physical ordering (rejection sampling) and the number
    of draws it took; after `tries` failures the last draw is repaired towards TISSUES."""
    tissues: dict[str, Tissue] = {}
    for attempt in range(1, tries + 1):
        normal = draw_normal_tissues(rng, style, field_t)
        tissues = {**normal, **draw_lesion_tissues(rng, normal)}
        if not ordering_violations(tissues, acqs, style):
            return tissues, attempt
    return dict(TISSUES), tries + 1


def relative_overrides(
    tissues: dict[str, Tissue], over: dict[str, dict[str, float]]
) -> dict[str, Tissue]:
    """A phenotype's atypical changes, applied as ratios to TISSUES (so relative, not absolute)."""
    out = dict(tissues)
    for name, fields in over.items():
        base = TISSUES[name]
        changes = {
            f: getattr(out[name], f) * v / max(getattr(base, f), 1e-6) for f, v in fields.items()
        }
        out[name] = replace(out[name], **changes)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Artefacts:
    """What degrades one series: bias strength, SNR factor, k-space share, motion."""

    bias: float  # log-amplitude of the smooth receive field
    snr_factor: float  # multiplies the protocol's SNR
    kspace_keep: float  # central share of k-space kept (1: none; < 1: blur + Gibbs ringing)
    motion_share: float  # share of phase-encoding lines acquired after a movement (0: none)
    motion_px: float
    gamma: float  # monotone intensity remapping (keeps every ordering)
    coils: int  # receive channels (style b's noise)
    accel: int = 1  # parallel-imaging acceleration (style c's noise)

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "bias": round(self.bias, 3),
            "snr_factor": round(self.snr_factor, 3),
            "kspace_keep": round(self.kspace_keep, 3),
            "motion_share": round(self.motion_share, 3),
            "motion_px": round(self.motion_px, 2),
            "gamma": round(self.gamma, 3),
            "coils": self.coils,
        }
        if self.accel > 1:  # style c only, so styles a and b keep their manifests
            out["accel"] = self.accel
        return out


def draw_artefacts(
    rng: np.random.Generator, *, style: str, field_t: float, randomise: bool
) -> Artefacts:
    """Artefacts of one series: mild and fixed without randomisation, wide with it."""
    high = field_t >= 2.0
    if style == "c":
        # Style c: an apodised reconstruction always, parallel imaging (g-factor noise), no
        # coil array shading (prescan-normalised) and no intensity remapping.
        moved = randomise and rng.random() < 0.2
        return Artefacts(
            bias=0.0,
            snr_factor=_u(rng, 0.5, 1.3) * (1.4 if high else 1.0) if randomise else 1.0,
            kspace_keep=_u(rng, 0.5, 0.95) if randomise else 0.85,
            motion_share=_u(rng, 0.03, 0.15) if moved else 0.0,
            motion_px=_u(rng, 1.0, 5.0) if moved else 0.0,
            gamma=1.0,
            coils=1,
            accel=int(rng.choice([2, 2, 3, 4])) if randomise else 2,
        )
    if not randomise:
        return Artefacts(
            bias=0.3,
            snr_factor=1.0,
            kspace_keep=0.8 if style == "b" else 1.0,
            motion_share=0.0,
            motion_px=0.0,
            gamma=1.0,
            coils=int(rng.choice([8, 12, 16])) if style == "b" else 1,
        )
    moved = rng.random() < 0.2
    return Artefacts(
        bias=_u(rng, 0.1, 0.6) * (1.3 if high else 1.0),
        snr_factor=_u(rng, 0.45, 1.4) * (1.5 if high else 1.0),
        kspace_keep=_u(rng, 0.45, 0.95) if (style == "b" or rng.random() < 0.35) else 1.0,
        motion_share=_u(rng, 0.03, 0.15) if moved else 0.0,
        motion_px=_u(rng, 1.0, 5.0) if moved else 0.0,
        gamma=_u(rng, 0.8, 1.25) if style == "a" else 1.0,
        coils=int(rng.choice([4, 8, 12, 16, 32])) if style == "b" else 1,
    )


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], amplitude: float
) -> npt.NDArray[np.float32]:
    """1 + a smooth random field of about +-amplitude (style b's tissue heterogeneity)."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.7, 3.0, 3.0))
    f /= max(float(f.std()), 1e-6)
    out: npt.NDArray[np.float32] = (1.0 + amplitude * f).astype(np.float32)
    return out

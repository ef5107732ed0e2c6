"""Phenotypes: where lesions go, what they are made of, and the labels each study carries."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from node.lab.synth.anatomy import Grid
from node.lab.synth.contrast import Tissue

FloatArray = npt.NDArray[np.float32]

PHENOTYPES = ("gbm", "pcnsl", "lgg", "hgg", "tsc", "normal")
# Fraction of studies of each phenotype drawn with atypical features (see draw_lesions).
ATYPICAL_FRACTION = 0.08


def study_labels(phenotype: str) -> dict[str, str]:
    """Task labels of a phenotype: gbm_pcnsl, glioma_grade, tubers ('' = not applicable)."""
    if phenotype not in PHENOTYPES:
        raise ValueError(f"phenotype must be one of {PHENOTYPES}, not {phenotype!r}")
    return {
        "gbm_pcnsl": phenotype if phenotype in ("gbm", "pcnsl") else "",
        "glioma_grade": {"lgg": "low", "hgg": "high", "gbm": "high"}.get(phenotype, ""),
        # Every brain without tuberous sclerosis has no cortical tubers: tumour studies are
        # negatives too, so a tubers model learns tubers, not "any lesion".
        "tubers": "present" if phenotype == "tsc" else "absent",
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Lesion:
    """One lesion in patient (LPS) mm: an irregular ball with optional core, patches and oedema."""

    kind: str  # gbm, hgg, lgg, pcnsl, tuber, subependymal_nodule, wmh
    center_mm: tuple[float, float, float]
    radius_mm: float
    solid_tissue: str  # tissue of the non-enhancing solid part (see contrast.TISSUES)
    enhancing_tissue: str = "enhancing"  # tissue of the enhancing solid part
    core_fraction: float = 0.0  # necrotic core radius / radius
    edema_mm: float = 0.0  # oedema reaches this far beyond the solid part (white matter only)
    enhancing_fraction: float = 0.0  # share of the solid part that enhances (patchy < 1)
    softness: float = 0.15  # edge width as a fraction of the radius
    shape_seed: int = 0  # irregularity of the outline
    irregularity: float = 1.0  # scales the outline's wobble (randomised studies draw it)

    def truth(self, grid: Grid) -> dict[str, object]:
        """The manifest entry: geometry in patient mm and on the grid of the routed series."""
        k, r, c = grid.voxel_of(self.center_mm)
        return {
            "kind": self.kind,
            "center_mm": [round(v, 2) for v in self.center_mm],
            "radius_mm": round(self.radius_mm, 2),
            "center_voxel": [round(k), round(r), round(c)],
            "solid_tissue": self.solid_tissue,
            "enhancing_tissue": self.enhancing_tissue,
            "necrotic_core_fraction": round(self.core_fraction, 3),
            "edema_mm": round(self.edema_mm, 2),
            "enhancing_fraction": round(self.enhancing_fraction, 3),
        }


def _inside(d: FloatArray, width: float) -> FloatArray:
    out: FloatArray = np.clip((1.0 - d) / max(width, 1e-3) + 0.5, 0.0, 1.0).astype(np.float32)
    return out


def _lesion_parts(
    les: Lesion, pts: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Solid, enhancing-share, core and oedema fractions of one lesion at points (..., 3)."""
    rng = np.random.default_rng(les.shape_seed)
    d = pts - np.array(les.center_mm, dtype=np.float32)
    r = np.sqrt(np.einsum("...i,...i->...", d, d)) + np.float32(1e-3)
    u = d / r[..., None]
    k = rng.normal(0, 1, (5, 3)).astype(np.float32) * 2.2
    ph = rng.uniform(0, 2 * math.pi, 5).astype(np.float32)
    amp = rng.uniform(0.04, 0.11, 5).astype(np.float32)
    if les.irregularity != 1.0:
        amp = (amp * np.float32(les.irregularity)).astype(np.float32)
    wobble = np.sin(u @ k.T + ph) @ amp
    dn = r / (np.float32(les.radius_mm) * (1 + wobble))
    solid = _inside(dn, les.softness)
    core = np.zeros_like(solid)
    if les.core_fraction > 0.05:
        # The rim is irregular in thickness: the core outline wobbles on its own.
        core_w = np.sin(u @ (k[::-1].T * 1.3) + ph[::-1]) @ (amp * 1.5)
        core = _inside(dn / (np.float32(les.core_fraction) * (1 + core_w)), 0.2) * solid
    enh = np.zeros_like(solid)
    if les.enhancing_fraction > 0:
        if les.enhancing_fraction >= 0.999:
            enh = np.ones_like(solid)
        else:
            # Patchy enhancement: a few random blobs inside the lesion, thresholded.
            n = 10
            centres = rng.normal(0, 0.5, (n, 3)).astype(np.float32) * np.float32(les.radius_mm)
            width = np.float32(les.radius_mm * 0.4)
            patch = np.zeros_like(solid)
            for cxyz in centres:
                e = d - cxyz
                patch = np.maximum(
                    patch, np.exp(-np.einsum("...i,...i->...", e, e) / (2 * width**2))
                )
            thr = 1.0 - les.enhancing_fraction
            enh = np.clip((patch - thr) / 0.12 + 0.5, 0, 1).astype(np.float32)
    edema = np.zeros_like(solid)
    if les.edema_mm > 0:
        reach = 1 + np.float32(les.edema_mm / les.radius_mm)
        edema = np.clip(_inside(dn / reach, 0.35) - solid, 0, 1)
    return solid, enh, core, edema


def apply_lesions(
    anatomy: dict[str, FloatArray], lesions: tuple[Lesion, ...], grid: Grid
) -> dict[str, FloatArray]:
    """Tissue fractions with the lesions replacing brain parenchyma (oedema: white matter)."""
    out = {k: v.copy() for k, v in anatomy.items()}
    if not lesions:
        return out
    pts = grid.points()
    step = np.array([grid.slice_mm, grid.pixel_mm[0], grid.pixel_mm[1]])
    for les in lesions:
        reach = les.radius_mm * 1.35 + les.edema_mm * 1.2 + 3.0
        k, r, c = grid.voxel_of(les.center_mm)
        half = np.ceil(reach / step).astype(int)
        lo = np.maximum(np.array([k, r, c]).round().astype(int) - half, 0)
        hi = np.minimum(np.array([k, r, c]).round().astype(int) + half + 1, grid.shape)
        if np.any(hi <= lo):
            continue
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        solid, enh, core, edema = _lesion_parts(les, pts[box])
        gm, wm = out["gm"][box], out["wm"][box]
        parenchyma = gm + wm
        take = np.clip(solid, 0, 1)
        viable = solid - core
        for name, part in (
            ("necrosis", core),
            (les.enhancing_tissue, viable * enh),
            (les.solid_tissue, viable * (1 - enh)),
        ):
            if name not in out:
                out[name] = np.zeros(grid.shape, dtype=np.float32)
            out[name][box] += part * parenchyma
        gm *= 1 - take
        wm *= 1 - take
        if les.edema_mm > 0:
            e = edema * wm
            out.setdefault("edema", np.zeros(grid.shape, dtype=np.float32))[box] += e
            wm -= e
    return out


def _pick(
    rng: np.random.Generator,
    mask: npt.NDArray[np.bool_],
    grid: Grid,
    *,
    slice_band: tuple[float, float],
    avoid: tuple[tuple[float, float, float], ...] = (),
    min_sep_mm: float = 0.0,
) -> tuple[float, float, float] | None:
    """A random voxel centre of the mask within a slice band, as a patient point."""
    s = grid.shape[0]
    m = mask.copy()
    m[: int(s * slice_band[0])] = False
    m[math.ceil(s * slice_band[1]) :] = False
    idx = np.argwhere(m)
    if len(idx) == 0:
        return None
    for _ in range(40):
        k, r, c = idx[rng.integers(len(idx))]
        p = (
            np.array(grid.origin)
            + k * grid.slice_mm * grid.normal
            + r * grid.pixel_mm[0] * np.array(grid.col_dir)
            + c * grid.pixel_mm[1] * np.array(grid.row_dir)
        )
        if all(np.linalg.norm(p - np.array(a)) >= min_sep_mm for a in avoid):
            return (float(p[0]), float(p[1]), float(p[2]))
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class PhenotypeDraw:
    """What a phenotype drew for one study: lesions, tissue changes and whether it is atypical."""

    lesions: tuple[Lesion, ...]
    tissue_overrides: dict[str, dict[str, float]]
    atypical: bool


def randomise_lesions(
    rng: np.random.Generator, draw: PhenotypeDraw, grid: Grid, anatomy: dict[str, FloatArray]
) -> PhenotypeDraw:
    """Wider lesion variation for domain randomisation: size, outline, softness, oedema extent,
    position (half the gliomas anywhere in the white matter), and atypical forms: a GBM with a
    non-enhancing solid part (a quarter), a low-grade glioma with a cyst-like core (a tenth)."""
    wm = anatomy["wm"] > 0.6
    out = []
    for les in draw.lesions:
        centre = les.center_mm
        if les.kind in ("gbm", "hgg", "lgg") and rng.random() < 0.5:
            centre = _pick(rng, wm, grid, slice_band=(0.2, 0.85)) or centre
        small = les.kind in ("tuber", "subependymal_nodule", "wmh")
        scale = float(rng.uniform(0.8, 1.25) if small else rng.uniform(0.6, 1.4))
        enh = les.enhancing_fraction
        core = les.core_fraction
        if les.kind == "gbm" and rng.random() < 0.25:
            enh = float(rng.uniform(0.55, 0.85))
        if les.kind == "lgg" and rng.random() < 0.1:
            core = float(rng.uniform(0.2, 0.4))
        out.append(
            replace(
                les,
                center_mm=centre,
                radius_mm=max(2.0, les.radius_mm * scale),
                edema_mm=les.edema_mm * float(rng.uniform(0.5, 1.6)),
                softness=min(0.6, les.softness * float(rng.uniform(0.7, 1.5))),
                irregularity=float(rng.uniform(0.5, 2.2)),
                enhancing_fraction=enh,
                core_fraction=core,
            )
        )
    return replace(draw, lesions=tuple(out))


def draw_lesions(
    rng: np.random.Generator, phenotype: str, grid: Grid, anatomy: dict[str, FloatArray]
) -> PhenotypeDraw:
    """Lesions of a phenotype placed in this subject's anatomy (on the routed-series grid)."""
    study_labels(phenotype)  # validates
    atypical = bool(rng.random() < ATYPICAL_FRACTION)
    wm, gm, vent = anatomy["wm"], anatomy["gm"], anatomy["ventricles"]
    deep_wm = wm > 0.85
    band = (0.35, 0.7)
    over: dict[str, dict[str, float]] = {}
    seed = int(rng.integers(2**31))
    lesions: list[Lesion] = []

    def centre(mask: npt.NDArray[np.bool_], **kw: object) -> tuple[float, float, float]:
        for m in (mask, deep_wm, wm > 0.5):
            p = _pick(rng, m, grid, slice_band=band, **kw)  # type: ignore[arg-type]
            if p is not None:
                return p
        return (0.0, 0.0, 0.0)

    if phenotype == "gbm":
        lesions.append(
            Lesion(
                kind="gbm",
                center_mm=centre(deep_wm),
                radius_mm=float(rng.uniform(13, 24)),
                solid_tissue="enhancing",
                core_fraction=float(rng.uniform(0.1, 0.3) if atypical else rng.uniform(0.45, 0.75)),
                edema_mm=float(rng.uniform(6, 20)),
                enhancing_fraction=1.0,
                softness=0.12,
                shape_seed=seed,
            )
        )
        if atypical:  # solid, with some restricted diffusion: looks like lymphoma
            over["enhancing"] = {"adc": float(rng.uniform(0.7, 0.85))}
    elif phenotype == "pcnsl":
        near_vent = _near(vent > 0.4, grid, 18.0) & (wm > 0.6)
        n = 2 if rng.random() < 0.25 else 1
        for i in range(n):
            lesions.append(
                Lesion(
                    kind="pcnsl",
                    center_mm=centre(
                        near_vent if rng.random() < 0.8 else deep_wm,
                        avoid=tuple(x.center_mm for x in lesions),
                        min_sep_mm=35.0,
                    ),
                    radius_mm=float(rng.uniform(10, 19) if i == 0 else rng.uniform(7, 12)),
                    solid_tissue="lymphoma",
                    enhancing_tissue="lymphoma",
                    core_fraction=float(rng.uniform(0.3, 0.45)) if atypical else 0.0,
                    edema_mm=float(rng.uniform(4, 14)),
                    enhancing_fraction=1.0,
                    softness=0.2,
                    shape_seed=seed + i,
                )
            )
        if atypical:  # immunocompromised-like ring lesion, less restriction
            over["lymphoma"] = {"adc": float(rng.uniform(0.8, 0.95))}
    elif phenotype == "lgg":
        lesions.append(
            Lesion(
                kind="lgg",
                center_mm=centre(deep_wm),
                radius_mm=float(rng.uniform(12, 26)),
                solid_tissue="infiltrative",
                enhancing_fraction=float(rng.uniform(0.15, 0.3)) if atypical else 0.0,
                softness=0.35,
                shape_seed=seed,
            )
        )
        if atypical:
            over["enhancing"] = {"gd_r1": 1.2}
    elif phenotype == "hgg":
        lesions.append(
            Lesion(
                kind="hgg",
                center_mm=centre(deep_wm),
                radius_mm=float(rng.uniform(13, 24)),
                solid_tissue="infiltrative",
                core_fraction=0.0 if atypical else float(rng.choice([0.0, rng.uniform(0.2, 0.45)])),
                edema_mm=float(rng.uniform(3, 12)),
                enhancing_fraction=float(
                    rng.uniform(0.15, 0.3) if atypical else rng.uniform(0.5, 0.95)
                ),
                softness=0.22,
                shape_seed=seed,
            )
        )
        if atypical:
            over["enhancing"] = {"gd_r1": 1.5}
    elif phenotype == "tsc":
        junction = (gm > 0.3) & (wm > 0.3)
        n = 1 if atypical else int(rng.integers(3, 9))
        for i in range(n):
            p = _pick(
                rng,
                junction,
                grid,
                slice_band=(0.3, 0.8),
                avoid=tuple(x.center_mm for x in lesions),
                min_sep_mm=22.0,
            )
            if p is None:
                continue
            lesions.append(
                Lesion(
                    kind="tuber",
                    center_mm=p,
                    radius_mm=float(rng.uniform(5.5, 11) if not atypical else rng.uniform(4, 6)),
                    solid_tissue="tuber",
                    softness=0.4,
                    shape_seed=seed + i,
                )
            )
        if atypical:
            over["tuber"] = {"t2_ms": 135.0}
        if rng.random() < 0.4:
            wall = _near(vent > 0.5, grid, 4.0) & (vent < 0.3) & (wm > 0.3)
            for i in range(int(rng.integers(1, 4))):
                p = _pick(
                    rng,
                    wall,
                    grid,
                    slice_band=(0.3, 0.75),
                    avoid=tuple(x.center_mm for x in lesions),
                    min_sep_mm=10.0,
                )
                if p is not None:
                    lesions.append(
                        Lesion(
                            kind="subependymal_nodule",
                            center_mm=p,
                            radius_mm=float(rng.uniform(2.5, 5)),
                            solid_tissue="nodule",
                            enhancing_fraction=float(rng.choice([0.0, 1.0])),
                            softness=0.3,
                            shape_seed=seed + 50 + i,
                        )
                    )
    elif phenotype == "normal" and atypical:
        # Small nonspecific white-matter hyperintensities: bright on FLAIR, not tubers.
        for i in range(int(rng.integers(1, 4))):
            p = _pick(
                rng,
                deep_wm,
                grid,
                slice_band=(0.4, 0.8),
                avoid=tuple(x.center_mm for x in lesions),
                min_sep_mm=15.0,
            )
            if p is not None:
                lesions.append(
                    Lesion(
                        kind="wmh",
                        center_mm=p,
                        radius_mm=float(rng.uniform(2, 4)),
                        solid_tissue="wmh",
                        softness=0.4,
                        shape_seed=seed + i,
                    )
                )
    return PhenotypeDraw(lesions=tuple(lesions), tissue_overrides=over, atypical=atypical)


def _near(mask: npt.NDArray[np.bool_], grid: Grid, mm: float) -> npt.NDArray[np.bool_]:
    """Voxels within mm of the mask (anisotropic grid aware)."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(~mask, sampling=(grid.slice_mm, *grid.pixel_mm))
    out: npt.NDArray[np.bool_] = d <= mm
    return out


def override_tissues(
    tissues: dict[str, Tissue], over: dict[str, dict[str, float]]
) -> dict[str, Tissue]:
    """Tissue table with a phenotype's per-study changes applied."""
    out = dict(tissues)
    for name, fields in over.items():
        out[name] = replace(out[name], **fields)  # type: ignore[arg-type]
    return out

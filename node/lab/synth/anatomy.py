"""A subject's head: MNI152 tissue maps (or a procedural head), deformed, sampled on a grid.

Tissue maps live in template space (RAS mm); a ``Subject`` maps patient LPS points to template
points with a random affine, a smooth elastic field and a ventricle enlargement, so every
series samples the same deformed head on its own geometry.

Why this module is long: the two anatomy sources (the atlas-based one, deformed two ways for
styles a and c, and style b's parametric head with its elastic field) share the sampling code;
split further, each half would import the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]

# Tissue maps produced by the anatomy stage, in this order.
ANATOMY_TISSUES = ("scalp", "skull", "csf", "gm", "wm")
# Then, beside them: the lateral ventricles (part of "csf") and the vessels, a tissue of its own
# (dural sinuses and choroid plexus: blood, which gadolinium makes bright on T1).
TEMPLATE_CHANNELS = (*ANATOMY_TISSUES, "ventricles", "vessels")
# Brain centre in template (MNI RAS) mm: the patient's isocentre is placed here.
_BRAIN_CENTRE_RAS = np.array([0.0, -18.0, 14.0])
_VENTRICLE_CENTRE_RAS = np.array([0.0, -12.0, 14.0])


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Template:
    """Tissue fractions (uint8, 0..255) on a template grid, and the grid's voxel-to-RAS affine."""

    maps: npt.NDArray[np.uint8]  # (i, j, k, channel): TEMPLATE_CHANNELS
    affine: npt.NDArray[np.float64]
    source: str  # "mni152", "procedural" or "parametric"


@dataclass(frozen=True, slots=True, kw_only=True)
class Grid:
    """A stack of parallel image planes in patient (LPS) mm, as DICOM describes them."""

    origin: tuple[float, float, float]  # ImagePositionPatient of slice 0
    row_dir: tuple[float, float, float]  # IOP[:3]: direction of increasing column index
    col_dir: tuple[float, float, float]  # IOP[3:]: direction of increasing row index
    pixel_mm: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    slice_mm: float  # SpacingBetweenSlices
    thickness_mm: float
    shape: tuple[int, int, int]  # (slices, rows, columns)

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        """Slice normal: row_dir x col_dir (the direction slices advance)."""
        return np.cross(np.array(self.row_dir), np.array(self.col_dir))

    def position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice k."""
        p = np.array(self.origin) + k * self.slice_mm * self.normal
        return (float(p[0]), float(p[1]), float(p[2]))

    def centre(self) -> tuple[float, float, float]:
        """Patient position of the middle of the stack (ImagePositionPatient is a corner)."""
        s, r, c = self.shape
        p = (
            np.array(self.origin)
            + (s - 1) / 2 * self.slice_mm * self.normal
            + (c - 1) / 2 * self.pixel_mm[1] * np.array(self.row_dir)
            + (r - 1) / 2 * self.pixel_mm[0] * np.array(self.col_dir)
        )
        return (float(p[0]), float(p[1]), float(p[2]))

    def points(self) -> FloatArray:
        """Patient coordinates of every voxel centre, shape (slices, rows, cols, 3)."""
        s, r, c = self.shape
        o = np.array(self.origin, dtype=np.float32)
        kk = (np.arange(s, dtype=np.float32) * self.slice_mm)[:, None] * self.normal.astype(
            np.float32
        )
        rr = (np.arange(r, dtype=np.float32) * self.pixel_mm[0])[:, None] * np.array(
            self.col_dir, dtype=np.float32
        )
        cc = (np.arange(c, dtype=np.float32) * self.pixel_mm[1])[:, None] * np.array(
            self.row_dir, dtype=np.float32
        )
        out = o + kk[:, None, None, :] + rr[None, :, None, :] + cc[None, None, :, :]
        res: FloatArray = out.astype(np.float32)
        return res

    def voxel_of(self, point: npt.ArrayLike) -> tuple[float, float, float]:
        """(slice, row, col) of a patient point (fractional)."""
        d = np.asarray(point, dtype=np.float64) - np.array(self.origin)
        k = float(d @ self.normal) / self.slice_mm
        r = float(d @ np.array(self.col_dir)) / self.pixel_mm[0]
        c = float(d @ np.array(self.row_dir)) / self.pixel_mm[1]
        return (k, r, c)


def centred_grid(
    *,
    centre: npt.ArrayLike,
    row_dir: npt.ArrayLike,
    col_dir: npt.ArrayLike,
    shape: tuple[int, int, int],
    fov_mm: float,
    slice_mm: float,
    thickness_mm: float,
) -> Grid:
    """A grid of the given shape and field of view centred on a patient point."""
    s, r, c = shape
    px = fov_mm / max(r, c)
    rd = np.asarray(row_dir, dtype=np.float64)
    cd = np.asarray(col_dir, dtype=np.float64)
    rd = rd / np.linalg.norm(rd)
    cd = cd - (cd @ rd) * rd
    cd = cd / np.linalg.norm(cd)
    n = np.cross(rd, cd)
    o = (
        np.asarray(centre, dtype=np.float64)
        - (c - 1) / 2 * px * rd
        - (r - 1) / 2 * px * cd
        - (s - 1) / 2 * slice_mm * n
    )
    o = np.round(o, 4)
    return Grid(
        origin=(float(o[0]), float(o[1]), float(o[2])),
        row_dir=tuple(float(round(v, 6)) for v in rd),  # type: ignore[arg-type]
        col_dir=tuple(float(round(v, 6)) for v in cd),  # type: ignore[arg-type]
        pixel_mm=(round(px, 6), round(px, 6)),
        slice_mm=round(slice_mm, 4),
        thickness_mm=round(thickness_mm, 4),
        shape=shape,
    )


# Acquisition planes: (row_dir, col_dir) in patient LPS, as scanners write ImageOrientationPatient
# for a head-first supine patient. Axial: rows run posterior, slices advance superior; sagittal:
# columns run posterior, rows inferior, slices advance to the patient's right (-x); coronal:
# columns run to the patient's left, rows inferior, slices advance posterior.
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


def plane_of(row_dir: npt.ArrayLike, col_dir: npt.ArrayLike) -> str:
    """axial, sagittal or coronal: the patient axis the slice normal is closest to."""
    n = np.abs(np.cross(np.asarray(row_dir, dtype=float), np.asarray(col_dir, dtype=float)))
    return ("sagittal", "coronal", "axial")[int(np.argmax(n))]


def plane_directions(
    plane: str, angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Row and column directions of a plane, obliqued by small rotations about x, y, z (deg)."""
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {tuple(PLANES)}, not {plane!r}")
    rot = _rotation(*np.deg2rad(np.asarray(angles_deg, dtype=float)))
    rd, cd = PLANES[plane]
    return rot @ np.array(rd), rot @ np.array(cd)


def _nilearn_data_dir() -> Path:
    """Folder of the MNI152 templates shipped inside the nilearn wheel (ImportError if absent)."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


def _to_u8(a: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    out: npt.NDArray[np.uint8] = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return out


def _vessels(
    ras: npt.NDArray[np.floating[Any]], depth_mm: npt.NDArray[Any], vent: FloatArray
) -> FloatArray:
    """Where the vessels a post-contrast T1 shows in every brain lie (a fraction map): the
    superior sagittal sinus (midline, along the inner table over the convexity), the transverse
    sinuses (along the occipital inner table) and the choroid plexus (the posterior third of
    each lateral ventricle). ``ras`` (3, ...) template mm, ``depth_mm`` the distance inside the
    intracranial cavity, ``vent`` the ventricle fraction. The template keeps its CSF and grey
    matter as they were; ``carve_vessels`` takes the vessels' volume from them when sampled."""
    x, y, z = ras[0], ras[1], ras[2]
    shell = depth_mm <= 5.0
    sagittal = shell & (np.abs(x) <= 4.0) & (z > np.where(y < -70.0, -12.0, 0.0))
    transverse = (depth_mm <= 6.0) & (y < -62.0) & (np.abs(z + 8.0) <= 3.5) & (np.abs(x) <= 55.0)
    mask = sagittal | transverse
    inside = vent > 0.5
    if inside.any():
        ys = y[inside]
        back = float(ys.min()) + 0.35 * float(ys.max() - ys.min())
        mask = mask | ndimage.binary_erosion(inside & (y <= back) & (np.abs(x) > 6.0))
    out: FloatArray = ndimage.gaussian_filter(mask.astype(np.float32), 0.6).astype(np.float32)
    return out


def carve_vessels(fractions: dict[str, FloatArray]) -> dict[str, FloatArray]:
    """Sampled fractions with the vessels a tissue of their own: their volume taken from CSF
    first, then grey matter (so a voxel's fractions still sum as before); the ventricles stay
    within what CSF is left."""
    out = dict(fractions)
    csf, gm = fractions["csf"], fractions["gm"]
    v = np.minimum(fractions["vessels"], csf + gm)
    from_csf = np.minimum(v, csf)
    out["vessels"] = v.astype(np.float32)
    out["csf"] = (csf - from_csf).astype(np.float32)
    out["gm"] = np.clip(gm - (v - from_csf), 0.0, 1.0).astype(np.float32)
    out["ventricles"] = np.minimum(fractions["ventricles"], out["csf"])
    return out


def _mni_template() -> Template:
    """Scalp, skull, CSF, GM, WM fractions from the MNI152 2009a GM/WM maps, on a 1.5 mm grid.

    nilearn's T1 template is brain-extracted, so the intracranial CSF, skull and scalp are built
    as shells around the closed brain mask.
    """
    import nibabel as nib

    data = _nilearn_data_dir()
    step = 1.5

    def load(name: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
        img: Any = nib.load(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
        a = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        a = ndimage.zoom(a, 1.0 / step, order=1, prefilter=False)
        aff = np.asarray(img.affine, dtype=np.float64) @ np.diag([step, step, step, 1.0])
        return a, aff

    gm, affine = load("gm")
    wm, _ = load("wm")
    # Pad so the scalp shell fits inside the array.
    pad = 12
    gm = np.pad(gm, pad)
    wm = np.pad(wm, pad)
    affine = affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    brain = gm + wm
    ic = ndimage.binary_closing(brain > 0.3, iterations=3)
    ic = ndimage.binary_fill_holes(ic)
    ic = ndimage.binary_dilation(ic, iterations=1)
    outside = ndimage.distance_transform_edt(~ic) * step
    icf = ndimage.gaussian_filter(ic.astype(np.float32), 0.5)
    csf = np.clip(icf - brain, 0.0, 1.0)
    skullf = np.clip((7.0 - outside) / 1.5, 0, 1) * (1 - icf)
    scalpf = np.clip((13.0 - outside) / 1.5, 0, 1) * (1 - icf) - skullf
    ijk = np.indices(gm.shape, dtype=np.float32)
    ras = np.tensordot(affine[:3, :3], ijk, axes=1) + affine[:3, 3, None, None, None]
    depth = ndimage.distance_transform_edt(ic) * step
    box = (
        (np.abs(ras[0]) < 32)
        & (ras[1] > -48)
        & (ras[1] < 32)
        & (ras[2] > -8)
        & (ras[2] < 36)
        & (depth > 14)
    )
    vent = ndimage.gaussian_filter(((csf > 0.5) & box).astype(np.float32), 0.5) * csf
    vessels = _vessels(ras, depth, vent)
    maps = np.stack(
        [_to_u8(m) for m in (scalpf, skullf, csf, gm, wm, vent, vessels)],
        axis=-1,
    )
    return Template(maps=np.ascontiguousarray(maps), affine=affine, source="mni152")


def _procedural_template() -> Template:
    """A smooth ellipsoidal head with folded cortex: used when nilearn is not installed."""
    step = 2.0
    shape = (104, 128, 108)
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = [-103.0, -146.0, -92.0]
    ijk = np.indices(shape, dtype=np.float32)
    x, y, z = (ijk[i] * step + affine[i, 3] for i in range(3))
    cx, cy, cz = _BRAIN_CENTRE_RAS
    rng = np.random.default_rng(12345)
    # Gyral folding: a band-limited random field modulating the cortex depth.
    fold = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    fold /= float(fold.std())

    def ell(a: float, b: float, c: float, dz: float = 0.0) -> npt.NDArray[np.float32]:
        r: npt.NDArray[np.float32] = np.sqrt(
            ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz - dz) / c) ** 2
        )
        return r

    def inside(r: npt.NDArray[np.float32], width: float = 0.02) -> npt.NDArray[np.float32]:
        f: npt.NDArray[np.float32] = np.clip((1.0 - r) / width * 0.5 + 0.5, 0.0, 1.0)
        return f

    head = inside(ell(72, 92, 84))
    skull_out = inside(ell(67, 87, 79))
    ic = inside(ell(62, 82, 73))
    brain = inside(ell(60, 80, 71))
    wm = inside(ell(52, 72, 63) - 0.025 * fold)
    # Sulci: CSF clefts in the cortical ribbon where the folding field is high.
    sulci = np.clip((fold - 0.9) / 0.4, 0, 1) * (1 - wm) * brain
    vent = inside(
        np.sqrt(((np.abs(x - cx) - 9) / 6) ** 2 + ((y - cy) / 28) ** 2 + ((z - cz - 6) / 9) ** 2),
        0.15,
    )
    wm = np.clip(wm - vent, 0, 1)
    gm = np.clip(brain - wm - vent - sulci, 0, 1)
    csf = np.clip(ic - gm - wm, 0, 1)
    skull = np.clip(skull_out - ic, 0, 1)
    scalp = np.clip(head - skull_out, 0, 1)
    depth = ndimage.distance_transform_edt(ic > 0.5) * step
    vessels = _vessels(np.stack([x, y, z]), depth, vent)
    maps = np.stack(
        [_to_u8(m) for m in (scalp, skull, csf, gm, wm, vent, vessels)],
        axis=-1,
    )
    return Template(maps=np.ascontiguousarray(maps), affine=affine, source="procedural")


def _ellipsoid(
    x: FloatArray, y: FloatArray, z: FloatArray, c: tuple[float, float, float], r: tuple[float, ...]
) -> npt.NDArray[np.bool_]:
    out: npt.NDArray[np.bool_] = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + (
        (z - c[2]) / r[2]
    ) ** 2 <= 1.0
    return out


def _parametric_template() -> Template:
    """Rendering style b's own head: parametric shapes, not a warped MNI brain.

    Cerebrum, cerebellum and brainstem as (super)ellipsoids; sulci are the zero crossings of a
    band-limited random field, so they are long connected clefts; the cortex is a 3 mm ribbon
    around the outer surface and every sulcus; thalami, caudate and putamen are grey-matter
    nuclei inside the white matter (the MNI maps blur them); banana-shaped lateral ventricles and
    a third ventricle; skull and scalp of varying thickness.
    """
    step = 2.0
    shape = (100, 124, 104)
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = [-99.0, -140.0, -92.0]
    ijk = np.indices(shape, dtype=np.float32)
    cx, cy, cz = _BRAIN_CENTRE_RAS
    x, y, z = (ijk[i] * step + affine[i, 3] - c for i, c in enumerate((cx, cy, cz)))
    rng = np.random.default_rng(20240613)

    def field(sigma_vox: float) -> FloatArray:
        f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
        out: FloatArray = (f / float(f.std())).astype(np.float32)
        return out

    lobes = field(6.0)
    e = 2.3  # superellipsoid exponent: flatter sides than an ellipsoid
    rc = (
        (np.abs(x) / 67.0) ** e
        + (np.abs(y - 2.0) / (86.0 - 6.0 * np.tanh(y / 40.0))) ** e
        + (np.abs(z - 10.0) / 57.0) ** e
    ) ** (1.0 / e)
    cerebrum = rc <= 1.0 + 0.03 * lobes
    cerebellum = _ellipsoid(x, y, z, (0.0, -50.0, -36.0), (52.0, 30.0, 22.0))
    stem = _ellipsoid(x, y, z, (0.0, -22.0, -42.0), (13.0, 14.0, 36.0))
    brain = cerebrum | cerebellum | stem
    callosum = _ellipsoid(x, y, z, (0.0, -8.0, 6.0), (12.0, 46.0, 17.0))
    fissure = (np.abs(x) < 1.6) & cerebrum & ~callosum
    sulcal = field(2.2)
    shallow = ndimage.distance_transform_edt(brain) * step
    sulci = (np.abs(sulcal) < 0.09) & (shallow < 16.0) & cerebrum
    cleft = sulci | fissure
    tissue = brain & ~cleft
    depth = ndimage.distance_transform_edt(tissue) * step
    gm = tissue & (depth <= 3.0 + 0.6 * lobes)
    wm = tissue & ~gm
    # Cerebellar folia: fine grey/white stripes around a white core.
    folia = np.sin(z * 0.9 + 0.4 * sulcal) > 0.1
    cb = cerebellum & ~_ellipsoid(x, y, z, (0.0, -46.0, -32.0), (22.0, 13.0, 10.0))
    gm = gm | (cb & folia)
    wm = wm & ~(cb & folia)
    nuclei = np.zeros(shape, dtype=bool)
    for s in (-1.0, 1.0):
        nuclei |= _ellipsoid(x, y, z, (s * 10.0, -18.0, 6.0), (9.0, 15.0, 9.0))  # thalamus
        nuclei |= _ellipsoid(x, y, z, (s * 13.0, 10.0, 12.0), (5.0, 9.0, 8.0))  # caudate head
        nuclei |= _ellipsoid(x, y, z, (s * 24.0, 0.0, 2.0), (6.0, 14.0, 9.0))  # putamen
    gm = (gm | (nuclei & wm)) & brain
    wm = wm & ~nuclei
    vent = np.zeros(shape, dtype=bool)
    for s in (-1.0, 1.0):
        vent |= _ellipsoid(x, y, z, (s * 9.0, -6.0, 16.0), (6.0, 30.0, 8.0))
        vent |= _ellipsoid(x, y, z, (s * 16.0, -34.0, 9.0), (6.0, 10.0, 9.0))
        vent |= _ellipsoid(x, y, z, (s * 20.0, -20.0, -6.0), (3.5, 11.0, 4.0))  # temporal horn
    vent |= _ellipsoid(x, y, z, (0.0, -14.0, 2.0), (1.8, 12.0, 8.0))
    gm &= ~vent
    wm &= ~vent
    inside = brain | ndimage.binary_dilation(brain, iterations=1)
    ic = ndimage.binary_fill_holes(ndimage.binary_closing(inside, iterations=2))
    out_d = ndimage.distance_transform_edt(~ic) * step
    skull_w = 5.0 + 1.5 * lobes
    skull = (out_d > 0) & (out_d <= skull_w)
    scalp = (out_d > skull_w) & (out_d <= skull_w + 5.0 + 0.8 * sulcal)

    def soft(m: npt.NDArray[np.bool_]) -> FloatArray:
        out: FloatArray = ndimage.gaussian_filter(m.astype(np.float32), 0.55)
        return out

    gmf, wmf, ventf = soft(gm), soft(wm), soft(vent)
    icf = soft(ic)
    csf = np.clip(icf - gmf - wmf, 0.0, 1.0)
    ventf = np.minimum(ventf, csf)
    ras = np.stack([x + cx, y + cy, z + cz]).astype(np.float32)
    depth = ndimage.distance_transform_edt(ic) * step
    vessels = _vessels(ras, depth, ventf)
    maps = np.stack(
        [
            _to_u8(soft(scalp)),
            _to_u8(soft(skull) * (1 - icf)),
            _to_u8(csf),
            _to_u8(gmf),
            _to_u8(wmf),
            _to_u8(ventf),
            _to_u8(vessels),
        ],
        axis=-1,
    )
    return Template(maps=np.ascontiguousarray(maps), affine=affine, source="parametric")


TEMPLATE_SOURCES = ("auto", "mni152", "procedural", "parametric")


@lru_cache(maxsize=3)
def load_template(source: str = "auto") -> Template:
    """The tissue template, loaded once per process: MNI152 from nilearn, else procedural.

    "parametric" is rendering style b's own head (never a fallback).
    """
    if source not in TEMPLATE_SOURCES:
        raise ValueError(f"source must be one of {TEMPLATE_SOURCES}, not {source!r}")
    if source == "procedural":
        return _procedural_template()
    if source == "parametric":
        return _parametric_template()
    try:
        return _mni_template()
    except (ImportError, OSError, FileNotFoundError):
        if source == "mni152":
            raise
        return _procedural_template()


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Subject:
    """One synthetic person: how their head differs from the template."""

    linear: npt.NDArray[np.float64]  # 3x3: template RAS offset -> patient RAS offset
    shift_mm: npt.NDArray[np.float64]  # patient RAS of the template brain centre
    warp_k: npt.NDArray[np.float64]  # (n, 3) spatial frequencies of the elastic field (1/mm)
    warp_phase: npt.NDArray[np.float64]  # (n,)
    warp_amp: npt.NDArray[np.float64]  # (n, 3) mm
    ventricle_gain: float  # >0 enlarges, <0 shrinks the ventricles
    template_source: str
    # Style b: a smooth random displacement field (3, n, n, n) in mm on a coarse lattice spanning
    # +-ELASTIC_HALF_MM around the brain centre (template offsets), linearly interpolated.
    elastic: npt.NDArray[np.float32] | None = None
    # Style c: Gaussian radial-basis displacements (k, 7): centre offset (3, template mm),
    # displacement (3, mm) and width (mm) of each.
    bumps: npt.NDArray[np.float32] | None = None


ELASTIC_HALF_MM = 110.0


def _rotation(ax: float, ay: float, az: float) -> npt.NDArray[np.float64]:
    cx, sx, cy, sy, cz, sz = (
        math.cos(ax),
        math.sin(ax),
        math.cos(ay),
        math.sin(ay),
        math.cos(az),
        math.sin(az),
    )
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    out: npt.NDArray[np.float64] = rz @ ry @ rx
    return out


def random_subject(rng: np.random.Generator, template_source: str = "auto") -> Subject:
    """Draw a head: rotation +-6 deg, size 0.9..1.1 per axis, elastic warp ~3 mm, ventricles."""
    rot = _rotation(*np.deg2rad(rng.uniform(-6, 6, 3)))
    scale = np.diag(rng.uniform(0.9, 1.08, 3) * rng.uniform(0.95, 1.03))
    n = 6
    return Subject(
        linear=rot @ scale,
        shift_mm=rng.uniform(-4, 4, 3),
        warp_k=rng.normal(0, 1, (n, 3)) * (2 * math.pi / 110.0),
        warp_phase=rng.uniform(0, 2 * math.pi, n),
        warp_amp=rng.normal(0, 1.4, (n, 3)),
        ventricle_gain=float(
            rng.choice([rng.uniform(-0.15, 0.2), rng.uniform(0.2, 0.55)], p=[0.75, 0.25])
        ),
        template_source=template_source,
    )


def random_subject_b(rng: np.random.Generator) -> Subject:
    """Style b's head: rotation +-10 deg, size 0.86..1.12 per axis, a random elastic field.

    The displacement is a 6^3 lattice of N(0, 2-4.5 mm) vectors, cubic-upsampled to 13^3 and
    interpolated linearly: a different deformation family from style a's random sinusoids.
    """
    rot = _rotation(*np.deg2rad(rng.uniform(-10, 10, 3)))
    scale = np.diag(rng.uniform(0.86, 1.12, 3))
    coarse = rng.normal(0.0, float(rng.uniform(2.0, 4.5)), (3, 6, 6, 6))
    fine = np.stack([ndimage.zoom(c, 13 / 6, order=3) for c in coarse]).astype(np.float32)
    return Subject(
        linear=rot @ scale,
        shift_mm=rng.uniform(-6, 6, 3),
        warp_k=np.zeros((0, 3)),
        warp_phase=np.zeros(0),
        warp_amp=np.zeros((0, 3)),
        ventricle_gain=float(rng.uniform(-0.2, 0.6)),
        template_source="parametric",
        elastic=fine,
    )


def random_subject_c(rng: np.random.Generator, template_source: str = "auto") -> Subject:
    """Style c's head: the atlas, but its own proportions and deformation.

    Head shape from a cephalic index (width / length 0.72-0.88, the brain scaled to it
    around a drawn length), a pitch of +-12 deg (neck flexion) with little roll, and 8-14
    Gaussian radial-basis displacements (3-7 mm, 18-35 mm wide) placed in the brain: local
    bulges and dents, unlike style a's global sinusoids and style b's lattice field.
    """
    length = rng.uniform(0.9, 1.1)
    width = length * rng.uniform(0.72, 0.88) / 0.8
    height = length * rng.uniform(0.9, 1.08)
    rot = _rotation(*np.deg2rad([rng.uniform(-12, 12), rng.uniform(-3, 3), rng.uniform(-5, 5)]))
    k = int(rng.integers(8, 15))
    centres = rng.uniform(-1, 1, (k, 3)) * np.array([55.0, 70.0, 45.0])
    direction = rng.normal(0, 1, (k, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    disp = direction * rng.uniform(3.0, 7.0, (k, 1))
    widths = rng.uniform(18.0, 35.0, (k, 1))
    return Subject(
        linear=rot @ np.diag([width, length, height]),
        shift_mm=rng.uniform(-5, 5, 3),
        warp_k=np.zeros((0, 3)),
        warp_phase=np.zeros(0),
        warp_amp=np.zeros((0, 3)),
        ventricle_gain=float(rng.triangular(-0.15, 0.1, 0.6)),
        template_source=template_source,
        bumps=np.concatenate([centres, disp, widths], axis=1).astype(np.float32),
    )


def _bumps(bumps: npt.NDArray[np.float32], m: FloatArray) -> FloatArray:
    """Displacement (N, 3) mm of the radial-basis bumps at template offsets m (N, 3)."""
    out = np.zeros_like(m)
    for row in bumps:
        d = m - row[:3]
        w = np.exp(-np.einsum("ij,ij->i", d, d) / np.float32(2 * row[6] ** 2))
        out += w[:, None] * row[3:6]
    return out


def _elastic(field: npt.NDArray[np.float32], m: FloatArray) -> FloatArray:
    """Displacement (N, 3) mm of the lattice field at template offsets m (N, 3)."""
    n = field.shape[1]
    idx = (m + np.float32(ELASTIC_HALF_MM)) * np.float32((n - 1) / (2 * ELASTIC_HALF_MM))
    out = np.stack(
        [ndimage.map_coordinates(field[i], idx.T, order=1, mode="nearest") for i in range(3)],
        axis=1,
    )
    res: FloatArray = out.astype(np.float32)
    return res


def _affine_points(subject: Subject, points_lps: FloatArray) -> FloatArray:
    """Template offsets from the brain centre (before any warp) of patient points (N, 3)."""
    flat = points_lps.reshape(-1, 3).astype(np.float32)
    ras = flat * np.array([-1.0, -1.0, 1.0], dtype=np.float32)
    inv = np.linalg.inv(subject.linear).astype(np.float32)
    out: FloatArray = (ras - subject.shift_mm.astype(np.float32)) @ inv.T
    return out


def _template_points(
    subject: Subject, points_lps: FloatArray, elastic_mm: FloatArray | None = None
) -> FloatArray:
    """Template (RAS mm) points that patient (LPS mm) points see.

    `elastic_mm` (N, 3): the elastic displacement at these points when the caller has it
    already (sample_anatomy interpolates it from a coarse lattice of the grid)."""
    m = _affine_points(subject, points_lps)
    phase = m @ subject.warp_k.T.astype(np.float32) + subject.warp_phase.astype(np.float32)
    m = m + np.sin(phase) @ subject.warp_amp.astype(np.float32)
    if elastic_mm is not None:
        m = m + elastic_mm.reshape(-1, 3)
    elif subject.elastic is not None:
        m = m + _elastic(subject.elastic, m)
    if subject.bumps is not None:
        m = m + _bumps(subject.bumps, m)
    # Ventricle size: sample closer to the ventricle centre to enlarge them.
    d = m - (_VENTRICLE_CENTRE_RAS - _BRAIN_CENTRE_RAS).astype(np.float32)
    r2 = np.einsum("ij,ij->i", d, d)
    m = m - d * (subject.ventricle_gain * np.exp(-r2 / (2 * 22.0**2)))[:, None].astype(np.float32)
    out: FloatArray = (m + _BRAIN_CENTRE_RAS.astype(np.float32)).reshape(points_lps.shape)
    return out


def _trilinear(maps: npt.NDArray[np.uint8], vox: FloatArray) -> FloatArray:
    """Trilinear interpolation of all channels at once (N, 3) -> (N, C), zero outside."""
    shape = np.array(maps.shape[:3])
    flat = maps.reshape(-1, maps.shape[3])
    base = np.floor(vox).astype(np.int64)
    inside = np.all((base >= 0) & (base < shape - 1), axis=1)
    frac = np.where(inside[:, None], vox - base, 0).astype(np.float32)
    base = np.where(inside[:, None], base, 0)
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    lin = base @ strides
    out = np.zeros((vox.shape[0], maps.shape[3]), dtype=np.float32)
    for dx in (0, 1):
        wx = frac[:, 0] if dx else 1 - frac[:, 0]
        for dy in (0, 1):
            wxy = wx * (frac[:, 1] if dy else 1 - frac[:, 1])
            for dz in (0, 1):
                w = wxy * (frac[:, 2] if dz else 1 - frac[:, 2])
                out += flat[lin + (dx * strides[0] + dy * strides[1] + dz)] * w[:, None]
    out *= (inside / np.float32(255.0)).astype(np.float32)[:, None]
    return out


def sample_points(
    subject: Subject, points_lps: FloatArray, elastic_mm: FloatArray | None = None
) -> dict[str, FloatArray]:
    """Tissue fractions of the subject's head at patient points (..., 3)."""
    template = load_template(subject.template_source)
    pts = _template_points(subject, points_lps, elastic_mm).reshape(-1, 3)
    inv = np.linalg.inv(template.affine)
    vox = pts @ inv[:3, :3].T.astype(np.float32) + inv[:3, 3].astype(np.float32)
    vals = _trilinear(template.maps, vox)
    names = TEMPLATE_CHANNELS
    shape = points_lps.shape[:-1]
    return {n: np.ascontiguousarray(vals[:, i].reshape(shape)) for i, n in enumerate(names)}


def sample_anatomy(subject: Subject, grid: Grid, *, vessels: bool = True) -> dict[str, FloatArray]:
    """Tissue fractions of the subject's head on a grid: TEMPLATE_CHANNELS, the vessels carved
    out of CSF and cortex (``carve_vessels``); ``vessels=False``: no vessel map, CSF and cortex
    as the template has them (plain style-a studies, the shipped bundles' training data)."""
    fractions = _sample_grid(subject, grid)
    if vessels:
        return carve_vessels(fractions)
    fractions.pop("vessels")
    return fractions


def _sample_grid(subject: Subject, grid: Grid) -> dict[str, FloatArray]:
    """sample_anatomy before the vessels are carved."""
    pts = grid.points()
    s, r, c = grid.shape
    if subject.elastic is None or min(r, c) < 16:
        return sample_points(subject, pts)
    # The elastic field is smooth over ~18 mm: evaluate it on every 4th row and column and
    # interpolate linearly in between (corner-aligned), a tenth of the cost.
    rows = np.linspace(0, r - 1, r // 4 + 1)
    cols = np.linspace(0, c - 1, c // 4 + 1)
    coarse = (
        np.array(grid.origin, dtype=np.float32)
        + (np.arange(s, dtype=np.float32) * grid.slice_mm)[:, None, None, None]
        * grid.normal.astype(np.float32)
        + (rows.astype(np.float32) * grid.pixel_mm[0])[None, :, None, None]
        * np.array(grid.col_dir, dtype=np.float32)
        + (cols.astype(np.float32) * grid.pixel_mm[1])[None, None, :, None]
        * np.array(grid.row_dir, dtype=np.float32)
    )
    d = _elastic(subject.elastic, _affine_points(subject, coarse)).reshape(
        s, len(rows), len(cols), 3
    )
    ri = np.interp(np.arange(r), rows, np.arange(len(rows))).astype(np.float32)
    ci = np.interp(np.arange(c), cols, np.arange(len(cols))).astype(np.float32)
    r0 = np.minimum(ri.astype(np.intp), len(rows) - 2)
    c0 = np.minimum(ci.astype(np.intp), len(cols) - 2)
    wr = (ri - r0)[None, :, None, None]
    wc = (ci - c0)[None, None, :, None]
    dr = d[:, r0] * (1 - wr) + d[:, r0 + 1] * wr
    full = dr[:, :, c0] * (1 - wc) + dr[:, :, c0 + 1] * wc
    return sample_points(subject, pts, full.astype(np.float32))

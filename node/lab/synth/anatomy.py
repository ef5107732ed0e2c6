"""A subject's head: MNI152 tissue maps (or a procedural head), deformed, sampled on a grid.

Tissue maps live in template space (RAS mm); a ``Subject`` maps patient LPS points to template
points with a random affine, a smooth elastic field and a ventricle enlargement, so every
series samples the same deformed head on its own geometry.
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
# Brain centre in template (MNI RAS) mm: the patient's isocentre is placed here.
_BRAIN_CENTRE_RAS = np.array([0.0, -18.0, 14.0])
_VENTRICLE_CENTRE_RAS = np.array([0.0, -12.0, 14.0])


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Template:
    """Tissue fractions (uint8, 0..255) on a template grid, and the grid's voxel-to-RAS affine."""

    maps: npt.NDArray[np.uint8]  # (i, j, k, tissue): ANATOMY_TISSUES then ventricles
    affine: npt.NDArray[np.float64]
    source: str  # "mni152" or "procedural"


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


def _nilearn_data_dir() -> Path:
    """Folder of the MNI152 templates shipped inside the nilearn wheel (ImportError if absent)."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


def _to_u8(a: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    out: npt.NDArray[np.uint8] = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
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
    maps = np.stack(
        [_to_u8(scalpf), _to_u8(skullf), _to_u8(csf), _to_u8(gm), _to_u8(wm), _to_u8(vent)],
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
    maps = np.stack(
        [_to_u8(scalp), _to_u8(skull), _to_u8(csf), _to_u8(gm), _to_u8(wm), _to_u8(vent)],
        axis=-1,
    )
    return Template(maps=np.ascontiguousarray(maps), affine=affine, source="procedural")


@lru_cache(maxsize=2)
def load_template(source: str = "auto") -> Template:
    """The tissue template, loaded once per process: MNI152 from nilearn, else procedural."""
    if source not in ("auto", "mni152", "procedural"):
        raise ValueError(f"source must be auto, mni152 or procedural, not {source!r}")
    if source == "procedural":
        return _procedural_template()
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


def _template_points(subject: Subject, points_lps: FloatArray) -> FloatArray:
    """Template (RAS mm) points that patient (LPS mm) points see."""
    flat = points_lps.reshape(-1, 3).astype(np.float32)
    ras = flat * np.array([-1.0, -1.0, 1.0], dtype=np.float32)
    inv = np.linalg.inv(subject.linear).astype(np.float32)
    m = (ras - subject.shift_mm.astype(np.float32)) @ inv.T
    phase = m @ subject.warp_k.T.astype(np.float32) + subject.warp_phase.astype(np.float32)
    m = m + np.sin(phase) @ subject.warp_amp.astype(np.float32)
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


def sample_anatomy(subject: Subject, grid: Grid) -> dict[str, FloatArray]:
    """Tissue fractions of the subject's head on a grid: ANATOMY_TISSUES plus 'ventricles'."""
    template = load_template(subject.template_source)
    pts = _template_points(subject, grid.points()).reshape(-1, 3)
    inv = np.linalg.inv(template.affine)
    vox = pts @ inv[:3, :3].T.astype(np.float32) + inv[:3, 3].astype(np.float32)
    vals = _trilinear(template.maps, vox)
    names = (*ANATOMY_TISSUES, "ventricles")
    return {n: np.ascontiguousarray(vals[:, i].reshape(grid.shape)) for i, n in enumerate(names)}

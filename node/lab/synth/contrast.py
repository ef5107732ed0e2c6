"""MR contrast from tissue properties and acquisition parameters (standard signal equations)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True, kw_only=True)
class Tissue:
    """Relaxation and diffusion properties of one tissue (about 1.5-3 T)."""

    pd: float  # proton density, relative
    t1_ms: float
    t2_ms: float
    adc: float  # apparent diffusion coefficient, 1e-3 mm^2/s
    gd_r1: float = 0.0  # added relaxation rate 1/T1 after gadolinium, 1/s
    fat: bool = False  # suppressed by the fat saturation of EPI diffusion


# Per tissue: the values of the normal head, then the lesion tissues phenotypes draw on.
TISSUES: dict[str, Tissue] = {
    "scalp": Tissue(pd=0.9, t1_ms=360, t2_ms=90, adc=0.1, gd_r1=0.3, fat=True),
    "skull": Tissue(pd=0.08, t1_ms=500, t2_ms=15, adc=0.1),
    "csf": Tissue(pd=1.0, t1_ms=4200, t2_ms=2000, adc=3.0),
    "gm": Tissue(pd=0.82, t1_ms=1400, t2_ms=100, adc=0.85),
    "wm": Tissue(pd=0.70, t1_ms=750, t2_ms=75, adc=0.72),
    "edema": Tissue(pd=0.90, t1_ms=1500, t2_ms=210, adc=1.45, gd_r1=0.05),
    "enhancing": Tissue(pd=0.85, t1_ms=1450, t2_ms=120, adc=1.10, gd_r1=3.0),
    "necrosis": Tissue(pd=0.95, t1_ms=2600, t2_ms=320, adc=2.20),
    "infiltrative": Tissue(pd=0.92, t1_ms=1600, t2_ms=230, adc=1.4),
    "lymphoma": Tissue(pd=0.80, t1_ms=1250, t2_ms=88, adc=0.50, gd_r1=3.0),
    "tuber": Tissue(pd=0.9, t1_ms=1550, t2_ms=215, adc=1.1),
    "nodule": Tissue(pd=0.70, t1_ms=700, t2_ms=60, adc=0.8),
    "wmh": Tissue(pd=0.86, t1_ms=1300, t2_ms=150, adc=1.0),
}
TISSUE_ORDER = tuple(TISSUES)


@dataclass(frozen=True, slots=True, kw_only=True)
class Acquisition:
    """The physics of one series: which equation and which parameters."""

    equation: str  # "se", "gre", "ir", "epi"
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None
    flip_deg: float = 90.0
    b_value: float = 0.0  # s/mm^2 (epi diffusion)
    contrast: bool = False  # after gadolinium
    fat_sat: bool = False
    # Style c only (signal_c): the scanner side of its Bloch steady-state model.
    field_t: float = 1.5
    echo_train: int = 1
    refocus_deg: float = 180.0  # refocusing flip angle (SAR-limited at 3 T)
    inversion_eff: float = 1.0  # inversion efficiency (1: a perfect 180)
    mt: float = 0.0  # magnetisation-transfer saturation of multi-slice spin-echo trains


# Gadolinium's added relaxation rate in blood (1/s): about 4 /mM/s at 1-1.5 mM in the first
# minutes, so the dural sinuses and choroid plexus are several times brighter on T1 after it.
BLOOD_GD_R1 = 6.0


def with_vessels(tissues: dict[str, Tissue]) -> dict[str, Tissue]:
    """The tissue table with ``vessels`` (venous blood, anatomy's sinuses and choroid plexus)
    derived from this subject's own grey and white matter and CSF, so every draw keeps it
    (no random draw: a study's other draws are unchanged): T1 about 1.1x grey matter, T2 a
    little below white matter (deoxygenated), diffusion like CSF (flow dephases), enhancing."""
    gm, wm, csf = tissues["gm"], tissues["wm"], tissues["csf"]
    blood = Tissue(
        pd=gm.pd, t1_ms=gm.t1_ms * 1.1, t2_ms=wm.t2_ms * 0.85, adc=csf.adc, gd_r1=BLOOD_GD_R1
    )
    return {**tissues, "vessels": blood}


def flair_null_ti(tr_ms: float, t1_ms: float = TISSUES["csf"].t1_ms) -> float:
    """Inversion time that nulls a tissue of the given T1 at this TR."""
    return t1_ms * math.log(2.0 / (1.0 + math.exp(-tr_ms / t1_ms)))


def tissue_signal(t: Tissue, acq: Acquisition) -> float:
    """Magnitude signal of a pure tissue voxel for this acquisition."""
    r1 = 1000.0 / t.t1_ms + (t.gd_r1 if acq.contrast else 0.0)
    t1 = 1000.0 / r1
    e1 = math.exp(-acq.tr_ms / t1)
    e2 = math.exp(-acq.te_ms / t.t2_ms)
    if acq.equation == "se":
        s = t.pd * (1 - e1) * e2
    elif acq.equation == "gre":
        a = math.radians(acq.flip_deg)
        s = t.pd * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1) * e2
    elif acq.equation == "ir":
        ti = acq.ti_ms if acq.ti_ms is not None else 0.0
        s = t.pd * abs(1 - 2 * math.exp(-ti / t1) + e1) * e2
    elif acq.equation == "epi":
        s = t.pd * (1 - e1) * e2 * math.exp(-acq.b_value * t.adc * 1e-3)
    else:
        raise ValueError(f"unknown signal equation {acq.equation!r}")
    if t.fat and acq.fat_sat:
        s *= 0.08
    return s


def render(
    fractions: dict[str, FloatArray],
    acq: Acquisition,
    tissues: dict[str, Tissue],
) -> FloatArray:
    """Noise-free image: the partial-volume sum of each tissue's signal."""
    shape = next(iter(fractions.values())).shape
    out = np.zeros(shape, dtype=np.float32)
    for name, frac in fractions.items():
        if name in tissues:
            out += np.float32(tissue_signal(tissues[name], acq)) * frac
    return out


def jitter_tissues(rng: np.random.Generator, base: dict[str, Tissue]) -> dict[str, Tissue]:
    """Per-subject tissue variation: a few percent on every property."""
    out = {}
    for name, t in base.items():
        f = rng.normal(1.0, 0.04, 4)
        out[name] = replace(
            t,
            pd=t.pd * float(f[0]),
            t1_ms=t.t1_ms * float(f[1]),
            t2_ms=t.t2_ms * float(f[2]),
            adc=t.adc * float(f[3]),
        )
    return out


def bias_field(
    rng: np.random.Generator, shape: tuple[int, int, int], strength: float
) -> FloatArray:
    """Smooth multiplicative receive-coil shading, about +-strength."""
    s, r, c = shape
    z = np.linspace(-1, 1, s, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, r, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, c, dtype=np.float32)[None, None, :]
    a = rng.normal(0, 1, 7).astype(np.float32)
    log = (
        a[0] * x
        + a[1] * y
        + a[2] * z * 0.5
        + a[3] * x * y
        + a[4] * (x**2 - 0.33)
        + a[5] * (y**2 - 0.33)
        + a[6] * x * z
    )
    field: FloatArray = np.exp(strength * 0.5 * log).astype(np.float32)
    return field


def blur_inplane(img: FloatArray, sigma_px: float) -> FloatArray:
    """Lower effective in-plane resolution (a smaller acquisition matrix, interpolated)."""
    if sigma_px <= 0.05:
        return img
    out: FloatArray = ndimage.gaussian_filter(img, (0, sigma_px, sigma_px), truncate=2.5).astype(
        np.float32
    )
    return out


def _linear_weights(
    n_in: int, n_out: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], FloatArray]:
    """Neighbour indices and weights of pixel-centre-aligned linear resampling along one axis."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * n_in / n_out - 0.5
    x = np.clip(x, 0.0, n_in - 1.0)
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (x - i0).astype(np.float32)


def upsample_inplane(img: FloatArray, rows: int, cols: int) -> FloatArray:
    """Linear interpolation of each slice to the display matrix, as scanners do."""
    _, r, c = img.shape
    if (r, c) == (rows, cols):
        return img
    i0, i1, w = _linear_weights(r, rows)
    tmp = img[:, i0, :] * (1 - w)[None, :, None] + img[:, i1, :] * w[None, :, None]
    j0, j1, v = _linear_weights(c, cols)
    out: FloatArray = (tmp[:, :, j0] * (1 - v) + tmp[:, :, j1] * v).astype(np.float32)
    return out


def rician(rng: np.random.Generator, img: FloatArray, sigma: float) -> FloatArray:
    """Magnitude of the image plus complex Gaussian noise."""
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    out: FloatArray = np.sqrt((img + n1) ** 2 + n2**2).astype(np.float32)
    return out


# --- Rendering style b: relaxation maps, then the signal equations voxel by voxel. ---


def tissue_maps(
    fractions: dict[str, FloatArray], tissues: dict[str, Tissue], *, contrast: bool
) -> dict[str, FloatArray]:
    """PD, R1, R2 (1/ms), ADC and fat maps: proton-weighted averages of the tissues in a voxel.

    Style a sums each tissue's signal (partial volume of signals); style b averages the
    relaxation rates first (fast exchange), which gives different edges and contrasts.
    """
    shape = next(iter(fractions.values())).shape
    pd = np.zeros(shape, dtype=np.float32)
    r1 = np.zeros(shape, dtype=np.float32)
    r2 = np.zeros(shape, dtype=np.float32)
    adc = np.zeros(shape, dtype=np.float32)
    fat = np.zeros(shape, dtype=np.float32)
    for name, frac in fractions.items():
        t = tissues.get(name)
        if t is None:
            continue
        w = frac * np.float32(t.pd)
        pd += w
        rate1 = 1.0 / t.t1_ms + (t.gd_r1 / 1000.0 if contrast else 0.0)
        rate2 = 1.0 / t.t2_ms + (t.gd_r1 * 0.6 / 1000.0 if contrast else 0.0)
        r1 += w * np.float32(rate1)
        r2 += w * np.float32(rate2)
        adc += w * np.float32(t.adc)
        if t.fat:
            fat += w
    safe = np.maximum(pd, np.float32(1e-4))
    return {
        "pd": pd,
        "r1": (r1 / safe).astype(np.float32),
        "r2": (r2 / safe).astype(np.float32),
        "adc": (adc / safe).astype(np.float32),
        "fat": (fat / safe).astype(np.float32),
    }


def signal_b(maps: dict[str, FloatArray], acq: Acquisition) -> FloatArray:
    """Style b's signal equations on maps (TR, TE, TI in ms; b in s/mm^2).

    Spin echo with the refocusing term, inversion recovery with it too, MP-RAGE-like
    magnetisation-prepared gradient echo when an IR sequence has a gradient-echo TE (< 10 ms),
    FLASH with T2* = T2 / 1.4, and spin-echo EPI diffusion.
    """
    pd, r1, r2 = maps["pd"], maps["r1"], maps["r2"]
    tr, te = np.float32(acq.tr_ms), np.float32(acq.te_ms)
    e1 = np.exp(-tr * r1)
    e1h = np.exp(-(tr - te / 2) * r1)
    e2 = np.exp(-te * r2)
    if acq.equation == "se":
        s = pd * np.abs(1 - 2 * e1h + e1) * e2
    elif acq.equation == "ir" and acq.te_ms < 10:
        ti = np.float32(acq.ti_ms or 0.0)
        s = pd * np.abs(1 - 2 * np.exp(-ti * r1) / (1 + e1)) * np.exp(-te * r2 * 1.4)
    elif acq.equation == "ir":
        ti = np.float32(acq.ti_ms or 0.0)
        s = pd * np.abs(1 - 2 * np.exp(-ti * r1) + 2 * e1h - e1) * e2
    elif acq.equation == "gre":
        a = np.float32(math.radians(acq.flip_deg))
        s = pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-te * r2 * 1.4)
    elif acq.equation == "epi":
        s = pd * (1 - e1) * e2 * np.exp(-np.float32(acq.b_value * 1e-3) * maps["adc"])
    else:
        raise ValueError(f"unknown signal equation {acq.equation!r}")
    if acq.fat_sat:
        s = s * (1 - 0.92 * maps["fat"])
    out: FloatArray = s.astype(np.float32)
    return out


def tissue_signal_b(t: Tissue, acq: Acquisition) -> float:
    """Style b's signal of a pure tissue voxel (for ordering checks and scaling)."""
    one = np.ones((1,), dtype=np.float32)
    maps = tissue_maps({"x": one}, {"x": t}, contrast=acq.contrast)
    return float(signal_b(maps, acq)[0])


def kspace_resize(img: FloatArray, rows: int, cols: int, keep: float) -> FloatArray:
    """Resample each slice through k-space: keep the central `keep` share of the acquired
    frequencies and zero-fill to (rows, cols), as scanners reconstruct (sinc interpolation with
    Gibbs ringing at sharp edges). Returns the real part."""
    s, r, c = img.shape
    k = np.fft.fftshift(np.fft.fft2(img, axes=(1, 2)), axes=(1, 2))
    kr, kc = max(4, int(r * keep)) // 2 * 2, max(4, int(c * keep)) // 2 * 2
    kr, kc = min(kr, r), min(kc, c)
    r0, c0 = (r - kr) // 2, (c - kc) // 2
    crop = k[:, r0 : r0 + kr, c0 : c0 + kc]
    out = np.zeros((s, rows, cols), dtype=np.complex64)
    R0, C0 = (rows - kr) // 2, (cols - kc) // 2
    out[:, R0 : R0 + kr, C0 : C0 + kc] = crop
    res = np.fft.ifft2(np.fft.ifftshift(out, axes=(1, 2)), axes=(1, 2)).real
    scaled: FloatArray = (res * (rows * cols) / (r * c)).astype(np.float32)
    return scaled


def motion_ghosts(
    rng: np.random.Generator, img: FloatArray, share: float, shift_px: float
) -> FloatArray:
    """Rigid in-plane motion during a share of the phase-encoding lines: ghost replicas."""
    _, r, c = img.shape
    k = np.fft.fft2(img, axes=(1, 2))
    lines = rng.random(r) < share
    kx = np.fft.fftfreq(c).astype(np.float32)
    ramp = np.exp(-2j * np.pi * kx * np.float32(shift_px)).astype(np.complex64)
    k[:, lines, :] *= ramp[None, None, :]
    out: FloatArray = np.abs(np.fft.ifft2(k, axes=(1, 2))).astype(np.float32)
    return out


def multicoil_noise(
    rng: np.random.Generator, img: FloatArray, sigma: float, coils: int, layout_seed: int
) -> FloatArray:
    """Root-sum-of-squares magnitude of `coils` receive channels (style b's noise model).

    Each channel sees the image through a smooth sensitivity and adds complex Gaussian noise;
    the combined magnitude is noncentral chi with 2 x coils degrees of freedom, drawn here in
    its closed form (one Gaussian plus one chi-square), and the sum of squared sensitivities
    shades the image (brighter near the coils). The layout comes from `layout_seed`, so series
    acquired together (DWI b=0 and b=1000) share it and their ratio stays physical.
    """
    layout = np.random.default_rng(layout_seed)
    s, r, c = img.shape
    zz = np.linspace(-1, 1, s, dtype=np.float32)
    yy = np.linspace(-1, 1, r, dtype=np.float32)
    xx = np.linspace(-1, 1, c, dtype=np.float32)
    phi0 = float(layout.uniform(0, 2 * math.pi))
    width = float(layout.uniform(0.9, 1.5))
    norm = np.zeros(img.shape, dtype=np.float32)
    for i in range(coils):
        phi = phi0 + 2 * math.pi * i / coils
        py, px = 1.2 * math.sin(phi), 1.2 * math.cos(phi)
        pz = float(layout.uniform(-0.6, 0.6))
        ez = np.exp(-0.6 * (zz - pz) ** 2 / width**2)[:, None, None]
        ey = np.exp(-2 * (yy - py) ** 2 / width**2)[None, :, None]
        ex = np.exp(-2 * (xx - px) ** 2 / width**2)[None, None, :]
        norm += ez * ey * ex
    gain = np.sqrt(norm / np.float32(norm.mean()))
    amp = img * gain
    first = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    rest = rng.chisquare(2 * coils - 1, img.shape).astype(np.float32) * np.float32(sigma**2)
    out: FloatArray = np.sqrt((amp + first) ** 2 + rest).astype(np.float32)
    return out


# --- Rendering style c: log-averaged relaxation times, Bloch steady states with B1. ---

_ECHO_SPACING_MS = 10.0
_R2_PRIME_PER_T = 0.0022  # 1/ms per tesla: T2* shortening grows with the field


def echo_train_ms(tr_ms: float, echo_train: int) -> float:
    """Style c: the time an echo train takes from each TR (at most half of it), during which
    longitudinal magnetisation does not recover."""
    return min(echo_train * _ECHO_SPACING_MS, 0.5 * tr_ms)


def tissue_maps_c(
    fractions: dict[str, FloatArray], tissues: dict[str, Tissue], *, contrast: bool
) -> dict[str, FloatArray]:
    """PD, T1, T2 (ms), ADC, fat and macromolecular-fraction maps, volume-weighted.

    Style a sums tissue signals and style b averages relaxation rates weighted by protons;
    style c averages log T1 and log T2 weighted by volume (a geometric mean, slow exchange),
    and keeps a macromolecular fraction 1 - PD for magnetisation transfer.
    """
    shape = next(iter(fractions.values())).shape
    vol = np.zeros(shape, dtype=np.float32)
    pd = np.zeros(shape, dtype=np.float32)
    lt1 = np.zeros(shape, dtype=np.float32)
    lt2 = np.zeros(shape, dtype=np.float32)
    adc = np.zeros(shape, dtype=np.float32)
    fat = np.zeros(shape, dtype=np.float32)
    for name, frac in fractions.items():
        t = tissues.get(name)
        if t is None:
            continue
        t1 = 1000.0 / (1000.0 / t.t1_ms + (t.gd_r1 if contrast else 0.0))
        t2 = 1000.0 / (1000.0 / t.t2_ms + (t.gd_r1 * 0.5 if contrast else 0.0))
        vol += frac
        pd += frac * np.float32(t.pd)
        lt1 += frac * np.float32(math.log(t1))
        lt2 += frac * np.float32(math.log(t2))
        adc += frac * np.float32(t.adc)
        if t.fat:
            fat += frac
    safe = np.maximum(vol, np.float32(1e-4))
    return {
        "pd": pd,
        "t1": np.exp(lt1 / safe).astype(np.float32),
        "t2": np.exp(lt2 / safe).astype(np.float32),
        "adc": (adc / safe).astype(np.float32),
        "fat": (fat / safe).astype(np.float32),
        "macro": np.clip(1.0 - pd / safe, 0.0, 1.0).astype(np.float32) * (vol > 1e-3),
    }


def signal_c(
    maps: dict[str, FloatArray], acq: Acquisition, b1: FloatArray | float = 1.0
) -> FloatArray:
    """Style c's signal: Bloch steady states with the transmit field `b1` (relative flip).

    Turbo spin echo with a finite refocusing angle (spin and stimulated echo pathways, the
    recovery shortened by the echo train) and magnetisation-transfer saturation; inversion
    recovery with an inversion efficiency; MP-RAGE as an inversion then a B1-scaled low-flip
    readout; Ernst spoiled gradient echo with T2* = 1 / (R2 + R2'(B0)); diffusion EPI whose
    trace is the arithmetic mean of three directions with white-matter anisotropy.
    """
    pd, t1, t2 = maps["pd"], maps["t1"], maps["t2"]
    b1a = np.asarray(b1, dtype=np.float32)
    tr, te = np.float32(acq.tr_ms), np.float32(acq.te_ms)
    train = np.float32(echo_train_ms(acq.tr_ms, acq.echo_train))
    r2s = 1.0 / t2 + np.float32(_R2_PRIME_PER_T * acq.field_t)
    mt = 1.0 - np.float32(acq.mt) * maps["macro"]
    beta = np.float32(math.radians(acq.refocus_deg)) * b1a
    spin = np.sin(beta / 2) ** 2
    if acq.equation == "se":
        rec = 1.0 - np.exp(-(tr - train) / t1)
        echo = spin * np.exp(-te / t2) + (1 - spin) * 0.5 * np.exp(-te * 0.8 / t2)
        s = pd * rec * echo * mt
    elif acq.equation == "ir" and acq.te_ms < 10:
        ti = np.float32(acq.ti_ms or 0.0)
        eta = np.float32(acq.inversion_eff)
        mz = 1.0 - (1.0 + eta) * np.exp(-ti / t1) + eta * np.exp(-tr / t1)
        a = np.float32(math.radians(8.0)) * b1a
        s = pd * np.abs(mz) * np.sin(a) * np.exp(-te * r2s)
    elif acq.equation == "ir":
        ti = np.float32(acq.ti_ms or 0.0)
        eta = np.float32(acq.inversion_eff)
        mz = 1.0 - (1.0 + eta) * np.exp(-ti / t1) + eta * np.exp(-(tr - train) / t1)
        s = pd * np.abs(mz) * (spin * np.exp(-te / t2) + (1 - spin) * 0.5 * np.exp(-te * 0.8 / t2))
        s = s * mt
    elif acq.equation == "gre":
        a = np.float32(math.radians(acq.flip_deg)) * b1a
        e1 = np.exp(-tr / t1)
        s = pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-te * r2s)
    elif acq.equation == "epi":
        d = maps["adc"] * np.float32(acq.b_value * 1e-3)
        k = np.float32(0.3) * maps.get("aniso", np.zeros_like(d))
        trace = (np.exp(-d * (1 + 2 * k)) + 2 * np.exp(-d * (1 - k))) / 3
        s = pd * (1 - np.exp(-tr / t1)) * np.exp(-te * r2s) * trace
    else:
        raise ValueError(f"unknown signal equation {acq.equation!r}")
    if acq.fat_sat:
        s = s * (1 - 0.95 * maps["fat"])
    out: FloatArray = np.asarray(s, dtype=np.float32)
    return out


def tissue_signal_c(t: Tissue, acq: Acquisition) -> float:
    """Style c's signal of a pure tissue voxel (for ordering checks and scaling)."""
    one = np.ones((1,), dtype=np.float32)
    maps = tissue_maps_c({"x": one}, {"x": t}, contrast=acq.contrast)
    return float(signal_c(maps, acq)[0])


def transmit_field(
    rng: np.random.Generator, shape: tuple[int, int, int], field_t: float
) -> FloatArray:
    """Relative B1 (flip angle) over a stack: the central brightening of a birdcage coil,
    strong at 3 T (dielectric effect, +15-30% in the centre), faint at 1.5 T."""
    s, r, c = shape
    amp = float(rng.uniform(0.15, 0.3) if field_t >= 2.0 else rng.uniform(0.02, 0.08))
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    width = float(rng.uniform(0.45, 0.7))
    z = np.linspace(-1, 1, s, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, r, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, c, dtype=np.float32)[None, None, :]
    bump = np.exp(-((y - cy) ** 2 + (x - cx) ** 2 + 0.3 * z**2) / (2 * width**2))
    out: FloatArray = (1.0 - amp / 2 + amp * bump).astype(np.float32)
    return out


def kspace_apodised(img: FloatArray, rows: int, cols: int, keep: float) -> FloatArray:
    """Style c's reconstruction: the central `keep` of k-space under a Tukey (cosine-tapered)
    filter, zero-filled to (rows, cols): less ringing, softer edges than a hard cut."""
    s, r, c = img.shape
    k = np.fft.fftshift(np.fft.fft2(img, axes=(1, 2)), axes=(1, 2))
    kr, kc = max(4, int(r * keep)) // 2 * 2, max(4, int(c * keep)) // 2 * 2
    kr, kc = min(kr, r), min(kc, c)
    r0, c0 = (r - kr) // 2, (c - kc) // 2

    def taper(n: int) -> FloatArray:
        u = np.abs(np.linspace(-1, 1, n, dtype=np.float32))
        w = np.where(u < 0.6, 1.0, 0.5 * (1 + np.cos(np.pi * (u - 0.6) / 0.4)))
        return w.astype(np.float32)

    crop = k[:, r0 : r0 + kr, c0 : c0 + kc] * (taper(kr)[:, None] * taper(kc)[None, :])[None]
    out = np.zeros((s, rows, cols), dtype=np.complex64)
    R0, C0 = (rows - kr) // 2, (cols - kc) // 2
    out[:, R0 : R0 + kr, C0 : C0 + kc] = crop
    res = np.abs(np.fft.ifft2(np.fft.ifftshift(out, axes=(1, 2)), axes=(1, 2)))
    scaled: FloatArray = (res * (rows * cols) / (r * c)).astype(np.float32)
    return scaled


def parallel_imaging_noise(
    rng: np.random.Generator, img: FloatArray, sigma: float, accel: int
) -> FloatArray:
    """Style c's noise: Rician (one channel, as after an adaptive coil combination) with its
    standard deviation raised by a parallel-imaging g-factor map (acceleration `accel` along
    the rows: highest where the aliased copies overlap, the centre of the field of view)."""
    _, r, c = img.shape
    y = np.linspace(-1, 1, r, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, c, dtype=np.float32)[None, None, :]
    g = 1.0 + 0.18 * (accel - 1) * np.exp(-(y**2) / 0.18) * np.exp(-(x**2) / 0.8)
    sig = np.float32(sigma) * g.astype(np.float32)
    re = img + rng.standard_normal(img.shape, dtype=np.float32) * sig
    im = rng.standard_normal(img.shape, dtype=np.float32) * sig
    out: FloatArray = np.sqrt(re**2 + im**2).astype(np.float32)
    return out

"""PNG grids of each contrast through the lesion, one per phenotype, for the docs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from node.lab.synth.phenotypes import PHENOTYPES
from node.lab.synth.study import SynthStudy, generate_study

_PANELS = (
    ("t1", "T1"),
    ("t1c", "T1C"),
    ("t2", "T2"),
    ("flair", "FLAIR"),
    ("dwi_b0", "DWI b=0"),
    ("dwi", "DWI b=1000"),
    ("adc", "ADC"),
)


def lesion_slice(study: SynthStudy, key: str | None = None) -> int:
    """Index of the slice through the first lesion (the middle slice when there is none), on
    the grid of volume `key` (default: the study's grid)."""
    grid = study.grids.get(key, study.grid) if key else study.grid
    if study.lesions:
        centre = study.lesions[0]["center_mm"]
        assert isinstance(centre, list)
        k = round(grid.voxel_of(centre)[0])
        return int(min(max(k, 0), grid.shape[0] - 1))
    return grid.shape[0] // 2


def study_figure(study: SynthStudy, path: Path) -> Path:
    """One row of panels: each routed contrast's slice through the lesion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = lesion_slice(study)
    planes = {s.kind: f"{s.plane[:3]} {s.acquisition}" for s in study.series}
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(2.0 * len(_PANELS), 2.35))
    for ax, (key, title) in zip(axes, _PANELS, strict=True):
        img = study.volumes[key][lesion_slice(study, key)]
        hi = float(np.percentile(img, 99.5)) or 1.0
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=hi, interpolation="nearest")
        kind = "dwi" if key == "dwi_b0" else key
        ax.set_title(f"{title}\n{planes.get(kind, '')}" if study.randomised else title, fontsize=8)
        ax.axis("off")
    atyp = " (atypical)" if study.atypical else ""
    extra = ", randomised" if study.randomised else ""
    fig.suptitle(
        f"{study.phenotype}{atyp}, {study.vendor}, style {study.style}{extra}, "
        f"{study.field_t:g} T, slice {k + 1}/{study.grid.shape[0]}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def write_figures(
    out: Path,
    *,
    seed: int,
    size: int = 256,
    slices: int = 24,
    vendor: str = "siemens",
    styles: list[str] | None = None,
) -> tuple[Path, ...]:
    """synth_<phenotype>.png for every phenotype (typical cases, same vendor) into out; with
    styles, also synth_style_<s>.png and synth_style_<s>_randomised.png (a typical GBM)."""
    paths: list[Path] = []
    for style in styles or ():
        for randomise in (False, True):
            for j in range(50):
                st = generate_study(
                    seed + j,
                    phenotype="gbm",
                    vendor=vendor,
                    size=size,
                    slices=slices,
                    distractors=False,
                    style=style,
                    randomise=randomise,
                )
                if not st.atypical:
                    break
            name = f"synth_style_{style}{'_randomised' if randomise else ''}.png"
            paths.append(study_figure(st, out / name))
    for i, ph in enumerate(PHENOTYPES):
        # Pick the first seed whose draw is typical, so the docs show the textbook picture.
        for j in range(50):
            st = generate_study(
                seed + 1000 * i + j,
                phenotype=ph,
                vendor=vendor,
                size=size,
                slices=slices,
                distractors=False,
            )
            if not st.atypical:
                break
        paths.append(study_figure(st, out / f"synth_{ph}.png"))
    return tuple(paths)

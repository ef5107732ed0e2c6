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


def lesion_slice(study: SynthStudy) -> int:
    """Index of the slice through the first lesion (the middle slice when there is none)."""
    if study.lesions:
        vox = study.lesions[0]["center_voxel"]
        assert isinstance(vox, list)
        return int(vox[0])
    return study.grid.shape[0] // 2


def study_figure(study: SynthStudy, path: Path) -> Path:
    """One row of panels: each routed contrast's slice through the lesion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = lesion_slice(study)
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(2.0 * len(_PANELS), 2.35))
    for ax, (key, title) in zip(axes, _PANELS, strict=True):
        img = study.volumes[key][k]
        hi = float(np.percentile(img, 99.5)) or 1.0
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    atyp = " (atypical)" if study.atypical else ""
    fig.suptitle(
        f"{study.phenotype}{atyp}, {study.vendor}, slice {k + 1}/{study.grid.shape[0]}", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def write_figures(
    out: Path, *, seed: int, size: int = 256, slices: int = 24, vendor: str = "siemens"
) -> tuple[Path, ...]:
    """synth_<phenotype>.png for every phenotype (typical cases, same vendor) into out."""
    paths = []
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

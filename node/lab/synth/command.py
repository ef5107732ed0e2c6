"""`neuronode synth`: write synthetic studies (and optionally the PNG grids)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from node.lab.synth.study import write_studies
from node.log import get_logger

log = get_logger(__name__)

if TYPE_CHECKING:
    from node.cli.lab import SynthArgs


def cmd_synth(args: SynthArgs) -> int:
    """Write args.studies studies under args.out; 2 on a bad argument."""
    t0 = time.perf_counter()
    try:
        manifest = write_studies(
            args.out,
            studies=args.studies,
            seed=args.seed,
            phenotypes=args.phenotype,
            vendors=args.vendor,
            size=args.size,
            slices=args.slices,
            enhanced=args.enhanced,
            transfer_syntax=args.transfer_syntax,
            distractors=not args.no_distractors,
            styles=args.style,
            randomise=args.randomise,
            plane=args.plane,
        )
    except ValueError as exc:
        print(f"neuronode synth: {exc}")
        return 2
    if args.figures is not None:
        from node.lab.synth.figures import write_figures

        for path in write_figures(
            args.figures, seed=args.seed, size=args.size, slices=args.slices, styles=args.style
        ):
            print(path)
    n_series = sum(len(s["series"]) for s in manifest.studies)  # type: ignore[arg-type,misc]
    log.info(
        "synth_done",
        count=len(manifest.studies),
        n_series=n_series,
        duration_ms=round((time.perf_counter() - t0) * 1000),
    )
    print(f"wrote {len(manifest.studies)} studies ({n_series} series) to {args.out}")
    return 0

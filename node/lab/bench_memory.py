"""Peak memory of one study job against the study's size (issue 15): a 200- and a 2,000-instance
synthetic study, each processed by the whole pipeline in a fresh subprocess.

The figure is the growth of the child's peak resident memory (VmHWM, else ru_maxrss) from the
small study to the large one; the target is <= 150 MB. Each child imports torch and MONAI and
warms up as a worker does before its first study (bundles loaded, detectors' scaling built),
so the import and model memory is common to both and cancels in the growth.
Run: ``python -m node.lab.bench_memory [--work DIR] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TARGET_GROWTH_MB = 150.0
SMALL_INSTANCES = 200
LARGE_INSTANCES = 2_000
SEED = 4242


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryFigure:
    """One study processed in a child process: its size, peak memory and time."""

    n_instances: int
    n_series: int
    peak_mb: float
    seconds: float


def _count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.dcm"))


def _merge_into(first: Path, other: Path) -> None:
    """Rewrite a second synthetic study's files into the first's study (same StudyInstanceUID
    and patient): one larger study with more series, as when a site repeats sequences."""
    import pydicom

    ref = pydicom.dcmread(next(first.rglob("*.dcm")), stop_before_pixels=True)
    keep = (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
    )
    for path in sorted(other.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in keep:
            if keyword in ref:
                setattr(ds, keyword, ref[keyword].value)
        target = first / "merged" / path.relative_to(other)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)


def make_study(out: Path, instances: int, *, seed: int = SEED, slices: int = 160) -> Path:
    """One synthetic study (node.lab.synth) with at least `instances` instances; its folder.

    The generator writes a fixed set of series (a handful of slices-long series and small
    extras): a small study gets shorter series; a large one is several generated studies
    rewritten into one (longer series and more of them, as in a long multi-sequence exam)."""
    from node.lab.synth.study import write_studies

    folder = out / f"study_{instances}"
    probe = out / "probe"
    write_studies(probe, studies=1, seed=seed, slices=slices)
    per_study = _count(probe)
    shutil.rmtree(probe)
    if instances < per_study:
        ratio = per_study / slices  # instances per slice of every series, roughly
        write_studies(folder, studies=1, seed=seed, slices=max(4, round(instances / ratio)))
        return folder
    write_studies(folder, studies=1, seed=seed, slices=slices)
    k = 1
    while _count(folder) < instances:
        extra = out / f"extra_{k}"
        write_studies(extra, studies=1, seed=seed + k, slices=slices)
        _merge_into(folder, extra)
        shutil.rmtree(extra)
        k += 1
    return folder


_CHILD = """
import json, os, resource, sys, time
from pathlib import Path
from node.bundles.bundle import set_torch_threads
from node.config import Rules
import pydicom
from node.pipeline.models import warm_up
from node.pipeline.runner import process_study
from node.records import StudyJob

set_torch_threads()
folder, out, models = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
rules = Rules(models_dir=models)
warm_up(rules)  # what a worker loads and builds before its first study: common to both sizes
paths = tuple(sorted(folder.rglob("*.dcm")))  # one study, whatever its folder layout
study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
job = StudyJob(job_id=0, study_uid=study_uid, instance_paths=paths, attempt=1)
t0 = time.perf_counter()
outcome = process_study(job, rules, out_dir=out)
seconds = time.perf_counter() - t0
hwm = None
with open("/proc/self/status", encoding="ascii") as fh:
    for line in fh:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
audit = json.loads(outcome.audit_path.read_text())
print(json.dumps({"n_instances": outcome.n_instances, "n_series": outcome.n_series,
                  "peak_mb": peak, "seconds": seconds,
                  "sequences": [[s["series_instance_uid"], s["label"], s["confidence"]]
                                for s in audit["sequences"]],
                  "findings": audit.get("findings")}))
"""


def measure(folder: Path, out: Path, models: Path) -> tuple[MemoryFigure, dict[str, object]]:
    """Process the study under `folder` in a fresh interpreter; its peak memory and result."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), str(out), str(models)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    peak = float(data["peak_mb"]) or usage
    return (
        MemoryFigure(
            n_instances=int(data["n_instances"]),
            n_series=int(data["n_series"]),
            peak_mb=round(peak, 1),
            seconds=round(float(data["seconds"]), 2),
        ),
        data,
    )


def bench_records(work: Path, *, small: int = SMALL_INSTANCES, large: int = LARGE_INSTANCES) -> Any:
    """The memory figure for `neuronode bench`: the peak of a `large`-instance study job, its
    reference the `small`-instance one in the same run, the growth against the 150 MB target."""
    from node.lab.bench import BenchRecord

    figures = []
    for n in (small, large):
        folder = work / f"study_{n}"
        if not folder.is_dir():
            folder = make_study(work, n)
        figures.append(measure(folder, work / f"out_{n}", REPO / "models")[0])
    growth = figures[1].peak_mb - figures[0].peak_mb
    return (
        BenchRecord(
            name=f"memory: study job, {figures[1].n_instances} instances",
            figure=figures[1].peak_mb,
            unit="MB peak",
            reference=figures[0].peak_mb,
            reference_what=f"the same job on {figures[0].n_instances} instances",
            ratio=round(figures[1].peak_mb / figures[0].peak_mb, 2),
            ratio_what="large / small peak",
            target=f"growth <= {TARGET_GROWTH_MB:.0f} MB (issue 15)",
            met=growth <= TARGET_GROWTH_MB,
            growth_mb=round(growth, 1),
            details=(
                ("small_s", figures[0].seconds),
                ("large_s", figures[1].seconds),
                ("large_series", float(figures[1].n_series)),
            ),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """Print the peak memory of a 200- and a 2,000-instance study and the growth between them."""
    p = argparse.ArgumentParser(prog="python -m node.lab.bench_memory", description=__doc__)
    p.add_argument("--work", type=Path, default=None, help="folder for the studies (default: tmp)")
    p.add_argument("--models", type=Path, default=REPO / "models")
    p.add_argument("--keep", action="store_true", help="keep the generated studies")
    p.add_argument("--small", type=int, default=SMALL_INSTANCES)
    p.add_argument("--large", type=int, default=LARGE_INSTANCES)
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="neuronode-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = []
        for n in (args.small, args.large):
            folder = work / f"study_{n}"
            if not folder.is_dir():
                t0 = time.perf_counter()
                folder = make_study(work, n)
                print(f"generated {_count(folder)} instances in {time.perf_counter() - t0:.0f} s")
            fig, _ = measure(folder, work / f"out_{n}", args.models)
            figures.append(fig)
            print(
                f"{fig.n_instances:>5} instances, {fig.n_series:>2} series: "
                f"peak {fig.peak_mb:.0f} MB, {fig.seconds:.1f} s"
            )
        growth = figures[1].peak_mb - figures[0].peak_mb
        per = growth / max(1, figures[1].n_instances - figures[0].n_instances)
        met = "met" if growth <= TARGET_GROWTH_MB else "NOT met"
        print(
            f"growth {growth:.0f} MB ({per * 1024:.0f} KB per extra instance); "
            f"target <= {TARGET_GROWTH_MB:.0f} MB: {met}"
        )
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

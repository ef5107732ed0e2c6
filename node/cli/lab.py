"""The lab's commands: `synth`, `train`, `evaluate`, `calibrate`, `fit-ensemble`,
`fit-detector`, `demo`, `bench`.

The lab (node.lab: synthesis, training, evaluation, the demo, benchmarks) is not part of the
running node. Each handler here imports its lab module when it runs, the one place the runtime
package reaches into the lab, so importing node.cli never loads it.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.cli.command import Command, rules_option


def _lab(module: str, function: str) -> Callable[[Any], int]:
    """The handler `function` of lab module `module`, imported on first call."""

    def run(args: Any) -> int:
        try:
            handler = getattr(importlib.import_module(module), function)
        except ImportError as exc:
            raise SystemExit(
                f"neuronode: the lab is not installed ({exc}); pip install 'neuronode[lab]'"
            ) from exc
        return int(handler(args))

    return run


def _labelled_data_arguments(
    p: argparse.ArgumentParser, data_help: str = "data folder (repeatable)"
) -> None:
    """--data (repeatable), --labels CSV and --label-map: labelled studies for a lab command."""
    p.add_argument("--data", type=Path, action="append", required=True, help=data_help)
    p.add_argument("--labels", type=Path, default=None, help="CSV StudyInstanceUID,label")
    p.add_argument(
        "--label-map",
        default=None,
        metavar="SITE=TASK,...",
        help="map the CSV's label values to the task's, e.g. GBM=gbm,PCNSL=pcnsl",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SynthArgs:
    out: Path
    studies: int
    seed: int
    phenotype: list[str] | None
    vendor: list[str] | None
    size: int
    slices: int
    enhanced: bool
    transfer_syntax: str
    no_distractors: bool
    figures: Path | None
    style: list[str] | None
    plane: str | None
    randomise: bool


def _synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--studies", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--phenotype",
        action="append",
        default=None,
        help="gbm, pcnsl, lgg, hgg, tsc, normal (repeatable; default: a mix)",
    )
    p.add_argument(
        "--vendor",
        action="append",
        default=None,
        help="siemens, ge, philips, generic (repeatable; default: a mix)",
    )
    p.add_argument("--size", type=int, default=256, help="in-plane matrix (default 256)")
    p.add_argument("--slices", type=int, default=24, help="slices per series (default 24)")
    p.add_argument("--enhanced", action="store_true", help="write enhanced multi-frame MR")
    p.add_argument(
        "--transfer-syntax",
        default="explicit",
        help="explicit, implicit, jpeg-lossless, jpeg2000, jpeg-ls, rle (default explicit)",
    )
    p.add_argument("--no-distractors", action="store_true", help="omit localizer/fMRI/etc.")
    p.add_argument("--figures", type=Path, default=None, help="also write PNG grids here")
    p.add_argument(
        "--style",
        action="append",
        default=None,
        choices=("a", "b", "c"),
        help="rendering style a, b or c, cycled study by study (repeatable; default a)",
    )
    p.add_argument(
        "--plane",
        default=None,
        choices=("axial", "sagittal", "coronal"),
        help="every routed series in this plane (default: axial, or drawn with --randomise)",
    )
    p.add_argument(
        "--randomise",
        action="store_true",
        help="domain randomisation: planes, 2D/3D, thickness, contrast, lesions, artefacts",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainArgs:
    task: str
    data: list[Path]
    labels: Path | None
    out: Path | None
    epochs: int | None
    seed: int
    recipe: str
    pretrained: Path | None
    folds: int | None
    label_map: str | None


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="sequence, gbm_pcnsl[_t1c|_adc], glioma_grade[_t1c|_flair], ...")
    _labelled_data_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="bundle folder (default models/NAME)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--recipe",
        choices=("small", "published", "planes"),
        default="small",
        help="planes: the sequence bundle on every plane, read in the acquired plane",
    )
    p.add_argument("--pretrained", type=Path, default=None, help="weights file (published)")
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="patient-level k-fold cross-validation instead of one bundle (writes OUT/cv.json"
        " and a bundle per fold; default OUT: cv/NAME)",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateArgs:
    task: str
    data: list[Path]
    labels: Path | None
    bundle: Path | None
    out: Path | None
    record: bool
    ensemble: bool
    rules: Path
    models_dir: Path | None
    label_map: str | None


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="a bundle name, or a task of the rule file with --ensemble")
    _labelled_data_arguments(p)
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder (default models/NAME)")
    p.add_argument("--out", type=Path, default=None, help="writes metrics.json, roc.png, ...")
    p.add_argument(
        "--record",
        action="store_true",
        help="store the test metrics in the bundle's card (with --ensemble: in each model's)",
    )
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="score TASK's study-level ensemble (rule file) against each of its models",
    )
    rules_option(p)
    p.add_argument("--models-dir", type=Path, default=None, help="override the rules' models_dir")


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrateArgs:
    name: str
    data: list[Path]
    labels: Path | None
    label_map: str | None
    bundle: Path | None
    test: list[Path] | None
    dry_run: bool
    record_only: bool


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a bundle name: sequence, gbm_pcnsl_t1c, glioma_grade_flair, ...")
    _labelled_data_arguments(p, "calibration data folder, not used for training (repeatable)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder (default models/NAME)")
    p.add_argument(
        "--test",
        type=Path,
        action="append",
        default=None,
        help="held-out data (repeatable): log-loss, ECE and AUC before and after, in the card",
    )
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--dry-run", action="store_true", help="fit and print; write nothing")
    keep.add_argument(
        "--record-only",
        action="store_true",
        help="record the fit and its figures in metadata.json and the card, but keep serving"
        " the bundle's present calibration (a refit measured and not shipped)",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class FitEnsembleArgs:
    task: str
    data: list[Path]
    labels: Path | None
    out: Path | None
    rules: Path
    models_dir: Path | None
    label_map: str | None


def _fit_ensemble_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="a task of the rule file: gbm_pcnsl, glioma_grade, tubers")
    _labelled_data_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="writes fit.json")
    rules_option(p)
    p.add_argument("--models-dir", type=Path, default=None, help="override the rules' models_dir")


@dataclass(frozen=True, slots=True, kw_only=True)
class FitDetectorArgs:
    name: str
    task: str
    sequence: str
    data: list[Path]
    labels: Path | None
    label_map: str | None
    out: Path
    z: float
    measure: str
    opening: float
    test: list[Path] | None
    test_same_style: list[Path] | None
    jobs: int


def _fit_detector_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the bundle's name, e.g. tumour_flair_detector")
    p.add_argument("--task", default="tumour", help="default: %(default)s")
    p.add_argument("--sequence", default="FLAIR", help="FLAIR or T1C (default: %(default)s)")
    _labelled_data_arguments(p, "calibration data folder (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    p.add_argument("--z", type=float, default=2.5, help="robust deviations (default %(default)s)")
    p.add_argument(
        "--measure",
        choices=("largest", "beyond_largest"),
        default="largest",
        help="the largest component (a lesion) or every other one (many foci, e.g. tubers)",
    )
    p.add_argument(
        "--opening", type=float, default=1 / 64, help="of the smaller image side (default 1/64)"
    )
    p.add_argument(
        "--test",
        type=Path,
        action="append",
        default=None,
        help="held-out data of a style never used for the fit (repeatable): metrics in the card",
    )
    p.add_argument(
        "--test-same-style",
        type=Path,
        action="append",
        default=None,
        help="held-out data of the calibration style (repeatable): metrics in the card",
    )
    p.add_argument("--jobs", type=int, default=1, help="processes measuring series")


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoArgs:
    out: Path
    seed: int | None
    phenotype: str | None
    keep_running: bool


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="default: %(default)s")
    p.add_argument("--seed", type=int, default=None, help="synthetic study seed")
    p.add_argument("--phenotype", default=None, help="gbm (default), pcnsl, lgg, hgg, tsc, normal")
    p.add_argument(
        "--keep-running", action="store_true", help="leave Orthanc and the node up until Ctrl-C"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchArgs:
    only: list[str] | None
    out: Path | None
    repeat: int
    ingest_instances: int
    receiver_processes: int | None


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="synth, sequence, specialists, receive, ingest, dicomio, latency, memory, scale"
        " (repeatable; default: all)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    p.add_argument("--repeat", type=int, default=1, help="median of N runs (default 1)")
    p.add_argument(
        "--ingest-instances",
        type=int,
        default=200,
        metavar="N",
        help="ingest: 512x512 MR instances per run (default 200; issue 15 measured 600)",
    )
    p.add_argument(
        "--receiver-processes",
        type=int,
        default=None,
        metavar="N",
        help="ingest: the node's receiver processes (default: node.receiver_processes' default)",
    )


COMMANDS = (
    Command(
        name="synth",
        help="write synthetic brain-MRI DICOM studies",
        arguments=_synth_arguments,
        args=SynthArgs,
        run=_lab("node.lab.synth.command", "cmd_synth"),
    ),
    Command(
        name="train",
        help="train a model bundle (patient-level split)",
        arguments=_train_arguments,
        args=TrainArgs,
        run=_lab("node.lab.train.command", "cmd_train"),
    ),
    Command(
        name="evaluate",
        help="evaluate a bundle on labelled data",
        arguments=_evaluate_arguments,
        args=EvaluateArgs,
        run=_lab("node.lab.train.command", "cmd_evaluate"),
    ),
    Command(
        name="calibrate",
        help="refit a bundle's calibration on labelled data not used for training",
        arguments=_calibrate_arguments,
        args=CalibrateArgs,
        run=_lab("node.lab.train.command", "cmd_calibrate"),
    ),
    Command(
        name="fit-ensemble",
        help="fit a task's ensemble weights and temperature on calibration studies",
        arguments=_fit_ensemble_arguments,
        args=FitEnsembleArgs,
        run=_lab("node.lab.train.command", "cmd_fit_ensemble"),
    ),
    Command(
        name="fit-detector",
        help="calibrate a lesion detector bundle (no network) on labelled studies",
        arguments=_fit_detector_arguments,
        args=FitDetectorArgs,
        run=_lab("node.lab.train.detector", "cmd_fit_detector"),
    ),
    Command(
        name="demo",
        help="synthetic study -> running node -> results",
        arguments=_demo_arguments,
        args=DemoArgs,
        run=_lab("node.lab.demo", "cmd_demo"),
    ),
    Command(
        name="bench",
        help="print speed and memory figures",
        arguments=_bench_arguments,
        args=BenchArgs,
        run=_lab("node.lab.bench", "cmd_bench"),
    ),
)

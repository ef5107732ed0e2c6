"""The `neuronode` command. Each subcommand is dispatched lazily to the module that owns it,
so `neuronode status` does not import torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from node import NOT_FOR_CLINICAL_USE, __version__
from node.errors import NodeError

DEFAULT_RULES = Path("routing_rules/default.yaml")


def _rules_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rules", type=Path, default=DEFAULT_RULES, help="rule file (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options; the handler of each is 'module:function'."""
    parser = argparse.ArgumentParser(
        prog="neuronode",
        description=f"DICOM AI node for brain MRI. {NOT_FOR_CLINICAL_USE}",
    )
    parser.add_argument("--version", action="version", version=f"neuronode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, handler: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = cmd("serve", "node.service:cmd_serve", "run the DICOM node (SCP, workers, sender)")
    _rules_arg(p)

    p = cmd("process", "node.pipeline:cmd_process", "run the pipeline on a folder of DICOM files")
    p.add_argument("directory", type=Path)
    _rules_arg(p)
    p.add_argument("--out", type=Path, default=None, help="where to write the audit/results")

    p = cmd("status", "node.spool:cmd_status", "studies by state, queue depth, recent failures")
    _rules_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = cmd("requeue", "node.outbox:cmd_requeue", "send dead-lettered deliveries again")
    _rules_arg(p)
    p.add_argument("--destination", default=None, help="only this destination (default: all)")

    p = cmd("check", "node.config:cmd_check", "validate a rule file; print every problem")
    p.add_argument("rules_file", type=Path)
    p.add_argument(
        "--skip-bundle-check",
        action="store_true",
        help="do not require a folder under models_dir for every bundle named",
    )

    p = cmd(
        "explain",
        "node.routing:cmd_explain",
        "show, series by series, the sequence label and the models each series is routed to",
    )
    p.add_argument("rules_file", type=Path)
    p.add_argument("study_dir", type=Path)

    p = cmd("synth", "node.synth.command:cmd_synth", "write synthetic brain-MRI DICOM studies")
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

    p = cmd("classify", "node.sequence_cli:cmd_classify", "classify each series of a folder")
    p.add_argument("directory", type=Path)
    p.add_argument("--no-cnn", action="store_true", help="tag rules only")
    p.add_argument("--json", action="store_true")

    p = cmd(
        "evaluate-sequences",
        "node.sequence_cli:cmd_evaluate_sequences",
        "accuracy of the sequence classifier against a labels CSV",
    )
    p.add_argument("directory", type=Path)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-cnn", action="store_true", help="tag rules only")

    p = cmd("train", "node.train.command:cmd_train", "train a model bundle (patient-level split)")
    p.add_argument("task", help="sequence, gbm_pcnsl[_t1c|_adc], glioma_grade[_t1c|_flair], ...")
    p.add_argument(
        "--data", type=Path, action="append", required=True, help="data folder (repeatable)"
    )
    p.add_argument("--labels", type=Path, default=None, help="CSV StudyInstanceUID,label")
    p.add_argument("--out", type=Path, default=None, help="bundle folder (default models/NAME)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", choices=("small", "published"), default="small")
    p.add_argument("--pretrained", type=Path, default=None, help="weights file (published)")
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="patient-level k-fold cross-validation instead of one bundle (writes OUT/cv.json"
        " and a bundle per fold; default OUT: cv/NAME)",
    )

    p = cmd("evaluate", "node.train.command:cmd_evaluate", "evaluate a bundle on labelled data")
    p.add_argument("task", help="a bundle name, or a task of the rule file with --ensemble")
    p.add_argument(
        "--data", type=Path, action="append", required=True, help="data folder (repeatable)"
    )
    p.add_argument("--labels", type=Path, default=None, help="CSV StudyInstanceUID,label")
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
    _rules_arg(p)
    p.add_argument("--models-dir", type=Path, default=None, help="override the rules' models_dir")

    p = cmd(
        "fit-ensemble",
        "node.train.command:cmd_fit_ensemble",
        "fit a task's ensemble weights and temperature on calibration studies",
    )
    p.add_argument("task", help="a task of the rule file: gbm_pcnsl, glioma_grade, tubers")
    p.add_argument(
        "--data", type=Path, action="append", required=True, help="data folder (repeatable)"
    )
    p.add_argument("--labels", type=Path, default=None, help="CSV StudyInstanceUID,label")
    p.add_argument("--out", type=Path, default=None, help="writes fit.json")
    _rules_arg(p)
    p.add_argument("--models-dir", type=Path, default=None, help="override the rules' models_dir")

    p = cmd("demo", "node.demo:cmd_demo", "synthetic study -> running node -> results")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="default: %(default)s")
    p.add_argument("--seed", type=int, default=None, help="synthetic study seed")
    p.add_argument("--phenotype", default=None, help="gbm (default), pcnsl, lgg, hgg, tsc, normal")
    p.add_argument(
        "--keep-running", action="store_true", help="leave Orthanc and the node up until Ctrl-C"
    )

    p = cmd("bench", "node.bench:cmd_bench", "print speed and memory figures")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="synth, sequence, specialists, receive, dicomio (repeatable; default: all)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    p.add_argument("--repeat", type=int, default=1, help="median of N runs (default 1)")

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    module_name, func_name = args.handler.split(":")
    try:
        module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except (ImportError, AttributeError) as exc:
        print(f"neuronode {args.command}: not available in this build ({exc})", file=sys.stderr)
        return 2
    try:
        return int(func(args))
    except NodeError as exc:
        print(f"neuronode {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

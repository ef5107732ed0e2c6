"""The rule file: `check` (validate it) and `explain` (what it does to one study)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from node.classify.study import classify_study, load_sequence_bundle
from node.cli.command import Command
from node.config import check_rule_text, summarise_rules, validate_rules_text
from node.dicom.folder import dicom_files
from node.dicom.volumes import LazyVolumes, read_study
from node.routing import explain_routes, study_qualifies


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckArgs:
    rules_file: Path
    skip_bundle_check: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ExplainArgs:
    rules_file: Path
    study_dir: Path


def cmd_check(args: CheckArgs) -> int:
    """`neuronode check RULES`: print every problem with its line and fix, or OK and a summary."""
    path: Path = args.rules_file
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"{path}: cannot read rule file: {exc.strerror}")
        return 1
    # The running node refuses a changed rule file with these same problems (check_rule_text).
    if args.skip_bundle_check:
        rules, problems = validate_rules_text(text)
    else:
        rules, problems = check_rule_text(text, path)
    for p in problems:
        print(p.render(path))
    if rules is None or problems:
        print(f"{len(problems)} problem(s) in {path}")
        return 1
    print(f"{path}: OK")
    print(summarise_rules(rules))
    return 0


def cmd_explain(args: ExplainArgs) -> int:
    """`neuronode explain RULES STUDY_DIR`: which label each series got and where it is routed."""
    rules_path: Path = args.rules_file
    study_dir: Path = args.study_dir
    try:
        text = rules_path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"{rules_path}: cannot read rule file: {exc.strerror}")
        return 1
    rules, problems = validate_rules_text(text, base_dir=rules_path.parent)
    if rules is None:
        for p in problems:
            print(p.render(rules_path))
        print(f"{len(problems)} problem(s) in {rules_path}; run neuronode check {rules_path}")
        return 1
    if not study_dir.is_dir():
        print(f"{study_dir}: not a folder")
        return 1
    # One header read per file: the same records qualify the study and classify its series.
    load, _ = read_study(dicom_files(study_dir))
    headers = load.series_headers
    if not headers:
        print(f"{study_dir}: no readable DICOM series")
        return 1
    ok, why = study_qualifies(
        [h.modality for h in headers], [h.body_part for h in headers], len(headers), rules.qualify
    )
    print(f"study: {why}")
    if not ok:
        print("not processed under qualify:; nothing is routed")
        return 0
    bundle, why = load_sequence_bundle(rules.sequence, rules.models_dir)
    run = classify_study(
        headers, LazyVolumes(load.layouts), rules.sequence, bundle, unavailable=why
    )
    decisions = run.decisions
    names = {
        h.series_uid: f"#{h.series_number if h.series_number is not None else '?'}"
        f" '{h.series_description}'"
        for h in headers
    }
    print(f"(sequence labels as the node gives them: {run.cnn_note})")
    print(explain_routes(decisions, rules, series_names=names))
    return 0


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rules_file", type=Path)
    p.add_argument(
        "--skip-bundle-check",
        action="store_true",
        help="do not require what the file names to exist on this machine (a folder under"
        " models_dir for every bundle, the TLS files)",
    )


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rules_file", type=Path)
    p.add_argument("study_dir", type=Path)


COMMANDS = (
    Command(
        name="check",
        help="validate a rule file; print every problem",
        arguments=_check_arguments,
        args=CheckArgs,
        run=cmd_check,
    ),
    Command(
        name="explain",
        help="show, series by series, the sequence label and the models each series is routed to",
        arguments=_explain_arguments,
        args=ExplainArgs,
        run=cmd_explain,
    ),
)

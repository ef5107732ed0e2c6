"""Studies on disk, without the network: `process`, `classify`, `evaluate-sequences`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import NOT_FOR_CLINICAL_USE
from node.classify.commands import (
    CnnRun,
    _per_uid,
    _Prediction,
    policy_from_settings,
    read_labels,
    run_cnn,
    score,
)
from node.classify.sequence import classify_headers
from node.cli.command import Command, rules_option
from node.cli.show import format_results, summary_table
from node.config import Rules, SequenceSettings, load_rules
from node.dicom.folder import scan_folder
from node.dicom.headers import read_series_headers
from node.errors import ConfigError, NodeError
from node.log import configure, uid_key
from node.pipeline.audit import audit_path, read_audit
from node.pipeline.context import DEFAULT_OUT
from node.pipeline.models import check_bundles, worker_bundle
from node.pipeline.runner import process_study
from node.records import SequenceDecision, SequenceLabel, SeriesHeader, StudyJob


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessArgs:
    directory: Path
    rules: Path
    out: Path | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassifyArgs:
    directory: Path
    no_cnn: bool
    json: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateSequencesArgs:
    directory: Path
    labels: Path
    out: Path | None
    no_cnn: bool


def cmd_process(args: ProcessArgs) -> int:
    """`neuronode process DIR`: run the pipeline on each study of a folder, without network."""
    from node.bundles.bundle import set_torch_threads  # torch: only once there is work

    set_torch_threads()
    directory: Path = args.directory
    out_dir: Path = args.out if args.out is not None else DEFAULT_OUT
    rules_path: Path = args.rules
    if rules_path.exists():
        rules = load_rules(rules_path)
        rules_note = f"rules: {rules_path}"
    else:
        rules = Rules()
        rules_note = f"rules: {rules_path} not found, using the built-in defaults"
    configure(fmt=rules.logging.format, level=rules.logging.level)
    if not directory.is_dir():
        print(f"neuronode process: {directory} is not a folder")
        return 2
    scan = scan_folder(directory)
    print(rules_note)
    print(
        f"{directory}: {len(scan.studies)} study(ies), "
        f"{sum(len(p) for _, p in scan.studies)} DICOM file(s), "
        f"{scan.n_skipped} other file(s) skipped"
    )
    print(NOT_FOR_CLINICAL_USE)
    for problem in check_bundles(rules, worker_bundle):
        print(f"warning: {problem} (studies routed to it will fail; see neuronode check)")
    failures = 0
    for study_uid, paths in scan.studies:
        job = StudyJob(job_id=0, study_uid=study_uid, instance_paths=paths, attempt=1)
        print(f"\nstudy {uid_key(study_uid)}  ({len(paths)} files)")
        try:
            outcome = process_study(job, rules, out_dir=out_dir)
        except NodeError as exc:
            failures += 1
            print(f"  FAILED: {exc}  (audit: {audit_path(out_dir, study_uid)})")
            continue
        audit = read_audit(outcome.audit_path)
        print(summary_table(audit))
        if audit.unreadable_files:
            print(f"unreadable files: {len(audit.unreadable_files)}")
        print(
            f"{outcome.n_series} series, {outcome.n_instances} instances, "
            f"{outcome.n_decode_errors} decode error(s), {audit.duration_ms:.0f} ms"
        )
        print()
        print(format_results(audit))
        print(f"audit: {outcome.audit_path}")
    return 1 if failures else 0


def _settings() -> SequenceSettings:
    return Rules().sequence


def _check_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a folder")


def _classify(
    directory: Path, no_cnn: bool
) -> tuple[tuple[SeriesHeader, ...], tuple[SequenceDecision, ...], CnnRun]:
    # Log lines go to stderr so the table (or --json) on stdout stays clean.
    configure(fmt="auto", level="warning", stream=sys.stderr)
    _check_directory(directory)
    settings = _settings()
    headers = read_series_headers([directory])
    if no_cnn:
        cnn = CnnRun(verdicts=None, status="sequence CNN disabled (--no-cnn): tag rules only")
    else:
        cnn = run_cnn(directory, headers, settings)
    decisions = classify_headers(headers, cnn.verdicts, policy_from_settings(settings))
    return headers, decisions, cnn


def _reason(d: SequenceDecision) -> str:
    return " | ".join(r for r in d.reasons if r != "CNN not run")


def cmd_classify(args: ClassifyArgs) -> int:
    """Print, series by series: number, description, label, confidence, method, reason."""
    headers, decisions, cnn = _classify(Path(args.directory), bool(args.no_cnn))
    if args.json:
        rows = [
            {
                "series_uid": h.series_uid,
                "series_number": h.series_number,
                "description": h.series_description,
                "label": d.label.value,
                "confidence": d.confidence,
                "method": d.method.value,
                "tag_label": d.tag_label.value if d.tag_label else None,
                "cnn_label": d.cnn_label.value if d.cnn_label else None,
                "cnn_votes": {label.value: n for label, n in d.cnn_votes},
                "reasons": list(d.reasons),
            }
            for h, d in zip(headers, decisions, strict=True)
        ]
        json.dump({"cnn": cnn.status, "series": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(cnn.status)
    print(f"{'#':>6}  {'description':<32} {'label':<6} {'conf':>5}  {'method':<13} reason")
    for h, d in zip(headers, decisions, strict=True):
        number = "" if h.series_number is None else str(h.series_number)
        print(
            f"{number:>6}  {h.series_description[:32]:<32} {d.label.value:<6} "
            f"{d.confidence:>5.2f}  {d.method.value:<13} {_reason(d)}"
        )
    return 0


def _print_metrics(name: str, metrics: Mapping[str, Any]) -> None:
    accuracy = metrics["accuracy"]
    shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
    print(
        f"\n== {name}: accuracy {shown} ({metrics['n_correct']}/{metrics['n_series']}), "
        f"OTHER labelled routable: {metrics['other_as_routable']}"
    )
    labels = [label.value for label in SequenceLabel]
    columns = [*labels, "NONE"]
    print(f"{'true/pred':<12}" + "".join(f"{c:>7}" for c in columns))
    for true in labels:
        row = metrics["confusion"].get(true)
        if row is None:
            continue
        print(f"{true:<12}" + "".join(f"{row.get(c, 0):>7}" for c in columns))
    for label, pr in metrics["per_class"].items():
        p = "n/a" if pr["precision"] is None else f"{pr['precision']:.3f}"
        r = "n/a" if pr["recall"] is None else f"{pr['recall']:.3f}"
        print(f"  {label:<6} precision {p:>6}  recall {r:>6}  support {pr['support']}")
    for e in metrics["errors"]:
        print(
            f"  MISS #{e['series_number']} {e['description'][:30]!r}: true {e['true']}, "
            f"predicted {e['predicted']}: {e['reason']}"
        )


def cmd_evaluate_sequences(args: EvaluateSequencesArgs) -> int:
    """Accuracy of tags alone, CNN alone and fused against a labels CSV; optional metrics.json."""
    truth = read_labels(Path(args.labels))
    headers, fused, cnn = _classify(Path(args.directory), bool(args.no_cnn))
    tags_only = classify_headers(headers, None, policy_from_settings(_settings()))
    descriptions = {h.series_uid: h.series_description for h in headers}
    labelled = sum(h.series_uid in truth for h in headers)
    print(cnn.status)
    print(
        f"{len(headers)} series read, {len({h.series_uid for h in headers})} series UIDs, "
        f"{labelled} of them labelled ({len(truth)} labelled UIDs in the file; "
        "unlabelled series skipped)"
    )
    sections: dict[str, Any] = {}
    sections["tags"] = score(
        truth,
        _per_uid(headers, [_Prediction(label=d.label, reason=_reason(d)) for d in tags_only]),
        descriptions,
    )
    if cnn.verdicts is not None:
        cnn_predictions = [
            _Prediction(
                label=v.label if v is not None else None,
                reason=(
                    f"CNN votes {dict((k.value, n) for k, n in v.votes)}"
                    if v is not None
                    else "CNN did not run on this series"
                ),
            )
            for v in cnn.verdicts
        ]
        sections["cnn"] = score(truth, _per_uid(headers, cnn_predictions), descriptions)
    sections["fused"] = score(
        truth,
        _per_uid(headers, [_Prediction(label=d.label, reason=_reason(d)) for d in fused]),
        descriptions,
    )
    for name in ("tags", "cnn", "fused"):
        if name in sections:
            _print_metrics(name, sections[name])
    if "cnn" not in sections:
        print(f"\n== cnn: not evaluated ({cnn.status})")
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        primary = sections["fused"]
        document = {
            "accuracy": primary["accuracy"],
            "n_series": primary["n_series"],
            "confusion": primary["confusion"],
            "errors": primary["errors"],
            "per_class": primary["per_class"],
            "other_as_routable": primary["other_as_routable"],
            "cnn_status": cnn.status,
            "labels_file": str(args.labels),
            "directory": str(args.directory),
            "methods": sections,
        }
        target = out / "metrics.json"
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        tmp.replace(target)
        print(f"\nwrote {target}")
    return 0


def _process_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path)
    rules_option(p)
    p.add_argument("--out", type=Path, default=None, help="where to write the audit/results")


def _classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path)
    p.add_argument("--no-cnn", action="store_true", help="tag rules only")
    p.add_argument("--json", action="store_true")


def _evaluate_sequences_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-cnn", action="store_true", help="tag rules only")


COMMANDS = (
    Command(
        name="process",
        help="run the pipeline on a folder of DICOM files",
        arguments=_process_arguments,
        args=ProcessArgs,
        run=cmd_process,
    ),
    Command(
        name="classify",
        help="classify each series of a folder",
        arguments=_classify_arguments,
        args=ClassifyArgs,
        run=cmd_classify,
    ),
    Command(
        name="evaluate-sequences",
        help="accuracy of the sequence classifier against a labels CSV",
        arguments=_evaluate_sequences_arguments,
        args=EvaluateSequencesArgs,
        run=cmd_evaluate_sequences,
    ),
)

"""Studies on disk, without the network: `process`, `classify`, `evaluate-sequences`."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import NOT_FOR_CLINICAL_USE
from node.classify.evaluate import (
    _Prediction,
    per_series,
    read_label_file,
    score,
    series_units,
)
from node.classify.study import FolderClassification, classify_folder, load_sequence_bundle
from node.cli.command import Command, rules_option
from node.cli.show import format_results, summary_table
from node.config import Rules, load_rules
from node.dicom.folder import scan_folder
from node.errors import ConfigError, NodeError
from node.log import configure, uid_key
from node.pipeline.audit import audit_path, read_audit
from node.pipeline.context import DEFAULT_OUT
from node.pipeline.models import check_bundles, worker_model
from node.pipeline.runner import process_study
from node.records import SequenceDecision, SequenceLabel, SeriesHeader, StudyJob
from node.store.files import write_bytes_durable, write_json_durable


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
    rules: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateSequencesArgs:
    directory: Path
    labels: Path
    out: Path | None
    no_cnn: bool
    rules: Path


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
    if scan.shared_uids:
        print(
            f"warning: {len(scan.shared_uids)} study UID(s) found as copies (the same instances) "
            "in more than one top-level folder: processed as separate studies, which share one "
            "results folder (the later run supersedes the earlier)"
        )
    print(NOT_FOR_CLINICAL_USE)
    for problem in check_bundles(rules, worker_model):
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


def _rules_or_defaults(path: Path) -> Rules:
    """The rule file when it exists, else the built-in defaults (what `process` does too)."""
    return load_rules(path) if path.exists() else Rules()


def _check_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a folder")


def _progress(done: int, total: int) -> None:
    """A progress line on stderr (rewritten in place on a terminal)."""
    end = "\r" if sys.stderr.isatty() and done < total else "\n"
    if sys.stderr.isatty() or done == total or done % 50 == 0:
        print(f"classified {done}/{total} studies", end=end, file=sys.stderr, flush=True)


def _classify(directory: Path, no_cnn: bool, rules_path: Path) -> FolderClassification:
    """The one classification path over every study of a folder (node.classify.study), under
    the rule file's `sequence:` settings and models_dir, as the running node classifies."""
    # Log lines go to stderr so the table (or --json) on stdout stays clean.
    configure(fmt="auto", level="warning", stream=sys.stderr)
    _check_directory(directory)
    rules = _rules_or_defaults(rules_path)
    settings = rules.sequence
    if no_cnn:
        bundle, why = None, "sequence CNN disabled (--no-cnn): tag rules only"
    else:
        models = rules.models_dir if rules_path.exists() else None
        bundle, why = load_sequence_bundle(settings, models)
    return classify_folder(directory, settings, bundle=bundle, unavailable=why, progress=_progress)


def _reason(d: SequenceDecision) -> str:
    return " | ".join(r for r in d.reasons if r != "CNN not run")


def cmd_classify(args: ClassifyArgs) -> int:
    """Print, series by series: number, description, label, confidence, method, reason."""
    run = _classify(Path(args.directory), bool(args.no_cnn), args.rules)
    headers, decisions = run.headers, run.decisions
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
        json.dump({"cnn": run.cnn_note, "series": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(run.cnn_note)
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
    labels = read_label_file(Path(args.labels))
    run = _classify(Path(args.directory), bool(args.no_cnn), args.rules)
    headers, fused, tags_only = run.headers, run.decisions, run.tags_only
    units = series_units(headers, run.folders)
    numbers = [h.series_number for h in headers]
    truth = {
        unit: label
        for unit in dict.fromkeys(units)
        if (label := labels.label_of(Path(unit[0]), unit[1])) is not None
    }
    per_header = [truth.get(unit) for unit in units]
    descriptions = {unit: h.series_description for unit, h in zip(units, headers, strict=True)}
    print(run.cnn_note)
    print(
        f"{run.n_studies} studies, {run.n_skipped} non-DICOM file(s) skipped; "
        f"{len(headers)} series read ({len(set(units))} by folder and SeriesInstanceUID: one UID "
        f"in two folders counts twice), {len(truth)} of them labelled "
        f"({sum(label is not None for label in per_header)} series numbers; "
        f"{len(labels.by_uid)} labelled UIDs in the file; unlabelled series skipped)"
    )
    if run.n_shared_study_uids:
        print(
            f"warning: {run.n_shared_study_uids} study UID(s) found as copies (the same "
            "instances) in more than one top-level folder: classified as separate studies"
        )

    def scored(predictions: list[_Prediction]) -> dict[str, Any]:
        return score(truth, per_series(units, numbers, predictions), descriptions)

    sections: dict[str, Any] = {}
    sections["tags"] = scored([_Prediction(label=d.label, reason=_reason(d)) for d in tags_only])
    if run.cnn_verdicts is not None:
        sections["cnn"] = scored(
            [
                _Prediction(
                    label=v.label if v is not None else None,
                    reason=(
                        f"CNN votes {dict((k.value, n) for k, n in v.votes)}"
                        if v is not None
                        else "CNN did not run on this series"
                    ),
                )
                for v in run.cnn_verdicts
            ]
        )
    sections["fused"] = scored([_Prediction(label=d.label, reason=_reason(d)) for d in fused])
    for name in ("tags", "cnn", "fused"):
        if name in sections:
            _print_metrics(name, sections[name])
    if "cnn" not in sections:
        print(f"\n== cnn: not evaluated ({run.cnn_note})")
    cells = accuracy_by_acquisition(run, per_header)
    _print_cells(cells)
    by_vendor = accuracy_by_acquisition(run, per_header, vendor_cell)
    _print_cells(by_vendor, "vendor")
    by_thickness = accuracy_by_acquisition(run, per_header, thickness_cell)
    _print_cells(by_thickness, "slice thickness")
    by_cell = accuracy_by_acquisition(run, per_header, vendor_acquisition_cell)
    _print_cells(by_cell, "vendor, plane and 2D/3D")
    _print_lowest(by_cell)
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
            "cnn_status": run.cnn_note,
            "labels_file": str(args.labels),
            "directory": str(args.directory),
            "methods": sections,
            "by_acquisition": cells,
            "by_vendor": by_vendor,
            "by_thickness": by_thickness,
            "by_cell": by_cell,
        }
        target = out / "metrics.json"
        write_json_durable(target, document)
        rows_path = out / "series.csv"
        _write_series_csv(rows_path, run, per_header, Path(args.directory))
        print(f"\nwrote {target} and {rows_path}")
    return 0


THIN_SLICE_MM = 2.5  # at or below: a thin slice (3D and thin 2D); above: a thick one


def acquisition_cell(h: SeriesHeader) -> str:
    """Plane and 2D/3D from the headers: 'sagittal 3D'."""
    return f"{h.orientation or 'unknown'} {h.mr_acquisition_type or '?'}"


def vendor_cell(h: SeriesHeader) -> str:
    """The normalised manufacturer: 'siemens'."""
    return h.manufacturer or "unknown"


def vendor_acquisition_cell(h: SeriesHeader) -> str:
    """Vendor, plane and 2D/3D: 'siemens sagittal 3D' (the cells issue 12's targets name)."""
    return f"{vendor_cell(h)} {acquisition_cell(h)}"


def thickness_cell(h: SeriesHeader) -> str:
    """Thin (<= THIN_SLICE_MM) or thick slices, from SliceThickness."""
    if h.slice_thickness is None:
        return "thickness unknown"
    return f"thin (<= {THIN_SLICE_MM:g} mm)" if h.slice_thickness <= THIN_SLICE_MM else "thick"


def accuracy_by_acquisition(
    run: FolderClassification,
    truth: Sequence[SequenceLabel | None],
    cell_of: Callable[[SeriesHeader], str] = acquisition_cell,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Accuracy of each method per cell of the headers (default plane x 2D/3D; vendor_cell,
    thickness_cell) over labelled series; ``truth``: each header's label (None: unlabelled)."""
    verdicts = run.cnn_verdicts or (None,) * len(run.headers)
    cells: dict[str, dict[str, list[int]]] = {}
    rows = zip(run.headers, run.tags_only, run.decisions, verdicts, truth, strict=True)
    for h, tag, fused, cnn, label in rows:
        if label is None:
            continue
        cell = cell_of(h)
        answers: dict[str, SequenceLabel | None] = {"tags": tag.label, "fused": fused.label}
        if run.cnn_verdicts is not None:
            answers["cnn"] = cnn.label if cnn is not None else None
        for method, answer in answers.items():
            hit = cells.setdefault(cell, {}).setdefault(method, [0, 0])
            hit[0] += answer is label
            hit[1] += 1
    return {
        cell: {m: {"accuracy": round(r / n, 4), "n": n} for m, (r, n) in methods.items()}
        for cell, methods in sorted(cells.items())
    }


def _print_cells(
    cells: Mapping[str, Mapping[str, Mapping[str, float | int]]],
    title: str = "plane and 2D/3D",
) -> None:
    if not cells:
        return
    print(f"\n== accuracy by {title} (labelled series)")
    for cell, methods in cells.items():
        shown = "  ".join(
            f"{m} {v['accuracy']:.3f}" for m, v in methods.items() if m in ("tags", "cnn", "fused")
        )
        n = next(iter(methods.values()))["n"]
        print(f"  {cell:<16} n={n:<5} {shown}")


def _print_lowest(cells: Mapping[str, Mapping[str, Mapping[str, float | int]]]) -> None:
    """The lowest cell of each method, the figure a per-cell target is read from."""
    for method in ("tags", "cnn", "fused"):
        scored = [(v[method]["accuracy"], cell, v[method]["n"]) for cell, v in cells.items()
                  if method in v]  # fmt: skip
        if scored:
            accuracy, cell, n = min(scored)
            print(f"  lowest {method} cell: {cell} {float(accuracy):.3f} (n={n})")


def _write_series_csv(
    path: Path,
    run: FolderClassification,
    truth: Sequence[SequenceLabel | None],
    root: Path,
) -> None:
    """One row per series: where (its folder under ``root``), what it is called, the truth and
    every method's answer."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        (
            "folder", "study_uid", "series_uid", "series_number", "description", "plane",
            "acquisition", "true", "tags", "cnn", "fused", "method", "evidence", "reason",
        )
    )  # fmt: skip
    verdicts = run.cnn_verdicts or (None,) * len(run.headers)
    rows = zip(run.headers, run.tags_only, run.decisions, verdicts, truth, run.folders, strict=True)
    for h, tag, fused, cnn, label, folder in rows:
        writer.writerow(
            (
                _relative(folder, root),
                h.study_uid,
                h.series_uid,
                "" if h.series_number is None else h.series_number,
                h.series_description,
                h.orientation,
                h.mr_acquisition_type,
                "" if label is None else label.value,
                tag.label.value,
                "" if cnn is None else cnn.label.value,
                fused.label.value,
                fused.method.value,
                fused.evidence.value,
                _reason(fused),
            )
        )
    write_bytes_durable(path, buffer.getvalue().encode("utf-8"))


def _relative(folder: Path, root: Path) -> str:
    """``folder`` under ``root`` as a POSIX path ('.' for the root itself), else as it is."""
    try:
        return folder.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return folder.as_posix()


def _process_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path)
    rules_option(p)
    p.add_argument("--out", type=Path, default=None, help="where to write the audit/results")


def _classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path)
    p.add_argument("--no-cnn", action="store_true", help="tag rules only")
    p.add_argument("--json", action="store_true")
    rules_option(p)


def _evaluate_sequences_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="writes metrics.json and series.csv")
    p.add_argument("--no-cnn", action="store_true", help="tag rules only")
    rules_option(p)


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

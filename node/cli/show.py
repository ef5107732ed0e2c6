"""Text tables of an audit record, for the terminal (`process`, and the demo)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from node import NOT_FOR_CLINICAL_USE
from node.pipeline.audit import AuditRecord


def summary_table(audit: AuditRecord) -> str:
    """A readable table of the series of one audit record."""
    head = ("#", "description", "inst", "frames", "matrix", "SOP class", "transfer syntax", "err")
    rows = [head]
    for s in audit.series:
        rows.append(
            (
                "" if s.series_number is None else str(s.series_number),
                s.description[:32],
                str(s.n_instances),
                str(s.n_frames),
                ",".join(s.matrix) or "-",
                ", ".join(n.removesuffix(" Storage") for n in s.sop_classes)[:32],
                ", ".join(s.transfer_syntaxes)[:40],
                str(len(s.decode_errors)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def format_sequences(audit: AuditRecord) -> str:
    """The sequence label of each series, how sure, how decided, and where it was routed."""
    routes: dict[str, list[str]] = defaultdict(list)
    for r in audit.routes:
        routes[r.series_instance_uid].append(r.bundle)
    rows: list[Sequence[str]] = [("#", "description", "label", "conf", "method", "routed to")]
    for d in audit.sequences:
        rows.append(
            (
                "" if d.series_number is None else str(d.series_number),
                d.description[:32],
                d.label,
                f"{d.confidence:.2f}",
                d.method,
                ", ".join(routes.get(d.series_instance_uid, [])) or "-",
            )
        )
    return _table(rows)


def format_findings(audit: AuditRecord) -> str:
    """One line per task: status, probability, the models that answered."""
    lines = []
    for f in audit.findings:
        p = f.probability
        prob = "-" if p is None else f"p({f.positive_label}) = {p:.3f}"
        models = ", ".join(f.models) or "no model ran"
        lines.append(f"  {f.task}: {f.status.upper()}  {prob}  [{models}]")
        lines.append(f"      {f.reason}")
    return "\n".join(lines)


def format_results(audit: AuditRecord) -> str:
    """What `neuronode process` (and the demo) print about one study's analysis."""
    if audit.qualifies is False:
        return f"not analysed: {audit.qualify_reason}"
    parts = [audit.sequence_cnn, format_sequences(audit), ""]
    parts.append(f"findings ({NOT_FOR_CLINICAL_USE}):")
    parts.append(format_findings(audit) or "  (no enabled task)")
    objects = audit.objects
    if objects:
        n_sc = sum(1 for o in objects if o.kind == "sc")
        n_sr = sum(1 for o in objects if o.kind == "sr")
        folder = Path(objects[0].file).parent
        parts.append(f"results: {n_sr} SR + {n_sc} heatmap SC written to {folder}")
        if audit.predecessor_sr:
            parts.append(f"the SR supersedes the earlier SR {audit.predecessor_sr}")
    elif audit.report_note:
        parts.append(f"results: {audit.report_note}")
    return "\n".join(parts)

"""Which specialist bundles run on which series, from the rule file's task routes (pure).

Every enabled task lists routes (bundle, sequence labels, weight). Each classified series whose
label is in a route's labels is sent to that route's bundle; series labelled OTHER never are. When
several series carry the same label (two FLAIRs), all of them are routed: the ensemble averages
one bundle's answers first and then fuses bundles by weight, so a second FLAIR does not double
the FLAIR model's say. A task none of whose routes matched gets no routes here; the ensemble then
reports it not assessable. No I/O: `cmd_explain` imports the header readers only when run.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from node.config import QualifySettings, Rules
from node.records import Route, SequenceDecision, SequenceLabel


def route_study(decisions: Sequence[SequenceDecision], rules: Rules) -> tuple[Route, ...]:
    """Routes for one study: enabled tasks in file order, then their bundles, then the series."""
    unique: dict[str, SequenceDecision] = {}
    for decision in decisions:
        unique.setdefault(decision.series_uid, decision)  # a series listed twice is routed once
    routes: list[Route] = []
    for task_name, task in rules.tasks.items():
        if not task.enabled:
            continue
        for model in task.models:
            for decision in unique.values():
                if decision.label is SequenceLabel.OTHER or decision.label not in model.sequences:
                    continue
                routes.append(
                    Route(
                        task=task_name,
                        bundle=model.bundle,
                        series_uid=decision.series_uid,
                        sequence=decision.label,
                        weight=model.weight,
                    )
                )
    return tuple(routes)


def study_qualifies(
    modalities: Collection[str],
    body_parts: Collection[str] | None,
    n_series: int,
    qualify: QualifySettings,
) -> tuple[bool, str]:
    """Whether a study is processed at all under `qualify:`, and the reason in words.

    body_parts None means unknown (not checked); an empty collection means all were blank.
    """
    wanted = {m.upper() for m in qualify.modalities}
    have = {m.strip().upper() for m in modalities if m.strip()}
    if wanted and not wanted & have:
        return False, (
            f"modalities {', '.join(sorted(have)) or 'none'} include none of"
            f" {', '.join(sorted(wanted))}"
        )
    parts_wanted = {b.upper() for b in qualify.body_parts}
    parts = {b.strip().upper() for b in body_parts or () if b.strip()}
    if body_parts is not None and parts_wanted and not parts_wanted & parts:
        return False, (
            f"body parts {', '.join(sorted(parts)) or '(blank)'} include none of"
            f" {', '.join(sorted(parts_wanted))}"
        )
    if n_series < qualify.min_series:
        return False, f"{n_series} series, fewer than min_series {qualify.min_series}"
    return True, f"qualifies: {n_series} series, modalities {', '.join(sorted(have)) or 'none'}"


def explain_routes(
    decisions: Sequence[SequenceDecision],
    rules: Rules,
    *,
    series_names: Mapping[str, str] | None = None,
) -> str:
    """Series by series: the label, why, and which bundles it goes to; then each task's outcome.

    series_names maps a series UID to what IT recognises (e.g. "#3 t2_tse_tra"); without it the
    UID is shown.
    """
    names = series_names or {}
    routes = route_study(decisions, rules)
    lines: list[str] = []
    for decision in decisions:
        name = names.get(decision.series_uid, decision.series_uid)
        lines.append(
            f"series {name}: {decision.label.value}"
            f" (confidence {decision.confidence:.2f}, by {decision.method.value})"
        )
        for reason in decision.reasons:
            lines.append(f"    because: {reason}")
        if not decision.reasons and (decision.tag_label or decision.cnn_label):
            tags = decision.tag_label.value if decision.tag_label is not None else "abstained"
            cnn = decision.cnn_label.value if decision.cnn_label is not None else "not run"
            lines.append(f"    tag rules: {tags}; CNN: {cnn}")
        mine = [r for r in routes if r.series_uid == decision.series_uid]
        if mine:
            for r in mine:
                lines.append(
                    f"    -> {r.bundle} (task {r.task}, route {r.sequence.value},"
                    f" weight {r.weight:g})"
                )
        elif decision.label is SequenceLabel.OTHER:
            lines.append("    -> not routed: OTHER series never go to a model")
        else:
            lines.append(
                f"    -> not routed: no enabled task has a route for {decision.label.value}"
            )
    lines.append("")
    for task_name, task in rules.tasks.items():
        if not task.enabled:
            lines.append(f"task {task_name}: disabled")
            continue
        task_routes = [r for r in routes if r.task == task_name]
        if not task_routes:
            wanted = sorted({s.value for m in task.models for s in m.sequences})
            lines.append(
                f"task {task_name}: NOT ASSESSABLE: no series labelled {' or '.join(wanted)}"
            )
            continue
        parts = []
        for model in task.models:
            n = sum(1 for r in task_routes if r.bundle == model.bundle)
            if n:
                averaged = ", averaged" if n > 1 else ""
                parts.append(f"{model.bundle} on {n} series{averaged} (weight {model.weight:g})")
            else:
                labels = "/".join(s.value for s in model.sequences)
                parts.append(f"{model.bundle} skipped (no {labels} series; weights renormalised)")
        lines.append(f"task {task_name}: {task.method}: " + "; ".join(parts))
    return "\n".join(lines)

"""Study-level fusion of the specialist answers per task (pure: records in, records out).

For each task the rule file gives routes (bundle + weight), a method and a temperature:

1. Each series probability is clipped to [EPS, 1 - EPS] so logits stay finite.
2. One bundle's answers on several series (two FLAIRs) are averaged first, in the space the
   method fuses in (logits for weighted_mean_logit, probabilities otherwise), so a repeated
   sequence does not multiply that bundle's weight.
3. Bundles that ran are fused with their weights renormalised over the bundles that ran (a
   missing ADC leaves T1C alone, with its weight rescaled to 1):
   - weighted_mean_logit: weighted mean of logits (a geometric pooling of odds; the usual late
     fusion of calibrated models);
   - weighted_mean_probability: weighted mean of probabilities (linear pooling);
   - max_weight: the answer of the highest-weighted bundle that ran (ties averaged).
4. The fused logit is divided by the task's temperature (study-level calibration). The
   temperature is fitted (`neuronode fit-ensemble`) on studies where every route ran: it
   corrects the pooling of correlated, individually calibrated models (a mean of two calibrated
   logits is under-confident when the models carry different evidence). So for the mean methods
   it applies in full when all n routes ran and in proportion to what was pooled otherwise:
   T_eff = 1 + (T - 1) (k - 1) / (n - 1) for k bundles that ran. One bundle alone keeps its own
   calibration (T_eff = 1); a task with a single route, or max_weight, uses T as given.
5. p >= band high: PRESENT, p <= band low: ABSENT, strictly inside: INDETERMINATE; no usable
   prediction: NOT_ASSESSABLE with probability None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from node.config import Rules, TaskSettings
from node.records import FindingStatus, SeriesPrediction, TaskFinding

EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] before logits

_METHOD_WORDS = {
    "weighted_mean_logit": "weighted mean logit",
    "weighted_mean_probability": "weighted mean probability",
    "max_weight": "highest-weight model",
}


def clip_probability(p: float) -> float:
    """p kept away from 0 and 1 so its logit is finite."""
    return min(max(p, EPS), 1.0 - EPS)


def logit(p: float) -> float:
    """log(p / (1 - p)) of the clipped probability."""
    q = clip_probability(p)
    return math.log(q) - math.log1p(-q)


def sigmoid(z: float) -> float:
    """1 / (1 + exp(-z)) without overflow."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def effective_temperature(temperature: float, n_ran: int, n_routes: int, method: str) -> float:
    """The temperature applied when n_ran of the task's n_routes bundles ran (see step 4)."""
    if method == "max_weight" or n_routes <= 1:
        return temperature
    share = (max(n_ran, 1) - 1) / (n_routes - 1)
    return 1.0 + (temperature - 1.0) * min(share, 1.0)


def _usable(p: SeriesPrediction) -> bool:
    return math.isfinite(p.probability) and 0.0 <= p.probability <= 1.0


def fuse_task(
    task: str, task_rules: TaskSettings, predictions: Sequence[SeriesPrediction]
) -> TaskFinding:
    """One task's study-level finding from the predictions of its bundles (others are ignored)."""
    weights = {m.bundle: m.weight for m in task_rules.models}
    order = [m.bundle for m in task_rules.models]
    mine = [p for p in predictions if p.task == task and p.model_id in weights]
    unusable = sorted({p.model_id for p in mine if not _usable(p)})
    # A fixed order (rules order, then series UID) makes the sums, and so the result, exactly
    # independent of the order predictions arrive in.
    by_bundle: dict[str, list[SeriesPrediction]] = {}
    for p in sorted((p for p in mine if _usable(p)), key=lambda p: (p.series_uid, p.probability)):
        by_bundle.setdefault(p.model_id, []).append(p)
    ran = [b for b in order if b in by_bundle]
    missing = [b for b in order if b not in by_bundle]
    contributions = tuple(p for b in ran for p in by_bundle[b])
    method_words = _METHOD_WORDS[task_rules.method]
    notes = ""
    if unusable:
        notes = f"; ignored non-finite or out-of-range output of {', '.join(unusable)}"

    if not ran:
        labels = sorted({s.value for m in task_rules.models for s in m.sequences})
        return TaskFinding(
            task=task,
            positive_label=task_rules.positive_label,
            negative_label=task_rules.negative_label,
            status=FindingStatus.NOT_ASSESSABLE,
            probability=None,
            contributions=(),
            method=f"{method_words}, temperature {task_rules.temperature:g}; no model ran",
            reason=(
                f"not assessable: no usable {' or '.join(labels)} series in the study"
                f" (models {', '.join(order)} did not run){notes}"
            ),
        )

    in_logits = task_rules.method == "weighted_mean_logit"
    per_bundle: dict[str, float] = {}
    for b in ran:
        values = [
            logit(p.probability) if in_logits else clip_probability(p.probability)
            for p in by_bundle[b]
        ]
        per_bundle[b] = math.fsum(values) / len(values)

    if task_rules.method == "max_weight":
        top = max(weights[b] for b in ran)
        chosen = [b for b in ran if weights[b] == top]
        z = logit(math.fsum(per_bundle[b] for b in chosen) / len(chosen))
    else:
        total = math.fsum(weights[b] for b in ran)
        fused = math.fsum(weights[b] * per_bundle[b] for b in ran) / total
        z = fused if in_logits else logit(fused)
    t_eff = effective_temperature(task_rules.temperature, len(ran), len(order), task_rules.method)
    probability = sigmoid(z / t_eff)

    low, high = task_rules.indeterminate_band
    if probability >= high:
        status = FindingStatus.PRESENT
        verdict = f"{probability:.3f} >= {high:g}: {task_rules.positive_label}"
    elif probability <= low:
        status = FindingStatus.ABSENT
        verdict = f"{probability:.3f} <= {low:g}: {task_rules.negative_label}"
    else:
        status = FindingStatus.INDETERMINATE
        verdict = f"{probability:.3f} inside the indeterminate band ({low:g}, {high:g})"

    used = ", ".join(
        f"{b} (weight {weights[b]:g}, {len(by_bundle[b])} series"
        f"{' averaged' if len(by_bundle[b]) > 1 else ''})"
        for b in ran
    )
    method = f"{method_words} of {used}; temperature {t_eff:g}"
    if missing:
        method += f"; not run: {', '.join(missing)} (weights renormalised"
        if t_eff != task_rules.temperature:
            method += f", temperature {task_rules.temperature:g} applied for {len(ran)} of"
            method += f" {len(order)} models"
        method += ")"
    return TaskFinding(
        task=task,
        positive_label=task_rules.positive_label,
        negative_label=task_rules.negative_label,
        status=status,
        probability=probability,
        contributions=contributions,
        method=method,
        reason=f"probability of {task_rules.positive_label} {verdict}{notes}",
    )


def fuse_study(rules: Rules, predictions: Sequence[SeriesPrediction]) -> tuple[TaskFinding, ...]:
    """One finding per enabled task, in rule-file order, the lesion gates applied."""
    findings = {
        name: fuse_task(name, task, predictions)
        for name, task in rules.tasks.items()
        if task.enabled
    }
    return tuple(
        apply_lesion_gate(f, findings.get(rules.tasks[name].requires_lesion or ""))
        for name, f in findings.items()
    )


def apply_lesion_gate(finding: TaskFinding, gate: TaskFinding | None) -> TaskFinding:
    """No diagnosis without a lesion: when the gate task (lesion presence) found none, the task
    reports "no lesion found" with no probability and no model evidence (so no heatmaps).

    A gate that is present or indeterminate lets the task answer; a gate that could not be
    assessed (no series for it) lets it answer too, and the reason says the gate did not run.
    """
    if gate is None or finding.status is FindingStatus.NOT_ASSESSABLE:
        return finding
    if gate.status is FindingStatus.ABSENT:
        return replace(
            finding,
            status=FindingStatus.NO_LESION,
            probability=None,
            contributions=(),
            method=f"{finding.method}; gated by task {gate.task}",
            reason=f"no lesion found ({gate.task}: {gate.reason}); no {finding.task} diagnosis",
        )
    if gate.status is FindingStatus.NOT_ASSESSABLE:
        return replace(
            finding,
            reason=f"{finding.reason}; lesion presence ({gate.task}) not assessed: {gate.reason}",
        )
    return finding

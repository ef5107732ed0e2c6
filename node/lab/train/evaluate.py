"""Evaluate a bundle on labelled studies the way the node serves it, and write its model card.

Task bundles are scored per patient: each study's routed series go through
``bundles.predict_series`` (the served code path), several series of one study are combined by
their mean logit, and the metrics are computed over studies. The sequence bundle is scored per
series with the majority vote of ``bundles.classify_series``.

Why this module is long: scoring and the model card belong together (the card shows what the
scoring stored: test metrics, evaluate-sequences sets per plane, vendor and thickness,
calibration records), for network and detector bundles alike; split, each half would import
the other.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from node import NOT_FOR_CLINICAL_USE
from node.bundles.bundle import (
    Bundle,
    classify_slices,
    is_detector_bundle,
    predict_series,
    read_bundle_config,
)
from node.bundles.config import BundleMetadata
from node.classify.sequence import vote_slices
from node.ensemble import logit
from node.errors import LoadError
from node.lab.train import plots
from node.lab.train.data import DataError, SeriesItem, load_volume
from node.lab.train.metrics import (
    binary_report,
    multiclass_report,
    roc_auc,
    top_label_ece,
)
from node.lab.train.recipes import get_recipe
from node.records import SequenceLabel, SeriesVolume

VolumeLoader = Callable[[SeriesItem], SeriesVolume]
Progress = Callable[[str], None]


def study_probabilities(
    bundle: Bundle,
    items: Sequence[SeriesItem],
    *,
    load: VolumeLoader = load_volume,
    progress: Progress | None = None,
) -> tuple[tuple[str, ...], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """(study UIDs, positive-class truth, calibrated probability) for every labelled study."""
    meta = bundle.metadata
    wanted = {s.value for s in meta.sequences}
    by_study: dict[str, list[SeriesItem]] = defaultdict(list)
    for it in items:
        if it.sequence.value in wanted and it.label is not None:
            by_study[it.study_uid].append(it)
    uids, ys, ps = [], [], []
    for i, (study, members) in enumerate(sorted(by_study.items())):
        label = members[0].label
        if label not in meta.labels:
            raise DataError(f"label '{label}' is not one of {meta.labels}")
        logits = [logit(predict_series(bundle, load(it)).probability) for it in members]
        uids.append(study)
        ys.append(meta.labels.index(label))
        z = float(np.mean(logits))
        ps.append(1.0 / (1.0 + math.exp(-z)))
        if progress is not None and (i + 1) % 20 == 0:
            progress(f"[{meta.name}] evaluated {i + 1}/{len(by_study)} studies")
    if not uids:
        raise DataError(f"no labelled {sorted(wanted)} series for task {meta.task}")
    return tuple(uids), np.asarray(ys, dtype=np.int64), np.asarray(ps, dtype=np.float64)


def evaluate_task(
    bundle: Bundle,
    items: Sequence[SeriesItem],
    *,
    out: Path | None = None,
    load: VolumeLoader = load_volume,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Patient-level metrics (AUC with 95% bootstrap CI, rates, ECE) and, with out, plots."""
    meta = bundle.metadata
    _uids, y, p = study_probabilities(bundle, items, load=load, progress=progress)
    report = binary_report(y, p, seed=seed)
    report.update(
        {
            "model": meta.name,
            "model_version": meta.version,
            "task": meta.task,
            "positive_label": meta.labels[1],
            "level": "patient (one study per patient; series combined by mean logit)",
        }
    )
    if out is not None:
        write_results(
            out,
            y,
            p,
            report,
            roc_title=f"{meta.name}: ROC (patient level)",
            reliability_title=f"{meta.name}: reliability",
        )
    return report


def write_results(
    out: Path,
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    report: Mapping[str, Any],
    *,
    roc_title: str,
    reliability_title: str,
    name: str = "metrics.json",
) -> None:
    """OUT/roc.png, OUT/reliability.png (with the report's ECE) and the report as OUT/name."""
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_roc(y, p, out / "roc.png", title=roc_title)
    plots.plot_reliability(
        y, p, out / "reliability.png", title=reliability_title, ece=report["ece"]
    )
    (out / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _macro_auc(y: npt.NDArray[np.int64], probs: npt.NDArray[np.float64]) -> float:
    aucs = [
        roc_auc((y == k).astype(int), probs[:, k])
        for k in range(probs.shape[1])
        if 0 < int((y == k).sum()) < y.size
    ]
    return float(np.mean(aucs)) if aucs else math.nan


def evaluate_sequence(
    bundle: Bundle,
    items: Sequence[SeriesItem],
    *,
    n_slices: int = 9,
    out: Path | None = None,
    load: VolumeLoader = load_volume,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Series-level accuracy of the CNN vote, confusion, macro AUC (95% CI) and top-label ECE."""
    meta = bundle.metadata
    names = meta.labels
    ys, qs, groups, mean_probs, conf, errors = [], [], [], [], [], []
    skipped = []
    for i, it in enumerate(items):
        try:
            volume = load(it)
        except LoadError as exc:
            skipped.append({"series_uid": it.series_uid, "reason": str(exc)})
            continue
        sc = classify_slices(bundle, volume, n_slices)
        winner, votes, _fraction = vote_slices(sc.labels)
        mp = sc.probabilities.mean(axis=0).astype(np.float64)
        ys.append(names.index(it.sequence.value))
        qs.append(names.index(winner.value))
        groups.append(it.group)
        mean_probs.append(mp)
        conf.append(float(mp.max()))
        if winner != it.sequence:
            errors.append(
                {
                    "series_uid": it.series_uid,
                    "true": it.sequence.value,
                    "predicted": winner.value,
                    "votes": {label.value: n for label, n in votes},
                }
            )
        if progress is not None and (i + 1) % 50 == 0:
            progress(f"[{meta.name}] classified {i + 1}/{len(items)} series")
    if not ys:
        raise DataError("no series to evaluate")
    y = np.asarray(ys, dtype=np.int64)
    q = np.asarray(qs, dtype=np.int64)
    probs = np.stack(mean_probs)
    report = multiclass_report(y, q, names)
    correct = (probs.argmax(axis=1) == y).astype(int)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(500):
        idx = rng.integers(0, y.size, y.size)
        boot.append(_macro_auc(y[idx], probs[idx]))
    finite = [b for b in boot if not math.isnan(b)]
    t1 = names.index(SequenceLabel.T1.value)
    t1c = names.index(SequenceLabel.T1C.value)
    n_t1_t1c = int(((y == t1) | (y == t1c)).sum())
    t1_t1c_errors = int((((y == t1) & (q == t1c)) | ((y == t1c) & (q == t1))).sum())
    report.update(
        {
            "model": meta.name,
            "model_version": meta.version,
            "task": "sequence",
            "level": f"series (majority vote over {n_slices} central slices)",
            "n_series": int(y.size),
            "n_patients": len(set(groups)),
            "auc": _macro_auc(y, probs),
            "auc_ci": list(np.quantile(finite, [0.025, 0.975])) if finite else [None, None],
            "auc_kind": "macro one-vs-rest over series mean probabilities",
            "ece": top_label_ece(probs, y),
            "ece_kind": "top-label confidence of the series mean probability",
            "t1_t1c_confusion_rate": t1_t1c_errors / n_t1_t1c if n_t1_t1c else None,
            "errors": errors,
            "skipped": skipped,
        }
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        plots.plot_reliability(
            correct,
            probs.max(axis=1),
            out / "reliability.png",
            title=f"{meta.name}: top-label reliability",
            ece=report["ece"],
        )
        plots.plot_roc(
            correct, probs.max(axis=1), out / "roc.png", title=f"{meta.name}: correct vs wrong"
        )
        (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


# --- model card ---------------------------------------------------------------------------------
_PLANE_TEXT = {
    "canonical_axial": "canonical axial slices resampled from the DICOM geometry",
    "acquired": "in the plane the series was acquired in (its stored slices, any plane)",
}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _metrics_table(m: Mapping[str, Any]) -> list[str]:
    ci = m.get("auc_ci") or [None, None]
    rows = [
        "| metric | value |",
        "|---|---|",
        f"| patients / series | {m.get('n_patients', 'n/a')} / {m.get('n_series', 'n/a')} |",
        f"| AUC (95% bootstrap CI) | {_fmt(m.get('auc'))} ({_fmt(ci[0])} - {_fmt(ci[1])}) |",
        f"| ECE (10 bins) | {_fmt(m.get('ece'))} |",
        *(
            [
                "| ECE a perfectly calibrated model would show here (mean, 95th pct) |"
                f" {_fmt(m['ece_if_calibrated'][0])}, {_fmt(m['ece_if_calibrated'][1])} |"
            ]
            if m.get("ece_if_calibrated")
            else []
        ),
        f"| accuracy | {_fmt(m.get('accuracy'))} |",
    ]
    for key in ("sensitivity", "specificity", "ppv", "npv", "f1", "t1_t1c_confusion_rate"):
        if key in m:
            rows.append(f"| {key} | {_fmt(m.get(key))} |")
    return rows


def model_card(config: BundleMetadata) -> str:
    """docs/README.md for a bundle, from its two config files (training, calibration,
    evaluation from metadata.json; network, transforms and calibration from inference.json)."""
    meta = config.raw
    name = meta["name"]
    inp = meta["input"]
    net = dict(config.network_config)
    net_name = str(net.pop("_target_")).removeprefix("monai.networks.nets.")
    steps = config.inference["preprocessing"]["transforms"]
    scaling = next(t for t in steps if t.get("_target_") == "ScaleIntensityRangePercentiles")
    training = meta.get("training", {})
    metrics = meta.get("metrics", {})
    lines = [
        f"# {name} (version {meta['version']})",
        "",
        "> **NOT FOR CLINICAL USE.** Research software. This model was trained only on",
        "> synthetic phantoms (node/lab/synth); it has never seen a patient and must not",
        "> inform any clinical decision.",
        "",
        "## What it does",
        "",
    ]
    if meta["task"] == "sequence":
        lines += [
            "Labels single MR slices as one of " + ", ".join(meta["labels"]) + "; the series",
            "label is the majority vote over central slices",
            "(node.classify.sequence.vote_slices), fused with the DICOM tag rules by",
            "node.classify.sequence.",
        ]
    else:
        desc = meta.get("label_descriptions", meta["labels"])
        lines += [
            f"Task `{meta['task']}`: probability of **{desc[1]}** (`{meta['labels'][1]}`) versus",
            f"{desc[0]} (`{meta['labels'][0]}`) from a {', '.join(inp['sequences'])} series.",
            "",
            "Series-level aggregation: **mean logit** over the brain-bearing slices, then",
            f"calibration p = sigmoid(z / T + b), T = {config.temperature:.3f},"
            f" b = {config.calibration_bias:.3f}. A mean logit is robust to a",
            "few off-lesion or artefact slices (one confident slice cannot dominate as with a",
            "max); slices without lesion evidence sit near logit 0 because in training they",
            "get a uniform target (slices through a lesion carry the study label; every slice",
            "of a lesion-free control carries its label), so they dilute but do not flip the",
            "answer, and the temperature fitted on validation series restores the scale.",
            "Without lesion positions (a hospital's own data) every slice carries the study",
            "label.",
        ]
    lines += [
        "",
        "## Input",
        "",
        f"- size {config.size[0]} x {config.size[1]}, {config.channels} channel(s), bilinear"
        " resize of each slice",
        f"- intensity: percentile {scaling['lower']} -> 0 and {scaling['upper']} -> 1 (clipped),"
        " computed per series on the native DICOM values after the modality LUT (not on 8-bit"
        " exports)",
        f"- slices: {inp['slice_selection']['mode']}, at most {inp['slice_selection']['n']},"
        f" {_PLANE_TEXT[config.slice_plane]}",
        *(
            [
                "- region: tumour-centred square found from the series itself (node.bundles.roi"
                f" `{inp['roi']['method']}`, z {inp['roi']['z']:g},"
                f" margin {inp['roi']['margin']:g}, same in training and inference);"
                " no focal lesion: the whole head"
            ]
            if inp.get("roi")
            else []
        ),
        f"- network: MONAI `{net_name}` {json.dumps(net)}; Grad-CAM layer `{config.cam_layer}`",
        f"- weights SHA-256 `{meta.get('weights_sha256', '(set on write)')}` (checked at load)",
        "",
        "## Training",
        "",
    ]
    for key in (
        "data",
        "recipe",
        "seed",
        "epochs",
        "best_epoch",
        "wall_time_s",
        "split",
        "n_train_series",
        "n_val_series",
        "n_train_slices",
        "augmentation",
        "optimiser",
        "hardware",
    ):
        if key in training:
            value = training[key]
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
            lines.append(f"- {key}: {text}")
    lines += ["", "## Calibration", ""]
    refit = meta.get("calibration")
    if refit and refit.get("applied", True):
        lines += _calibration_section(config, refit, training)
    else:
        lines.append(
            f"Temperature {config.temperature:.3f} and bias {config.calibration_bias:.3f}"
            " (Platt scaling of the series mean logit; temperature only for the sequence CNN),"
            " fitted on the validation split by minimising the negative log-likelihood"
            + (
                f" (validation NLL {_fmt(training.get('val_nll_before'))} ->"
                f" {_fmt(training.get('val_nll_after'))})."
                if "val_nll_before" in training
                else "."
            )
        )
        if refit:
            lines += ["", *_calibration_section(config, refit, training)]
    lines += ["", "## Evaluation", ""]
    test = metrics.get("test")
    if test:
        lines += [
            f"Held-out synthetic studies ({test.get('data', 'see metadata')}); "
            f"{test.get('level', '')}.",
            "",
            *_metrics_table(test),
        ]
        lines += ["", *(f"![{f}]({f})" for f in test.get("figures", ()))]
    else:
        lines.append("Not evaluated on held-out data yet (run `neuronode evaluate`).")
    val = metrics.get("validation")
    if val:
        lines += ["", "Validation split (used for early stopping and calibration):", ""]
        lines += _metrics_table(val)
    lines += _sequence_sets_section(metrics.get("evaluate_sequences") or {})
    lines += [
        "",
        "## Intended use",
        "",
        str(meta.get("intended_use", "")),
        "Demonstrates routing, inference, Grad-CAM and reporting in neuronode. A site that",
        "wants a real model trains its own with `neuronode train` on its own labelled DICOM.",
        "",
        "## Limits",
        "",
        "- Trained and tested on synthetic phantoms only: the figures above say nothing about",
        "  real patients, scanners or pathology.",
        "- Small CPU-sized network trained from scratch"
        + (" (here fine-tuned from a previous such bundle)" if "pretrained" in training else "")
        + "; no external validation.",
        "- Grad-CAM maps are attention maps, not a localisation.",
        *(f"- {text}" for text in meta.get("known_limits", ())),
        "",
        "## Reproduce",
        "",
        "```",
        f"neuronode train {name} --data SYNTH_DIR --seed {training.get('seed', 0)}"
        + (
            f" --epochs {training.get('epochs')} --pretrained PREVIOUS_BUNDLE/models/model.pt"
            if "pretrained" in training
            else ""
        ),
        *(
            [f"neuronode calibrate {name} --data CALIBRATION_DIR --test HELD_OUT_DIR"]
            if (meta.get("calibration") or {}).get("applied")
            else []
        ),
        f"neuronode evaluate {name} --data HELD_OUT_DIR --bundle models/{name} --out OUT",
        "```",
        "",
    ]
    try:
        published = get_recipe(name, "published")
        lines += [
            "## Published full-size recipe",
            "",
            f"`--recipe published --pretrained FILE`: MONAI `{published.network_name}` at"
            f" {published.size[0]} px, Adam {published.lr:g}, up to {published.epochs} epochs.",
            *published.notes,
            "",
        ]
    except ValueError:
        pass
    lines.append(f"**{NOT_FOR_CLINICAL_USE}**")
    return "\n".join(lines) + "\n"


def _calibration_section(
    config: BundleMetadata, refit: Mapping[str, Any], training: Mapping[str, Any]
) -> list[str]:
    """The card's text for a `neuronode calibrate` refit on other data, applied or not."""
    fitted = refit.get("fitted_on", {})
    before = fitted.get("before", {})
    source = (
        f"labelled data not used for training: {fitted.get('data', 'see metadata')}"
        f" ({fitted.get('n_series', 'n/a')} series of {fitted.get('n_patients', 'n/a')}"
        f" patients). Method: {refit.get('method', 'n/a')}."
    )
    trained = (
        " Training fitted its calibration on its validation split (validation NLL"
        f" {_fmt(training.get('val_nll_before'))} -> {_fmt(training.get('val_nll_after'))})."
        if "val_nll_before" in training
        else ""
    )
    if refit.get("applied", True):
        lines = [
            f"Temperature {config.temperature:.3f} and bias {config.calibration_bias:.3f},"
            f" refitted after training (`neuronode calibrate`) on {source} It replaced"
            f" temperature {_fmt(before.get('temperature'))} and bias"
            f" {_fmt(before.get('calibration_bias'))}.{trained}",
            "",
            "Series-level log-loss, ECE (10 bins) and AUC, previous calibration -> this one:",
        ]
        if (refit.get("temperature"), refit.get("calibration_bias")) != (
            config.temperature,
            config.calibration_bias,
        ):
            lines[0] += (
                f" **inference.json no longer holds the refit** (temperature"
                f" {_fmt(refit.get('temperature'))}, bias {_fmt(refit.get('calibration_bias'))}):"
                " the figures below are not the served calibration's."
            )
    else:
        lines = [
            f"A refit with `neuronode calibrate` on {source} It gave temperature"
            f" {_fmt(refit.get('temperature'))} and bias {_fmt(refit.get('calibration_bias'))}"
            " and was measured but **not applied**: the bundle serves the calibration above.",
            "",
            "Series-level log-loss, ECE (10 bins) and AUC, served calibration -> the refit:",
        ]
    lines += ["", "| set | series | NLL | ECE | AUC |", "|---|---|---|---|---|"]
    sets = [("calibration set", fitted)]
    sets += [(f"held out: {h.get('data', '')}", h) for h in refit.get("held_out", ())]
    for name, entry in sets:
        b, a = entry.get("before", {}), entry.get("after", {})
        cells = " | ".join(f"{_fmt(b.get(k))} -> {_fmt(a.get(k))}" for k in ("nll", "ece", "auc"))
        lines.append(f"| {name} | {entry.get('n_series', 'n/a')} | {cells} |")
    return lines


_BREAKDOWNS = (
    ("by_acquisition", "plane and 2D/3D"),
    ("by_vendor", "vendor"),
    ("by_thickness", "slice thickness"),
    ("by_cell", "vendor, plane and 2D/3D"),
)
_METHODS = (("tags", "tags"), ("cnn", "CNN"), ("fused", "fused"))


def _cell_text(cell: Mapping[str, Any] | None, method: str) -> str:
    if not cell or method not in cell:
        return "-"
    return f"{float(cell[method]['accuracy']):.3f}"


def _sequence_sets_section(sets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Tables of `neuronode evaluate-sequences` results stored by record_sequence_evaluations:
    overall, then per plane and 2D/3D, vendor and slice thickness, the sets side by side."""
    if not sets:
        return []
    names = list(sets)
    lines = [
        "",
        "## Series accuracy by set, plane, 2D/3D, vendor and thickness",
        "",
        "`neuronode evaluate-sequences DIR --labels DIR/labels.csv --out OUT` with this bundle",
        "(default rules: CNN vote over the central slices, fused with the tag rules physics",
        "first). Tags alone, CNN alone and fused (what is routed); n is the number of labelled",
        "series; plane, 2D/3D, vendor and thickness come from the headers.",
        "",
        *(f"- **{name}**: {sets[name].get('data', '')}" for name in names),
        "",
        "| set | n | tags | CNN | fused |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        acc = sets[name].get("accuracy", {})
        shown = " | ".join(
            "-" if acc.get(m) is None else f"{float(acc[m]):.3f}" for m, _ in _METHODS
        )
        lines.append(f"| {name} | {sets[name].get('n_series', '-')} | {shown} |")
    for key, title in _BREAKDOWNS:
        cells = sorted({c for name in names for c in sets[name].get(key, {})})
        if not cells:
            continue
        head = " | ".join(f"{name} n | {name} tags | {name} CNN | {name} fused" for name in names)
        lines += ["", f"By {title}:", "", f"| {title} | {head} |"]
        lines.append("|---" * (1 + 4 * len(names)) + "|")
        for cell in cells:
            parts = []
            for name in names:
                c = sets[name].get(key, {}).get(cell)
                n = next(iter(c.values()))["n"] if c else "-"
                parts.append(f"{n} | " + " | ".join(_cell_text(c, m) for m, _ in _METHODS))
            lines.append(f"| {cell} | " + " | ".join(parts) + " |")
    return lines


def record_sequence_evaluations(
    bundle_dir: Path, sets: Sequence[tuple[str, str, Mapping[str, Any]]]
) -> None:
    """Store `neuronode evaluate-sequences` results (name, data description, its metrics.json)
    in the bundle's metadata and rewrite its card (weights unchanged)."""
    stored: dict[str, Any] = {}
    for name, data, doc in sets:
        methods = doc.get("methods", {})
        stored[name] = {
            "data": data,
            "n_series": doc.get("n_series"),
            "accuracy": {m: methods[m]["accuracy"] for m, _ in _METHODS if m in methods},
            **{key: doc[key] for key, _ in _BREAKDOWNS if key in doc},
        }
    _store_metrics(bundle_dir, "evaluate_sequences", stored)


def _store_metrics(bundle_dir: Path, key: str, value: Any) -> None:
    """Put ``value`` at metrics[key] of the bundle's metadata and rewrite its model card (a
    network's or a detector's; the weights and their checksum are untouched)."""
    meta_path = bundle_dir / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.setdefault("metrics", {})[key] = value
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if is_detector_bundle(bundle_dir):
        from node.bundles.detector import load_detector
        from node.lab.train.detector import detector_card

        card = detector_card(load_detector(bundle_dir))
    else:
        card = model_card(read_bundle_config(bundle_dir))
    (bundle_dir / "docs" / "README.md").write_text(card, encoding="utf-8")


def record_evaluation(
    bundle_dir: Path, report: Mapping[str, Any], data: str, figures: Path | None = None
) -> None:
    """Store held-out metrics in the bundle's metadata and rewrite its card (weights unchanged).

    With figures (the evaluation's --out folder) its ROC and reliability PNGs go to docs/."""
    keep = {k: v for k, v in report.items() if k not in ("errors", "reliability")}
    keep["data"] = data
    copied = []
    for name in ("roc.png", "reliability.png"):
        if figures is not None and (figures / name).is_file():
            shutil.copyfile(figures / name, bundle_dir / "docs" / name)
            copied.append(name)
    keep["figures"] = copied
    _store_metrics(bundle_dir, "test", keep)

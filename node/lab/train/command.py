"""`neuronode train` and `neuronode evaluate`: train a bundle on labelled data, score it."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from node.bundles.bundle import (
    load_bundle,
    load_model,
    read_bundle_config,
    sha256_file,
    write_bundle,
    write_calibration,
)
from node.lab.train.data import (
    DataError,
    SeriesItem,
    build_slice_set,
    class_index,
    fold_groups,
    load_items,
    parse_label_map,
    select_items,
    split_groups,
)
from node.lab.train.ensemble_eval import (
    collect_outputs,
    evaluate_ensemble,
    fit_ensemble,
    rules_snippet,
)
from node.lab.train.evaluate import (
    evaluate_sequence,
    evaluate_task,
    model_card,
    record_evaluation,
    write_results,
)
from node.lab.train.metrics import binary_report, brief, multiclass_report, nll, sigmoid
from node.lab.train.recipes import Recipe, bundle_metadata, get_recipe, resolve_bundle_name
from node.lab.train.trainer import (
    Progress,
    calibrate,
    series_mean_logits,
    stderr_progress,
    train_model,
)
from node.log import get_logger

log = get_logger(__name__)

if TYPE_CHECKING:
    from node.cli.lab import CalibrateArgs, EvaluateArgs, FitEnsembleArgs, TrainArgs


def _threads() -> None:
    """Torch threads for this process, and log lines at warning and above only: the progress
    lines on stderr tell the story, per-series debug lines would drown them."""
    import sys

    from node.bundles.bundle import set_torch_threads
    from node.log import configure

    configure(fmt="auto", level="warning", stream=sys.stderr)
    set_torch_threads()


def train_bundle(
    recipe: Recipe,
    items: Sequence[SeriesItem],
    out: Path,
    *,
    seed: int = 0,
    epochs: int | None = None,
    pretrained: Path | None = None,
    data_description: str = "",
    progress: Progress = stderr_progress,
    load: Callable[[SeriesItem], npt.NDArray[Any]] | None = None,
) -> Path:
    """Split by patient, train, calibrate and write the bundle (weights, metadata, card)."""
    start = time.perf_counter()
    chosen = select_items(items, recipe)
    train_items, val_items = split_groups(
        chosen,
        val_fraction=recipe.val_fraction,
        seed=seed,
        label_of=lambda it: str(class_index(it, recipe)),
    )
    progress(
        f"[{recipe.bundle_name}] {len(train_items)} train / {len(val_items)} validation series"
        f" from {len({i.group for i in chosen})} patients (patient-disjoint)"
    )

    def bar(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            progress(f"[{recipe.bundle_name}] loaded {done}/{total} series")

    train_set = build_slice_set(train_items, recipe, progress=bar, load=load)
    val_set = build_slice_set(val_items, recipe, progress=bar, load=load)
    result = train_model(
        recipe,
        train_set,
        val_set,
        seed=seed,
        epochs=epochs,
        pretrained=pretrained,
        progress=progress,
    )
    network_logits = _val_logits(recipe, result.state_dict, val_set.x)
    if recipe.task == "sequence":
        val_metrics = multiclass_report(
            val_set.y.numpy(), network_logits.argmax(1).numpy(), recipe.labels
        )
        val_metrics["level"] = "slice"
    else:
        z = series_mean_logits(network_logits, val_set) / result.temperature
        z = z + result.calibration_bias
        val_metrics = brief(binary_report(np.asarray(val_set.series_labels), sigmoid(z), seed=seed))
        val_metrics["level"] = "series"
        val_metrics["n_series"] = len(val_set.series_labels)
    training = {
        "data": data_description,
        "recipe": recipe.variant,
        "seed": seed,
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "train_time_s": round(result.wall_time_s, 1),
        "split": {
            "method": "patient-disjoint, stratified by label",
            "val_fraction": recipe.val_fraction,
            "n_train_patients": len({i.group for i in train_items}),
            "n_val_patients": len({i.group for i in val_items}),
        },
        "n_train_series": len(train_items),
        "n_val_series": len(val_items),
        "n_train_slices": int(train_set.x.shape[0]),
        "augmentation": {
            k: getattr(recipe.augment, k) for k in recipe.augment.__dataclass_fields__
        },
        "optimiser": {
            "name": "Adam",
            "lr": recipe.lr,
            "weight_decay": recipe.weight_decay,
            "decay_after_epoch": recipe.lr_decay_after_epoch,
            "gamma": recipe.lr_decay_gamma,
            "early_stopping": f"lowest validation loss, patience {recipe.patience}",
        },
        "hardware": f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}",
        "val_nll_before": round(result.val_nll_before, 4),
        "val_nll_after": round(result.val_nll_after, 4),
        "history": [{k: round(v, 4) for k, v in row.items()} for row in result.history],
        "notes": list(recipe.notes),
    }
    if pretrained is not None:
        # the starting weights (a previous bundle's, for a fine-tune), named and hashed
        training["pretrained"] = {"file": pretrained.name, "sha256": sha256_file(pretrained)}
    meta = bundle_metadata(
        recipe,
        temperature=round(result.temperature, 4),
        calibration_bias=round(result.calibration_bias, 4),
        training=training,
        metrics={"validation": val_metrics},
    )
    write_bundle(out, meta, result.state_dict, "")
    (out / "docs" / "README.md").write_text(model_card(read_bundle_config(out)), encoding="utf-8")
    log.info(
        "bundle_trained", model_id=recipe.bundle_name, duration_ms=int(1000 * result.wall_time_s)
    )
    progress(f"[{recipe.bundle_name}] wrote {out} in {training['wall_time_s']} s")
    return out


def cross_validate(
    recipe: Recipe,
    items: Sequence[SeriesItem],
    out: Path,
    *,
    folds: int = 5,
    seed: int = 0,
    epochs: int | None = None,
    pretrained: Path | None = None,
    data_description: str = "",
    progress: Progress = stderr_progress,
    load: Callable[[SeriesItem], npt.NDArray[Any]] | None = None,
    volume_load: Callable[[SeriesItem], Any] | None = None,
) -> dict[str, Any]:
    """Patient-level k-fold cross-validation of a recipe: each fold's patients are held out
    while a bundle is trained (with its own inner validation split for early stopping and
    calibration) on the others, then scored as served; OUT/fold_k holds each fold's bundle and
    OUT/cv.json the per-fold and pooled out-of-fold metrics (plus roc.png, reliability.png)."""
    from node.lab.train.data import load_volume
    from node.lab.train.evaluate import study_probabilities

    chosen = select_items(items, recipe)
    groups = fold_groups(
        chosen, folds=folds, seed=seed, label_of=lambda it: str(class_index(it, recipe))
    )
    out.mkdir(parents=True, exist_ok=True)
    per_fold, ys, ps = [], [], []
    for k, held in enumerate(groups, start=1):
        progress(f"[{recipe.bundle_name}] fold {k}/{folds}: {len(held)} held-out patients")
        fold_dir = train_bundle(
            recipe,
            [it for it in chosen if it.group not in held],
            out / f"fold_{k}",
            seed=seed,
            epochs=epochs,
            pretrained=pretrained,
            data_description=f"{data_description} (cross-validation fold {k} of {folds})",
            progress=progress,
            load=load,
        )
        bundle = load_bundle(fold_dir)
        test = [it for it in chosen if it.group in held]
        _uids, y, p = study_probabilities(bundle, test, load=volume_load or load_volume)
        per_fold.append({"fold": k, **brief(binary_report(y, p, seed=seed))})
        ys.append(y)
        ps.append(p)
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    pooled = brief(binary_report(y_all, p_all, seed=seed))
    aucs = np.asarray([f["auc"] for f in per_fold], dtype=np.float64)
    result = {
        "model": recipe.bundle_name,
        "recipe": recipe.variant,
        "folds": folds,
        "seed": seed,
        "split": "patient-level, stratified by label; inner validation split per fold",
        "data": data_description,
        "auc_mean": float(np.nanmean(aucs)),
        "auc_sd": float(np.nanstd(aucs, ddof=1)) if folds > 1 else 0.0,
        "auc": pooled["auc"],
        "auc_ci": pooled["auc_ci"],
        "ece": pooled["ece"],
        "n_patients": pooled["n_patients"],
        "pooled_out_of_fold": pooled,
        "per_fold": per_fold,
    }
    title = f"{recipe.bundle_name}: {folds}-fold CV"
    write_results(
        out, y_all, p_all, result, roc_title=title, reliability_title=title, name="cv.json"
    )
    return result


def recalibrate_bundle(
    bundle_dir: Path, items: Sequence[SeriesItem], *, seed: int = 0
) -> tuple[float, float]:
    """Refit a task bundle's calibration on its own validation split (same data and seed as
    training, so the split is the same); weights are untouched, so their SHA-256 still holds.

    The temperature and bias go to inference.json, their one place; metadata.json keeps the
    training record (the validation log-loss after calibration)."""
    meta_path = bundle_dir / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    recipe = get_recipe(meta["name"], meta["training"].get("recipe", "small"))
    chosen = select_items(items, recipe)
    _train, val_items = split_groups(
        chosen,
        val_fraction=recipe.val_fraction,
        seed=seed,
        label_of=lambda it: str(class_index(it, recipe)),
    )
    val_set = build_slice_set(val_items, recipe)
    state = torch.load(bundle_dir / "models" / "model.pt", map_location="cpu", weights_only=True)
    z = series_mean_logits(_val_logits(recipe, state, val_set.x), val_set)
    y = np.asarray(val_set.series_labels)
    temperature, bias = calibrate(z, y, binary=True)
    write_calibration(
        bundle_dir, temperature=round(temperature, 4), calibration_bias=round(bias, 4)
    )
    meta["training"]["val_nll_after"] = round(nll(z / temperature + bias, y), 4)
    meta["training"]["calibration"] = "Platt scaling refitted on the validation split"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    card = model_card(read_bundle_config(bundle_dir))
    (bundle_dir / "docs" / "README.md").write_text(card, encoding="utf-8")
    return temperature, bias


def _val_logits(recipe: Recipe, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    from node.bundles.bundle import build_network

    net = build_network(recipe.network_name, recipe.network_args)
    net.load_state_dict(state)
    net.eval()
    with torch.inference_mode():
        return torch.cat([net(x[s : s + 128].float()) for s in range(0, x.shape[0], 128)])


def _describe(data: Path) -> str:
    manifest = data / "manifest.json"
    if manifest.is_file():
        try:
            m: Any = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return f"synth folder {data.name}"
        if isinstance(m, dict):
            keys = ("seed", "size", "slices", "vendors", "phenotypes")
            parts = [f"{k}={m[k]}" for k in keys if k in m]
            studies = m.get("studies", [])
            n = len(studies)
            styles = sorted({str(s.get("style", "a")) for s in studies if isinstance(s, dict)})
            randomised = any(isinstance(s, dict) and s.get("randomised") for s in studies)
            parts.append(f"style {'+'.join(styles) or 'a'}")
            if randomised:
                parts.append("domain-randomised")
            return (
                f"node/lab/synth studies (n={n}, "
                + ", ".join(parts)
                + _geometry(data, studies)
                + ")"
            )
    return f"DICOM folder {data.name}"


def _geometry(data: Path, studies: list[Any]) -> str:
    """', 128 x 128 x 16 slices' from the first routed series of a synth folder."""
    import pydicom

    for study in studies[:1]:
        for series in study.get("series", []):
            if series.get("label") in (None, "OTHER") or not series.get("folder"):
                continue
            files = sorted((data / series["folder"]).glob("*.dcm"))
            if not files:
                continue
            try:
                ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            except (OSError, ValueError, TypeError, EOFError):
                return ""
            return f", {ds.Rows} x {ds.Columns} x {series.get('n_instances')} slices"
    return ""


def cmd_train(args: TrainArgs) -> int:
    """`neuronode train TASK --data DIR [--labels CSV] [--out DIR] ...`."""
    _threads()
    recipe = get_recipe(args.task, args.recipe)
    folders = _folders(args)
    items = _task_items(folders, recipe.task, args.labels, args.label_map)
    description = "; ".join(_describe(f) for f in folders)
    if args.folds:
        cv_out = args.out or Path("cv") / recipe.bundle_name
        result = cross_validate(
            recipe,
            items,
            cv_out,
            folds=args.folds,
            seed=args.seed,
            epochs=args.epochs,
            pretrained=args.pretrained,
            data_description=description,
        )
        summary = {
            k: result[k]
            for k in ("model", "folds", "n_patients", "auc_mean", "auc_sd", "auc", "auc_ci", "ece")
        }
        print(json.dumps(summary, indent=2))
        return 0
    out = args.out or Path("models") / recipe.bundle_name
    train_bundle(
        recipe,
        items,
        out,
        seed=args.seed,
        epochs=args.epochs,
        pretrained=args.pretrained,
        data_description=description,
    )
    print(out)
    return 0


def _folders(args: TrainArgs | EvaluateArgs | FitEnsembleArgs | CalibrateArgs) -> list[Path]:
    """The --data folders (repeatable)."""
    return list(args.data)


def _task_items(
    folders: Sequence[Path], task: str, labels: Path | None, label_map: str | None = None
) -> list[SeriesItem]:
    """Labelled series of every --data folder."""
    mapping = parse_label_map(label_map)
    return [it for folder in folders for it in load_items(folder, task, labels, mapping)]


def _task_rules(args: EvaluateArgs | FitEnsembleArgs) -> tuple[Any, Any, dict[str, Any]]:
    """(task name, its rules, its loaded bundles) for --ensemble and fit-ensemble."""
    from node.config import load_rules

    rules = load_rules(args.rules)
    task = args.task.strip().lower()
    if task not in rules.tasks:
        raise DataError(
            f"'{args.task}' is not a task of {args.rules} (tasks: {', '.join(rules.tasks)})"
        )
    task_rules = rules.tasks[task]
    models_dir = args.models_dir or rules.models_dir
    bundles = {r.bundle: load_model(models_dir / r.bundle) for r in task_rules.models}
    return task, task_rules, bundles


def cmd_evaluate(args: EvaluateArgs) -> int:
    """`neuronode evaluate TASK --data DIR [--labels CSV] [--bundle DIR] [--out OUT]`;
    with --ensemble, TASK's study-level ensemble from the rule file against its single models."""
    _threads()
    folders = _folders(args)
    if args.ensemble:
        task, task_rules, bundles = _task_rules(args)
        outputs = collect_outputs(
            task,
            task_rules,
            bundles,
            _task_items(folders, task, args.labels, args.label_map),
            progress=stderr_progress,
        )
        report = evaluate_ensemble(task, task_rules, outputs, out=args.out)
        if args.record:
            data = "; ".join(_describe(f) for f in folders)
            for name, single in report["single_models"].items():
                figures = args.out / name if args.out is not None else None
                record_evaluation(bundles[name].path, single, data, figures)
        summary = {k: report[k] for k in ("task", "n_patients", "auc", "auc_ci", "ece")}
        summary["single_models"] = {
            n: {k: m[k] for k in ("n_patients", "auc", "ece")}
            for n, m in report["single_models"].items()
        }
        summary["comparison"] = report["comparison"]
        print(json.dumps(summary, indent=2))
        return 0
    name, task, _seq = resolve_bundle_name(args.task)
    bundle_dir = args.bundle or Path("models") / name
    bundle = load_bundle(bundle_dir)
    items = _task_items(folders, task, args.labels, args.label_map)
    if task == "sequence":
        report = evaluate_sequence(bundle, items, out=args.out, progress=stderr_progress)
    else:
        report = evaluate_task(bundle, items, out=args.out, progress=stderr_progress)
    if args.record:
        data = "; ".join(_describe(f) for f in folders)
        record_evaluation(bundle_dir, report, data, args.out)
    summary = {
        k: report.get(k)
        for k in ("model", "n_patients", "n_series", "auc", "auc_ci", "ece", "accuracy")
        if k in report
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_calibrate(args: CalibrateArgs) -> int:
    """`neuronode calibrate NAME --data DIR [--test DIR] [--bundle DIR] [--dry-run |
    --record-only]`: refit a network bundle's calibration on labelled series not used for its
    training (weights untouched), scored before and after there and on each held-out --test
    set."""
    from node.lab.train.calibration import calibrate_bundle

    _threads()
    name, task, _seq = resolve_bundle_name(args.name)
    bundle_dir = args.bundle or Path("models") / name
    folders = _folders(args)
    items = _task_items(folders, task, args.labels, args.label_map)
    held_out = [
        (_describe(t), _task_items([t], task, args.labels, args.label_map)) for t in args.test or ()
    ]
    fit = calibrate_bundle(
        bundle_dir,
        items,
        data="; ".join(_describe(f) for f in folders),
        held_out=held_out,
        apply=not (args.dry_run or args.record_only),
        record=not args.dry_run,
        progress=stderr_progress,
    )
    print(
        json.dumps({"bundle": str(bundle_dir), "recorded": fit.recorded, **fit.as_json()}, indent=2)
    )
    return 0


def cmd_fit_ensemble(args: FitEnsembleArgs) -> int:
    """`neuronode fit-ensemble TASK --data DIR`: weights and temperature for the rule file,
    fitted on labelled calibration studies (neither training nor test data)."""
    _threads()
    folders = _folders(args)
    task, task_rules, bundles = _task_rules(args)
    items = _task_items(folders, task, args.labels, args.label_map)
    outputs = collect_outputs(task, task_rules, bundles, items, progress=stderr_progress)
    fit = fit_ensemble(task, task_rules, outputs)
    result = {
        "task": task,
        "weights": fit.weights,
        "temperature": fit.temperature,
        "n_studies": fit.n_studies,
        "log_loss_with_rules": round(fit.nll_rules, 4),
        "log_loss_fitted": round(fit.nll_fitted, 4),
        "data": "; ".join(_describe(f) for f in folders),
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fit.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print("# paste under tasks: in the rule file")
    print(rules_snippet(task, task_rules, fit))
    return 0

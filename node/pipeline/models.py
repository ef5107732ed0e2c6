"""The model bundles a worker serves: one verified copy per worker thread, and start-up checks.

Threads never share a network, because Grad-CAM registers hooks on it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import Rules, TaskSettings
from node.errors import ModelUnavailable

if TYPE_CHECKING:
    from node.bundles.bundle import Bundle
    from node.bundles.detector import Detector


_worker = threading.local()


def _bundle_key(path: Path) -> tuple[str, str]:
    """(resolved path, weights SHA-256 the metadata declares): a replaced bundle is reloaded."""
    meta = path / "configs" / "metadata.json"
    try:
        sha = str(json.loads(meta.read_text(encoding="utf-8")).get("weights_sha256", ""))
    except (OSError, ValueError, AttributeError):
        sha = ""
    return (str(path.resolve()), sha)


def worker_bundle(path: Path) -> Bundle:
    """This thread's own verified copy of a network bundle (the sequence CNN), loaded on first
    use (ModelUnavailable if not).

    Never shared between threads: Grad-CAM registers hooks on the network.
    """
    from node.bundles.bundle import Bundle

    model = worker_model(path)
    if not isinstance(model, Bundle):
        raise ModelUnavailable(f"model bundle {path}: is a detector, not a network bundle")
    return model


def worker_model(path: Path) -> Bundle | Detector:
    """This thread's own verified copy of a task route's bundle (a network or a detector),
    loaded on first use (ModelUnavailable if not)."""
    from node.bundles.bundle import load_model

    cache: dict[str, tuple[str, Bundle | Detector]] | None = getattr(_worker, "bundles", None)
    if cache is None:
        cache = {}
        _worker.bundles = cache
    resolved, sha = _bundle_key(path)
    hit = cache.get(resolved)
    if hit is not None and hit[0] == sha and sha:
        return hit[1]
    model = load_model(path)
    cache[resolved] = (model.weights_sha256, model)
    return model


def clear_worker_bundles() -> None:
    """Forget this thread's loaded bundles (tests; a node reloading its rules)."""
    _worker.bundles = {}


def required_bundles(rules: Rules) -> tuple[tuple[str, Path], ...]:
    """(task, bundle folder) of every route of every enabled task, in rule-file order."""
    return tuple(
        (name, rules.models_dir / route.bundle)
        for name, task in rules.tasks.items()
        if task.enabled
        for route in task.models
    )


def check_bundles(rules: Rules, load: Callable[[Path], object] | None = None) -> tuple[str, ...]:
    """Why each bundle an enabled task needs cannot be served (empty: all load and verify).

    ``load`` defaults to a plain load; `neuronode process` passes ``worker_bundle`` so the
    check also warms the cache of the thread that then runs the study.
    """
    from node.bundles.bundle import load_model

    loader = load if load is not None else load_model
    problems: list[str] = []
    seen: set[Path] = set()
    for task, path in required_bundles(rules):
        if path in seen:
            continue
        seen.add(path)
        try:
            loader(path)
        except ModelUnavailable as exc:
            problems.append(f"task {task}: {exc}")
    return tuple(problems)


def warm_up(rules: Rules) -> None:
    """Pay a worker's one-time costs before it says it is ready, not in its first study: the
    report and outbox modules (highdicom, SQLAlchemy), the caption font, the sequence CNN, and
    each network's first forward and backward pass (Grad-CAM). Measured: the first study after
    a start spent about 1 s more in its stages than the next ones."""
    import torch

    import node.classify.study
    import node.deliver.outbox
    import node.report.sr  # noqa: F401 - imported for its cost, here
    from node.bundles.bundle import Bundle, forward_logits, resolve_layer
    from node.bundles.detector import detector_scaling
    from node.bundles.gradcam import grad_cam
    from node.errors import InferenceError
    from node.report.sc import caption_band_rows
    from node.report.sr import warm_up as warm_up_report

    caption_band_rows(256, ("warm up",))  # loads the caption font
    warm_up_report()
    paths = dict.fromkeys(
        (rules.models_dir / rules.sequence.bundle, *(p for _, p in required_bundles(rules)))
    )
    for path in paths:
        try:
            model = worker_model(path)
        except ModelUnavailable:
            continue  # said by check_bundles, or the tag rules work alone
        if not isinstance(model, Bundle):
            detector_scaling()  # MONAI's first config parse, here rather than in a study
            continue
        bundle = model
        meta = bundle.metadata
        x = torch.zeros((1, meta.channels, *meta.size), dtype=torch.float32)
        try:
            forward_logits(bundle, x)
            if meta.cam_layer:
                grad_cam(bundle.network, resolve_layer(bundle.network, meta.cam_layer), x, 0)
        except (InferenceError, RuntimeError, ValueError):
            continue  # a real study will say what is wrong with this network


@dataclass(frozen=True, slots=True, kw_only=True)
class LeftOutRoute:
    """A route of a task dropped because its bundle cannot be served, and why."""

    task: str
    bundle: str
    reason: str


def loadable_tasks(
    models_dir: Path,
) -> tuple[dict[str, TaskSettings], tuple[LeftOutRoute, ...]]:
    """The built-in tasks cut down to the routes whose bundle loads (demo, bench); a task with
    no loadable route is left out, and a task whose lesion gate is left out runs ungated."""
    from node.bundles.bundle import load_model

    tasks: dict[str, TaskSettings] = {}
    left_out: list[LeftOutRoute] = []
    for name, task in Rules().tasks.items():
        routes = []
        for route in task.models:
            try:
                load_model(models_dir / route.bundle)
            except ModelUnavailable as exc:
                left_out.append(LeftOutRoute(task=name, bundle=route.bundle, reason=str(exc)))
                continue
            routes.append(route)
        if routes:
            tasks[name] = task.model_copy(update={"models": tuple(routes)})
    # A task whose lesion gate was left out answers ungated (said in the left-out list).
    for name, task in list(tasks.items()):
        if task.requires_lesion is not None and task.requires_lesion not in tasks:
            tasks[name] = task.model_copy(update={"requires_lesion": None})
    return tasks, tuple(left_out)

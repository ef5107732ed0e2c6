"""Load MONAI model bundles from models/ and run them on a series.

A bundle is data: configs/metadata.json (task, labels, input, normalisation, network, the
SHA-256 of the weights, calibration), configs/inference.json (the same network as a MONAI
config), models/model.pt (a state_dict) and docs/README.md (the model card). A bundle that
cannot be served exactly as described is refused with ``ModelUnavailable`` and the reason:
the node never runs a network whose weights it did not load and verify.

Series-level aggregation is the mean of the per-slice logits, then temperature scaling. A mean
logit is robust to a few off-lesion or artefact slices (one confident slice cannot dominate as
with a max), and slices without evidence for either class sit near logit 0 when the model is
trained on all brain-bearing slices with the study label, so they dilute but do not flip the
answer; the temperature is fitted on the validation series' mean logits, which restores the
scale.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from node import NOT_FOR_CLINICAL_USE
from node.bundles.roi import Box, RoiSpec, lesion_box
from node.errors import InferenceError, ModelUnavailable
from node.log import get_logger
from node.records import (
    CnnVerdict,
    FloatArray,
    SequenceDecision,
    SequenceLabel,
    SeriesPrediction,
    SeriesVolume,
)

log = get_logger(__name__)

SEQUENCE_TASK = "sequence"
TASKS = ("sequence", "gbm_pcnsl", "glioma_grade", "tubers")
SLICE_MODES = ("brain_range", "central_window")
AGGREGATIONS = ("mean_logit",)
# Networks a bundle may name: MONAI classes only, built without any download.
NETWORKS = ("ResNet", "EfficientNetBN", "DenseNet121", "DenseNet", "SEResNet50", "SEResNext50")
_BATCH = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleMetadata:
    """What configs/metadata.json says about a bundle, checked."""

    name: str
    version: str
    task: str
    labels: tuple[str, ...]  # class names; binary tasks: (negative, positive)
    sequences: tuple[SequenceLabel, ...]  # series a task bundle reads
    size: tuple[int, int]  # network input (H, W)
    channels: int
    norm_low: float  # percentile of the series' native values mapped to 0
    norm_high: float  # percentile mapped to 1
    slice_mode: str  # brain_range or central_window
    slice_n: int  # how many slices at most
    roi: RoiSpec | None  # tumour-centred rectangle (node.bundles.roi); None = whole slices
    temperature: float
    calibration_bias: float  # added to logit / temperature (Platt scaling); 0 = temperature only
    series_aggregation: str
    network_name: str
    network_args: Mapping[str, Any]
    cam_layer: str
    weights_sha256: str
    raw: Mapping[str, Any]  # the whole JSON, for the model card and audit


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Bundle:
    """A verified bundle: its metadata and its network in eval mode (one copy per worker)."""

    path: Path
    metadata: BundleMetadata
    network: torch.nn.Module

    @property
    def model_id(self) -> str:
        """The bundle name, used in logs, the SR and the audit."""
        return self.metadata.name

    def copy(self) -> Bundle:
        """An independent copy (own parameters, own hooks) for another worker."""
        return Bundle(path=self.path, metadata=self.metadata, network=copy.deepcopy(self.network))


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SliceClassification:
    """The sequence CNN's label for each sampled slice of a series (central slices first)."""

    series_uid: str
    model_id: str
    model_version: str
    slice_indices: tuple[int, ...]
    labels: tuple[SequenceLabel, ...]  # one per slice
    confidences: tuple[float, ...]  # calibrated probability of each slice's label
    probabilities: FloatArray  # (n_slices, n_classes), calibrated, columns in metadata.labels


# --- metadata ----------------------------------------------------------------------------------


THREADS_ENV = "NEURONODE_TORCH_THREADS"


def set_torch_threads() -> int:
    """Torch intra-op threads: $NEURONODE_TORCH_THREADS, else 1.

    On 2 shared cores, 2 torch threads ran the networks 4-7x slower than 1 while the node's
    other threads worked (docs/benchmarks.md), so one thread per process is the default.
    """
    n = max(1, int(os.environ.get(THREADS_ENV, "1")))
    torch.set_num_threads(n)
    return n


def _need(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise ModelUnavailable(f"{where}: metadata has no '{key}'")
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelUnavailable(f"{where}: metadata '{key}' has the wrong type")
    return value


def parse_metadata(raw: Mapping[str, Any], where: str) -> BundleMetadata:
    """Check and convert metadata.json; every problem names the key."""
    if not isinstance(raw, Mapping):
        raise ModelUnavailable(f"{where}: metadata is not a JSON object")
    name = _need(raw, "name", str, where)
    task = _need(raw, "task", str, where)
    if task not in TASKS:
        raise ModelUnavailable(f"{where}: unknown task '{task}' (expected one of {TASKS})")
    labels = tuple(str(x) for x in _need(raw, "labels", list, where))
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ModelUnavailable(f"{where}: 'labels' needs at least two distinct class names")
    if task != SEQUENCE_TASK and len(labels) != 2:
        raise ModelUnavailable(f"{where}: task '{task}' is binary; 'labels' must have two names")
    if task == SEQUENCE_TASK:
        try:
            [SequenceLabel(x) for x in labels]
        except ValueError as exc:
            raise ModelUnavailable(
                f"{where}: sequence labels must be {list(SequenceLabel)}"
            ) from exc
    inp = _need(raw, "input", dict, where)
    try:
        sequences = tuple(SequenceLabel(s) for s in inp.get("sequences", []))
    except ValueError as exc:
        raise ModelUnavailable(f"{where}: input.sequences holds an unknown label") from exc
    if task != SEQUENCE_TASK and not sequences:
        raise ModelUnavailable(f"{where}: input.sequences is empty")
    size = inp.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise ModelUnavailable(f"{where}: input.size must be [H, W] integers")
    if min(size) < 16 or max(size) > 1024:
        raise ModelUnavailable(f"{where}: input.size {size} is outside 16..1024")
    channels = inp.get("channels", 1)
    if not isinstance(channels, int) or channels not in (1, 3):
        raise ModelUnavailable(f"{where}: input.channels must be 1 or 3")
    norm = inp.get("normalisation", {})
    if not isinstance(norm, dict) or norm.get("method") != "percentile":
        raise ModelUnavailable(f"{where}: input.normalisation.method must be 'percentile'")
    low, high = float(norm.get("low", 0.5)), float(norm.get("high", 99.5))
    if not 0 <= low < high <= 100:
        raise ModelUnavailable(f"{where}: normalisation percentiles must satisfy 0 <= low < high")
    sel = inp.get("slice_selection", {})
    mode = sel.get("mode") if isinstance(sel, dict) else None
    if mode not in SLICE_MODES:
        raise ModelUnavailable(f"{where}: input.slice_selection.mode must be one of {SLICE_MODES}")
    n = sel.get("n")
    if not isinstance(n, int) or n < 1:
        raise ModelUnavailable(f"{where}: input.slice_selection.n must be a positive integer")
    try:
        roi = RoiSpec.from_json(inp.get("roi"))
    except ValueError as exc:
        raise ModelUnavailable(f"{where}: {exc}") from exc
    temperature = _need(raw, "temperature", (int, float), where)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ModelUnavailable(f"{where}: temperature must be a positive number")
    bias = raw.get("calibration_bias", 0.0)
    if not isinstance(bias, int | float) or not math.isfinite(bias):
        raise ModelUnavailable(f"{where}: calibration_bias must be a finite number")
    aggregation = raw.get("series_aggregation", "mean_logit")
    if aggregation not in AGGREGATIONS:
        raise ModelUnavailable(f"{where}: series_aggregation must be one of {AGGREGATIONS}")
    net = _need(raw, "network", dict, where)
    net_name = net.get("name")
    if net_name not in NETWORKS:
        raise ModelUnavailable(f"{where}: network.name must be a MONAI network of {NETWORKS}")
    args = net.get("args", {})
    if not isinstance(args, dict):
        raise ModelUnavailable(f"{where}: network.args must be an object")
    if args.get("pretrained"):
        raise ModelUnavailable(f"{where}: network.args.pretrained would download weights")
    cam_layer = net.get("cam_layer")
    if not isinstance(cam_layer, str) or not cam_layer:
        raise ModelUnavailable(f"{where}: network.cam_layer (Grad-CAM target) is missing")
    sha = _need(raw, "weights_sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelUnavailable(f"{where}: weights_sha256 is not a lowercase SHA-256 hex digest")
    if raw.get("not_for_clinical_use") is not True:
        raise ModelUnavailable(f"{where}: metadata must declare not_for_clinical_use: true")
    return BundleMetadata(
        name=name,
        version=str(_need(raw, "version", str, where)),
        task=task,
        labels=labels,
        sequences=sequences,
        size=(size[0], size[1]),
        channels=channels,
        norm_low=low,
        norm_high=high,
        slice_mode=str(mode),
        slice_n=n,
        roi=roi,
        temperature=float(temperature),
        calibration_bias=float(bias),
        series_aggregation=str(aggregation),
        network_name=str(net_name),
        network_args=dict(args),
        cam_layer=cam_layer,
        weights_sha256=sha,
        raw=dict(raw),
    )


def build_network(name: str, args: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate a MONAI network by class name (never with pretrained downloads)."""
    import monai.networks.nets as nets

    if name not in NETWORKS:
        raise ModelUnavailable(f"network '{name}' is not one of {NETWORKS}")
    if args.get("pretrained"):
        raise ModelUnavailable(f"network '{name}': pretrained=True would download weights")
    cls = getattr(nets, name)
    try:
        module: torch.nn.Module = cls(**dict(args))
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise ModelUnavailable(f"network '{name}' cannot be built from its args: {exc}") from exc
    return module


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_layer(network: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule named by a dotted path (the Grad-CAM target layer)."""
    modules: dict[str, torch.nn.Module] = dict(network.named_modules())
    if name not in modules:
        raise ModelUnavailable(f"Grad-CAM layer '{name}' is not a module of the network")
    return modules[name]


def load_bundle(path: Path) -> Bundle:
    """Load and verify a bundle directory, or refuse it with ModelUnavailable and why."""
    path = Path(path)
    where = f"model bundle {path}"
    if not path.is_dir():
        raise ModelUnavailable(f"{where}: directory not found")
    meta_path = path / "configs" / "metadata.json"
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelUnavailable(f"{where}: configs/metadata.json is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelUnavailable(f"{where}: configs/metadata.json is not valid JSON: {exc}") from exc
    meta = parse_metadata(raw, where)
    weights = path / "models" / "model.pt"
    if not weights.is_file():
        raise ModelUnavailable(f"{where}: weights models/model.pt are missing")
    digest = sha256_file(weights)
    if digest != meta.weights_sha256:
        raise ModelUnavailable(
            f"{where}: weights SHA-256 {digest[:12]}... does not match metadata "
            f"{meta.weights_sha256[:12]}... (corrupt or replaced file)"
        )
    network = build_network(meta.network_name, meta.network_args)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle/zip
        raise ModelUnavailable(f"{where}: weights cannot be read: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelUnavailable(f"{where}: models/model.pt is not a state_dict")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelUnavailable(f"{where}: weights do not match the network: {exc}") from exc
    resolve_layer(network, meta.cam_layer)
    n_out = _count_outputs(network, meta)
    if n_out != len(meta.labels):
        raise ModelUnavailable(
            f"{where}: network gives {n_out} outputs for {len(meta.labels)} labels"
        )
    network.eval()
    log.info("bundle_loaded", model_id=meta.name, version=meta.version, task=meta.task)
    return Bundle(path=path, metadata=meta, network=network)


def _count_outputs(network: torch.nn.Module, meta: BundleMetadata) -> int:
    network.eval()
    with torch.inference_mode():
        out = network(torch.zeros(1, meta.channels, *meta.size))
    return int(out.shape[-1])


def write_bundle(
    out_dir: Path,
    metadata: dict[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    card: str,
) -> Path:
    """Write a bundle directory (weights, metadata with their SHA-256, MONAI config, card)."""
    out_dir = Path(out_dir)
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    (out_dir / "docs").mkdir(parents=True, exist_ok=True)
    weights = out_dir / "models" / "model.pt"
    torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, weights)
    meta = dict(metadata)
    meta["weights_sha256"] = sha256_file(weights)
    meta["not_for_clinical_use"] = True
    meta.setdefault("disclaimer", NOT_FOR_CLINICAL_USE)
    parse_metadata(meta, f"model bundle {out_dir}")  # never write a bundle we would refuse
    (out_dir / "configs" / "metadata.json").write_text(
        json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    (out_dir / "configs" / "inference.json").write_text(
        json.dumps(inference_config(meta), indent=2) + "\n", encoding="utf-8"
    )
    (out_dir / "docs" / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def inference_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The MONAI bundle inference config mirroring metadata (the node itself reads metadata)."""
    net = meta["network"]
    inp = meta["input"]
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": f"monai.networks.nets.{net['name']}", **net["args"]},
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "ScaleIntensityRangePercentiles",
                    "lower": inp["normalisation"]["low"],
                    "upper": inp["normalisation"]["high"],
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "Resize", "spatial_size": inp["size"], "mode": "bilinear"},
            ],
        },
        "postprocessing": {
            "temperature": meta["temperature"],
            "calibration_bias": meta.get("calibration_bias", 0.0),
            "series_aggregation": meta.get("series_aggregation", "mean_logit"),
        },
        "note": "neuronode reads configs/metadata.json; this file mirrors it for MONAI tools.",
    }


# --- preprocessing (shared by inference and training so both see the same pixels) ---------------


def brain_slices(pixels: npt.NDArray[Any]) -> tuple[int, ...]:
    """Indices of slices carrying tissue: foreground fraction at least a quarter of the peak."""
    vol = np.asarray(pixels, dtype=np.float32)
    if vol.ndim != 3 or vol.shape[0] == 0:
        raise InferenceError(f"expected (slices, rows, cols) pixels, got shape {vol.shape}")
    top = float(np.percentile(vol, 99.0))
    floor = float(np.percentile(vol, 1.0))
    threshold = floor + 0.1 * (top - floor)
    frac = (vol > threshold).reshape(vol.shape[0], -1).mean(axis=1)
    peak = float(frac.max())
    if peak <= 0.0:
        return tuple(range(vol.shape[0]))
    keep = np.nonzero(frac >= max(0.25 * peak, 0.01))[0]
    return tuple(int(i) for i in keep) or tuple(range(vol.shape[0]))


def select_slices(
    pixels: npt.NDArray[Any], mode: str, n: int, *, max_slices: int | None = None
) -> tuple[int, ...]:
    """The slices a model reads: brain range (evenly thinned, ascending) or centre-first window."""
    limit = n if max_slices is None else max(1, min(n, max_slices))
    n_slices = int(np.asarray(pixels).shape[0])
    if mode == "brain_range":
        idx = brain_slices(pixels)
        if len(idx) > limit:
            pick = np.unique(np.round(np.linspace(0, len(idx) - 1, limit)).astype(int))
            idx = tuple(idx[i] for i in pick)
        return idx
    if mode == "central_window":
        centre = (n_slices - 1) / 2.0
        order = sorted(range(n_slices), key=lambda i: (abs(i - centre), i))
        return tuple(order[:limit])
    raise InferenceError(f"unknown slice selection mode '{mode}'")


def normalise_volume(pixels: npt.NDArray[Any], low: float, high: float) -> FloatArray:
    """Map the series' native values: percentile low -> 0, high -> 1, clipped (per series)."""
    vol = np.asarray(pixels, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(vol, [low, high]))
    if not hi > lo:
        return np.zeros_like(vol, dtype=np.float32)
    out: FloatArray = np.clip((vol - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return out


def preprocess(
    pixels: npt.NDArray[Any],
    indices: tuple[int, ...],
    *,
    size: tuple[int, int],
    channels: int,
    low: float,
    high: float,
    box: Box | None = None,
) -> torch.Tensor:
    """Network input (n, channels, H, W): per-series percentile scaling, the series' region
    (box) when the bundle reads one, bilinear resize."""
    vol = normalise_volume(pixels, low, high)
    picked = vol[list(indices)]
    if box is not None:
        picked = picked[:, box.r0 : box.r1, box.c0 : box.c1]
    x = torch.from_numpy(np.ascontiguousarray(picked))[:, None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if channels > 1:
        x = x.repeat(1, channels, 1, 1)
    return x


def roi_box(pixels: npt.NDArray[Any], roi: RoiSpec | None, low: float, high: float) -> Box | None:
    """The series' tumour-centred rectangle (node.bundles.roi) on its scaled values, or None."""
    return None if roi is None else lesion_box(normalise_volume(pixels, low, high), roi)


def series_box(pixels: npt.NDArray[Any], meta: BundleMetadata) -> Box | None:
    """The series' tumour-centred rectangle when the bundle reads one, else None."""
    return roi_box(pixels, meta.roi, meta.norm_low, meta.norm_high)


def prepare_slices(
    pixels: npt.NDArray[Any],
    indices: tuple[int, ...],
    meta: BundleMetadata,
    box: Box | None = None,
) -> torch.Tensor:
    """Network input (n, channels, H, W) for the chosen slices of one series (box: the
    series' region, found here when the bundle reads one and it is not given)."""
    return preprocess(
        pixels,
        indices,
        size=meta.size,
        channels=meta.channels,
        low=meta.norm_low,
        high=meta.norm_high,
        box=box if box is not None else series_box(pixels, meta),
    )


def forward_logits(bundle: Bundle, x: torch.Tensor) -> torch.Tensor:
    """Raw logits for a batch of prepared slices, in chunks."""
    outs = []
    try:
        with torch.inference_mode():
            for start in range(0, x.shape[0], _BATCH):
                outs.append(bundle.network(x[start : start + _BATCH]).float())
    except RuntimeError as exc:
        raise InferenceError(f"model {bundle.model_id} failed: {exc}") from exc
    return torch.cat(outs) if outs else torch.zeros(0, len(bundle.metadata.labels))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def predict_series(
    bundle: Bundle,
    volume: SeriesVolume,
    *,
    sequence: SequenceLabel | SequenceDecision | None = None,
    max_slices: int | None = None,
) -> SeriesPrediction:
    """A task bundle's calibrated probability of its positive class on one series."""
    meta = bundle.metadata
    if meta.task == SEQUENCE_TASK:
        raise InferenceError(f"model {meta.name} is a sequence classifier; use classify_slices")
    indices = select_slices(volume.pixels, meta.slice_mode, meta.slice_n, max_slices=max_slices)
    box = series_box(volume.pixels, meta)
    logits = forward_logits(bundle, prepare_slices(volume.pixels, indices, meta, box))
    slice_logit = (logits[:, 1] - logits[:, 0]).double().numpy()
    series_logit = float(slice_logit.mean())
    t = meta.temperature
    if isinstance(sequence, SequenceDecision):
        label = sequence.label
    elif sequence is None:
        label = meta.sequences[0]
    else:
        label = sequence
    b = meta.calibration_bias
    prob = _sigmoid(series_logit / t + b)
    log.debug("series_predicted", model_id=meta.name, task=meta.task, probability=round(prob, 4))
    return SeriesPrediction(
        task=meta.task,
        model_id=meta.name,
        model_version=meta.version,
        series_uid=volume.series_uid,
        sequence=label,
        probability=prob,
        slice_indices=indices,
        slice_probabilities=tuple(_sigmoid(float(z) / t + b) for z in slice_logit),
        weights_sha256=meta.weights_sha256,
        region=None if box is None else (box.r0, box.r1, box.c0, box.c1),
    )


def classify_slices(bundle: Bundle, volume: SeriesVolume, n: int) -> SliceClassification:
    """The sequence CNN's calibrated label for up to n slices, central slices first."""
    meta = bundle.metadata
    if meta.task != SEQUENCE_TASK:
        raise InferenceError(f"model {meta.name} is not a sequence classifier")
    indices = select_slices(volume.pixels, "central_window", max(1, n))
    logits = forward_logits(bundle, prepare_slices(volume.pixels, indices, meta))
    probs = torch.softmax(logits / meta.temperature, dim=1).numpy().astype(np.float32)
    best = probs.argmax(axis=1)
    return SliceClassification(
        series_uid=volume.series_uid,
        model_id=meta.name,
        model_version=meta.version,
        slice_indices=indices,
        labels=tuple(SequenceLabel(meta.labels[int(k)]) for k in best),
        confidences=tuple(float(probs[i, k]) for i, k in enumerate(best)),
        probabilities=probs,
    )


def classify_series(bundle: Bundle, volume: SeriesVolume, n: int) -> CnnVerdict:
    """The sequence CNN's series label: majority vote over n slices (central slices first).

    Confidence is the winner's vote fraction times its mean calibrated probability over the
    sampled slices, so a narrow or unsure majority stays low."""
    from node.classify.sequence import vote_slices

    sc = classify_slices(bundle, volume, n)
    winner, votes, fraction = vote_slices(sc.labels)
    column = bundle.metadata.labels.index(winner.value)
    mean_p = float(sc.probabilities[:, column].mean())
    return CnnVerdict(
        label=winner, confidence=fraction * mean_p, votes=votes, n_slices=len(sc.labels)
    )

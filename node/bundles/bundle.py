"""Load MONAI model bundles from models/ and run them on a series.

A bundle is data: configs/metadata.json (MONAI's bundle metadata plus the node's fields: task,
labels, input sequences, slice selection, the SHA-256 of the weights), configs/inference.json
(the network, the preprocessing transforms and the calibration, built with MONAI's parser: see
node.bundles.config), models/model.pt (a state_dict) and docs/README.md (the model card). A
bundle that cannot be served exactly as described is refused with ``ModelUnavailable`` and the
reason: the node never runs a network whose weights it did not load and verify.

Series-level aggregation is the mean of the per-slice logits, then temperature scaling. A mean
logit is robust to a few off-lesion or artefact slices (one confident slice cannot dominate as
with a max), and slices without evidence for either class sit near logit 0 when the model is
trained on all brain-bearing slices with the study label, so they dilute but do not flip the
answer; the temperature is fitted on the validation series' mean logits, which restores the
scale.

Why this module is long: loading, verifying and running a bundle share one preprocessing path
with training (slice selection, brain slices, scaling), which must stay one code so that both
see the same pixels.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from node import NOT_FOR_CLINICAL_USE
from node.bundles.config import (
    INFERENCE_FILE,
    METADATA_FILE,
    SEQUENCE_TASK,
    BundleFiles,
    BundleMetadata,
    Preprocessing,
    RecentValues,
    build_network_config,
    frozen_digest,
    parse_bundle_config,
    read_config_files,
    read_json,
    recipe_preprocessing,
)
from node.bundles.detector import Detector, detector_from, is_detector_config, predict_detector
from node.bundles.roi import Box, RoiSpec, lesion_box
from node.dicom.canonical import canonical_axial
from node.ensemble import sigmoid
from node.errors import InferenceError, ModelUnavailable
from node.log import get_logger
from node.percentiles import series_percentiles, voxel_slabs
from node.records import (
    CnnVerdict,
    FloatArray,
    SequenceDecision,
    SequenceLabel,
    SeriesPrediction,
    SeriesVolume,
)

log = get_logger(__name__)

_BATCH = 32


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

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names (binary tasks: negative, positive)."""
        return self.metadata.labels

    @property
    def weights_sha256(self) -> str:
        """The verified weights' digest."""
        return self.metadata.weights_sha256

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


def build_network(name: str, args: Mapping[str, Any]) -> torch.nn.Module:
    """A MONAI network by class name and arguments (a recipe's), built by MONAI's parser."""
    return build_network_config({"_target_": f"monai.networks.nets.{name}", **dict(args)})


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


def read_bundle_config(path: Path) -> BundleMetadata:
    """Both config files of a network bundle directory, checked (no weights read)."""
    path = Path(path)
    where = f"model bundle {path}"
    return _network_config(*read_config_files(path, where), where)


def _network_config(metadata: Any, inference: Any, where: str) -> BundleMetadata:
    if is_detector_config(inference):
        raise ModelUnavailable(f"{where}: is a detector, not a network bundle")
    return parse_bundle_config(metadata, inference, where)


def is_detector_bundle(path: Path) -> bool:
    """Whether a bundle folder holds a detector (node.bundles.detector), not a network."""
    try:
        inference = json.loads((Path(path) / "configs" / INFERENCE_FILE).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # loading it then says what is wrong with it
    return is_detector_config(inference)


def load_model(path: Path) -> Bundle | Detector:
    """A task route's bundle: a network bundle or a detector, verified (ModelUnavailable if
    it cannot be served); its config files are read once."""
    path = Path(path)
    where = f"model bundle {path}"
    metadata, inference = read_config_files(path, where)
    if is_detector_config(inference):
        return detector_from(metadata, inference, path, where)
    return _verified(path, _network_config(metadata, inference, where), where)


def load_bundle(path: Path) -> Bundle:
    """Load and verify a bundle directory, or refuse it with ModelUnavailable and why."""
    path = Path(path)
    return _verified(path, read_bundle_config(path), f"model bundle {path}")


def _verified(path: Path, meta: BundleMetadata, where: str) -> Bundle:
    """The network of a checked config, its weights verified against the metadata."""
    weights = path / "models" / "model.pt"
    if not weights.is_file():
        raise ModelUnavailable(f"{where}: weights models/model.pt are missing")
    digest = sha256_file(weights)
    if digest != meta.weights_sha256:
        raise ModelUnavailable(
            f"{where}: weights SHA-256 {digest[:12]}... does not match metadata "
            f"{meta.weights_sha256[:12]}... (corrupt or replaced file)"
        )
    network = build_network_config(meta.network_config, where)
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


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def write_bundle(
    out_dir: Path,
    files: BundleFiles,
    state_dict: Mapping[str, torch.Tensor],
    card: str,
) -> Path:
    """Write a bundle directory: weights, metadata.json with their SHA-256, inference.json, card.

    Both files are checked as the loader checks them first: never write a bundle we would
    refuse."""
    if not isinstance(files, BundleFiles):
        raise TypeError(f"files must be BundleFiles, not {type(files).__name__}")
    out_dir = Path(out_dir)
    for sub in ("configs", "models", "docs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    weights = out_dir / "models" / "model.pt"
    torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, weights)
    meta = dict(files.metadata)
    meta["weights_sha256"] = sha256_file(weights)
    meta["not_for_clinical_use"] = True
    meta.setdefault("disclaimer", NOT_FOR_CLINICAL_USE)
    parse_bundle_config(meta, files.inference, f"model bundle {out_dir}")
    _write_json(out_dir / "configs" / METADATA_FILE, meta)
    _write_json(out_dir / "configs" / INFERENCE_FILE, files.inference)
    (out_dir / "docs" / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def write_calibration(bundle_dir: Path, *, temperature: float, calibration_bias: float) -> None:
    """Set a bundle's calibration in inference.json, its one place (weights untouched)."""
    bundle_dir = Path(bundle_dir)
    where = f"model bundle {bundle_dir}"
    path = bundle_dir / "configs" / INFERENCE_FILE
    inference = read_json(path, where)
    metadata = read_json(bundle_dir / "configs" / METADATA_FILE, where)
    post = dict(inference.get("postprocessing") or {})
    post.update(temperature=temperature, calibration_bias=calibration_bias)
    inference["postprocessing"] = post
    parse_bundle_config(metadata, inference, where)
    _write_json(path, inference)


# --- preprocessing (shared by inference and training so both see the same pixels) ---------------


# The brain slices of the last few read-only series (a job's decoded series), by content: the
# bundles routed to one series select from the same pixels.
_BRAIN: RecentValues[tuple[bytes, tuple[int, ...]], tuple[int, ...]] = RecentValues(16)


def brain_slices(pixels: npt.NDArray[Any]) -> tuple[int, ...]:
    """Indices of slices carrying tissue: foreground fraction at least a quarter of the peak."""
    vol = np.asarray(pixels, dtype=np.float32)
    if vol.ndim != 3 or vol.shape[0] == 0:
        raise InferenceError(f"expected (slices, rows, cols) pixels, got shape {vol.shape}")
    digest = frozen_digest(vol)
    if digest is None:
        return _brain_slices(vol)
    key = (digest, tuple(vol.shape))
    found = _BRAIN.get(key)
    if found is None:
        found = _brain_slices(vol)
        _BRAIN.put(key, found)
    return found


def _brain_slices(vol: FloatArray) -> tuple[int, ...]:
    """brain_slices, computed."""
    # Both from one selection: np.percentile's values without its sorted copy of the series.
    top, floor = (float(v) for v in series_percentiles(vol, [99.0, 1.0]))
    threshold = floor + 0.1 * (top - floor)
    # Foreground fractions a few slices at a time (not a mask of the whole series).
    frac = np.concatenate(
        [(part > threshold).reshape(part.shape[0], -1).mean(axis=1) for part in voxel_slabs(vol)]
    )
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
    """Map the series' native values: percentile low -> 0, high -> 1, clipped (per series),
    with the MONAI transform a bundle's inference.json names."""
    return recipe_preprocessing(low=low, high=high).scale(pixels)


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
    """Network input (n, channels, H, W) for a recipe that has no bundle yet (training data):
    the transforms its bundle's inference.json will hold, built the same way."""
    pre = recipe_preprocessing(low=low, high=high, size=size, channels=channels)
    return slices_input(pre, pre.scale(pixels), indices, box)


def slices_input(
    pre: Preprocessing, scaled: npt.NDArray[Any], indices: tuple[int, ...], box: Box | None
) -> torch.Tensor:
    """The chosen slices of a scaled series, cut to the region when given, through the
    bundle's per-slice transforms."""
    picked = scaled[list(indices)]
    if box is not None:
        picked = picked[:, box.r0 : box.r1, box.c0 : box.c1]
    return pre.slice_input(picked)


def roi_box(pixels: npt.NDArray[Any], roi: RoiSpec | None, low: float, high: float) -> Box | None:
    """The series' tumour-centred rectangle (node.bundles.roi) on its scaled values, or None."""
    return None if roi is None else lesion_box(normalise_volume(pixels, low, high), roi)


def series_box(pixels: npt.NDArray[Any], meta: BundleMetadata) -> Box | None:
    """The series' tumour-centred rectangle when the bundle reads one, else None."""
    if meta.roi is None:
        return None
    return lesion_box(meta.preprocessing.scale(pixels), meta.roi)


def prepare_slices(
    pixels: npt.NDArray[Any],
    indices: tuple[int, ...],
    meta: BundleMetadata,
    box: Box | None = None,
) -> torch.Tensor:
    """Network input (n, channels, H, W) for the chosen slices of one series, through the
    bundle's own preprocessing (box: the series' region, found here when the bundle reads one
    and it is not given)."""
    pre = meta.preprocessing
    if box is None and meta.roi is not None:
        scaled = pre.scale(pixels)  # the region is found on the whole scaled series
        box = lesion_box(scaled, meta.roi)
        return slices_input(pre, scaled, indices, box)
    # Only the chosen slices are scaled (with the whole series' statistics).
    picked = pre.scale_slices(pixels, indices)
    return slices_input(pre, picked, tuple(range(len(indices))), box)


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


def task_slice_logits(
    bundle: Bundle, volume: SeriesVolume, *, max_slices: int | None = None
) -> tuple[tuple[int, ...], Box | None, npt.NDArray[np.float64]]:
    """A task bundle's uncalibrated evidence on one series, as served: the slices it reads,
    its region (None without one) and each slice's logit (positive minus negative)."""
    meta = bundle.metadata
    if meta.task == SEQUENCE_TASK:
        raise InferenceError(f"model {meta.name} is a sequence classifier; use classify_slices")
    # Canonical axial slices from the DICOM geometry: a sagittal 3D series reads as axial.
    pixels = canonical_axial(volume).pixels
    indices = select_slices(pixels, meta.slice_mode, meta.slice_n, max_slices=max_slices)
    if meta.roi is not None:
        scaled = meta.preprocessing.scale(pixels)  # once: the region and the slices
        box: Box | None = lesion_box(scaled, meta.roi)
        x = slices_input(meta.preprocessing, scaled, indices, box)
        del scaled
    else:
        box = None
        x = prepare_slices(pixels, indices, meta)
    logits = forward_logits(bundle, x)
    slice_logit: npt.NDArray[np.float64] = (logits[:, 1] - logits[:, 0]).double().numpy()
    return indices, box, slice_logit


def predict_series(
    bundle: Bundle | Detector,
    volume: SeriesVolume,
    *,
    sequence: SequenceLabel | SequenceDecision | None = None,
    max_slices: int | None = None,
) -> SeriesPrediction:
    """A task bundle's calibrated probability of its positive class on one series."""
    if isinstance(bundle, Detector):
        label = sequence.label if isinstance(sequence, SequenceDecision) else sequence
        return predict_detector(bundle, volume, sequence=label)
    meta = bundle.metadata
    indices, box, slice_logit = task_slice_logits(bundle, volume, max_slices=max_slices)
    series_logit = float(slice_logit.mean())
    t = meta.temperature
    if isinstance(sequence, SequenceDecision):
        label = sequence.label
    elif sequence is None:
        label = meta.sequences[0]
    else:
        label = sequence
    b = meta.calibration_bias
    prob = sigmoid(series_logit / t + b)
    log.debug("series_predicted", model_id=meta.name, task=meta.task, probability=round(prob, 4))
    return SeriesPrediction(
        task=meta.task,
        model_id=meta.name,
        model_version=meta.version,
        series_uid=volume.series_uid,
        sequence=label,
        probability=prob,
        slice_indices=indices,
        slice_probabilities=tuple(sigmoid(float(z) / t + b) for z in slice_logit),
        weights_sha256=meta.weights_sha256,
        region=None if box is None else (box.r0, box.r1, box.c0, box.c1),
    )


_SAME_POSITION_MM = 0.01


def acquired_slices(volume: SeriesVolume) -> FloatArray:
    """The slices a sequence bundle reads in the acquired plane: the stored stack, or for a time
    series (positions repeat: a DWI series holding its b0 images, fMRI, DTI directions) its one
    time point of lowest mean signal.

    Pixels of a time series are time-major (node.dicom.volumes), so each time point is a block.
    Diffusion weighting only removes signal: the darkest block of a DWI series is its most
    diffusion-weighted one, while its b0 images are T2-weighted EPI that look like any other EPI
    (fMRI, field-map magnitude). The choice depends on the signal, not on the vendor's order."""
    pixels = volume.pixels
    n = pixels.shape[0]
    if n < 2 or volume.slice_spacing_mm is None or len(volume.slices) != n:
        return pixels
    first = np.asarray(volume.slices[0].geometry.position, dtype=np.float64)
    block = next(
        (
            i
            for i in range(1, n)
            if np.linalg.norm(np.asarray(volume.slices[i].geometry.position) - first)
            < _SAME_POSITION_MM
        ),
        n,
    )
    if block < 2 or block == n or n % block:
        return pixels
    means = pixels.reshape(n // block, -1).mean(axis=1)
    t = int(np.argmin(means))
    out: FloatArray = pixels[t * block : (t + 1) * block]
    return out


def sequence_slice_logits(
    bundle: Bundle, volume: SeriesVolume, n: int
) -> tuple[tuple[int, ...], torch.Tensor]:
    """The sequence CNN's uncalibrated logits (n_slices, n_classes) for up to n central slices
    of a series in the bundle's plane, and which slices they are."""
    meta = bundle.metadata
    if meta.task != SEQUENCE_TASK:
        raise InferenceError(f"model {meta.name} is not a sequence classifier")
    # The bundle's plane: canonical axial from the DICOM geometry, or the acquired slices as
    # stored (a thick sagittal 2D series keeps its sharp sagittal slices; one time point).
    if meta.slice_plane == "acquired":
        pixels = acquired_slices(volume)
    else:
        pixels = canonical_axial(volume).pixels
    indices = select_slices(pixels, "central_window", max(1, n))
    return indices, forward_logits(bundle, prepare_slices(pixels, indices, meta))


def classify_slices(bundle: Bundle, volume: SeriesVolume, n: int) -> SliceClassification:
    """The sequence CNN's calibrated label for up to n slices, central slices first."""
    meta = bundle.metadata
    indices, logits = sequence_slice_logits(bundle, volume, n)
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

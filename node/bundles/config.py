"""A bundle's two config files, checked and turned into what the node serves.

configs/metadata.json follows MONAI's bundle metadata schema (meta_schema 0.8.x: version,
changelog, software versions, task, description, authors, copyright, network_data_format) and
holds the node's own fields (name, labels, input sequences, slice selection, region, Grad-CAM
layer, weights SHA-256, metrics, training record). configs/inference.json is the one place for
the network (``network_def``), the preprocessing transforms and the postprocessing numbers
(temperature, calibration bias, series aggregation). Both are read with MONAI's ConfigParser,
with the metadata under ``_meta_``, so ``@_meta_#network_data_format#...`` references resolve
here as they do in MONAI's own bundle tools, and no number is written twice.

The node builds the network and the transforms from the config, never from a copy of their
arguments. The preprocessing Compose is applied in two parts: the transforms before the first
spatial one see the whole series (slices, rows, cols) at once, as per-series intensity scaling
needs; the rest run on each chosen slice as a channel-first 2-D image, after the series'
region is cut out when the bundle reads one.

A config is data from a file, so nothing in it may run code: ``$`` expressions are refused in
the parts the node builds, and every ``_target_`` must be a MONAI class.

Why this module is long: it is the whole bundle contract (MONAI metadata schema checks, the
refusal of code in configs, network, preprocessing and calibration parsing, and the writer's
side of the same files); keeping reader and writer together keeps them from drifting.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from node.bundles.roi import RoiSpec
from node.errors import ModelUnavailable
from node.percentiles import series_percentiles
from node.records import FloatArray, SequenceLabel

META_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)
# Mandatory keys of MONAI's bundle metadata (docs: MONAI Bundle Specification, metadata.json).
META_REQUIRED: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("version", str),
    ("monai_version", str),
    ("pytorch_version", str),
    ("numpy_version", str),
    ("task", str),
    ("description", str),
    ("authors", (str, list)),
    ("copyright", str),
    ("network_data_format", dict),
)
PACKAGES_KEYS = ("required_packages_version", "optional_packages_version")
# Keys every tensor format specifier must carry.
TENSOR_KEYS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)
SEQUENCE_TASK = "sequence"
# A task is named by the rule file (a site may bring a bundle for a task of its own): the
# bundle only has to name it as an identifier; "sequence" marks the sequence classifier.
_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SLICE_MODES = ("brain_range", "central_window")
# The plane a bundle's slices are cut in: canonical axial (resampled from the DICOM geometry,
# the default and what every bundle without the key reads) or the plane the series was acquired
# in (its stored slices; the sequence bundle: contrast shows in any plane, while a thick 2D
# sagittal or coronal series rebuilt as axial slices is a stack of blurred stripes).
SLICE_PLANES = ("canonical_axial", "acquired")
AGGREGATIONS = ("mean_logit",)
# Networks a bundle may name: MONAI classes only, built without any download.
NETWORKS = ("ResNet", "EfficientNetBN", "DenseNet121", "DenseNet", "SEResNet50", "SEResNext50")
# Network arguments that take the input and output channel counts: the writer points them at
# network_data_format so the counts are written once.
IN_CHANNEL_ARGS = ("n_input_channels", "in_channels")
OUT_CHANNEL_ARGS = ("num_classes", "out_channels")
METADATA_FILE = "metadata.json"
INFERENCE_FILE = "inference.json"
_IMAGE = "@_meta_#network_data_format#inputs#image"
_PRED = "@_meta_#network_data_format#outputs#pred"


_SCALE_CHUNK_SLICES = 8  # slices scaled at a time once the series' percentiles are known


def _ignore_read_only(arr: npt.NDArray[Any]) -> None:
    """Inside a ``warnings.catch_warnings()`` block: torch's warning that a read-only array (a
    job's shared decoded series) becomes a tensor it could write is not shown. Each transform
    here reads its input and returns a new tensor, so nothing writes through it."""
    if not arr.flags.writeable:
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _apply(scalar: Callable[[Any], Any], part: npt.NDArray[Any]) -> FloatArray:
    """A voxel-wise intensity transform on some slices, as float32 numpy."""
    from monai.utils.type_conversion import convert_to_tensor

    with warnings.catch_warnings():
        _ignore_read_only(part)
        picked = convert_to_tensor(np.ascontiguousarray(part, dtype=np.float32), track_meta=False)
        # A constant series (a blank localiser) maps to 0, which MONAI announces.
        warnings.filterwarnings("ignore", message="Divide by zero", category=Warning)
        out = scalar(picked)
    scaled: FloatArray = _as_tensor(out).numpy().astype(np.float32, copy=False)
    return scaled


# MONAI's percentile hands arrays above this size to np.percentile, smaller ones to torch.quantile
# (pytorch#64947); series_percentiles stands in for the numpy branch only.
MONAI_NUMPY_PERCENTILE_ABOVE = 1_000_000


def _series_bounds(vol: FloatArray, lower: float, upper: float) -> torch.Tensor:
    """MONAI's ``percentile(series, [lower, upper])``, as ScaleIntensityRangePercentiles takes
    its bounds: a float32 tensor of the two values.

    Both bounds from one call: one selection over the series instead of two. For a series
    above a million voxels MONAI's answer is ``np.percentile`` over a sorted copy of the whole
    series; ``series_percentiles`` gives the same values bit for bit with no copy. A smaller
    one goes through MONAI's own call (torch.quantile)."""
    from monai.transforms.utils_pytorch_numpy_unification import percentile
    from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

    if vol.size > MONAI_NUMPY_PERCENTILE_ABOVE:
        found = series_percentiles(vol, [lower, upper])
        bounds: torch.Tensor = convert_to_dst_type(found, torch.empty(0, dtype=torch.float32))[0]
        return bounds
    data = np.ascontiguousarray(vol)
    with warnings.catch_warnings():
        _ignore_read_only(data)
        tensor = convert_to_tensor(data, track_meta=False)
    small: Any = percentile(tensor, [lower, upper])
    return _as_tensor(small)


# The series percentiles of the last few volumes, by content: one study's series are read by
# the sequence CNN, each specialist routed to it and its Grad-CAM, on the same pixels; a
# selection over a whole series costs far more than hashing it.
K = TypeVar("K")
V = TypeVar("V")


class RecentValues(Generic[K, V]):
    """The values of the last ``kept`` keys put, oldest dropped first; safe across threads."""

    def __init__(self, kept: int) -> None:
        self._kept = kept
        self._values: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value put for ``key``, if still kept."""
        with self._lock:
            return self._values.get(key)

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` for ``key``, dropping the oldest values beyond ``kept``."""
        with self._lock:
            self._values[key] = value
            while len(self._values) > self._kept:
                self._values.pop(next(iter(self._values)))


_BOUNDS: RecentValues[tuple[bytes, tuple[int, ...], str, float, float], Any] = RecentValues(16)

# The content digests of read-only arrays (a job's decoded series, node.pipeline.series_cache),
# by the view's identity in its owner: pixels that cannot change are hashed once, not at every
# read (a 256x256x33 series costs about 8 ms to hash, and a study's series are read 15 times).
_ViewKey = tuple[int, int, tuple[int, ...], tuple[int, ...], str]
_DIGESTS: RecentValues[_ViewKey, tuple[weakref.ref[npt.NDArray[Any]], bytes]] = RecentValues(64)


def _frozen_owner(arr: npt.NDArray[Any]) -> npt.NDArray[Any] | None:
    """The array that owns ``arr``'s memory when neither can be written (else None): only then
    do the same view's values stay the same."""
    if arr.flags.writeable:
        return None
    owner = arr
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if owner.base is not None or owner.flags.writeable:
        return None  # memory owned by another object (a buffer), or writable through the owner
    return owner


def frozen_digest(arr: npt.NDArray[Any]) -> bytes | None:
    """``content_digest(arr)`` for a read-only array whose owner is read-only too (its values
    cannot change), hashed once per view; None for any other array."""
    owner = _frozen_owner(arr)
    if owner is None:
        return None
    key: _ViewKey = (
        id(owner),
        int(arr.__array_interface__["data"][0]),
        tuple(arr.shape),
        tuple(arr.strides),
        arr.dtype.str,
    )
    hit = _DIGESTS.get(key)
    if hit is not None and hit[0]() is owner:  # the same owner, not a new one at its address
        return hit[1]
    digest = content_digest(arr)
    _DIGESTS.put(key, (weakref.ref(owner), digest))
    return digest


def content_digest(arr: npt.NDArray[Any]) -> bytes:
    """SHA-1 of an array's values in C order (shape and dtype are not part of it)."""
    data = np.ascontiguousarray(arr)
    return hashlib.sha1(data.data.cast("B")).digest()


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Preprocessing:
    """The bundle's MONAI preprocessing, split where the node cuts out the series' region."""

    series: Callable[[Any], Any]  # intensity transforms on the whole series (slices, rows, cols)
    slices: Callable[[Any], Any]  # transforms on each chosen slice, channel-first (1, rows, cols)

    def scale(self, pixels: npt.NDArray[Any]) -> FloatArray:
        """The series' values as the network sees them (before any region or resize).

        A series transform that is one ScaleIntensityRangePercentiles (every bundle's) is
        applied a few slices at a time after its percentiles are taken over the whole series:
        the same values as the whole-series transform (its arithmetic is voxel by voxel), with
        one copy of a long series in memory instead of three."""
        vol = np.asarray(pixels, dtype=np.float32)
        scalar = self._range_scaler(vol)
        if scalar is None:
            with warnings.catch_warnings():
                # A constant series (a blank localiser) maps to 0, which MONAI announces.
                warnings.filterwarnings("ignore", message="Divide by zero", category=Warning)
                out = self.series(vol)
            whole: FloatArray = _as_tensor(out).numpy().astype(np.float32, copy=False)
            return whole
        scaled = np.empty(vol.shape, dtype=np.float32)
        for start in range(0, vol.shape[0], _SCALE_CHUNK_SLICES):
            part = slice(start, start + _SCALE_CHUNK_SLICES)
            scaled[part] = _apply(scalar, vol[part])
        return scaled

    def scale_slices(self, pixels: npt.NDArray[Any], indices: Sequence[int]) -> FloatArray:
        """The chosen slices exactly as ``scale(pixels)[indices]``, without scaling the rest.

        The series statistics (ScaleIntensityRangePercentiles' percentiles) still come from every
        slice, with MONAI's own ``percentile``; only the arithmetic is limited to the chosen
        slices. Any other series transform: the whole series is scaled and the slices picked.
        """
        vol = np.asarray(pixels, dtype=np.float32)
        scalar = self._range_scaler(vol)
        if scalar is None:
            return self.scale(vol)[list(indices)]
        return _apply(scalar, vol[list(indices)])

    def scaled_slices(self, pixels: npt.NDArray[Any]) -> ScaledSlices:
        """``scale(pixels)`` read a slice at a time, each slice scaled when read (the series'
        percentiles taken once, here): the same values without a scaled copy of the series."""
        return ScaledSlices(self, pixels)

    def _range_scaler(self, vol: FloatArray) -> Callable[[Any], Any] | None:
        """The series transform as a voxel-wise ScaleIntensityRange with the whole series'
        percentiles (as ScaleIntensityRangePercentiles._normalize takes them), or None when
        the series transform is something else."""
        from monai.transforms.compose import Compose
        from monai.transforms.intensity.array import (
            ScaleIntensityRange,
            ScaleIntensityRangePercentiles,
        )

        steps = list(self.series.transforms) if isinstance(self.series, Compose) else []
        step = steps[0] if len(steps) == 1 else None
        if (
            not isinstance(step, ScaleIntensityRangePercentiles)
            or step.channel_wise
            or step.relative
        ):
            return None
        digest = frozen_digest(vol)
        key = (
            content_digest(vol) if digest is None else digest,
            tuple(vol.shape),
            vol.dtype.str,
            float(step.lower),
            float(step.upper),
        )
        bounds: Any = _BOUNDS.get(key)
        if bounds is None:
            bounds = _series_bounds(vol, float(step.lower), float(step.upper))
            _BOUNDS.put(key, bounds)
        a_min: Any = bounds[0]
        a_max: Any = bounds[1]
        return ScaleIntensityRange(
            a_min=a_min,
            a_max=a_max,
            b_min=step.b_min,
            b_max=step.b_max,
            clip=step.clip,
            dtype=step.dtype,
        )

    def slice_input(self, scaled: npt.NDArray[Any]) -> torch.Tensor:
        """Network input (n, channels, H, W) for already scaled (and cut) slices (n, rows, cols)."""
        arr = np.ascontiguousarray(scaled, dtype=np.float32)
        outs = [_as_tensor(self.slices(arr[i : i + 1])) for i in range(arr.shape[0])]
        if not outs:
            raise ValueError("no slices to prepare")
        return torch.stack(outs).float()


class ScaledSlices:
    """A series' scaled values (``Preprocessing.scale``) a slice at a time: ``self[k]`` equals
    ``pre.scale(pixels)[k]``, made when read (a series transform other than one
    ScaleIntensityRangePercentiles is applied to the whole series once, here)."""

    def __init__(self, pre: Preprocessing, pixels: npt.NDArray[Any]) -> None:
        self._vol = np.asarray(pixels, dtype=np.float32)
        self._scalar = pre._range_scaler(self._vol)
        self._whole = pre.scale(self._vol) if self._scalar is None else None

    @property
    def shape(self) -> tuple[int, ...]:
        """The series' shape (slices, rows, cols)."""
        return tuple(self._vol.shape)

    def __getitem__(self, index: int, /) -> FloatArray:
        if self._scalar is None:
            assert self._whole is not None
            whole: FloatArray = self._whole[index]
            return whole
        k = range(self._vol.shape[0])[index]  # a negative index counts from the end, as numpy
        one: FloatArray = _apply(self._scalar, self._vol[k : k + 1])[0]
        return one


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleMetadata:
    """What a bundle's two config files say, checked (numbers from inference.json)."""

    name: str
    version: str
    task: str
    labels: tuple[str, ...]  # class names; binary tasks: (negative, positive)
    sequences: tuple[SequenceLabel, ...]  # series a task bundle reads
    size: tuple[int, int]  # network input (H, W), network_data_format
    channels: int  # network input channels, network_data_format
    slice_mode: str  # brain_range or central_window
    slice_n: int  # how many slices at most
    slice_plane: str  # canonical_axial or acquired (SLICE_PLANES)
    roi: RoiSpec | None  # tumour-centred rectangle (node.bundles.roi); None = whole slices
    temperature: float  # inference.json postprocessing
    calibration_bias: float  # added to logit / temperature (Platt scaling); 0 = temperature only
    series_aggregation: str
    cam_layer: str
    weights_sha256: str
    preprocessing: Preprocessing  # built from inference.json by MONAI's ConfigParser
    network_config: Mapping[str, Any]  # inference.json network_def, references resolved
    raw: Mapping[str, Any]  # metadata.json, for the model card and audit
    inference: Mapping[str, Any]  # inference.json as written


def _as_tensor(x: Any) -> torch.Tensor:
    """A plain tensor from a transform's output (MONAI returns MetaTensors)."""
    from monai.utils.type_conversion import convert_to_tensor

    out: torch.Tensor = convert_to_tensor(x, track_meta=False)
    return out


# --- metadata.json -----------------------------------------------------------------------------


def _need(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise ModelUnavailable(f"{where}: metadata has no '{key}'")
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelUnavailable(f"{where}: metadata '{key}' has the wrong type")
    return value


def _tensor_spec(fmt: Mapping[str, Any], side: str, name: str, where: str) -> Mapping[str, Any]:
    specs = fmt.get(side)
    if not isinstance(specs, dict) or not isinstance(specs.get(name), dict):
        raise ModelUnavailable(f"{where}: metadata network_data_format.{side}.{name} is missing")
    spec: Mapping[str, Any] = specs[name]
    missing = [k for k in TENSOR_KEYS if k not in spec]
    if missing:
        raise ModelUnavailable(
            f"{where}: metadata network_data_format.{side}.{name} lacks {', '.join(missing)}"
        )
    n = spec["num_channels"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ModelUnavailable(
            f"{where}: network_data_format.{side}.{name}.num_channels must be a positive integer"
        )
    return spec


def read_json(path: Path, where: str) -> Any:
    """One of a bundle's config files, parsed (ModelUnavailable says which and why)."""
    rel = f"{path.parent.name}/{path.name}"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelUnavailable(f"{where}: {rel} is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelUnavailable(f"{where}: {rel} is not valid JSON: {exc}") from exc


def read_config_files(path: Path, where: str) -> tuple[Any, Any]:
    """(metadata.json, inference.json) of a bundle folder, parsed, each read once."""
    if not path.is_dir():
        raise ModelUnavailable(f"{where}: directory not found")
    return (
        read_json(path / "configs" / METADATA_FILE, where),
        read_json(path / "configs" / INFERENCE_FILE, where),
    )


def task_name(raw: Mapping[str, Any], where: str) -> str:
    """metadata task: an identifier the rule file can name."""
    task: str = _need(raw, "task", str, where)
    if not _TASK_NAME.match(task):
        raise ModelUnavailable(
            f"{where}: task '{task}' is not a task name (lower-case letters, digits, '_')"
        )
    return task


def check_monai_metadata(raw: Mapping[str, Any], where: str) -> None:
    """The mandatory keys of MONAI's bundle metadata schema, with their types."""
    if not isinstance(raw, Mapping):
        raise ModelUnavailable(f"{where}: metadata is not a JSON object")
    for key, kind in META_REQUIRED:
        _need(raw, key, kind, where)
    # MONAI 1.4+ renamed optional_packages_version (meta_schema 0.8.x) and warns on the old name.
    if not any(isinstance(raw.get(k), dict) for k in PACKAGES_KEYS):
        raise ModelUnavailable(f"{where}: metadata has no '{PACKAGES_KEYS[0]}' object")
    fmt = raw["network_data_format"]
    _tensor_spec(fmt, "inputs", "image", where)
    _tensor_spec(fmt, "outputs", "pred", where)


def labels_of(raw: Mapping[str, Any], task: str, where: str) -> tuple[str, ...]:
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
    pred = raw["network_data_format"]["outputs"]["pred"]
    if pred["num_channels"] != len(labels):
        raise ModelUnavailable(
            f"{where}: network_data_format.outputs.pred.num_channels is {pred['num_channels']}"
            f" for {len(labels)} labels"
        )
    channel_def = pred["channel_def"]
    named = {}
    if isinstance(channel_def, dict):
        named = {str(k): str(v) for k, v in channel_def.items()}
    if named != {str(i): label for i, label in enumerate(labels)}:
        raise ModelUnavailable(
            f"{where}: network_data_format.outputs.pred.channel_def does not name the labels"
        )
    return labels


# --- inference.json ----------------------------------------------------------------------------


def _refuse_code(node: Any, path: str, where: str) -> None:
    """No ``$`` expression and no non-MONAI ``_target_`` in a part the node instantiates."""
    if isinstance(node, str):
        if node.startswith("$"):
            raise ModelUnavailable(
                f"{where}: inference.json {path} holds an expression ({node[:40]!r});"
                " the node runs no code from a bundle"
            )
        return
    if isinstance(node, list):
        for i, item in enumerate(node):
            _refuse_code(item, f"{path}#{i}", where)
        return
    if isinstance(node, dict):
        target = node.get("_target_")
        foreign = not isinstance(target, str) or ("." in target and not target.startswith("monai."))
        if target is not None and foreign:
            raise ModelUnavailable(
                f"{where}: inference.json {path}._target_ {target!r} is not a MONAI class"
            )
        for key, value in node.items():
            _refuse_code(value, f"{path}#{key}", where)


def _parser(metadata: Mapping[str, Any], inference: Mapping[str, Any]) -> Any:
    from monai.bundle.config_parser import ConfigParser

    # The parser rewrites what it is given (reference separators, renamed keys): give it copies.
    parser = ConfigParser(copy.deepcopy(dict(inference)))
    parser.read_meta(copy.deepcopy(dict(metadata)))
    return parser


def _parsed(parser: Any, key: str, where: str) -> Any:
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except ModelUnavailable:
        raise
    except Exception as exc:  # MONAI wraps instantiation errors in many types
        raise ModelUnavailable(f"{where}: inference.json '{key}' cannot be built: {exc}") from exc


def _plain(node: Any) -> Any:
    """A resolved config part as plain JSON values (MONAI returns ConfigItems)."""
    from monai.bundle.config_item import ConfigItem

    if isinstance(node, ConfigItem):
        return _plain(node.get_config())  # type: ignore[no-untyped-call]  # MONAI leaves it untyped
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(v) for v in node]
    return node


def _network_config(parser: Any, where: str) -> dict[str, Any]:
    """network_def with its references resolved, checked: a known MONAI net, no download."""
    if "network_def" not in parser:
        raise ModelUnavailable(f"{where}: inference.json has no 'network_def'")
    raw = parser["network_def"]
    _refuse_code(raw, "network_def", where)
    resolved = _plain(parser.get_parsed_content("network_def", instantiate=False))
    if not isinstance(resolved, dict):
        raise ModelUnavailable(f"{where}: inference.json network_def is not an object")
    target = str(resolved.get("_target_", ""))
    name = target.removeprefix("monai.networks.nets.")
    if name not in NETWORKS:
        raise ModelUnavailable(
            f"{where}: inference.json network_def._target_ must be a MONAI network of {NETWORKS}"
        )
    if resolved.get("pretrained"):
        raise ModelUnavailable(f"{where}: inference.json network_def.pretrained would download")
    return dict(resolved)


def build_network_config(config: Mapping[str, Any], where: str = "network") -> torch.nn.Module:
    """Instantiate a resolved ``network_def`` with MONAI's ConfigParser (never pretrained)."""
    from monai.bundle.config_parser import ConfigParser

    name = str(config.get("_target_", "")).removeprefix("monai.networks.nets.")
    if name not in NETWORKS:
        raise ModelUnavailable(f"{where}: network '{name}' is not one of {NETWORKS}")
    if config.get("pretrained"):
        raise ModelUnavailable(f"{where}: network '{name}': pretrained=True would download weights")
    _refuse_code(dict(config), "network_def", where)
    try:
        parser = ConfigParser({"network_def": copy.deepcopy(dict(config))})
        module = parser.get_parsed_content("network_def")
    except Exception as exc:  # MONAI re-raises constructor errors as RuntimeError and others
        raise ModelUnavailable(
            f"{where}: network '{name}' cannot be built from its args: {exc}"
        ) from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelUnavailable(f"{where}: network_def did not give a torch module")
    return module


def _preprocessing(parser: Any, where: str) -> Preprocessing:
    """The preprocessing Compose, split before its first spatial transform."""
    from monai.transforms.compose import Compose
    from monai.transforms.inverse import InvertibleTransform
    from monai.transforms.transform import MapTransform

    if "preprocessing" not in parser:
        raise ModelUnavailable(f"{where}: inference.json has no 'preprocessing'")
    _refuse_code(parser["preprocessing"], "preprocessing", where)
    pre = _parsed(parser, "preprocessing", where)
    steps: list[Any] = []
    pending: list[Any] = [pre]
    while pending:  # nested Composes flattened, in order
        step = pending.pop(0)
        if isinstance(step, Compose):
            pending[:0] = list(step.transforms)
        else:
            steps.append(step)
    for step in steps:
        if isinstance(step, MapTransform):
            raise ModelUnavailable(
                f"{where}: inference.json preprocessing uses the dictionary transform"
                f" {type(step).__name__}; the node passes arrays (use the array version)"
            )
        if not callable(step):
            raise ModelUnavailable(f"{where}: inference.json preprocessing holds a non-transform")
    cut = next((i for i, s in enumerate(steps) if isinstance(s, InvertibleTransform)), len(steps))
    return Preprocessing(series=Compose(list(steps[:cut])), slices=Compose(list(steps[cut:])))


def postprocessing_of(
    inference: Mapping[str, Any], where: str, *, allowed: tuple[str, ...] = AGGREGATIONS
) -> tuple[float, float, str]:
    """inference.json postprocessing: temperature, calibration bias, series aggregation."""
    post = inference.get("postprocessing")
    if not isinstance(post, dict):
        raise ModelUnavailable(f"{where}: inference.json has no 'postprocessing' object")
    temperature = post.get("temperature")
    if (
        not isinstance(temperature, int | float)
        or isinstance(temperature, bool)
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ModelUnavailable(
            f"{where}: inference.json postprocessing.temperature must be a positive number"
        )
    bias = post.get("calibration_bias", 0.0)
    if not isinstance(bias, int | float) or isinstance(bias, bool) or not math.isfinite(bias):
        raise ModelUnavailable(
            f"{where}: inference.json postprocessing.calibration_bias must be a finite number"
        )
    aggregation = post.get("series_aggregation", allowed[0])
    if aggregation not in allowed:
        raise ModelUnavailable(
            f"{where}: inference.json postprocessing.series_aggregation must be one of {allowed}"
        )
    return float(temperature), float(bias), str(aggregation)


# --- both --------------------------------------------------------------------------------------


def parse_bundle_config(
    metadata: Mapping[str, Any], inference: Mapping[str, Any], where: str
) -> BundleMetadata:
    """Check both files and build the preprocessing; every problem names the file and key."""
    check_monai_metadata(metadata, where)
    if not isinstance(inference, Mapping):
        raise ModelUnavailable(f"{where}: inference.json is not a JSON object")
    raw = metadata
    name = _need(raw, "name", str, where)
    task = task_name(raw, where)
    labels = labels_of(raw, task, where)
    image = raw["network_data_format"]["inputs"]["image"]
    size = image["spatial_shape"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise ModelUnavailable(
            f"{where}: network_data_format.inputs.image.spatial_shape must be [H, W] integers"
        )
    if min(size) < 16 or max(size) > 1024:
        raise ModelUnavailable(f"{where}: input spatial_shape {size} is outside 16..1024")
    channels = image["num_channels"]
    if channels not in (1, 3):
        raise ModelUnavailable(f"{where}: network_data_format.inputs.image.num_channels: 1 or 3")
    inp = _need(raw, "input", dict, where)
    try:
        sequences = tuple(SequenceLabel(s) for s in inp.get("sequences", []))
    except ValueError as exc:
        raise ModelUnavailable(f"{where}: input.sequences holds an unknown label") from exc
    if task != SEQUENCE_TASK and not sequences:
        raise ModelUnavailable(f"{where}: input.sequences is empty")
    sel = inp.get("slice_selection", {})
    mode = sel.get("mode") if isinstance(sel, dict) else None
    if mode not in SLICE_MODES:
        raise ModelUnavailable(f"{where}: input.slice_selection.mode must be one of {SLICE_MODES}")
    n = sel.get("n")
    if not isinstance(n, int) or n < 1:
        raise ModelUnavailable(f"{where}: input.slice_selection.n must be a positive integer")
    plane = sel.get("plane", SLICE_PLANES[0])
    if plane not in SLICE_PLANES:
        raise ModelUnavailable(
            f"{where}: input.slice_selection.plane must be one of {SLICE_PLANES}"
        )
    if plane != SLICE_PLANES[0] and task != SEQUENCE_TASK:
        # predict_series and Grad-CAM map canonical axial slices back to the source
        raise ModelUnavailable(f"{where}: only the sequence bundle reads the acquired plane")
    try:
        roi = RoiSpec.from_json(inp.get("roi"))
    except ValueError as exc:
        raise ModelUnavailable(f"{where}: {exc}") from exc
    cam_layer = raw.get("cam_layer")
    if not isinstance(cam_layer, str) or not cam_layer:
        raise ModelUnavailable(f"{where}: metadata cam_layer (Grad-CAM target) is missing")
    sha = _need(raw, "weights_sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelUnavailable(f"{where}: weights_sha256 is not a lowercase SHA-256 hex digest")
    if raw.get("not_for_clinical_use") is not True:
        raise ModelUnavailable(f"{where}: metadata must declare not_for_clinical_use: true")
    temperature, bias, aggregation = postprocessing_of(inference, where)
    parser = _parser(metadata, inference)
    network_config = _network_config(parser, where)
    preprocessing = _preprocessing(parser, where)
    _probe(preprocessing, (channels, size[0], size[1]), where)
    return BundleMetadata(
        name=name,
        version=str(raw["version"]),
        task=task,
        labels=labels,
        sequences=sequences,
        size=(size[0], size[1]),
        channels=channels,
        slice_mode=str(mode),
        slice_n=n,
        slice_plane=str(plane),
        roi=roi,
        temperature=temperature,
        calibration_bias=bias,
        series_aggregation=aggregation,
        cam_layer=cam_layer,
        weights_sha256=sha,
        preprocessing=preprocessing,
        network_config=network_config,
        raw=dict(raw),
        inference=dict(inference),
    )


def _probe(pre: Preprocessing, shape: tuple[int, int, int], where: str) -> None:
    """Run the preprocessing on a small ramp: it must give the network's input shape."""
    ramp = np.arange(3 * 20 * 24, dtype=np.float32).reshape(3, 20, 24)
    try:
        out = pre.slice_input(pre.scale(ramp))
    except Exception as exc:  # a transform that cannot take a (1, rows, cols) array
        raise ModelUnavailable(f"{where}: inference.json preprocessing fails: {exc}") from exc
    if tuple(out.shape[1:]) != shape:
        raise ModelUnavailable(
            f"{where}: inference.json preprocessing gives {tuple(out.shape[1:])} per slice;"
            f" network_data_format says {shape}"
        )


# --- writing -----------------------------------------------------------------------------------


def inference_config(
    *,
    network_name: str,
    network_args: Mapping[str, Any],
    norm_low: float,
    norm_high: float,
    channels: int,
    temperature: float,
    calibration_bias: float = 0.0,
    series_aggregation: str = "mean_logit",
) -> dict[str, Any]:
    """configs/inference.json: the one place for the network, transforms and calibration.

    Channel counts, the input size and the value range are references to metadata.json's
    network_data_format, so they are written once."""
    args: dict[str, Any] = {k: v for k, v in network_args.items() if k != "pretrained"}
    if "pretrained" in network_args:
        args["pretrained"] = False
    for key in IN_CHANNEL_ARGS:
        if key in args:
            args[key] = f"{_IMAGE}#num_channels"
    for key in OUT_CHANNEL_ARGS:
        if key in args:
            args[key] = f"{_PRED}#num_channels"
    transforms: list[dict[str, Any]] = [
        {
            "_target_": "ScaleIntensityRangePercentiles",
            "lower": norm_low,
            "upper": norm_high,
            "b_min": f"{_IMAGE}#value_range#0",
            "b_max": f"{_IMAGE}#value_range#1",
            "clip": True,
        },
        {"_target_": "Resize", "spatial_size": f"{_IMAGE}#spatial_shape", "mode": "bilinear"},
    ]
    if channels > 1:
        transforms.append({"_target_": "RepeatChannel", "repeats": f"{_IMAGE}#num_channels"})
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": f"monai.networks.nets.{network_name}", **args},
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "postprocessing": {
            "temperature": temperature,
            "calibration_bias": calibration_bias,
            "series_aggregation": series_aggregation,
        },
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleFiles:
    """The content of a bundle's two config files, before they are written."""

    metadata: Mapping[str, Any]  # configs/metadata.json (weights_sha256 is added on write)
    inference: Mapping[str, Any]  # configs/inference.json


def network_data_format(
    channels: int, size: tuple[int, int] | None, labels: Sequence[str]
) -> dict[str, Any]:
    """network_data_format for a 2-D slice classifier; size None: a detector, which reads a
    whole series of any shape in native values."""
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "MR",
                "num_channels": channels,
                "spatial_shape": ["*", "*", "*"] if size is None else [size[0], size[1]],
                "dtype": "float32",
                "value_range": [] if size is None else [0, 1],
                "is_patch_data": False,
                "channel_def": {str(i): "image" for i in range(channels)},
            }
        },
        "outputs": {
            "pred": {
                "type": "logits",
                "format": "classes",
                "modality": "n/a",
                "num_channels": len(labels),
                "spatial_shape": [],
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": False,
                "channel_def": {str(i): label for i, label in enumerate(labels)},
            }
        },
    }


@functools.lru_cache(maxsize=8)
def recipe_preprocessing(
    *, low: float, high: float, size: tuple[int, int] = (128, 128), channels: int = 1
) -> Preprocessing:
    """The preprocessing a bundle with these settings declares, built from the same config."""
    inference = inference_config(
        network_name="ResNet",
        network_args={},
        norm_low=low,
        norm_high=high,
        channels=channels,
        temperature=1.0,
    )
    metadata = {"network_data_format": network_data_format(channels, size, ("a", "b"))}
    return _preprocessing(_parser(metadata, inference), "recipe preprocessing")

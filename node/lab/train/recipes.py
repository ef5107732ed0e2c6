"""Training recipes per bundle: the CPU-sized ones we ship, and the published full-size configs.

``small`` recipes train in minutes on a 2-core CPU and produce the bundles in models/.
``published`` recipes reproduce the architectures and schedules of the source studies for a
GPU site with its own data; they need a pretrained weights FILE (``--pretrained PATH``) and
never download anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

from node import __version__
from node.bundles.config import (
    META_SCHEMA_URL,
    BundleFiles,
    inference_config,
    network_data_format,
)
from node.bundles.roi import RoiSpec
from node.records import SequenceLabel

VARIANTS = ("small", "published", "planes")
NORM_LOW, NORM_HIGH = 0.5, 99.5  # percentiles of the native series values mapped to 0 and 1

TASK_LABELS: dict[str, tuple[str, str]] = {
    # (negative, positive) in the synth manifest's vocabulary
    "gbm_pcnsl": ("pcnsl", "gbm"),
    "glioma_grade": ("low", "high"),
    "tubers": ("absent", "present"),
    # Lesion presence, the gate before the tumour tasks: any glioma or lymphoma is present;
    # normal brains and tuberous sclerosis (tubers are lesions, not tumours) are absent.
    "tumour": ("absent", "present"),
}
TASK_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "gbm_pcnsl": ("primary CNS lymphoma", "glioblastoma"),
    "glioma_grade": ("low-grade glioma", "high-grade glioma"),
    "tubers": ("no cortical tubers", "cortical tubers"),
    "tumour": ("no brain tumour", "brain tumour"),
}
SEQUENCE_LABELS = tuple(label.value for label in SequenceLabel)

# Default sequence per task (the bundle name without a suffix) and every bundle we know.
DEFAULT_SEQUENCE = {"gbm_pcnsl": "T1C", "glioma_grade": "T1C", "tubers": "FLAIR", "tumour": "FLAIR"}
BUNDLES: dict[str, tuple[str, str | None]] = {
    "sequence": ("sequence", None),
    "gbm_pcnsl_t1c": ("gbm_pcnsl", "T1C"),
    "gbm_pcnsl_adc": ("gbm_pcnsl", "ADC"),
    "glioma_grade_t1c": ("glioma_grade", "T1C"),
    "glioma_grade_flair": ("glioma_grade", "FLAIR"),
    "tubers_flair": ("tubers", "FLAIR"),
    "tubers_t2": ("tubers", "T2"),
    "tumour_flair": ("tumour", "FLAIR"),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Augment:
    """Random training-time transforms (applied per image on the network-size tensor)."""

    hflip: bool = True
    vflip: bool = False
    rotate_deg: float = 0.0
    shift: float = 0.0  # fraction of the image size
    shear: float = 0.0
    zoom: float = 0.0  # +- fraction
    intensity_scale: float = 0.0  # +- fraction
    intensity_shift: float = 0.0  # +- (on the 0..1 normalised image)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """Everything that decides how one bundle is trained."""

    bundle_name: str
    variant: str
    task: str
    labels: tuple[str, ...]
    label_descriptions: tuple[str, ...]
    sequences: tuple[str, ...]  # series the bundle reads; () for the sequence classifier
    size: tuple[int, int]
    channels: int
    slice_mode: str
    slice_n: int
    network_name: str
    network_args: Mapping[str, Any]
    cam_layer: str
    epochs: int
    batch_size: int
    lr: float
    lr_decay_after_epoch: int | None  # exponential decay starts after this epoch
    lr_decay_gamma: float
    weight_decay: float
    patience: int  # early stopping on validation loss (epochs without improvement)
    augment: Augment
    val_fraction: float
    needs_pretrained: bool
    roi: RoiSpec | None = None  # tumour-centred rectangle (node.bundles.roi); None = whole slices
    # The plane slices are cut in (node.bundles.config.SLICE_PLANES), at training and inference.
    slice_plane: str = "canonical_axial"
    # Training slices drawn at random per epoch (None: every slice each epoch); the rest still
    # teach in later epochs, so a large slice set costs a fixed time per epoch.
    epoch_slices: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def _resnet(
    block: str,
    layers: tuple[int, int, int, int],
    inplanes: tuple[int, int, int, int],
    channels: int,
    num_classes: int,
    **extra: Any,
) -> dict[str, Any]:
    """MONAI ResNet arguments for 2-D slices (key order as written into inference.json)."""
    return {
        "block": block,
        "layers": list(layers),
        "block_inplanes": list(inplanes),
        "spatial_dims": 2,
        "n_input_channels": channels,
        "num_classes": num_classes,
        **extra,
    }


def _efficientnet(model_name: str, num_classes: int) -> dict[str, Any]:
    """MONAI EfficientNetBN arguments: 3 channels (ImageNet weights come from a file, never
    downloaded: pretrained stays False and the trainer loads the file)."""
    return {
        "model_name": model_name,
        "spatial_dims": 2,
        "in_channels": 3,
        "num_classes": num_classes,
        "pretrained": False,
    }


def _tiny_resnet(num_classes: int, channels: int = 1) -> dict[str, Any]:
    return _resnet("basic", (1, 1, 1, 1), (8, 16, 32, 64), channels, num_classes)


# Rotation, shift, zoom and intensity jitter: the small sequence and glioma recipes and the
# published sequence and glioma-grade recipes all use this one.
_AFFINE_INTENSITY = Augment(
    hflip=True, rotate_deg=10, shift=0.05, zoom=0.1, intensity_scale=0.1, intensity_shift=0.05
)
_N_SEQUENCES = len(SEQUENCE_LABELS)

# What the small recipes share: a tiny ResNet at 128 px, trained from scratch with Adam 1e-3.
_SMALL: dict[str, Any] = {
    "size": (128, 128),
    "channels": 1,
    "network_name": "ResNet",
    "cam_layer": "layer4",
    "batch_size": 32,
    "lr": 1e-3,
    "lr_decay_gamma": 0.8,
    "weight_decay": 1e-4,
    "augment": _AFFINE_INTENSITY,
    "val_fraction": 0.25,
    "needs_pretrained": False,
    "epochs": 20,
    "lr_decay_after_epoch": 10,
    "patience": 10,
    "notes": (
        "CPU-sized: MONAI ResNet (basic blocks, one per stage, 8-64 channels) at 128 px,"
        " trained from scratch with Adam 1e-3; sized so training finishes in minutes on"
        " a 2-core CPU.",
    ),
}
# Where a task's small recipe differs from _SMALL.
_SMALL_BY_TASK: dict[str, dict[str, Any]] = {
    "sequence": {"epochs": 12, "lr_decay_after_epoch": 6, "patience": 4},
    "gbm_pcnsl": {"augment": Augment(hflip=True, intensity_scale=0.1, intensity_shift=0.05)},
    "glioma_grade": {},
    # the published tubers augmentation at half strength: at 128 px a tuber is a few pixels
    # across and the full-strength affine blurred it out of a tiny network's reach
    "tubers": {
        "epochs": 30,
        "augment": Augment(hflip=True, rotate_deg=15, shift=0.05, shear=0.1, zoom=0.12),
    },
    "tumour": {
        "augment": Augment(
            hflip=True,
            rotate_deg=10,
            shift=0.05,
            zoom=0.1,
            intensity_scale=0.2,
            intensity_shift=0.1,
        )
    },
}
# `planes`, the sequence bundle only: every plane, 2D and 3D, read in the plane each series was
# acquired in (a thick sagittal series resampled to axial is a stack of blurred stripes), a
# fine-tune of the shipped weights (--pretrained models/sequence/models/model.pt) on
# domain-randomised studies; a random 8,000 slices per epoch keeps an epoch near 1.5 minutes.
# Shipped as sequence 0.2.0 (docs/sequence.md has its figures).
_PLANES_SEQUENCE: dict[str, Any] = {
    "epochs": 10,
    "lr_decay_after_epoch": 2,
    "lr_decay_gamma": 0.75,
    "patience": 4,
    "val_fraction": 0.15,
    "slice_plane": "acquired",
    "epoch_slices": 8000,
    "notes": (
        *_SMALL["notes"],
        "Recipe planes: slices in the acquired plane (for a time series its darkest time point),"
        " fine-tuned from the shipped sequence weights on domain-randomised studies (all planes,"
        " 2D and 3D), 8,000 random training slices per epoch.",
    ),
}
# The published full-size configurations: transfer learning from a weights file, 20% validation.
_PUBLISHED: dict[str, dict[str, Any]] = {
    "gbm_pcnsl": {
        "size": (380, 380),
        "channels": 3,
        "network_name": "EfficientNetBN",
        "network_args": _efficientnet("efficientnet-b4", 2),
        "cam_layer": "_conv_head",
        "epochs": 100,
        "batch_size": 16,
        "lr": 1e-4,
        "lr_decay_after_epoch": 50,
        "lr_decay_gamma": 0.95,
        "weight_decay": 0.0,
        "patience": 20,
        "augment": Augment(hflip=True, vflip=True, intensity_scale=0.1, intensity_shift=0.1),
        "notes": (
            "Published recipe: transfer-learned EfficientNet (B4 at its native 380 px),"
            " flip and intensity augmentation, Adam 1e-4 with exponential decay after"
            " epoch 50. The grey slice is repeated over 3 channels to match ImageNet"
            " weights supplied as a file.",
        ),
    },
    "sequence": {
        "size": (224, 224),
        "channels": 1,
        "network_name": "ResNet",
        "network_args": _resnet(
            "basic", (2, 2, 2, 2), (64, 128, 256, 512), 1, _N_SEQUENCES, conv1_t_stride=2
        ),
        "cam_layer": "layer4",
        "epochs": 50,
        "batch_size": 64,
        "lr": 1e-4,
        "lr_decay_after_epoch": 25,
        "lr_decay_gamma": 0.95,
        "weight_decay": 1e-4,
        "patience": 10,
        "augment": _AFFINE_INTENSITY,
        "notes": (
            "Published recipe: ResNet-18 slice classifier, series label by majority"
            " vote over sampled slices.",
        ),
    },
    "tubers": {
        "size": (224, 224),
        "channels": 3,
        "network_name": "ResNet",
        "network_args": _resnet(
            "bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 3, 2, conv1_t_stride=2
        ),
        "cam_layer": "layer4",
        "epochs": 100,
        "batch_size": 32,
        "lr": 2.5e-4,
        "lr_decay_after_epoch": None,
        "lr_decay_gamma": 1.0,
        "weight_decay": 0.0,
        "patience": 100,
        "augment": Augment(hflip=True, rotate_deg=30, shift=0.1, shear=0.2, zoom=0.25),
        "notes": (
            "Published recipe: transfer learning with rotation 30 deg, shift 0.1,"
            " shear 0.2, zoom 0.25, horizontal flip, Adam 2.5e-4, model of lowest"
            " validation loss, threshold 0.5 (ResNet-50 weights supplied as a file).",
        ),
    },
    "glioma_grade": {
        "size": (224, 224),
        "channels": 3,
        "network_name": "EfficientNetBN",
        "network_args": _efficientnet("efficientnet-b0", 2),
        "cam_layer": "_conv_head",
        "epochs": 60,
        "batch_size": 32,
        "lr": 1e-4,
        "lr_decay_after_epoch": 30,
        "lr_decay_gamma": 0.95,
        "weight_decay": 1e-4,
        "patience": 15,
        "augment": _AFFINE_INTENSITY,
        "notes": (
            "Published recipe: transfer learning on a tumour-centred region with"
            " patient-level 5-fold cross-validation. Here the rectangle is found from the"
            " series itself (node.bundles.roi), the same way at inference;"
            " `neuronode train --folds 5`"
            " runs the cross-validation.",
        ),
    },
}
# The lesion gate has no published recipe of its own: it takes glioma grading's (without the
# region, which _task_roi gives glioma grading only).
_PUBLISHED["tumour"] = _PUBLISHED["glioma_grade"]


def _task_roi(task: str, sequences: tuple[str, ...]) -> RoiSpec | None:
    """Glioma grading reads a tumour-centred rectangle (the published recipe's ROI): enhancing
    tumour on T1C is further above the brain median (z 4) than tumour and oedema on FLAIR (z 3);
    thresholds chosen on training seed 1001 (the box holds the tumour centre in 30/32 T1C and
    31/32 FLAIR series)."""
    if task != "glioma_grade":
        return None
    return RoiSpec(z=4.0 if "T1C" in sequences else 3.0)


def resolve_bundle_name(name: str) -> tuple[str, str, str | None]:
    """(bundle name, task, sequence) from 'gbm_pcnsl', 'gbm_pcnsl_adc', 'sequence', ..."""
    key = name.strip().lower()
    if key in DEFAULT_SEQUENCE:
        key = f"{key}_{DEFAULT_SEQUENCE[key].lower()}"
    if key not in BUNDLES:
        raise ValueError(f"unknown task/bundle '{name}' (expected one of {sorted(BUNDLES)})")
    task, seq = BUNDLES[key]
    return key, task, seq


def get_recipe(name: str, variant: str = "small") -> Recipe:
    """The recipe for a bundle name or task ('gbm_pcnsl' means its T1C bundle)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown recipe variant '{variant}' (expected one of {VARIANTS})")
    bundle, task, seq = resolve_bundle_name(name)
    if task == "sequence":
        labels: tuple[str, ...] = SEQUENCE_LABELS
        descriptions = SEQUENCE_LABELS
        sequences: tuple[str, ...] = ()
    else:
        labels = TASK_LABELS[task]
        descriptions = TASK_DESCRIPTIONS[task]
        sequences = (seq or DEFAULT_SEQUENCE[task],)
    slice_mode, slice_n = ("central_window", 9) if task == "sequence" else ("brain_range", 16)
    if variant == "planes" and task != "sequence":
        raise ValueError("recipe 'planes' is for the sequence bundle only")
    if variant == "planes":
        training = {**_SMALL, "network_args": _tiny_resnet(len(labels)), **_PLANES_SEQUENCE}
    elif variant == "small":
        training = {**_SMALL, "network_args": _tiny_resnet(len(labels)), **_SMALL_BY_TASK[task]}
    else:
        # a copy: each recipe gets network arguments of its own, as the small ones do
        training = {"val_fraction": 0.2, "needs_pretrained": True, **deepcopy(_PUBLISHED[task])}
    return Recipe(
        bundle_name=bundle,
        variant=variant,
        task=task,
        labels=labels,
        label_descriptions=descriptions,
        sequences=sequences,
        slice_mode=slice_mode,
        slice_n=slice_n,
        roi=_task_roi(task, sequences),
        **training,
    )


AUTHORS = "neuronode contributors"
COPYRIGHT = "Copyright (c) neuronode contributors; Apache License 2.0"
VALUES_SOURCE = "per series, native DICOM values after the modality LUT"


def bundle_description(recipe: Recipe) -> str:
    """MONAI metadata 'description': what the network reads and answers, in plain words."""
    if recipe.task == "sequence":
        return (
            "2-D CNN labelling single MR slices as one of "
            + ", ".join(recipe.labels)
            + "; the series label is a vote over central slices. Trained on synthetic phantoms."
        )
    neg, pos = recipe.label_descriptions
    return (
        f"2-D CNN giving the probability of {pos} versus {neg} from a"
        f" {', '.join(recipe.sequences)} series: mean logit over the chosen slices, then"
        " calibration. Trained on synthetic phantoms."
    )


def bundle_metadata(
    recipe: Recipe,
    *,
    temperature: float,
    calibration_bias: float = 0.0,
    training: Mapping[str, Any],
    metrics: Mapping[str, Any],
    version: str = __version__,
) -> BundleFiles:
    """metadata.json (MONAI's bundle metadata plus the node's fields; SHA-256 added on write)
    and inference.json (network, preprocessing, calibration) for a bundle of this recipe."""
    import monai
    import numpy
    import torch

    metadata = {
        "schema": META_SCHEMA_URL,
        "name": recipe.bundle_name,
        "version": version,
        "changelog": {version: f"trained with `neuronode train` (recipe {recipe.variant})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {},
        "task": recipe.task,
        "description": bundle_description(recipe),
        "authors": AUTHORS,
        "copyright": COPYRIGHT,
        "labels": list(recipe.labels),
        "label_descriptions": list(recipe.label_descriptions),
        "input": {
            "sequences": list(recipe.sequences),
            "values": VALUES_SOURCE,
            "slice_selection": {
                "mode": recipe.slice_mode,
                "n": recipe.slice_n,
                "plane": recipe.slice_plane,
            },
            **({"roi": recipe.roi.to_json()} if recipe.roi is not None else {}),
        },
        "cam_layer": recipe.cam_layer,
        "training": dict(training),
        "metrics": dict(metrics),
        "intended_use": (
            "Demonstration of the neuronode pipeline on synthetic phantoms; research only."
        ),
        "not_for_clinical_use": True,
        "network_data_format": network_data_format(recipe.channels, recipe.size, recipe.labels),
    }
    inference = inference_config(
        network_name=recipe.network_name,
        network_args=recipe.network_args,
        norm_low=NORM_LOW,
        norm_high=NORM_HIGH,
        channels=recipe.channels,
        temperature=temperature,
        calibration_bias=calibration_bias,
    )
    return BundleFiles(metadata=metadata, inference=inference)

"""Training recipes resolve to the settings they are documented and were trained with.

The expected values come from outside recipes.py: the published recipes from an explicit table
written from docs/models.md, docs/architecture.md and the source studies' descriptions; the
small recipes from what the shipped bundles in models/ recorded when they were trained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from node.bundles.roi import RoiSpec
from node.lab.train import recipes

MODELS = Path(__file__).resolve().parents[2] / "models"
RESNET18 = {"block": "basic", "layers": [2, 2, 2, 2], "block_inplanes": [64, 128, 256, 512]}
RESNET50 = {"block": "bottleneck", "layers": [3, 4, 6, 3], "block_inplanes": [64, 128, 256, 512]}
AFFINE = {"rotate_deg": 10, "shift": 0.05, "zoom": 0.1, "intensity_scale": 0.1}


def efficientnet(name: str) -> dict[str, Any]:
    return {"model_name": name, "spatial_dims": 2, "in_channels": 3, "num_classes": 2}


def resnet(arch: dict[str, Any], channels: int, classes: int) -> dict[str, Any]:
    return {**arch, "spatial_dims": 2, "n_input_channels": channels, "num_classes": classes}


GLIOMA = {
    "size": (224, 224),
    "channels": 3,
    "network_name": "EfficientNetBN",
    "network_args": {**efficientnet("efficientnet-b0"), "pretrained": False},
    "cam_layer": "_conv_head",
    "epochs": 60,
    "batch_size": 32,
    "lr": 1e-4,
    "lr_decay_after_epoch": 30,
    "lr_decay_gamma": 0.95,
    "weight_decay": 1e-4,
    "patience": 15,
    "augment": {**AFFINE, "intensity_shift": 0.05},
}
# Published: gbm_pcnsl EfficientNet-B4 at 380 px, flips and intensity, Adam 1e-4, decay after
# epoch 50; sequences ResNet-18 by majority vote; tubers ResNet-50, rotation 30, shift 0.1,
# shear 0.2, zoom 0.25, hflip, Adam 2.5e-4 on the lowest validation loss; glioma grading
# EfficientNet-B0 at 224 px on the tumour region (the lesion gate borrows it, without region).
PUBLISHED: dict[str, dict[str, Any]] = {
    "gbm_pcnsl": {
        "size": (380, 380),
        "channels": 3,
        "network_name": "EfficientNetBN",
        "network_args": {**efficientnet("efficientnet-b4"), "pretrained": False},
        "cam_layer": "_conv_head",
        "epochs": 100,
        "batch_size": 16,
        "lr": 1e-4,
        "lr_decay_after_epoch": 50,
        "lr_decay_gamma": 0.95,
        "weight_decay": 0.0,
        "patience": 20,
        "augment": {"vflip": True, "intensity_scale": 0.1, "intensity_shift": 0.1},
    },
    "sequence": {
        "size": (224, 224),
        "channels": 1,
        "network_name": "ResNet",
        "network_args": {**resnet(RESNET18, 1, 7), "conv1_t_stride": 2},  # 6 kinds and OTHER
        "cam_layer": "layer4",
        "epochs": 50,
        "batch_size": 64,
        "lr": 1e-4,
        "lr_decay_after_epoch": 25,
        "lr_decay_gamma": 0.95,
        "weight_decay": 1e-4,
        "patience": 10,
        "augment": {**AFFINE, "intensity_shift": 0.05},
    },
    "tubers": {
        "size": (224, 224),
        "channels": 3,
        "network_name": "ResNet",
        "network_args": {**resnet(RESNET50, 3, 2), "conv1_t_stride": 2},
        "cam_layer": "layer4",
        "epochs": 100,
        "batch_size": 32,
        "lr": 2.5e-4,
        "lr_decay_after_epoch": None,
        "lr_decay_gamma": 1.0,
        "weight_decay": 0.0,
        "patience": 100,
        "augment": {"rotate_deg": 30, "shift": 0.1, "shear": 0.2, "zoom": 0.25},
    },
    "glioma_grade": {**GLIOMA, "roi": RoiSpec(z=4.0)},
    "tumour": {**GLIOMA, "roi": None},
}
SMALL_EPOCHS = {"sequence": 12, "tubers": 30, "gbm_pcnsl": 20, "glioma_grade": 20, "tumour": 20}


def augment(fields: dict[str, Any]) -> recipes.Augment:
    """An Augment from the non-default fields (hflip is on in every recipe)."""
    return recipes.Augment(hflip=True, **fields)


@pytest.mark.parametrize("task", sorted(PUBLISHED))
def test_published_recipes_resolve_to_the_documented_settings(task: str) -> None:
    r = recipes.get_recipe(task, "published")
    expected = {**PUBLISHED[task], "augment": augment(PUBLISHED[task]["augment"])}
    expected.setdefault("roi", None)
    got = {k: getattr(r, k) for k in expected}
    assert got == expected
    assert list(r.network_args) == list(expected["network_args"])  # inference.json key order
    assert (r.val_fraction, r.needs_pretrained, r.variant) == (0.2, True, "published")
    # each call gets its own arguments: a caller changing one cannot change the next recipe
    assert isinstance(r.network_args, dict)
    r.network_args.clear()
    assert recipes.get_recipe(task, "published").network_args == expected["network_args"]


def _network_bundles() -> list[str]:
    """The shipped bundles trained by a recipe (detector bundles have no network to train)."""
    return sorted(
        p.name
        for p in MODELS.iterdir()
        if p.is_dir()
        and "detector" not in json.loads((p / "configs" / "inference.json").read_text())
    )


def test_every_shipped_bundle_is_a_network_or_a_detector() -> None:
    names = {p.name for p in MODELS.iterdir() if p.is_dir()}
    detectors = names - set(_network_bundles())
    assert detectors == {
        "tumour_flair_detector",
        "tumour_t1c_detector",
        "glioma_grade_t1c_enhancement",
        "tubers_flair_foci",
    }


@pytest.mark.parametrize("bundle", _network_bundles())
def test_small_recipes_are_what_the_shipped_bundles_were_trained_with(bundle: str) -> None:
    meta = json.loads((MODELS / bundle / "configs" / "metadata.json").read_text())
    network = json.loads((MODELS / bundle / "configs" / "inference.json").read_text())
    training, optimiser = meta["training"], meta["training"]["optimiser"]
    # The task bundles were trained with 'small', the sequence bundle (0.2.0 on) with 'planes'.
    assert training["recipe"] == ("planes" if bundle == "sequence" else "small")
    r = recipes.get_recipe(bundle, training["recipe"])
    assert r.variant == training["recipe"]
    assert dataclasses.asdict(r.augment) == training["augmentation"]
    assert (r.lr, r.weight_decay, r.lr_decay_after_epoch, r.lr_decay_gamma) == (
        optimiser["lr"],
        optimiser["weight_decay"],
        optimiser["decay_after_epoch"],
        optimiser["gamma"],
    )
    assert optimiser["early_stopping"] == f"lowest validation loss, patience {r.patience}"
    assert r.val_fraction == training["split"]["val_fraction"]
    assert r.network_name == network["network_def"]["_target_"].rsplit(".", 1)[1]
    arch = {k: network["network_def"][k] for k in ("block", "layers", "block_inplanes")}
    assert {k: r.network_args[k] for k in arch} == arch
    selection = {"plane": "canonical_axial", **meta["input"]["slice_selection"]}  # the default
    assert {"mode": r.slice_mode, "n": r.slice_n, "plane": r.slice_plane} == selection
    assert list(r.sequences) == meta["input"]["sequences"]
    assert (r.roi.to_json() if r.roi else None) == meta["input"].get("roi")
    assert list(r.labels) == meta["labels"]
    # the bundles were trained with --epochs at or below the recipe's own
    assert r.epochs >= training["epochs"]
    if r.variant == "small":
        assert r.epochs == SMALL_EPOCHS[r.task]
    assert (r.size, r.channels, r.batch_size, r.needs_pretrained) == ((128, 128), 1, 32, False)


def test_planes_recipe_is_the_sequence_network_on_acquired_slices() -> None:
    planes, small = recipes.get_recipe("sequence", "planes"), recipes.get_recipe("sequence")
    assert (planes.variant, planes.slice_plane, planes.epoch_slices) == ("planes", "acquired", 8000)
    assert (small.slice_plane, small.epoch_slices) == ("canonical_axial", None)
    same = ("network_name", "network_args", "size", "channels", "augment", "labels", "slice_mode")
    assert all(getattr(planes, k) == getattr(small, k) for k in same)
    assert recipes.bundle_metadata(planes, temperature=1.0, training={}, metrics={}).metadata[
        "input"
    ]["slice_selection"] == {"mode": "central_window", "n": 9, "plane": "acquired"}
    with pytest.raises(ValueError, match="sequence bundle only"):
        recipes.get_recipe("gbm_pcnsl", "planes")

"""Train a bundle's network on prepared slices: augmentation, early stopping, temperature.

Every slice of a series carries the series' label (the study label for task bundles), so
slices without lesion evidence learn to sit near logit 0 and the series-level mean logit stays
meaningful. The model kept is the one of lowest validation loss; the temperature is then fitted
on validation data at the level the node serves: series mean logits for task bundles, slice
logits for the sequence bundle (its vote is over slices).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from node.bundles.bundle import build_network
from node.errors import ModelUnavailable
from node.lab.train.data import SliceSet
from node.lab.train.metrics import fit_platt, fit_temperature, nll
from node.lab.train.recipes import Augment, Recipe

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    """Progress lines on stderr (stdout stays for results)."""
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TrainResult:
    """What training produced: the best weights, calibration and the history behind them."""

    state_dict: dict[str, torch.Tensor]
    temperature: float
    calibration_bias: float
    best_epoch: int
    epochs_run: int
    history: tuple[dict[str, float], ...]
    wall_time_s: float
    val_nll_before: float
    val_nll_after: float


def augment_batch(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Random flips, affine (rotation, shear, zoom, shift) and intensity changes, per image."""
    b = x.shape[0]

    def uniform(scale: float) -> torch.Tensor:
        return (torch.rand(b, generator=gen) * 2 - 1) * scale

    if aug.hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if aug.vflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-2), x)
    if aug.rotate_deg or aug.shift or aug.shear or aug.zoom:
        angle = uniform(math.radians(aug.rotate_deg))
        zoom = 1.0 + uniform(aug.zoom)
        shear = uniform(aug.shear)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = cos
        theta[:, 0, 1] = -sin + shear * cos
        theta[:, 1, 0] = sin
        theta[:, 1, 1] = cos + shear * sin
        theta[:, 0, 2] = uniform(2 * aug.shift)
        theta[:, 1, 2] = uniform(2 * aug.shift)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if aug.intensity_scale or aug.intensity_shift:
        scale = 1.0 + uniform(aug.intensity_scale)
        shift = uniform(aug.intensity_shift)
        x = x * scale[:, None, None, None] + shift[:, None, None, None]
    return x


def load_pretrained(network: torch.nn.Module, path: Path) -> int:
    """Copy matching tensors from a weights FILE (never a download); returns how many."""
    if not Path(path).is_file():
        raise ModelUnavailable(f"pretrained weights file {path} not found (no download is made)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelUnavailable(f"pretrained weights {path} cannot be read: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelUnavailable(f"pretrained weights {path} are not a state_dict")
    own = network.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ModelUnavailable(f"pretrained weights {path} share no tensor with the network")
    network.load_state_dict(usable, strict=False)
    return len(usable)


def _logits(network: torch.nn.Module, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    network.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch):
            out.append(network(x[s : s + batch].float()).float())
    return torch.cat(out)


def series_mean_logits(slice_logits: torch.Tensor, data: SliceSet) -> np.ndarray[Any, Any]:
    """Per-series mean of the binary slice logit (z1 - z0), in series order."""
    diff = (slice_logits[:, 1] - slice_logits[:, 0]).double()
    n = len(data.series_labels)
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, data.series, diff)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, data.series, torch.ones_like(diff))
    out: np.ndarray[Any, Any] = (sums / counts.clamp_min(1)).numpy()
    return out


def _epoch_order(train: SliceSet, gen: torch.Generator, limit: int | None = None) -> torch.Tensor:
    """This epoch's slices, shuffled: every informative slice and as many uninformative ones,
    at most `limit` of them (a fresh random draw each epoch).

    Lesion-free slices of lesion studies (uniform targets) would otherwise be most of each
    epoch while teaching only 'no evidence here'; a fresh random subset each epoch keeps that
    lesson at a fraction of the cost."""
    informative = train.target.max(dim=1).values > 0.75
    inf_idx = torch.nonzero(informative).ravel()
    un_idx = torch.nonzero(~informative).ravel()
    if un_idx.numel() > inf_idx.numel() > 0:
        un_idx = un_idx[torch.randperm(un_idx.numel(), generator=gen)[: inf_idx.numel()]]
    both = torch.cat([inf_idx, un_idx])
    return both[torch.randperm(both.numel(), generator=gen)][:limit]


def calibrate(
    z: np.ndarray[Any, Any], y: np.ndarray[Any, Any], *, binary: bool
) -> tuple[float, float]:
    """(temperature, bias) fitted on validation logits: Platt scaling for binary series logits
    (temperature only if the fitted slope is not positive), temperature for multi-class."""
    if binary:
        a, b = fit_platt(z, y)
        if a > 1e-3:
            return 1.0 / a, b
    return fit_temperature(z, y), 0.0


def _calibrated_nll(
    z: np.ndarray[Any, Any], y: np.ndarray[Any, Any], temperature: float, bias: float
) -> float:
    if z.ndim == 1:
        return nll(z / temperature + bias, y, 1.0)
    return nll(z, y, temperature)


def train_model(
    recipe: Recipe,
    train: SliceSet,
    val: SliceSet,
    *,
    seed: int,
    epochs: int | None = None,
    pretrained: Path | None = None,
    progress: Progress = stderr_progress,
) -> TrainResult:
    """Train from the recipe; keep the lowest-validation-loss weights; fit the temperature."""
    if recipe.needs_pretrained and pretrained is None:
        raise ModelUnavailable(
            f"recipe '{recipe.variant}' for {recipe.bundle_name} needs --pretrained FILE"
        )
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    network = build_network(recipe.network_name, recipe.network_args)
    if pretrained is not None:
        n = load_pretrained(network, pretrained)
        progress(f"loaded {n} pretrained tensors from {pretrained}")
    opt = torch.optim.Adam(network.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    n_epochs = epochs if epochs is not None else recipe.epochs
    best_loss, best_epoch, best_state = math.inf, 0, None
    history: list[dict[str, float]] = []
    stale = 0
    n_seen = 0
    for epoch in range(1, n_epochs + 1):
        t0 = time.perf_counter()
        if recipe.lr_decay_after_epoch is not None and epoch > recipe.lr_decay_after_epoch:
            for group in opt.param_groups:
                group["lr"] *= recipe.lr_decay_gamma
        network.train()
        order = _epoch_order(train, gen, recipe.epoch_slices)
        total, count = 0.0, 0
        n_seen = order.numel()
        for s in range(0, n_seen, recipe.batch_size):
            idx = order[s : s + recipe.batch_size]
            if idx.numel() < 2:
                continue  # batch norm needs two samples
            xb = augment_batch(train.x[idx].float(), recipe.augment, gen)
            loss = F.cross_entropy(network(xb), train.target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        vlogits = _logits(network, val.x)
        vloss = float(F.cross_entropy(vlogits, val.target))
        informative = val.target.max(dim=1).values > 0.75
        vacc = float((vlogits.argmax(1) == val.y)[informative].float().mean())
        row = {
            "epoch": float(epoch),
            "train_loss": total / max(count, 1),
            "val_loss": vloss,
            "val_slice_accuracy": vacc,
            "lr": float(opt.param_groups[0]["lr"]),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        progress(
            f"[{recipe.bundle_name}] epoch {epoch}/{n_epochs} train_loss {row['train_loss']:.4f} "
            f"val_loss {vloss:.4f} val_acc {vacc:.3f} ({row['seconds']:.0f}s)"
        )
        if vloss < best_loss - 1e-4:
            best_loss, best_epoch, stale = vloss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        else:
            stale += 1
            if stale >= recipe.patience:
                progress(f"[{recipe.bundle_name}] early stop: no val improvement for {stale}")
                break
    if best_state is None:
        best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    network.load_state_dict(best_state)
    vlogits = _logits(network, val.x)
    if recipe.task == "sequence":
        z: np.ndarray[Any, Any] = vlogits.double().numpy()
        y: np.ndarray[Any, Any] = val.y.numpy()
    else:
        z = series_mean_logits(vlogits, val)
        y = np.asarray(val.series_labels)
    temperature, bias = calibrate(z, y, binary=recipe.task != "sequence")
    progress(
        f"[{recipe.bundle_name}] best epoch {best_epoch}, temperature {temperature:.3f},"
        f" bias {bias:.3f}"
    )
    return TrainResult(
        state_dict=best_state,
        temperature=temperature,
        calibration_bias=bias,
        best_epoch=best_epoch,
        epochs_run=len(history),
        history=tuple(history),
        wall_time_s=time.perf_counter() - start,
        val_nll_before=nll(z, y, 1.0),
        val_nll_after=_calibrated_nll(z, y, temperature, bias),
    )

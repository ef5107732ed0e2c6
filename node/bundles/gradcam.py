"""Grad-CAM attention maps for a series-level prediction, on the source slices' pixel grid.

Our own Grad-CAM rather than monai.visualize.GradCAM so the two faults the field knows are
closed by construction: the forward hook is removed in ``finally`` (the gradient is captured
with a tensor hook that dies with the tensor), and the map is normalised explicitly to 0..1
with higher meaning more evidence for the explained class (never inverted). Call it on a
worker's own ``Bundle.copy()``; it does not change the module's parameters or mode.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from node.bundles.bundle import Bundle, prepare_slices, resolve_layer, series_box
from node.bundles.roi import Box
from node.dicom.canonical import canonical_axial, to_source
from node.errors import InferenceError
from node.records import FloatArray, Heatmap, SeriesPrediction, SeriesVolume


def grad_cam(
    network: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, class_index: int
) -> torch.Tensor:
    """Grad-CAM maps (n, H, W) at the input size for one class, each scaled to 0..1."""
    acts: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        acts.append(out)
        out.register_hook(grads.append)  # type: ignore[no-untyped-call]

    handle = layer.register_forward_hook(keep)
    was_training = network.training
    network.eval()
    try:
        with torch.enable_grad():
            xi = x.detach().clone().requires_grad_(True)
            logits = network(xi)
            if not acts:
                raise InferenceError("Grad-CAM layer did not run in the forward pass")
            network.zero_grad(set_to_none=True)
            logits[:, class_index].sum().backward()
    finally:
        handle.remove()
        network.zero_grad(set_to_none=True)
        network.train(was_training)
    a = acts[0].detach()
    g = grads[0].detach()
    weights = g.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _unit_range(cam)


def _unit_range(cam: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to 0..1 (a flat map becomes zeros, not NaN)."""
    flat = cam.reshape(cam.shape[0], -1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    span = hi - lo
    out = torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))
    return out.clamp(0.0, 1.0)


def to_source_grid(cam: torch.Tensor, rows: int, cols: int, box: Box | None = None) -> FloatArray:
    """Resample an input-size map onto the source slice grid and re-normalise to 0..1; with a
    region (box) the map covers that rectangle and is 0 outside it."""
    if box is None:
        up = F.interpolate(cam[None, None], size=(rows, cols), mode="bilinear", align_corners=False)
        out: FloatArray = _unit_range(up[0]).numpy()[0].astype(np.float32)
        return out
    size = (box.r1 - box.r0, box.c1 - box.c0)
    part = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)
    full = torch.zeros(1, rows, cols, dtype=part.dtype)
    full[0, box.r0 : box.r1, box.c0 : box.c1] = part[0, 0]
    placed: FloatArray = _unit_range(full).numpy()[0].astype(np.float32)
    return placed


def key_slices(
    volume: SeriesVolume, prediction: SeriesPrediction, *, top_k: int = 3
) -> tuple[int, ...] | None:
    """The source slices whose maps the report shows, where they are known before any map is
    computed: for an axial series the slices most confident in the predicted class. None for
    a sagittal or coronal series, whose key slices are those holding most of the 3-D map."""
    if top_k < 1 or not prediction.slice_indices:
        return ()
    if not canonical_axial(volume).slice_aligned:
        return None
    probs = np.asarray(prediction.slice_probabilities)
    positive = prediction.probability >= 0.5
    order = np.argsort(-probs if positive else probs, kind="stable")[:top_k]
    return tuple(prediction.slice_indices[int(i)] for i in order)


def planned_heatmaps(volume: SeriesVolume, chosen: tuple[int, ...]) -> tuple[Heatmap, ...]:
    """Heatmaps of chosen key slices whose maps are not computed yet (``explained=False``)."""
    return tuple(
        Heatmap(
            series_uid=volume.series_uid,
            slice_index=idx,
            source=volume.slices[idx],
            cam=np.zeros(np.shape(volume.pixels[idx]), dtype=np.float32),
            image=_slice_copy(volume, idx),
            explained=False,
        )
        for idx in chosen
    )


def explain_series(
    bundle: Bundle,
    volume: SeriesVolume,
    prediction: SeriesPrediction,
    *,
    top_k: int = 3,
    chosen: tuple[int, ...] | None = None,
) -> tuple[Heatmap, ...]:
    """Heatmaps of the key slices, on source slices of the series.

    The model read canonical axial slices (node.dicom.canonical). For an axial series those are
    the source slices: the key slices are the ones most confident in the predicted class
    (``key_slices``; ``chosen``, when given, names them). For a sagittal or coronal series the
    maps of every slice the model read, each weighted by that slice's confidence in the
    predicted class and interpolated between them, form a 3-D map that is mapped back onto the
    source grid; the key source slices are those holding most of it."""
    meta = bundle.metadata
    if top_k < 1 or not prediction.slice_indices:
        return ()
    canon = canonical_axial(volume)
    pixels = canon.pixels
    positive = prediction.probability >= 0.5
    class_index = 1 if positive else 0
    probs = np.asarray(prediction.slice_probabilities)
    if prediction.region is not None:
        box: Box | None = Box(*prediction.region, found=True)
    else:
        box = series_box(pixels, meta)
    rows, cols = int(pixels.shape[1]), int(pixels.shape[2])
    if canon.slice_aligned:
        if chosen is None:
            order = np.argsort(-probs if positive else probs, kind="stable")[:top_k]
            chosen = tuple(prediction.slice_indices[int(i)] for i in order)
        cams = _cams(bundle, pixels, chosen, box, class_index)
        return tuple(
            Heatmap(
                series_uid=volume.series_uid,
                slice_index=idx,
                source=volume.slices[idx],
                # on the canonical (square) slice, then without its padding
                cam=to_source(to_source_grid(cams[j], rows, cols, box)[None], canon)[0],
                image=_slice_copy(volume, idx),
            )
            for j, idx in enumerate(chosen)
        )
    read = prediction.slice_indices
    cams = _cams(bundle, pixels, read, box, class_index)
    support = probs if positive else 1.0 - probs
    maps = np.stack(
        [float(support[j]) * to_source_grid(cams[j], rows, cols, box) for j in range(len(read))]
    )
    source_map = to_source(fill_between(maps, read, int(pixels.shape[0])), canon)
    mass = source_map.reshape(source_map.shape[0], -1).sum(axis=1)
    chosen = tuple(int(i) for i in np.argsort(-mass, kind="stable")[:top_k] if mass[i] > 0)
    return tuple(
        Heatmap(
            series_uid=volume.series_uid,
            slice_index=idx,
            source=volume.slices[idx],
            cam=_unit_range(torch.from_numpy(source_map[idx][None])).numpy()[0],
            image=_slice_copy(volume, idx),
        )
        for idx in chosen
    )


def _slice_copy(volume: SeriesVolume, idx: int) -> FloatArray:
    """One source slice as its own array: a view would keep the whole series alive for as long
    as the heatmap (until the report is written)."""
    return np.array(volume.pixels[idx], dtype=np.float32)


def _cams(
    bundle: Bundle,
    pixels: FloatArray,
    indices: tuple[int, ...],
    box: Box | None,
    class_index: int,
) -> torch.Tensor:
    meta = bundle.metadata
    x = prepare_slices(pixels, indices, meta, box)
    layer = resolve_layer(bundle.network, meta.cam_layer)
    try:
        return grad_cam(bundle.network, layer, x, class_index)
    except RuntimeError as exc:
        raise InferenceError(f"Grad-CAM failed for model {meta.name}: {exc}") from exc


def fill_between(maps: FloatArray, indices: tuple[int, ...], n_slices: int) -> FloatArray:
    """A (n_slices, rows, cols) volume from maps on some slices, linear in between, 0 outside."""
    out = np.zeros((n_slices, *maps.shape[1:]), dtype=np.float32)
    order = np.argsort(indices, kind="stable")
    idx = [int(indices[i]) for i in order]
    sorted_maps = maps[order]
    for j, k in enumerate(idx):
        out[k] = sorted_maps[j]
        if j + 1 < len(idx):
            nxt = idx[j + 1]
            for z in range(k + 1, nxt):
                t = (z - k) / (nxt - k)
                out[z] = (1.0 - t) * sorted_maps[j] + t * sorted_maps[j + 1]
    return out


def with_heatmaps(
    bundle: Bundle, volume: SeriesVolume, prediction: SeriesPrediction, *, top_k: int = 3
) -> SeriesPrediction:
    """The prediction with Grad-CAM heatmaps of its key slices attached (a detector's map comes
    with its measurement: ``detector.predict_detector(..., top_k=k)``)."""
    return dataclasses.replace(
        prediction, heatmaps=explain_series(bundle, volume, prediction, top_k=top_k)
    )

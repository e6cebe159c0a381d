"""Segmentation overlays: three informative slices of a volume with label and prediction outlines.

People would rather look at a segmentation than read its Dice. The slices shown are the ones
where the label (else the prediction, else the image) carries the most foreground on each of
the three axes, so a small lesion is not missed by a centre slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Per class: label outlines in cool colours, prediction outlines in warm ones.
LABEL_COLOURS = ((0, 230, 0), (0, 200, 255), (60, 120, 255), (160, 255, 160), (0, 255, 180))
PREDICTION_COLOURS = ((255, 40, 40), (255, 160, 0), (255, 0, 200), (255, 255, 0), (200, 80, 0))
MIN_PANEL_PX = 192


def render_overlay(
    image,
    label=None,
    prediction=None,
    *,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """An RGB ``uint8`` picture: axial, coronal and sagittal slices side by side.

    Args:
        image: a 3D volume (H, W, D), or channel-first (C, H, W, D) or batched (1, C, H, W, D);
            numpy arrays or torch tensors.
        label: class indices (same spatial shape) or one-hot channels; outlined in cool colours.
        prediction: as ``label``; outlined in warm colours.
        spacing: voxel size per axis; slices are stretched so anatomy keeps its proportions.

    Raises:
        ValueError: shapes that are not 3D or do not match the image.
    """
    volume = _as_volume(image, "image", channels="first")
    masks = {
        "label": _as_labels(label, volume.shape, "label"),
        "prediction": _as_labels(prediction, volume.shape, "prediction"),
    }
    focus = masks["label"] if masks["label"] is not None else masks["prediction"]
    low, high = np.percentile(volume, (0.5, 99.5)) if volume.size else (0.0, 1.0)
    grey = np.clip((volume - low) / ((high - low) or 1.0), 0, 1)
    panels = []
    for axis in (2, 1, 0):  # axial, coronal, sagittal
        index = _best_slice(focus, grey, axis)
        rgb = np.repeat((np.take(grey, index, axis=axis) * 255).astype(np.uint8)[..., None], 3, -1)
        for kind, colours in (("label", LABEL_COLOURS), ("prediction", PREDICTION_COLOURS)):
            if masks[kind] is not None:
                _draw_outlines(rgb, np.take(masks[kind], index, axis=axis), colours)
        rgb = np.rot90(rgb)  # radiological habit: anterior/superior up
        panels.append(_stretch(rgb, spacing, axis))
    return _side_by_side(panels)


def _as_volume(array, what: str, channels: str) -> np.ndarray:
    data = _to_numpy(array)
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 4 and channels == "first":
        data = data[0]  # first channel / modality
    if data.ndim != 3:
        raise ValueError(f"{what} must be a 3D volume (optionally channel-first); got {data.shape}")
    return data.astype(np.float32, copy=False)


def _as_labels(array, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    if array is None:
        return None
    data = _to_numpy(array)
    while data.ndim > 3 and data.shape[0] == 1 and data.shape[1:] != shape:
        data = data[0]
    if data.ndim == 4 and data.shape[1:] == shape:
        data = data.argmax(0)  # one-hot channels -> class index
    if data.shape != shape:
        raise ValueError(f"{what} has shape {data.shape}; expected {shape} like the image")
    return np.rint(data).astype(np.int64)


def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _best_slice(mask: np.ndarray | None, grey: np.ndarray, axis: int) -> int:
    others = tuple(a for a in range(3) if a != axis)
    if mask is not None and (mask > 0).any():
        return int((mask > 0).sum(axis=others).argmax())
    energy = grey.std(axis=others)
    return int(energy.argmax()) if energy.any() else grey.shape[axis] // 2


def _draw_outlines(rgb: np.ndarray, mask: np.ndarray, colours) -> None:
    for cls in np.unique(mask):
        if cls <= 0:
            continue
        region = mask == cls
        inner = region.copy()
        inner[1:, :] &= region[:-1, :]
        inner[:-1, :] &= region[1:, :]
        inner[:, 1:] &= region[:, :-1]
        inner[:, :-1] &= region[:, 1:]
        rgb[region & ~inner] = colours[(int(cls) - 1) % len(colours)]


def _stretch(rgb: np.ndarray, spacing: Sequence[float] | None, axis: int) -> np.ndarray:
    scale = [1.0, 1.0]
    if spacing is not None:
        # after rot90 the rows follow the second in-plane axis, the columns the first
        first, second = (a for a in range(3) if a != axis)
        finest = min(spacing[first], spacing[second])
        scale = [spacing[second] / finest, spacing[first] / finest]
    base = max(1, int(np.ceil(MIN_PANEL_PX / max(rgb.shape[:2]))))
    rows = np.repeat(rgb, max(1, round(base * scale[0])), axis=0)
    return np.repeat(rows, max(1, round(base * scale[1])), axis=1)


def _side_by_side(panels: list[np.ndarray]) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    gap = np.zeros((height, 4, 3), dtype=np.uint8)
    padded = []
    for panel in panels:
        pad = np.zeros((height - panel.shape[0], panel.shape[1], 3), dtype=np.uint8)
        padded.extend([np.concatenate([panel, pad]), gap])
    return np.concatenate(padded[:-1], axis=1)

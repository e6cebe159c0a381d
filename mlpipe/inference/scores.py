"""Dice, HD95 and volume error of a predicted mask against its label: one definition shared by
seg3d's ``evaluate`` and ``mlpipe predict --labels``, so both report the same numbers.

It lives in mlpipe (seg3d already depends on mlpipe) because ``mlpipe predict`` must not import
a training project. Metrics per case and foreground class ``c``:

* ``dice_<c>``: 2|P∩G| / (|P|+|G|); NaN when the class is in neither (nothing to score),
* ``hd95_<c>``: 95th percentile symmetric Hausdorff distance in mm (MONAI's
  ``compute_hausdorff_distance``); NaN when the class is in neither, and the volume's diagonal
  in mm (the worst possible distance) when it is in only one of them, so a missed structure
  counts against the model instead of vanishing,
* ``volume_error_<c>``: |V_pred - V_true| / V_true; NaN when the label has no such voxel.

Means skip NaN.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

HD_PERCENTILE = 95


class LabelShapeError(ValueError):
    """A label whose voxel grid is not its image's."""


def score_case(
    prediction: np.ndarray,
    label: np.ndarray,
    *,
    spacing: tuple[float, ...],
    num_classes: int,
) -> dict[str, float]:
    """Dice, HD95 (mm) and relative volume error of one case, per foreground class.

    Args:
        prediction: integer mask, same shape as ``label``.
        label: integer ground truth.
        spacing: voxel size in mm along each axis.
        num_classes: classes including background (0, not scored).

    Returns:
        ``{"dice_<c>", "hd95_<c>", "volume_error_<c>"}`` for ``c`` in 1..num_classes-1, NaN where
        a metric is undefined (see the module docstring).
    """
    if prediction.shape != label.shape:
        raise ValueError(f"prediction shape {prediction.shape} != label shape {label.shape}")
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(label.shape, spacing, strict=True)))
    scores: dict[str, float] = {}
    for c in range(1, num_classes):
        pred, true = prediction == c, label == c
        n_pred, n_true = int(pred.sum()), int(true.sum())
        both = int(np.logical_and(pred, true).sum())
        if n_pred == 0 and n_true == 0:
            dice = hd95 = math.nan
        elif n_pred == 0 or n_true == 0:
            dice, hd95 = 0.0, diagonal
        else:
            dice = 2.0 * both / (n_pred + n_true)
            hd95 = _hd95(pred, true, spacing)
        scores[f"dice_{c}"] = dice
        scores[f"hd95_{c}"] = hd95
        scores[f"volume_error_{c}"] = abs(n_pred - n_true) / n_true if n_true else math.nan
    return scores


def score_against_label(
    prediction: np.ndarray, label_path: str | Path, *, num_classes: int
) -> dict[str, float]:
    """Score a predicted mask against a label file as it is on disk (its own voxel grid).

    The label is rounded to integers and its spacing read from its header, as seg3d's
    ``evaluate`` has always done.

    Raises:
        LabelShapeError: the label's shape differs from the prediction's.
    """
    import nibabel as nib

    label_image = nib.load(str(label_path))
    label = np.rint(np.asarray(label_image.dataobj)).astype(np.int64)
    if label.shape != prediction.shape:
        raise LabelShapeError(
            f"{label_path}: label shape {label.shape} differs from its image's "
            f"{prediction.shape}; a label must share its image's voxel grid"
        )
    spacing = tuple(float(s) for s in label_image.header.get_zooms()[:3])
    return score_case(prediction, label, spacing=spacing, num_classes=num_classes)


def summarize(table: pd.DataFrame, num_classes: int) -> dict[str, float]:
    """The logged means: over all cases and classes, and Dice per class; NaN skipped."""
    classes = range(1, num_classes)
    means = {
        "mean_dice": nanmean(table[[f"dice_{c}" for c in classes]]),
        "mean_hd95": nanmean(table[[f"hd95_{c}" for c in classes]]),
        "mean_volume_error": nanmean(table[[f"volume_error_{c}" for c in classes]]),
    }
    for c in classes:
        means[f"mean_dice_{c}"] = nanmean(table[[f"dice_{c}"]])
    return means


def _hd95(pred: np.ndarray, true: np.ndarray, spacing: tuple[float, ...]) -> float:
    import torch
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI 1.6 calls its own deprecated get_mask_edges argument once per call.
        warnings.filterwarnings("ignore", "monai.metrics.utils get_mask_edges", FutureWarning)
        distance = compute_hausdorff_distance(
            torch.from_numpy(pred[None, None]),  # batch and channel axes first
            torch.from_numpy(true[None, None]),
            include_background=True,
            percentile=HD_PERCENTILE,
            spacing=list(spacing),
        )
    return float(distance.item())


def nanmean(frame: pd.DataFrame) -> float:
    """Mean of the non-NaN values; NaN (without numpy's warning) when there is none."""
    values = frame.to_numpy(dtype=float).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if values.size else math.nan

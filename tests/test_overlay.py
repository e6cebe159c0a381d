"""Overlays: informative slices, outlines where the masks are, any common array layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlpipe.log.figures import LABEL_COLOURS, PREDICTION_COLOURS, _best_slice, render_overlay


def _volume_with_lesion(shape=(24, 20, 16), lesion_slice=3):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.int64)
    label[8:14, 6:12, lesion_slice] = 1
    image[label > 0] += 4
    return image, label


def _colour_present(picture: np.ndarray, colour) -> bool:
    return bool((picture == np.array(colour, dtype=np.uint8)).all(-1).any())


def test_render_overlay_outlines_label_and_prediction_in_their_colours():
    image, label = _volume_with_lesion()
    prediction = np.roll(label, 2, axis=0)
    picture = render_overlay(image, label, prediction)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert _colour_present(picture, LABEL_COLOURS[0])
    assert _colour_present(picture, PREDICTION_COLOURS[0])


def test_render_overlay_without_masks_has_no_outline_colours():
    image, _ = _volume_with_lesion()
    picture = render_overlay(image)
    assert not _colour_present(picture, LABEL_COLOURS[0])
    assert not _colour_present(picture, PREDICTION_COLOURS[0])


def test_best_slice_finds_a_small_off_centre_lesion():
    image, label = _volume_with_lesion(lesion_slice=3)
    assert _best_slice(label, image, axis=2) == 3
    assert _best_slice(label, image, axis=0) in range(8, 14)


def test_render_overlay_accepts_channel_first_tensors_and_one_hot_labels():
    image, label = _volume_with_lesion()
    one_hot = np.stack([label == 0, label == 1]).astype(np.float32)
    from_tensors = render_overlay(
        torch.from_numpy(image)[None, None], torch.from_numpy(one_hot)[None]
    )
    assert np.array_equal(from_tensors, render_overlay(image, label))


def test_render_overlay_stretches_anisotropic_spacing():
    image, label = _volume_with_lesion(shape=(16, 16, 8))
    plain = render_overlay(image, label)
    stretched = render_overlay(image, label, spacing=(1.0, 1.0, 4.0))
    assert stretched.shape[0] > plain.shape[0]  # coronal/sagittal slices grow along z


def test_render_overlay_refuses_mismatched_label():
    image, _ = _volume_with_lesion()
    with pytest.raises(ValueError, match="label has shape"):
        render_overlay(image, np.zeros((4, 4, 4)))

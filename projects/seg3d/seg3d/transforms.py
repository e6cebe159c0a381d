"""The MONAI transform chains: deterministic preprocessing, random augmentation, inference.

One place builds them so that training, validation, the ``preprocess`` entry point and the
served model apply the same geometry and intensity steps. Every chain is logged with
``mlog.preprocessing``; the inference chain is stored with the model and rebuilt from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monai.transforms import Compose

    from seg3d.config import TrainConfig

KEYS = ("image", "label")


DICOM_READER = "mlpipe.data.monai_reader.DicomSeriesReader"


def base_transforms(
    config: TrainConfig, keys: tuple[str, ...] = KEYS, *, intensity: bool = True
) -> list:
    """Load, channel first, RAS, target spacing, intensity by modality: no randomness.

    ``intensity=False`` for data the ``preprocess`` step already windowed (windowing twice
    would squash every voxel to one grey); the inference chain always has it.
    """
    from monai.transforms import (
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    chain = [
        # A DICOM series (folder, .zip) is read by mlpipe's reader (slices along the normal,
        # HU); NIfTI still goes to MONAI's own. A dotted name keeps the chain JSON.
        LoadImaged(keys=keys, image_only=True, reader=DICOM_READER),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        Spacingd(keys=keys, pixdim=config.spacing, mode=modes),
    ]
    if not intensity:
        return chain
    if config.modality == "ct":
        low, high = config.window
        if config.norm_std > 0:  # the plan: clip to foreground percentiles, z-score (one map)
            b_min = (low - config.norm_mean) / config.norm_std
            b_max = (high - config.norm_mean) / config.norm_std
        else:  # an explicit window: to 0..1
            b_min, b_max = 0.0, 1.0
        chain.append(
            ScaleIntensityRanged(
                keys="image", a_min=low, a_max=high, b_min=b_min, b_max=b_max, clip=True
            )
        )
    else:
        chain.append(NormalizeIntensityd(keys="image", nonzero=config.nonzero, channel_wise=True))
    return chain


def train_transforms(config: TrainConfig, device: str = "cpu") -> Compose:
    """Base chain, pad to the patch, then (on ``device``) random patches and augmentation.

    Everything before the first random transform is cached by ``CacheDataset``; on a GPU the
    cached tensors move to it once and the crops and augmentation run there, as MONAI's
    fast-training guide does.
    """
    from monai.transforms import (
        Compose,
        EnsureTyped,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    keys = list(KEYS)
    chain = base_transforms(config, intensity=not config.extra.get("preprocessed"))
    chain += [
        SpatialPadd(keys=keys, spatial_size=config.patch_size),
        EnsureTyped(keys=keys, device=device, track_meta=False),
        _crop(config, keys),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
        *_rotations(config, keys),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ]
    return Compose(chain)


def _rotations(config: TrainConfig, keys: list[str]) -> list:
    """Quarter turns in the first plane whose two sides are equal (a turn must keep the shape)."""
    from monai.transforms import RandRotate90d

    p = config.patch_size
    for axes in ((0, 1), (1, 2), (0, 2)):
        if p[axes[0]] == p[axes[1]]:
            return [RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=axes)]
    return []


def _crop(config: TrainConfig, keys: list[str]):
    """Class-balanced patches (the plan's ratios), else positive/negative around the label."""
    from monai.transforms import RandCropByLabelClassesd, RandCropByPosNegLabeld

    if config.class_ratios:
        return RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=config.patch_size,
            ratios=list(config.class_ratios),
            num_classes=config.num_classes,
            num_samples=config.num_samples,
            warn=False,  # a class absent from one volume is normal; its share goes elsewhere
        )
    return RandCropByPosNegLabeld(
        keys=keys,
        label_key="label",
        spatial_size=config.patch_size,
        pos=1,
        neg=1,
        num_samples=config.num_samples,
        image_key="image",
        image_threshold=0,
    )


def val_transforms(config: TrainConfig, device: str = "cpu") -> Compose:
    """Base chain on whole volumes (sliding-window inference does the patching)."""
    from monai.transforms import Compose, EnsureTyped

    keys = list(KEYS)
    chain = base_transforms(config, intensity=not config.extra.get("preprocessed"))
    return Compose([*chain, EnsureTyped(keys=keys, device=device)])


def infer_transforms(config: TrainConfig) -> Compose:
    """The image-only chain a service applies; its inverse maps a mask back to the input."""
    from monai.transforms import Compose, EnsureTyped

    return Compose([*base_transforms(config, keys=("image",)), EnsureTyped(keys="image")])

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
        chain.append(
            ScaleIntensityRanged(
                keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True
            )
        )
    else:
        chain.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
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
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    keys = list(KEYS)
    chain = base_transforms(config, intensity=not config.extra.get("preprocessed"))
    chain += [
        SpatialPadd(keys=keys, spatial_size=config.patch_size),
        EnsureTyped(keys=keys, device=device, track_meta=False),
        RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=config.patch_size,
            pos=1,
            neg=1,
            num_samples=config.num_samples,
            image_key="image",
            image_threshold=0,
        ),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
        RandRotate90d(keys=keys, prob=0.5, max_k=3),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ]
    return Compose(chain)


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

"""The networks seg3d trains: MONAI's DynUNet (the plan's), UNet and SegResNet, from the config.

Built from plain settings (not pickled), so the service rebuilds the same network from the
config stored with the model and loads a state dict into it with ``weights_only=True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from seg3d.config import TrainConfig


def build_network(config: TrainConfig) -> torch.nn.Module:
    from monai.networks.nets import DynUNet, SegResNet, UNet

    if config.model == "dynunet":
        if not config.kernels or not config.strides:
            raise ValueError("dynunet needs the plan's kernels and strides (seg3d.plan)")
        return DynUNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.num_classes,
            kernel_size=config.kernels,
            strides=config.strides,
            upsample_kernel_size=config.strides[1:],
            filters=config.filters,
            norm_name="instance",
            res_block=True,
        )
    if config.model == "segresnet":
        return SegResNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.num_classes,
            init_filters=16,
            dropout_prob=0.1,
        )
    return UNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.num_classes,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm="batch",
    )

"""The networks seg3d trains: MONAI's UNet and SegResNet, built from the config alone.

Built from plain settings (not pickled), so the service rebuilds the same network from the
config stored with the model and loads a state dict into it with ``weights_only=True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from seg3d.config import TrainConfig


def build_network(config: TrainConfig) -> torch.nn.Module:
    from monai.networks.nets import SegResNet, UNet

    if config.model == "segresnet":
        return SegResNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=config.num_classes,
            init_filters=16,
            dropout_prob=0.1,
        )
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=config.num_classes,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm="batch",
    )

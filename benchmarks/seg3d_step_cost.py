"""What one training step costs on this machine, per network and patch: why seg3d's CPU plan
keeps DynUNet's patch small, and what the plain MONAI recipe's UNet pays at 64^3.

A step is forward + backward + AdamW on ``--patches`` patches of one channel, three classes,
DiceCE, with torch's threads as set (all cores by default); the median of ``--repeats`` steps
after one warm-up step.

    python benchmarks/seg3d_step_cost.py [--patches 4 --repeats 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import emit, machine, median, versions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "projects" / "seg3d"))


def step_seconds(net, patch: tuple[int, ...], patches: int, repeats: int) -> float:
    import torch
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3)
    image = torch.randn(patches, 1, *patch)
    label = torch.randint(0, 3, (patches, 1, *patch))
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(net(image), label).backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    import torch
    from monai.networks.nets import DynUNet, UNet

    from seg3d.plan import topology

    def dynunet(patch):
        kernels, strides = topology(patch, [2.0, 2.0, 2.0])
        filters = [min(16 * 2**i, 256) for i in range(len(strides))]
        return DynUNet(3, 1, 3, kernels, strides, strides[1:], filters=filters,
                       norm_name="instance", res_block=True)  # fmt: skip

    rows = {}
    for patch in [(32, 32, 40), (48, 48, 48), (64, 64, 64)]:
        name = f"dynunet 16..256 {'x'.join(map(str, patch))}"
        rows[name] = round(step_seconds(dynunet(patch), patch, args.patches, args.repeats), 3)
    unet = UNet(3, 1, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    rows["unet 16..256 (recipe) 64x64x64"] = round(
        step_seconds(unet, (64, 64, 64), args.patches, args.repeats), 3
    )
    emit({
        "benchmark": "seg3d_step_cost",
        "patches_per_step": args.patches,
        "threads": torch.get_num_threads(),
        "step_seconds": rows,
        "machine": machine(),
        "versions": versions("torch", "monai"),
    })  # fmt: skip


if __name__ == "__main__":
    main()

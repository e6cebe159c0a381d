"""seg3d (mlpipe, all logging on) against a plain MONAI loop: same model, same data, same recipe.

The baseline is the loop a MONAI user writes from MONAI's fast-training guide, with no MLflow
and no mlpipe: ``CacheDataset`` holding the deterministic chain (on the GPU when there is
one, so random crops and augmentation run there), ``ThreadDataLoader``, AdamW, DiceCELoss,
mixed precision and ``cudnn.benchmark`` on CUDA, sliding-window validation with
``DiceMetric``. seg3d trains the same UNet on the same train/validation split inside a real
MLflow run (SQLite in a temporary folder) with every ``mlpipe.log`` call a project run makes:
dataset manifest, preprocessing, profile, per-epoch metrics, overlays, checkpoints uploaded
each epoch. The two alternate round by round, each round of each side in a fresh process.

Figures for each: samples/s, seconds per training epoch, the whole loop (validation, logging
and checkpoints included), peak GPU memory, the training time until ``val_dice`` first reaches
``--target-dice`` (validation time left out on both sides) and the best ``val_dice``.
The ratio is seg3d's epoch time over the plain loop's; target: at most 1.05.

Run on a GPU (``benchmarks/gpu.sh`` does this):
``python benchmarks/seg3d_vs_monai.py --count 32 --size 128 --patch 96 --epochs 40``;
on this CPU machine, small: ``--count 8 --size 48 --patch 32 --epochs 4``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, machine, median, summary, versions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "projects" / "seg3d"))

TARGET_RATIO = 1.05


def plain_monai(train_items, val_items, args, device) -> dict:
    """MONAI's fast-training recipe, written out as a MONAI user would, without tracking."""
    import torch
    from monai.data import CacheDataset, ThreadDataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.nets import UNet
    from monai.networks.utils import one_hot
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )
    from monai.utils import set_determinism

    set_determinism(seed=0)
    cuda = device.type == "cuda"
    keys = ["image", "label"]
    patch = (args.patch,) * 3
    data_device = str(device) if cuda else "cpu"
    base = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        Spacingd(keys=keys, pixdim=(1.5, 1.5, 2.0), mode=["bilinear", "nearest"]),
        ScaleIntensityRanged(
            keys="image", a_min=-175.0, a_max=250.0, b_min=0.0, b_max=1.0, clip=True
        ),
    ]
    train_tf = Compose(
        [
            *base,
            SpatialPadd(keys=keys, spatial_size=patch),
            EnsureTyped(keys=keys, device=data_device, track_meta=False),
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=1,
                                   neg=1, num_samples=2, image_key="image", image_threshold=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandRotate90d(keys=keys, prob=0.5, max_k=3),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )  # fmt: skip
    val_tf = Compose([*base, EnsureTyped(keys=keys, device=data_device)])
    workers = 0 if cuda else min(2, os.cpu_count() or 1)
    train_ds = CacheDataset(train_items, train_tf, num_workers=workers, progress=False)
    val_ds = CacheDataset(val_items, val_tf, num_workers=workers, progress=False)
    loader = ThreadDataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=0)
    val_loader = ThreadDataLoader(val_ds, batch_size=1, num_workers=0)

    torch.backends.cudnn.benchmark = cuda
    model = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128, 256),
                 strides=(2, 2, 2, 2), num_res_units=2, norm="batch").to(device)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    amp = args.amp and cuda
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    history = []
    began = time.monotonic()
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        samples = 0
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(model(image), label)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            samples += image.shape[0]
        scheduler.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        row = {"epoch_seconds": seconds, "samples_per_s": samples / seconds}
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, enabled=amp):
                for batch in val_loader:
                    image, label = batch["image"].to(device), batch["label"].to(device)
                    logits = sliding_window_inference(image, patch, 4, model, overlap=0.25)
                    pred = logits.argmax(dim=1, keepdim=True)
                    metric(one_hot(pred, 3), one_hot(label.long(), 3))
            per_class = metric.aggregate().float().cpu().tolist()
            metric.reset()
            finite = [v for v in per_class if v == v]
            row["val_dice"] = sum(finite) / len(finite) if finite else 0.0
        row["elapsed_s"] = (history[-1]["elapsed_s"] if history else 0.0) + seconds
        if cuda:
            row["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        history.append(row)
    return {"history": history, "loop_s": time.monotonic() - began}


def seg3d_logged(data: Path, args) -> dict:
    """The project's own ``train`` in a real MLflow run, every mlpipe logging call on."""
    import mlflow

    from seg3d.config import TrainConfig
    from seg3d.train import train

    config = TrainConfig(
        data_dir=str(data),
        epochs=args.epochs,
        batch_size=args.batch_size,
        patch_size=(args.patch,) * 3,
        amp=args.amp,
        val_every=args.val_every,
    )
    config.check()
    with mlflow.start_run():
        result = train(config, log=True)
    # time to a Dice counts training time only (epoch_seconds), on both sides
    history, elapsed = [], 0.0
    for h in result.history:
        elapsed += h["epoch_seconds"]
        history.append({**h, "elapsed_s": elapsed})
    return {"history": history, "loop_s": result.loop_seconds}


def figures(runs: list[dict], target: float) -> dict:
    """Medians over rounds and epochs (the first epoch, with cudnn autotuning, left out)."""

    def per_epoch(key: str) -> float:
        values = [h[key] for r in runs for h in r["history"][1:] or r["history"] if key in h]
        return median(values) if values else float("nan")

    reached = []
    for r in runs:
        hit = next((h["elapsed_s"] for h in r["history"] if h.get("val_dice", 0) >= target), None)
        if hit is not None:
            reached.append(hit)
    best = [max((h.get("val_dice", 0.0) for h in r["history"]), default=0.0) for r in runs]
    return {
        "samples_per_s": round(per_epoch("samples_per_s"), 2),
        "epoch_s": round(per_epoch("epoch_seconds"), 3),
        "loop_s": round(median([r["loop_s"] for r in runs]), 2),
        "gpu_memory_peak_gb": round(
            max(h.get("gpu_memory_peak_gb", 0.0) for r in runs for h in r["history"]), 2
        ),
        f"seconds_to_val_dice_{target}": round(median(reached), 1) if reached else None,
        "best_val_dice": round(median(best), 4),
    }


SIDES = {"seg3d": "seg3d (mlpipe, logging on)", "plain": "plain MONAI"}


def one_side(args) -> None:
    """Child process: one round of one side on the prepared data; prints its history as JSON.

    Each round runs in a fresh process because in one shared process the side that ran
    second was measured up to 20 % faster or slower on a CPU (allocator state, threads and
    caches the other side left behind), which is not a property of either loop.
    """
    import json

    import mlflow
    import torch

    from mlpipe.data.dataset import build_manifest
    from seg3d.checks import split_cases

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(args.data)
    if args.side == "seg3d":
        mlflow.set_experiment("seg3d-vs-monai")
        result = seg3d_logged(data, args)
    else:
        train_pairs, val_pairs = split_cases(build_manifest(data).pairs, 0.2, 0)
        items = [{"image": str(p.image), "label": str(p.label)} for p in train_pairs]
        val_items = [{"image": str(p.image), "label": str(p.label)} for p in val_pairs]
        result = plain_monai(items, val_items, args, device)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(json.dumps({**result, "device": device_name}), flush=True)


def run_side(side: str, data: Path, tmp: str, argv: list[str]) -> dict:
    import json
    import subprocess

    env = {
        **os.environ,
        "MLPIPE_CACHE_DIR": str(Path(tmp) / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlruns.db",
    }
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--side", side, "--data", str(data)],
        cwd=tmp,  # a SQLite store puts artifacts in ./mlruns: keep them in the temporary folder
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--val-every", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--target-dice", type=float, default=0.9)
    parser.add_argument("--amp", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        one_side(args)
        return
    argv = sys.argv[1:]

    from seg3d.synthesize import synthesize

    with tempfile.TemporaryDirectory(prefix="seg3d-vs-monai-") as tmp:
        data = synthesize(Path(tmp) / "data", args.count, args.size, 3, 0)
        runs: dict[str, list[dict]] = {name: [] for name in SIDES.values()}
        device = "cpu"
        for round_ in range(args.repeats):
            # alternate which side goes first, so neither always has the warmer machine
            order = list(SIDES) if round_ % 2 == 0 else list(SIDES)[::-1]
            for side in order:
                result = run_side(side, data, tmp, argv)
                device = result.pop("device")
                runs[SIDES[side]].append(result)
        out = {name: figures(r, args.target_dice) for name, r in runs.items()}
    mine, base = out["seg3d (mlpipe, logging on)"], out["plain MONAI"]
    ratio = mine["epoch_s"] / base["epoch_s"]
    emit(
        {
            "name": "seg3d_vs_monai",
            "device": device,
            "volumes": args.count,
            "size": args.size,
            "patch": args.patch,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "amp": args.amp and device != "cpu",
            "figures": out,
            "ratio": {"seg3d / plain MONAI (epoch time)": round(ratio, 3)},
            "target": f"at most {TARGET_RATIO}",
            "met": ratio <= TARGET_RATIO,
            "summary": summary(
                f"{mine['epoch_s']} s/epoch, {mine['samples_per_s']} samples/s",
                f"{base['epoch_s']} s/epoch, {base['samples_per_s']} samples/s",
                ratio,
                f"<= {TARGET_RATIO}",
                ratio <= TARGET_RATIO,
            ),
            "versions": versions("mlpipe", "mlflow", "torch", "monai"),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()

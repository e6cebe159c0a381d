"""seg3d with its plan against a plain MONAI recipe, same data, same time budget: held-out Dice.

The data: real-anatomy brain MRI (``seg3d.anatomy``: the MNI152 template and its tissue maps
from nilearn's wheel, warped into subjects with random affine and elastic deformations, bias
fields and noise), 2 mm, labels 1 grey matter and 2 white matter, Decathlon layout with a
``dataset.json`` that declares ``"modality": {"0": "MRI"}``.

* seg3d: ``mlpipe run projects/seg3d -P data_dir=... -P max_minutes=N``, nothing else: the plan
  decides spacing, normalization, patch, network, sampling and the schedule; ``main``
  evaluates the best checkpoint on ``imagesTs`` through the served pyfunc (``mean_dice``).
* plain MONAI: the recipe of MONAI's tutorials, written out: UNet (16..256, 2 residual units),
  a fixed 64^3 patch, per-image z-score over the non-zero voxels (``NormalizeIntensityd``),
  positive/negative crops, flips, Adam 1e-3, DiceCE; trained for the same minutes, best
  ``val_dice`` checkpoint kept, scored on the same test cases with the same ``score_case``.

Both run one after the other on the same machine; on a shared CPU say so next to the figures.

    python benchmarks/seg3d_quality.py --max-minutes 10 --count 20 --test-count 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import bin_path, emit, machine, versions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "projects" / "seg3d"))
TARGET_DICE = 0.90


def run_seg3d(data: Path, minutes: float, work: Path, extra: list[str] = ()) -> dict:
    from mlflow import MlflowClient

    began = time.perf_counter()
    done = subprocess.run(
        [bin_path("mlpipe"), "run", str(ROOT / "projects" / "seg3d"),
         "-P", f"data_dir={data}", "-P", f"max_minutes={minutes:g}",
         *[arg for value in extra for arg in ("-P", value)]],
        cwd=work, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"seg3d failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    plan_lines = [line for line in done.stdout.splitlines() if "plan:" in line]
    return {
        "mean_dice": run.data.metrics["mean_dice"],
        "mean_dice_1": run.data.metrics["mean_dice_1"],
        "mean_dice_2": run.data.metrics["mean_dice_2"],
        "best_val_dice": run.data.metrics.get("best_val_dice"),
        "epochs": run.data.tags.get("seg3d.epochs_done"),
        "wall_s": round(seconds, 1),
        "plan": plan_lines,
    }


def run_plain_monai(data: Path, minutes: float, seed: int = 0) -> dict:
    """The plain recipe, in this process; returns the held-out scores of its best checkpoint."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.nets import UNet
    from monai.networks.utils import one_hot
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        RandCropByPosNegLabeld,
        RandFlipd,
        SpatialPadd,
    )
    from monai.utils import set_determinism

    from mlpipe.data.dataset import build_manifest
    from seg3d.checks import split_cases
    from seg3d.evaluate import score_case

    set_determinism(seed)
    info = build_manifest(data)
    train_pairs, val_pairs = split_cases(info.pairs, 0.2, seed)
    test_pairs = [p for p in info.pairs if p.split == "test"]
    patch = (64, 64, 64)
    keys = ["image", "label"]
    base = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ]
    train_tf = Compose([
        *base,
        SpatialPadd(keys=keys, spatial_size=patch),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=1, neg=1,
                               num_samples=2),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
    ])  # fmt: skip
    items = [{"image": str(p.image), "label": str(p.label)} for p in train_pairs]
    val_items = [{"image": str(p.image), "label": str(p.label)} for p in val_pairs]
    loader = DataLoader(CacheDataset(items, train_tf, progress=False), batch_size=2, shuffle=True)
    val_ds = CacheDataset(val_items, Compose(base), progress=False)
    net = UNet(3, 1, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    budget = 60 * minutes
    began, best, best_state, epochs = time.monotonic(), -1.0, None, 0
    validated = began
    while time.monotonic() - began < budget:
        net.train()
        for batch in loader:
            optimizer.zero_grad()
            loss_fn(net(batch["image"]), batch["label"]).backward()
            optimizer.step()
        epochs += 1
        last = time.monotonic() - began >= budget
        if last or time.monotonic() - validated >= budget / 10:
            validated = time.monotonic()
            net.eval()
            metric = DiceMetric(include_background=False)
            with torch.no_grad():
                for item in val_ds:
                    logits = sliding_window_inference(item["image"][None], patch, 4, net)
                    pred = logits.argmax(1, keepdim=True)
                    metric(one_hot(pred, 3), one_hot(item["label"][None].long(), 3))
            score = float(metric.aggregate().mean())
            if score > best:
                best = score
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    net.eval()
    scores = []
    with torch.no_grad():
        for pair in test_pairs:
            item = Compose(base)({"image": str(pair.image), "label": str(pair.label)})
            logits = sliding_window_inference(item["image"][None], patch, 4, net)
            pred = logits.argmax(1)[0].numpy()
            label = np.asarray(nib.load(pair.label).dataobj)
            spacing = tuple(float(z) for z in nib.load(pair.label).header.get_zooms()[:3])
            scores.append(score_case(pred, label, spacing=spacing, num_classes=3))
    per_class = [float(np.mean([s[f"dice_{c}"] for s in scores])) for c in (1, 2)]
    return {
        "mean_dice": float(np.mean(per_class)),
        "mean_dice_1": per_class[0],
        "mean_dice_2": per_class[1],
        "best_val_dice": best,
        "epochs": epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-minutes", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--test-count", type=int, default=5)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-seg3d", action="store_true")
    parser.add_argument(
        "--seg3d-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a -P value for seg3d (an override of its plan; for experiments)",
    )
    args = parser.parse_args()

    from seg3d.anatomy import make_anatomy

    with tempfile.TemporaryDirectory(prefix="seg3d-quality-") as tmp:
        work = Path(tmp)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        data = make_anatomy(work / "data", variant="mri", count=args.count,
                            test_count=args.test_count, spacing=args.spacing)  # fmt: skip
        extra = args.seg3d_param
        seg3d = None if args.skip_seg3d else run_seg3d(data, args.max_minutes, work, extra)
        print(json.dumps({"seg3d": seg3d}), file=sys.stderr, flush=True)
        plain = None if args.skip_baseline else run_plain_monai(data, args.max_minutes)
    emit({
        "benchmark": "seg3d_quality",
        "data": f"mni-anatomy mri {args.spacing:g} mm, {args.count} train, {args.test_count} test",
        "max_minutes": args.max_minutes,
        "seg3d_params": args.seg3d_param,
        "seg3d": seg3d,
        "plain_monai": plain,
        "target_dice": TARGET_DICE,
        "met": None
        if seg3d is None
        else seg3d["mean_dice"] >= TARGET_DICE
        and (plain is None or seg3d["mean_dice"] > plain["mean_dice"]),
        "machine": machine(),
        "versions": versions("torch", "monai", "mlflow"),
    })  # fmt: skip


if __name__ == "__main__":
    main()

"""The quickstart project: NIfTI in, a tiny voxel classifier, Dice out, all in one MLflow run.

Small on purpose (seconds on a laptop CPU) but real: volumes are NIfTI files with an affine,
loaded and normalised by a MONAI transform chain, the model is trained by gradient descent,
validation cases are held out, and the metric is the Dice overlap that the segmentation
project uses too. ``mlpipe.log`` records the dataset (with its content digest), the
preprocessing, a data profile, the metrics and an overlay picture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd

import mlpipe.log as mlog


def synthesize(out_dir: Path, count: int, size: int, seed: int) -> Path:
    """Noisy volumes with one bright ellipsoid each, in the Decathlon layout."""
    rng = np.random.default_rng(seed)
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    grid = np.indices((size, size, size)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for case in range(count):
        centre = rng.uniform(0.35, 0.65, 3)[:, None, None, None] * size
        radii = rng.uniform(0.12, 0.25, 3)[:, None, None, None] * size
        label = (((grid - centre) / radii) ** 2).sum(0) <= 1.0
        image = rng.normal(0.0, 0.6, label.shape) + 1.2 * label
        name = f"case_{case:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), out_dir / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), out_dir / "labelsTr" / name)
    meta = {
        "name": "quickstart-synthetic",
        "version": f"seed{seed}-n{count}-s{size}",
        "training": count,
    }
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def features(image: np.ndarray, smooth: bool) -> np.ndarray:
    """Intensity and, with ``smooth``, the 6-neighbour mean: a 3D context feature."""
    feats = [image]
    if smooth:
        padded = np.pad(image, 1, mode="edge")
        neigh = sum(
            np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1] for axis in range(3) for shift in (-1, 1)
        )
        feats.append(neigh / 6.0)
    return np.stack([f.ravel() for f in feats], axis=1)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * inter / total)


def load_cases(pairs, transform: Compose) -> list[tuple[str, np.ndarray, np.ndarray]]:
    cases = []
    for pair in pairs:
        item = transform({"image": str(pair.image), "label": str(pair.label)})
        cases.append((pair.case, item["image"][0].numpy(), item["label"][0].numpy() > 0))
    return cases


def default_dataset(seed: int) -> Path:
    """The built-in synthetic volumes, written once per seed into mlpipe's cache folder.

    Written once and reused, so repeated runs log the same dataset digest and the UI shows
    them as runs on one dataset version.
    """
    from mlpipe.data.dataset import default_cache_path

    out_dir = default_cache_path().parent / "datasets" / f"quickstart-seed{seed}"
    if not (out_dir / "dataset.json").is_file():
        synthesize(out_dir, 8, 32, seed)
        print(f"no data_dir: synthesized 8 volumes into {out_dir}", flush=True)
    return out_dir


def preprocessing() -> Compose:
    """Load, channel-first, zero-mean unit-variance intensities: logged and rebuildable."""
    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            NormalizeIntensityd(keys="image"),
        ]
    )


def train(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir) if args.data_dir else default_dataset(args.seed)
    transform = preprocessing()
    data = mlog.dataset(data_dir)  # name, version, content digest; refuses a broken dataset
    mlog.preprocessing(transform, name="train")
    mlog.data_profile(data)
    mlog.params({"model": "voxel-logistic", "features": "intensity,neighbour-mean"})
    cases = load_cases([p for p in data.pairs if p.split == "train"], transform)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(cases))
    n_val = max(1, round(args.val_fraction * len(cases)))
    val = [cases[i] for i in order[:n_val]]
    train_cases = [cases[i] for i in order[n_val:]]
    x = np.concatenate([features(img, args.smooth) for _, img, _ in train_cases])
    y = np.concatenate([lab.ravel() for _, _, lab in train_cases]).astype(np.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    w, b = np.zeros(x.shape[1]), 0.0
    pos_weight = (1 - y.mean()) / max(y.mean(), 1e-6)  # the foreground is small: balance it
    for epoch in range(args.epochs):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        weight = np.where(y > 0, pos_weight, 1.0)
        loss = float(np.mean(-weight * (y * np.log(p + 1e-7) + (1 - y) * np.log(1 - p + 1e-7))))
        grad = weight * (p - y) / len(y)
        w -= args.lr * (x.T @ grad)
        b -= args.lr * float(grad.sum())
        scores = []
        for _, img, lab in val:
            logits = ((features(img, args.smooth) - mean) / std) @ w + b
            scores.append(dice(logits.reshape(lab.shape) > 0, lab))
        val_dice = float(np.mean(scores))
        mlog.metrics({"train_loss": loss, "val_dice": val_dice}, step=epoch)
        print(
            f"epoch {epoch + 1}/{args.epochs} train_loss={loss:.4f} val_dice={val_dice:.4f}",
            flush=True,
        )
    _, img, lab = val[0]
    pred = (((features(img, args.smooth) - mean) / std) @ w + b).reshape(lab.shape) > 0
    spacing = nib.load(data.pairs[0].image).header.get_zooms()[:3]
    mlog.overlay(img, label=lab, prediction=pred, step=args.epochs, name="val", spacing=spacing)
    weights = {
        "w": w.tolist(),
        "b": b,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "smooth": args.smooth,
    }
    mlflow.log_dict(weights, "model/weights.json")
    mlog.flush()


def evaluate(args: argparse.Namespace) -> None:
    model = json.loads(Path(args.weights).read_text())
    w, b = np.array(model["w"]), model["b"]
    mean, std = np.array(model["mean"]), np.array(model["std"])
    data = mlog.dataset(args.data_dir, context="test")
    scores = []
    for _, img, lab in load_cases(data.pairs, preprocessing()):
        logits = ((features(img, model["smooth"]) - mean) / std) @ w + b
        scores.append(dice(logits.reshape(lab.shape) > 0, lab))
    mlog.metrics({"test_dice": float(np.mean(scores))})
    mlog.flush()
    print(f"test_dice={np.mean(scores):.4f} over {len(scores)} cases")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("synthesize")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train")
    p.add_argument("--data-dir", default="")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--smooth", type=lambda s: s.lower() in ("true", "1", "yes"), default=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("evaluate")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--weights", required=True)
    args = parser.parse_args(argv)
    if args.step == "synthesize":
        print(f"wrote {synthesize(args.out_dir, args.count, args.size, args.seed)}")
    elif args.step == "train":
        train(args)
    else:
        evaluate(args)


if __name__ == "__main__":
    main(sys.argv[1:])

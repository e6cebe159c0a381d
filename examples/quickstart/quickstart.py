"""The quickstart project: NIfTI in, a tiny voxel classifier, Dice out, all in one MLflow run.

Small on purpose (seconds on a laptop CPU) but real: volumes are NIfTI files with an affine,
the model is trained by gradient descent, validation cases are held out, and the metric is
the Dice overlap that the segmentation project uses too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np


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


def load_cases(data_dir: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    cases = []
    for image_path in sorted((data_dir / "imagesTr").glob("*.nii*")):
        label_path = data_dir / "labelsTr" / image_path.name
        image = np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(label_path).dataobj) > 0
        cases.append((image_path.name, image, label))
    if not cases:
        raise SystemExit(f"no volumes in {data_dir}/imagesTr")
    return cases


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Middle axial slice: grey image, truth in green, prediction in red."""
    z = image.shape[2] // 2
    grey = image[:, :, z]
    grey = (255 * (grey - grey.min()) / (np.ptp(grey) or 1.0)).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    rgb[truth[:, :, z], 1] = 255
    rgb[pred[:, :, z], 0] = 255
    return np.kron(rgb, np.ones((4, 4, 1), dtype=np.uint8))


def train(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir is None:
        data_dir = synthesize(Path(tempfile.mkdtemp(prefix="quickstart-")), 8, 32, args.seed)
        print(f"no data_dir: synthesized 8 volumes into {data_dir}", flush=True)
    cases = load_cases(data_dir)
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
    with mlflow.start_run():
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
            mlflow.log_metrics({"train_loss": loss, "val_dice": val_dice}, step=epoch)
            print(
                f"epoch {epoch + 1}/{args.epochs} train_loss={loss:.4f} val_dice={val_dice:.4f}",
                flush=True,
            )
        _, img, lab = val[0]
        pred = (((features(img, args.smooth) - mean) / std) @ w + b).reshape(lab.shape) > 0
        mlflow.log_image(overlay(img, lab, pred), "overlays/val_case.png")
        weights = {
            "w": w.tolist(),
            "b": b,
            "mean": mean.tolist(),
            "std": std.tolist(),
            "smooth": args.smooth,
        }
        mlflow.log_dict(weights, "model/weights.json")


def evaluate(args: argparse.Namespace) -> None:
    model = json.loads(Path(args.weights).read_text())
    w, b = np.array(model["w"]), model["b"]
    mean, std = np.array(model["mean"]), np.array(model["std"])
    with mlflow.start_run():
        scores = []
        for _, img, lab in load_cases(Path(args.data_dir)):
            logits = ((features(img, model["smooth"]) - mean) / std) @ w + b
            scores.append(dice(logits.reshape(lab.shape) > 0, lab))
        mlflow.log_metric("test_dice", float(np.mean(scores)))
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
    p.add_argument("--lr", type=float, default=0.5)
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

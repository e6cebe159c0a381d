"""{{project_name}}: entry points of an mlpipe project (convention 1).

`mlpipe run .` starts a run and hands it over through MLFLOW_RUN_ID, so `mlflow.start_run()`
below continues that run: parameters are already logged, tags say which commit, data and
entry point it was. Replace the toy model with yours; keep the metric names of the
MLproject's mlpipe: section (primary_metric) so promotion can compare versions.
"""

from __future__ import annotations

import argparse
import sys

import mlflow
import numpy as np


def load_data(data_dir: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Your data loading goes here; without a data_dir, a synthetic regression problem."""
    if data_dir:
        table = np.loadtxt(data_dir, delimiter=",", skiprows=1)
        return table[:, :-1], table[:, -1]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(512, 4))
    y = x @ np.array([1.5, -2.0, 0.5, 0.0]) + 0.1 * rng.normal(size=512)
    return x, y


def train(args: argparse.Namespace) -> None:
    x, y = load_data(args.data_dir, args.seed)
    split = int(0.8 * len(x))
    weights = np.zeros(x.shape[1])
    with mlflow.start_run():
        for epoch in range(args.epochs):
            grad = x[:split].T @ (x[:split] @ weights - y[:split]) / split
            weights -= args.lr * grad
            train_loss = float(np.mean((x[:split] @ weights - y[:split]) ** 2))
            val_loss = float(np.mean((x[split:] @ weights - y[split:]) ** 2))
            mlflow.log_metrics({"train_loss": train_loss, "val_loss": val_loss}, step=epoch)
            print(
                f"epoch {epoch + 1}/{args.epochs} train_loss={train_loss:.4f} "
                f"val_loss={val_loss:.4f}",
                flush=True,
            )
        np.save("weights.npy", weights)
        mlflow.log_artifact("weights.npy")


def preprocess(args: argparse.Namespace) -> None:
    with mlflow.start_run():
        print(f"nothing to preprocess yet; would write {args.out_dir}")


def evaluate(args: argparse.Namespace) -> None:
    with mlflow.start_run():
        print(f"evaluate the model of run {args.run_id} here")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("train")
    p.add_argument("--data-dir", default="")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("preprocess")
    p.add_argument("--data-dir", default="")
    p.add_argument("--out-dir", default="prepared")
    p = sub.add_parser("evaluate")
    p.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    {"train": train, "preprocess": preprocess, "evaluate": evaluate}[args.step](args)


if __name__ == "__main__":
    main(sys.argv[1:])

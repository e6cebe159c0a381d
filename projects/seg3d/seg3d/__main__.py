"""``python -m seg3d <step>``: the commands the MLproject's entry points run.

Parses and delegates; bad input (a parameter or a dataset file) prints one ``Error:`` line
naming the fix and exits 2, before any training starts.
"""

from __future__ import annotations

import argparse
import sys

from seg3d.config import Seg3dInputError, TrainConfig, pair, triple


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _train_args(parser: argparse.ArgumentParser) -> None:
    # Empty or 0 means "from the plan" (seg3d.plan): only what the user gives overrides it.
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--dataset-version", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--patch-size", default="")
    parser.add_argument("--spacing", default="")
    parser.add_argument("--modality", default="")
    parser.add_argument("--window", default="")
    parser.add_argument("--num-classes", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--val-every", type=int, default=-1)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--cache-rate", type=float, default=1.0)
    parser.add_argument("--amp", type=_bool, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=0.0)
    parser.add_argument("--checkpoint-every-s", type=float, default=30.0)
    parser.add_argument("--resume-from", default="")
    parser.add_argument("--register", type=_bool, default=False)
    parser.add_argument("--nproc", type=int, default=1)


def config_from(args: argparse.Namespace) -> TrainConfig:
    """The checked config; settings left empty (or 0) are listed in ``auto`` for the plan."""
    given: dict = {}
    given["model"] = args.model or "dynunet"  # the plan's network; refined by the plan
    if args.epochs:
        given["epochs"] = args.epochs
    if args.batch_size:
        given["batch_size"] = args.batch_size
    if str(args.patch_size).strip():
        given["patch_size"] = triple(args.patch_size, "patch_size", int)
    if str(args.spacing).strip():
        given["spacing"] = triple(args.spacing, "spacing")
    if args.modality:
        given["modality"] = args.modality
    if str(args.window).strip():
        given["window"] = pair(args.window, "window")
    if args.num_classes:
        given["num_classes"] = args.num_classes
    if args.lr:
        given["lr"] = args.lr
    if args.val_every >= 0:
        given["val_every"] = args.val_every
    from seg3d.planning import USER_FIELDS

    config = TrainConfig(
        data_dir=args.data_dir,
        dataset_version=args.dataset_version,
        **given,
        auto=[k for k in USER_FIELDS if k not in given or (k == "model" and not args.model)],
        val_fraction=args.val_fraction,
        cache_rate=args.cache_rate,
        amp=args.amp,
        seed=args.seed,
        max_minutes=args.max_minutes,
        checkpoint_every_s=args.checkpoint_every_s,
        resume_from=args.resume_from,
        register=args.register,
        nproc=args.nproc,
    )
    config.check()
    return config


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m seg3d", description=__doc__)
    sub = top.add_subparsers(dest="step", required=True)
    p = sub.add_parser("synthesize", help="write the synthetic Decathlon-layout dataset")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--count", type=int, default=12)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("preprocess", help="RAS, target spacing, intensity, foreground crop")
    p.add_argument("--data-dir", default="")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--spacing", default="1.5,1.5,2.0")
    p.add_argument("--modality", default="ct")
    p.add_argument("--window", default="-175,250")
    _train_args(sub.add_parser("train", help="train (and optionally register) a model"))
    _train_args(sub.add_parser("main", help="train, evaluate on the test split, register"))
    _train_args(sub.add_parser("check", help="train's checks and plan, no run (pre-flight)"))
    p = sub.add_parser("plan", help="fingerprint the dataset and print the training plan")
    p.add_argument("--data-dir", default="")
    p.add_argument("--max-minutes", type=float, default=0.0)
    p = sub.add_parser("evaluate", help="per-case Dice, HD95 and volume error on imagesTs")
    p.add_argument("--model-uri", required=True)
    p.add_argument("--data-dir", default="")
    p.add_argument("--num-classes", type=int, default=0, help="0: the model's own")
    return top


def main(argv: list[str] | None = None) -> int:
    from mlpipe.core.errors import UsageError

    args = parser().parse_args(argv)
    try:
        if args.step == "synthesize":
            from seg3d.synthesize import synthesize

            out = synthesize(args.out_dir, args.count, args.size, args.num_classes, args.seed)
            print(f"wrote {out}")
        elif args.step == "preprocess":
            from seg3d.preprocess import preprocess

            preprocess(
                args.data_dir,
                args.out_dir,
                spacing=triple(args.spacing, "spacing"),
                modality=args.modality,
                window=pair(args.window, "window"),
            )
        elif args.step in ("train", "main"):
            from seg3d.train import train_entry

            train_entry(config_from(args), evaluate_after=args.step == "main")
        elif args.step == "check":
            from seg3d.prepare import check_entry

            check_entry(config_from(args))
        elif args.step == "plan":
            from seg3d.planning import plan_entry

            plan_entry(args.data_dir, args.max_minutes)
        else:
            from seg3d.evaluate import evaluate

            evaluate(args.model_uri, args.data_dir, num_classes=args.num_classes or None)
    except (Seg3dInputError, UsageError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

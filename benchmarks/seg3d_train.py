"""seg3d training speed, and what mlpipe's logging costs the training loop.

Trains the seg3d project in this process on its synthetic volumes, alternating round by round
between logging on (every ``mlpipe.log`` call a real run makes, to a SQLite store in a
temporary folder: metrics, overlays, checkpoints logged as artifacts when written) and logging
off (the same loop, no tracking at all). The ratio is of the epoch loop's wall time (training,
validation, logging, checkpoints); set-up (hashing, caching) and the final model logging are
reported apart. Also: samples/s, seconds per epoch, the share of the epoch spent waiting for
data, peak GPU memory, and the time until ``val_dice`` first reaches ``--target-dice``.
Target: logging on / off at most 1.03.
Run: ``python benchmarks/seg3d_train.py [--count 16 --size 64 --patch 48 --epochs 5 --repeats 3]``;
on a GPU: ``--count 32 --size 128 --patch 96 --epochs 40 --batch-size 2 --repeats 1``.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--model", default="unet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target-dice", type=float, default=0.9)
    parser.add_argument("--amp", default="true")
    args = parser.parse_args()

    import mlflow
    import torch

    from seg3d.config import TrainConfig
    from seg3d.synthesize import synthesize
    from seg3d.train import train

    with tempfile.TemporaryDirectory(prefix="seg3d-bench-") as tmp:
        os.environ["MLPIPE_CACHE_DIR"] = str(Path(tmp) / "cache")
        began = time.perf_counter()
        data = synthesize(Path(tmp) / "data", args.count, args.size, 3, 0)
        synth_s = time.perf_counter() - began
        config = TrainConfig(
            data_dir=str(data),
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            patch_size=(args.patch,) * 3,
            amp=args.amp.lower() == "true",
        )
        config.check()
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlruns.db")
        # artifacts in the temporary folder too (a SQLite store defaults to ./mlruns)
        mlflow.set_experiment(
            experiment_id=mlflow.create_experiment("seg3d-bench", artifact_location=f"{tmp}/art")
        )
        loops: dict[str, list[float]] = {"logging on": [], "logging off": []}
        total: dict[str, list[float]] = {"logging on": [], "logging off": []}
        last = None
        for _ in range(args.repeats):
            for name, log in (("logging on", True), ("logging off", False)):
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                began = time.perf_counter()
                if log:
                    with mlflow.start_run():
                        result = train(config, log=True)
                else:
                    result = train(config, log=False)
                total[name].append(time.perf_counter() - began)
                loops[name].append(result.loop_seconds)
                last = result if not log else last or result
        history = last.history
        epochs = [h["epoch_seconds"] for h in history]
        reached = next(
            (sum(epochs[: i + 1]) for i, h in enumerate(history)
             if h.get("val_dice", 0) >= args.target_dice),
            None,
        )  # fmt: skip
        on, off = median(loops["logging on"]), median(loops["logging off"])
        emit(
            {
                "name": "seg3d_train",
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "volumes": args.count,
                "size": args.size,
                "patch": args.patch,
                "model": args.model,
                "epochs": args.epochs,
                "repeats": args.repeats,
                "median_loop_s": {"logging on": round(on, 3), "logging off": round(off, 3)},
                "median_total_s": {k: round(median(v), 3) for k, v in total.items()},
                "ratio": {"logging on / off (epoch loop)": round(on / off, 3)},
                "target": "at most 1.03",
                "met": on / off <= 1.03,
                "summary": summary(
                    f"logging on {on:.2f} s ({args.epochs} epochs, {args.count} x {args.size}^3)",
                    f"logging off {off:.2f} s",
                    on / off,
                    "<= 1.03",
                    on / off <= 1.03,
                ),
                "samples_per_s": round(median([h["samples_per_s"] for h in history]), 2),
                "epoch_s": round(median(epochs), 3),
                "data_loading_share": round(median([h["data_loading_share"] for h in history]), 3),
                "gpu_memory_peak_gb": round(
                    max(h.get("gpu_memory_peak_gb", 0) for h in history), 2
                ),
                "best_val_dice": round(last.best_val_dice, 4),
                f"seconds_to_val_dice_{args.target_dice}": reached and round(reached, 1),
                "synthesize_s": round(synth_s, 2),
                "versions": versions("mlpipe", "mlflow", "torch", "monai"),
                "machine": machine(),
            }
        )


if __name__ == "__main__":
    main()

"""CLI start-up: `mlpipe --help` and `mlpipe run --help` against `mlflow --help`.

Each is a fresh interpreter started through its console script, as a user types it; the three
are timed round by round (interleaved) and the medians compared. Target: mlpipe at most 0.15
of mlflow. Run: `python benchmarks/cli_startup.py [--repeats N]`.
"""

from __future__ import annotations

import argparse

from _common import bin_path, emit, machine, median, summary, time_commands, versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    commands = {
        "mlpipe --help": [bin_path("mlpipe"), "--help"],
        "mlpipe run --help": [bin_path("mlpipe"), "run", "--help"],
        "mlflow --help": [bin_path("mlflow"), "--help"],
    }
    times = time_commands(commands, repeats=args.repeats)
    medians = {name: median(t) for name, t in times.items()}
    base = medians["mlflow --help"]
    worst = max(medians["mlpipe --help"], medians["mlpipe run --help"]) / base
    emit(
        {
            "name": "cli_startup",
            "repeats": args.repeats,
            "median_s": {k: round(v, 4) for k, v in medians.items()},
            "ratio": {
                "mlpipe --help / mlflow --help": round(medians["mlpipe --help"] / base, 4),
                "mlpipe run --help / mlflow --help": round(medians["mlpipe run --help"] / base, 4),
            },
            "target": "ratio <= 0.15",
            "met": worst <= 0.15,
            "summary": summary(
                f"mlpipe --help {medians['mlpipe --help']:.3f} s; "
                f"mlpipe run --help {medians['mlpipe run --help']:.3f} s",
                f"mlflow --help {base:.2f} s",
                worst,
                "<= 0.15",
                worst <= 0.15,
            ),
            "versions": versions("mlpipe", "mlflow", "click"),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()

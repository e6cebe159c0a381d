"""Run overhead: `mlpipe run` of a trivial project against `mlflow run` of the same project.

Both use `--env-manager local` and a fresh SQLite store per command in a temporary folder;
the project's command is `python -c pass`, so the figure is the launcher's own cost (import,
checks, run creation, process start, status update). Target: ratio at most 1.10.
Run: `python benchmarks/run_overhead.py [--repeats N]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import bin_path, emit, machine, median, summary, time_commands, versions

MLPROJECT = """name: trivial
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.5}
    command: "python -c pass {alpha}"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-") as tmp:
        project = Path(tmp) / "trivial"
        project.mkdir()
        (project / "MLproject").write_text(MLPROJECT)
        db = f"sqlite:///{Path(tmp) / 'bench.db'}"
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": db,
            "PATH": os.path.dirname(bin_path("x")) + os.pathsep + os.environ.get("PATH", ""),
        }
        common = [str(project), "-P", "alpha=0.25", "--env-manager", "local"]
        commands = {
            "mlpipe run": [bin_path("mlpipe"), "run", *common],
            "mlflow run": [bin_path("mlflow"), "run", *common],
        }
        times = time_commands(commands, repeats=args.repeats, cwd=tmp, env=env)
    medians = {name: median(t) for name, t in times.items()}
    ratio = medians["mlpipe run"] / medians["mlflow run"]
    emit(
        {
            "name": "run_overhead",
            "repeats": args.repeats,
            "median_s": {k: round(v, 3) for k, v in medians.items()},
            "ratio": {
                "mlpipe run / mlflow run": round(medians["mlpipe run"] / medians["mlflow run"], 3)
            },
            "target": "ratio <= 1.10",
            "met": ratio <= 1.10,
            "summary": summary(
                f"mlpipe run {medians['mlpipe run']:.2f} s",
                f"mlflow run {medians['mlflow run']:.2f} s (--env-manager local)",
                ratio,
                "<= 1.10",
                ratio <= 1.10,
            ),
            "versions": versions("mlpipe", "mlflow"),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()

"""Sweep overhead: `mlpipe sweep` of N trials against N sequential `mlpipe run`s of a project.

Two cases, each with `--env-manager local` and a fresh SQLite tracking store (and the sweep's
default SQLite study beside it) per measurement, in a temporary folder:

- trivial: the project only logs its metric (`python -c "import mlflow; mlflow.log_metric(...)"`),
  so the figure is the sweep's own cost per trial (study, sampler, child run tags, metric
  polling); `--parallel 1`, no pruner. Target: sweep / sequential at most 1.10.
- sleeping: the project sleeps `--sleep` seconds, then logs its metric; `--parallel 2` on two
  cores. Target: sweep / sequential at most 0.60.

The sequential baseline is what a researcher does without mlpipe sweep: a shell loop of
`mlpipe run -P alpha=<value>`. Run: `python benchmarks/sweep_overhead.py [--trials N]
[--sleep S] [--repeats R]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from _common import bin_path, emit, machine, median, summary, versions

BODY = "import time, mlflow; time.sleep({sleep}); mlflow.log_metric('score', {{alpha}})"
MLPROJECT = (
    "name: {name}\n"
    "entry_points:\n"
    "  main:\n"
    "    parameters:\n"
    "      alpha: {{type: float, default: 0.5}}\n"
    '    command: "python -c \\"' + BODY + '\\""\n'
)


def _project(root: Path, name: str, sleep: float) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "MLproject").write_text(MLPROJECT.format(name=name, sleep=sleep))
    return folder


def _env(db_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{db_dir / 'bench.db'}",
        "PATH": os.path.dirname(bin_path("x")) + os.pathsep + os.environ.get("PATH", ""),
    }


def _timed(cmds: list[list[str]], cwd: Path) -> float:
    began = time.perf_counter()
    for cmd in cmds:
        subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, check=True)
    return time.perf_counter() - began


def _case(root: Path, project: Path, trials: int, parallel: int, repeats: int) -> dict[str, float]:
    """Median wall time of the sweep and of the sequential runs, each in a fresh folder."""
    sweep_times, seq_times = [], []
    for i in range(repeats):
        seq_dir = root / f"{project.name}-seq-{i}"
        seq_dir.mkdir()
        values = [0.1 + 0.8 * k / max(trials - 1, 1) for k in range(trials)]
        runs = [
            [
                bin_path("mlpipe"),
                "run",
                str(project),
                "-P",
                f"alpha={v:.4f}",
                "--env-manager",
                "local",
            ]
            for v in values
        ]
        seq_times.append(_timed(runs, seq_dir))
        sweep_dir = root / f"{project.name}-sweep-{i}"
        sweep_dir.mkdir()
        sweep = [
            bin_path("mlpipe"),
            "sweep",
            str(project),
            "--space",
            "alpha=uniform(0.1,0.9)",
            "--trials",
            str(trials),
            "--parallel",
            str(parallel),
            "--metric",
            "score",
            "--goal",
            "max",
            "--pruner",
            "none",
            "--study",
            "bench",
        ]
        sweep_times.append(_timed([sweep], sweep_dir))
    return {"sweep": median(sweep_times), "sequential": median(seq_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-sweep-") as tmp:
        root = Path(tmp)
        trivial = _case(root, _project(root, "trivial", 0), args.trials, 1, args.repeats)
        sleeping = _case(root, _project(root, "sleeping", args.sleep), args.trials, 2, args.repeats)
    r1 = trivial["sweep"] / trivial["sequential"]
    r2 = sleeping["sweep"] / sleeping["sequential"]
    met = r1 <= 1.10 and r2 <= 0.60
    emit(
        {
            "name": "sweep_overhead",
            "trials": args.trials,
            "sleep_s": args.sleep,
            "repeats": args.repeats,
            "median_s": {
                "trivial sweep --parallel 1": round(trivial["sweep"], 2),
                "trivial sequential mlpipe run": round(trivial["sequential"], 2),
                "sleeping sweep --parallel 2": round(sleeping["sweep"], 2),
                "sleeping sequential mlpipe run": round(sleeping["sequential"], 2),
            },
            "ratio": {
                "trivial sweep / sequential": round(r1, 3),
                "sleeping sweep --parallel 2 / sequential": round(r2, 3),
            },
            "target": "trivial <= 1.10 at --parallel 1; sleeping <= 0.60 at --parallel 2",
            "met": met,
            "summary": summary(
                f"sweep {trivial['sweep']:.1f} s (--parallel 1); sleeping --parallel 2: "
                f"{sleeping['sweep']:.1f} s, ratio {r2:.2f}",
                f"{args.trials} x mlpipe run {trivial['sequential']:.1f} s; sleeping "
                f"{sleeping['sequential']:.1f} s",
                r1,
                "<= 1.10 (sleeping <= 0.60)",
                met,
            ),
            "versions": versions("mlpipe", "mlflow", "optuna"),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()

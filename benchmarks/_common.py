"""Shared bits of the benchmarks: timing commands side by side, one JSON line per result."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata


def time_commands(
    commands: dict[str, Sequence[str]], repeats: int, warmup: int = 1, **kwargs
) -> dict[str, list[float]]:
    """Wall time of each command, interleaved round by round so drift hits all alike."""
    for _ in range(warmup):
        for cmd in commands.values():
            subprocess.run(cmd, capture_output=True, check=True, **kwargs)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            began = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True, **kwargs)
            times[name].append(time.perf_counter() - began)
    return times


def machine() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def summary(mlpipe: str, baseline: str, ratio: float, target: str, met: bool) -> dict[str, object]:
    """The row ``benchmarks/run_all.py`` puts in the summary table: figures as people read them."""
    return {
        "mlpipe": mlpipe,
        "baseline": baseline,
        "ratio": round(ratio, 4),
        "target": target,
        "met": bool(met),
    }


def emit(result: dict[str, object]) -> None:
    print(json.dumps(result), flush=True)


def bin_path(name: str) -> str:
    """A console script of the running interpreter's environment."""
    return os.path.join(os.path.dirname(sys.executable), name)

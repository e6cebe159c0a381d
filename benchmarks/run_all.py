"""`make bench`: every benchmark in ``benchmarks/``, each beside its baseline, and one table.

Each benchmark runs in its own process (so one's imports, threads and servers cannot colour the
next) with settings sized for this 2-core machine: all of them together take well under 15
minutes. Each prints one JSON line (name, figures, ratio, target, versions, machine) and a
``summary`` row; this script collects the lines into ``<out>/results.jsonl``, writes the table
to ``<out>/summary.md`` and prints it. A benchmark that crashes or overruns its time is a row
that says so, its output is kept in ``<out>/<name>.log``, and the exit code is 1; a missed target
is shown in the table and, with ``--strict``, also exits 1.

Run: ``python benchmarks/run_all.py [--only NAME ...] [--out bench-results] [--strict]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHMARKS: list[tuple[str, list[str], int]] = [
    # (script, arguments for this machine, time limit in seconds)
    ("cli_startup", ["--repeats", "10"], 180),
    ("run_overhead", ["--repeats", "5"], 240),
    ("sweep_overhead", ["--trials", "10", "--sleep", "5"], 600),
    ("metrics_logging", [], 240),
    ("dataset_digest", ["--repeats", "5"], 180),
    ("seg3d_train", ["--repeats", "5"], 420),
    (
        "seg3d_vs_monai",
        ["--count", "8", "--size", "48", "--patch", "32", "--epochs", "6", "--repeats", "2"],
        300,
    ),
    ("artifact_upload", ["--size-mb", "200", "--repeats", "5"], 300),
    ("serving", ["--requests", "200", "--concurrency", "8"], 300),
    ("dicom_io", ["--repeats", "5"], 420),
    # the 50 volumes of 96^3 take ~15 min here: `make bench` runs a smaller batch
    ("predict_throughput", ["--count", "16", "--size", "64", "--repeats", "1"], 600),
    # the 100 cases of 128^3: a smaller set here keeps `make bench` short
    ("seg3d_plan_time", ["--count", "40", "--size", "96"], 300),
]
"""Sized for the 2-core development machine. On a GPU, ``benchmarks/gpu.sh`` runs the large one."""

MANUAL: dict[str, str] = {
    "seg3d_quality": "python benchmarks/seg3d_quality.py --max-minutes 10 (about 25 minutes: "
    "seg3d and a plain MONAI recipe, each trained for the budget)",
    "seg3d_step_cost": "python benchmarks/seg3d_step_cost.py (about 2 minutes on 2 CPU cores: "
    "the cost of one training step per network and patch)",
}
"""Benchmarks too long for ``make bench``, run by hand with the command given."""


def run_one(name: str, args: list[str], limit: int, out: Path) -> dict:
    """Run one benchmark; its last JSON line, or a row saying why there is none.

    It runs in an empty temporary folder, so nothing it writes by relative path (MLflow's
    default ``./mlruns`` artifact folder, for one) lands in the repository.
    """
    import tempfile

    log = out / f"{name}.log"
    began = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as cwd:
            proc = subprocess.run(
                [sys.executable, str(HERE / f"{name}.py"), *args],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=limit,
            )
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = _text(exc.stdout)
        stderr = _text(exc.stderr) + f"\n[run_all] stopped after {limit} s\n"
        rc = None
    seconds = time.perf_counter() - began
    log.write_text(f"$ {name}.py {' '.join(args)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    result = _last_json(stdout)
    if rc != 0 or result is None:
        why = "timed out" if rc is None else f"exit {rc}" if rc else "printed no JSON line"
        return {"name": name, "error": f"{why}; see {log}", "seconds": round(seconds, 1)}
    result["seconds"] = round(seconds, 1)
    result["arguments"] = args
    return result


def table(results: list[dict]) -> str:
    rows = [
        "| benchmark | mlpipe | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | FAILED: {r['error']} | | | | no |")
            continue
        s = r.get("summary") or {}
        met = s.get("met", r.get("met"))
        rows.append(
            f"| {r['name']} | {s.get('mlpipe', '?')} | {s.get('baseline', '?')} | "
            f"{s.get('ratio', '?')} | {s.get('target', r.get('target', '?'))} | "
            f"{'yes' if met else 'NO'} |"
        )
    return "\n".join(rows)


def header(results: list[dict]) -> str:
    first = next((r for r in results if "machine" in r), {})
    m = first.get("machine", {})
    versions: dict[str, str] = {}
    for r in results:
        versions.update(r.get("versions", {}))
    return (
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Machine: {m.get('cpus', '?')} CPUs, {m.get('processor', '?')}, "
        f"{m.get('platform', '?')}, Python {m.get('python', '?')}.\n"
        f"Versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}.\n"
        f"Command: `make bench` (`python benchmarks/run_all.py`)."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="Run only these benchmarks.")
    parser.add_argument("--out", default="bench-results", help="Folder for results and logs.")
    parser.add_argument("--strict", action="store_true", help="Exit 1 when a target is missed.")
    args = parser.parse_args()
    known = [name for name, _, _ in BENCHMARKS]
    unknown = sorted(set(args.only or []) - set(known))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [b for b in BENCHMARKS if not args.only or b[0] in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    began = time.perf_counter()
    for i, (name, bench_args, limit) in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {name} ...", file=sys.stderr, flush=True)
        result = run_one(name, bench_args, limit, out)
        results.append(result)
        line = json.dumps(result)
        print(line, flush=True)
        state = result.get("error") or f"ratio {result.get('summary', {}).get('ratio')}"
        print(f"[{i}/{len(chosen)}] {name}: {state} ({result['seconds']} s)", file=sys.stderr)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    text = f"{header(results)}\n\n{table(results)}\n"
    (out / "summary.md").write_text(text)
    print(f"\n{text}\nAll benchmarks: {time.perf_counter() - began:.0f} s. Written to {out}/.")
    failed = [r["name"] for r in results if "error" in r]
    missed = [r["name"] for r in results if "error" not in r and not _met(r)]
    if failed:
        print(f"Failed: {', '.join(failed)}", file=sys.stderr)
    if missed:
        print(f"Target missed: {', '.join(missed)} (see BENCHMARKS.md)", file=sys.stderr)
    return 1 if failed or (args.strict and missed) else 0


def _met(result: dict) -> bool:
    return bool(result.get("summary", {}).get("met", result.get("met", True)))


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


if __name__ == "__main__":
    sys.exit(main())

"""Serving under load: `mlpipe serve` beside `mlflow models serve`, same model, same volumes.

Logs an untrained seg3d UNet (the network and inference a trained one runs; weights do not
change the cost) into a SQLite store in a temporary folder, in a run with the dataset, the
preprocessing and a data profile, as a training run does, and registers it. Then, one server
at a time on a free loopback port:

* `mlpipe serve models:/seg3d-bench/1`, with its default `--concurrency 1` (one inference at
  a time; the summary's figure) and `--concurrency 2`: multipart uploads to `POST /segment`
  (the mask comes back as `.nii.gz`); every request is also checked and profiled, and its
  profile appended to the profiles file, as in production;
* `mlflow models serve -m models:/seg3d-bench/1 --env-manager local` (one worker): the same
  volumes as base64 in `{"dataframe_split": {"columns": ["nifti"], ...}}` to `/invocations`.
  It runs every request's `predict` in `asyncio.to_thread`, so up to the default executor's
  size (here 6) run at once, with no bound on queued requests or on memory.

Each gets 16 warm-up requests, 20 requests one at a time (the latency of a lone request),
then `--requests` at `--concurrency` from a thread pool with keep-alive connections.
Reported: p50/p95/max latency, throughput, errors (any non-200 or failed request; must be
0), and the server's resident memory (whole process tree) after the
warm-up, half-way and at the end; the growth over the second half is what a leak would show.
Target: zero errors and less than 32 MiB growth over the second half, for `mlpipe serve`.
Run: `python benchmarks/serving.py [--requests 200] [--concurrency 8] [--size 32]`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import bin_path, emit, machine, summary, versions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "projects" / "seg3d"))
MODEL = "seg3d-bench"
WARMUP = 16
SEQUENTIAL = 20
GROWTH_LIMIT_MIB = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="volume edge: size x size x 3/4")
    parser.add_argument(
        "--serve-concurrency",
        default="1,2",
        help="mlpipe serve --concurrency values to run, comma-separated (the first is the "
        "summary's: 1 is the default)",
    )
    parser.add_argument("--skip-mlflow", action="store_true", help="only mlpipe serve")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        root = Path(tmp)
        os.environ["MLPIPE_CACHE_DIR"] = str(root / "cache")
        shape = (args.size, args.size, max(8, args.size * 3 // 4))
        uri = log_model(root, shape)
        volumes = write_volumes(root / "requests", shape, count=4)
        results = {}
        for n, concurrency in enumerate(int(c) for c in args.serve_concurrency.split(",")):
            profiles = root / f"profiles-{n}.jsonl"
            cmd = [
                bin_path("mlpipe"), "serve", f"models:/{MODEL}/1", "--tracking-uri", uri,
                "--profile-file", str(profiles), "--max-queue", str(args.concurrency * 2),
                "--concurrency", str(concurrency),
            ]  # fmt: skip
            key = "mlpipe serve" if n == 0 else f"mlpipe serve --concurrency {concurrency}"
            with server(cmd, {}, root / f"mlpipe-serve-{n}.log", "--port") as (url, pid):
                results[key] = load(url, pid, volumes, args, mlpipe_request)
            results[key]["concurrency"] = concurrency
            results[key]["profiles_recorded"] = len(profiles.read_text().splitlines())
        if not args.skip_mlflow:
            cmd = [
                bin_path("mlflow"), "models", "serve", "-m", f"models:/{MODEL}/1",
                "--env-manager", "local", "--host", "127.0.0.1", "--workers", "1",
            ]  # fmt: skip
            # It starts `uvicorn` by name, so the environment's bin/ goes first on PATH.
            path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            env = {"MLFLOW_TRACKING_URI": uri, "PATH": path}
            with server(cmd, env, root / "mlflow-serve.log", "--port") as (url, pid):
                results["mlflow models serve"] = load(url, pid, volumes, args, mlflow_request)

    ours = results["mlpipe serve"]
    theirs = results.get("mlflow models serve")
    met = all(
        r["errors"] == 0 and r["rss_growth_second_half_mib"] < GROWTH_LIMIT_MIB
        for name, r in results.items()
        if name.startswith("mlpipe")
    )
    ratio = ours["p50_s"] / theirs["p50_s"] if theirs else 1.0
    emit(
        {
            "name": "serving",
            "requests": args.requests,
            "concurrency": args.concurrency,
            "volume_shape": list(shape),
            "results": results,
            "ratio": {"p50 mlpipe / mlflow": round(ratio, 3)},
            "target": f"0 errors, RSS growth over the second half < {GROWTH_LIMIT_MIB} MiB",
            "met": met,
            "summary": summary(
                _line("mlpipe serve", ours),
                _line("mlflow models serve", theirs) if theirs else "skipped",
                ratio,
                f"0 errors; RSS growth < {GROWTH_LIMIT_MIB} MiB",
                met,
            ),
            "versions": versions("mlpipe", "mlflow", "torch", "monai", "fastapi", "uvicorn"),
            "machine": machine(),
        }
    )


def _line(name: str, r: dict) -> str:
    return (
        f"{name}: alone {r['sequential_p50_s']:.3f} s; at concurrency: p50 {r['p50_s']:.3f} s, "
        f"p95 {r['p95_s']:.3f} s, {r['throughput_rps']:.1f} req/s, {r['errors']} errors, "
        f"RSS {r['rss_mib']['warm']:.0f}->{r['rss_mib']['end']:.0f} MiB"
    )


# --- the model and the volumes -----------------------------------------------------------------


def log_model(root: Path, shape: tuple[int, int, int]) -> str:
    """Register an untrained UNet with a data profile of `shape` volumes; the tracking URI."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    import mlpipe.log as mlog
    from seg3d.config import TrainConfig
    from seg3d.networks import build_network
    from seg3d.pyfunc import log_model as log_seg3d
    from seg3d.transforms import infer_transforms

    data = root / "data"
    write_volumes(data / "imagesTr", shape, count=3, labels=data / "labelsTr")
    (data / "dataset.json").write_text(json.dumps({"name": "bench-ct", "version": "v1"}))
    config = TrainConfig(model="unet", patch_size=(32, 32, 32), num_classes=3)
    torch.manual_seed(0)
    uri = f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("seg3d", artifact_location=str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        info = mlog.dataset(data)
        mlog.preprocessing(infer_transforms(config), name="train")
        mlog.data_profile(info)
        network = build_network(config).eval()
        example = data / "imagesTr" / "case_0.nii.gz"
        log_seg3d(network, config, registered_model_name=MODEL, example_path=example)
    MlflowClient(uri).set_registered_model_alias(MODEL, "production", "1")
    return uri


def write_volumes(folder: Path, shape, count: int, labels: Path | None = None) -> list[Path]:
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    paths = []
    for i in range(count):
        label = np.zeros(shape, np.uint8)
        x, y, z = shape
        label[x // 4 : x // 2, y // 4 : y // 2, z // 4 : z // 2] = 1
        image = rng.normal(size=shape).astype(np.float32) + 3 * label
        path = folder / f"case_{i}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), path)
        if labels is not None:
            labels.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(label, affine), labels / path.name)
        paths.append(path)
    return paths


# --- servers and load ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], env: dict, log: Path, port_flag: str):
    """A server process on a free loopback port until the block ends: (url, pid)."""
    import httpx2 as httpx

    port = _free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cmd, port_flag, str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def mlpipe_request(client, name: str, data: bytes) -> bool:
    response = client.post("/segment", files={"file": (name, data)})
    return response.status_code == 200 and response.content[:2] == b"\x1f\x8b"


def mlflow_request(client, name: str, data: bytes) -> bool:
    body = {"dataframe_split": {"columns": ["nifti"], "data": [[base64.b64encode(data).decode()]]}}
    response = client.post("/invocations", json=body)
    return response.status_code == 200 and len(response.json()["predictions"]) == 1


def rss_mib(pid: int) -> float:
    """Resident memory of the process and its children (mlflow runs uvicorn as a child)."""
    import psutil

    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total / 2**20


def load(url: str, pid: int, volumes: list[Path], args, request) -> dict:
    """Warm-up, then `--requests` at `--concurrency`; latency, throughput, errors, memory."""
    import httpx2 as httpx

    payloads = [(v.name, v.read_bytes()) for v in volumes]
    limits = httpx.Limits(max_connections=args.concurrency)
    with httpx.Client(base_url=url, timeout=120, limits=limits) as client:

        def one(i: int) -> tuple[bool, float]:
            began = time.perf_counter()
            try:
                ok = request(client, *payloads[i % len(payloads)])
            except httpx.HTTPError:
                ok = False
            return ok, time.perf_counter() - began

        with ThreadPoolExecutor(args.concurrency) as pool:
            warm = list(pool.map(one, range(WARMUP)))
            alone = [one(i)[1] for i in range(SEQUENTIAL)]  # one at a time: no queueing
            rss = {"warm": rss_mib(pid)}
            half = args.requests // 2
            began = time.perf_counter()
            first = list(pool.map(one, range(half)))
            rss["half"] = rss_mib(pid)
            second = list(pool.map(one, range(half, args.requests)))
            seconds = time.perf_counter() - began
            rss["end"] = rss_mib(pid)
    results = first + second
    latencies = sorted(t for _, t in results)
    return {
        "errors": sum(1 for ok, _ in results if not ok),
        "warmup_errors": sum(1 for ok, _ in warm if not ok),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(results) / seconds, 2),
        "p50_s": round(statistics.median(latencies), 4),
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 4),
        "max_s": round(latencies[-1], 4),
        "sequential_p50_s": round(statistics.median(alone), 4),
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_second_half_mib": round(rss["end"] - rss["half"], 1),
    }


if __name__ == "__main__":
    main()

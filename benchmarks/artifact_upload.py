"""Artifact upload: a checkpoint through `mlpipe server` to S3, against boto3 straight to S3.

Starts its own moto S3 server (`moto_server`, free port) and an `mlpipe server` (SQLite backend
in a temporary folder, artifacts proxied to `s3://bench-artifacts/mlflow` on that moto, one
uvicorn worker, MLflow's job runner off so its start-up does not compete for the CPU). The
S3 credentials are in the server's environment only. A `--size-mb` file of random bytes (a
checkpoint does not compress either) goes up `--repeats` times each way, interleaved round by
round:

- mlpipe: `MlflowClient.log_artifact` to a run on the server (what `mlflow.log_artifact` and
  `mlflow.pytorch.log_model` do), which streams it to the server, which writes it to S3;
- baseline: `boto3` `upload_file` (managed multipart transfer, default settings) to the same
  moto endpoint, with the credentials the server has.

Every upload is checked: the object in the bucket has the file's size. The figure is MB/s
(MB = 10^6 bytes) of the whole call. Target: mlpipe at least 0.7 of the baseline.
Run: `python benchmarks/artifact_upload.py [--size-mb 200] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from _common import bin_path, emit, machine, median, summary, versions

TARGET = 0.7
BUCKET = "bench-artifacts"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench-key-id",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server():
    """`moto_server` on a free port until the block ends; yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [bin_path("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield endpoint, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def write_checkpoint(path: Path, size_mb: int) -> int:
    chunk = 1 << 20
    total = size_mb * 10**6
    with path.open("wb") as fh:
        left = total
        while left:
            n = min(chunk, left)
            fh.write(os.urandom(n))
            left -= n
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server")
    args = parser.parse_args()

    import boto3
    from metrics_logging import wait_until_idle
    from mlflow import MlflowClient

    from mlpipe.server.launch import start
    from mlpipe.server.plan import plan as make_plan
    from mlpipe.server.preflight import preflight

    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-") as tmp, moto_server() as (s3, _):
        folder = Path(tmp)
        client_s3 = boto3.client(
            "s3",
            endpoint_url=s3,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))},
            **CREDENTIALS,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        plan = make_plan(
            backend_store_uri=f"sqlite:///{folder / 'server.db'}",
            artifacts_destination=f"s3://{BUCKET}/mlflow",
            port=_free_port(),
            workers=args.workers,
            s3_endpoint_url=s3,
            create_bucket=True,
            env=env,
        )
        preflight(plan, env=env)
        handle = start(plan, env=env)
        try:
            settle_s = wait_until_idle(handle.pid)
            checkpoint = folder / "checkpoint.pt"
            size = write_checkpoint(checkpoint, args.size_mb)
            client = MlflowClient(handle.url)
            run_id = client.create_run(client.create_experiment("artifact_upload")).info.run_id
            warm = folder / "warm.bin"
            warm.write_bytes(os.urandom(1 << 20))
            client.log_artifact(run_id, str(warm))  # connection, server-info, caches
            client_s3.upload_file(str(warm), BUCKET, "direct/warm.bin")
            run = client.get_run(run_id)
            prefix = run.info.artifact_uri.split(":/", 1)[1]  # <experiment>/<run>/artifacts

            times: dict[str, list[float]] = {"mlpipe": [], "baseline": []}
            for i in range(args.repeats):
                began = time.perf_counter()
                client.log_artifact(run_id, str(checkpoint), artifact_path=f"round{i}")
                times["mlpipe"].append(time.perf_counter() - began)
                key = f"mlflow/{prefix}/round{i}/checkpoint.pt"
                assert client_s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == size

                began = time.perf_counter()
                client_s3.upload_file(str(checkpoint), BUCKET, f"direct/round{i}/checkpoint.pt")
                times["baseline"].append(time.perf_counter() - began)
                head = client_s3.head_object(Bucket=BUCKET, Key=f"direct/round{i}/checkpoint.pt")
                assert head["ContentLength"] == size
        finally:
            handle.stop()

    mb = size / 1e6
    rates = {name: [mb / t for t in ts] for name, ts in times.items()}
    med = {name: median(r) for name, r in rates.items()}
    ratio = med["mlpipe"] / med["baseline"]
    emit(
        {
            "name": "artifact_upload",
            "size_mb": args.size_mb,
            "repeats": args.repeats,
            "workers": args.workers,
            "server_settle_s": round(settle_s, 1),
            "mlpipe": {
                "what": "MlflowClient.log_artifact through mlpipe server to S3 (moto)",
                "median_mb_s": round(med["mlpipe"], 1),
                "mb_s": [round(r, 1) for r in rates["mlpipe"]],
                "seconds": [round(t, 2) for t in times["mlpipe"]],
            },
            "baseline": {
                "what": "boto3 upload_file straight to the same S3 endpoint",
                "median_mb_s": round(med["baseline"], 1),
                "mb_s": [round(r, 1) for r in rates["baseline"]],
                "seconds": [round(t, 2) for t in times["baseline"]],
            },
            "ratio": round(ratio, 3),
            "target": f">= {TARGET}",
            "met": ratio >= TARGET,
            "summary": summary(
                f"through the server {med['mlpipe']:.0f} MB/s ({args.size_mb} MB)",
                f"boto3 direct {med['baseline']:.0f} MB/s",
                ratio,
                f">= {TARGET}",
                ratio >= TARGET,
            ),
            "versions": versions("mlpipe", "mlflow", "boto3", "moto", "uvicorn"),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    sys.exit(main())

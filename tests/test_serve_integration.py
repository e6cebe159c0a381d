"""``mlpipe serve`` as a real process on a free port: uploads over HTTP, limits, auth, load.

The model is logged and registered as in ``tests/test_serve.py`` (an untrained UNet, a data
profile of 32x32x24 volumes), into a SQLite store the server reads with ``--tracking-uri``.
Requests go over loopback with httpx2, and with a raw socket where the test needs to send
a body the server must refuse before it has all arrived.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx2 as httpx
import nibabel as nib
import numpy as np
import psutil
import pytest

from tests.conftest import free_port
from tests.test_serve import LPS_AFFINE, MODEL, isolated, log_served_model, write_volume

pytestmark = pytest.mark.integration

TOKEN = "integration-token-5f1c9a"
START_TIMEOUT_S = 120


def mlpipe_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "mlpipe")


@contextlib.contextmanager
def running_serve(uri: str, tracking_uri: str, *args: str, env: dict | None = None, log: Path):
    """``mlpipe serve URI`` on a free port until the block ends; yields url, process, log."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [mlpipe_bin(), "serve", uri, "--tracking-uri", tracking_uri, "--port", str(port),
             *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlpipe serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield SimpleNamespace(url=url, port=port, proc=proc, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-int-model")
    with isolated(root):
        return log_served_model(root)


@pytest.fixture(scope="module")
def server(logged, tmp_path_factory):
    """One server for the module, with the default profile location under its cache dir."""
    root = tmp_path_factory.mktemp("serve-int")
    cache = root / "cache"
    with running_serve(
        f"models:/{MODEL}@production",
        logged.uri,
        env={"MLPIPE_CACHE_DIR": str(cache)},
        log=root / "server.log",
    ) as srv:
        srv.profiles = cache / "serving" / MODEL / "profiles.jsonl"
        yield srv


def post_file(url: str, path: Path, name: str | None = None, **kwargs) -> httpx.Response:
    with open(path, "rb") as handle:
        files = {"file": (name or path.name, handle, "application/octet-stream")}
        return httpx.post(url + "/segment", files=files, timeout=60, **kwargs)


def test_serve_segments_an_uploaded_volume(server, tmp_path):
    volume = write_volume(tmp_path / "ct_042.nii.gz", shape=(30, 34, 22), affine=LPS_AFFINE)
    response = post_file(server.url, volume)
    assert response.status_code == 200, response.text
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    original = nib.load(volume)
    assert mask.shape == original.shape
    np.testing.assert_allclose(mask.affine, original.affine, atol=1e-5)
    assert set(json.loads(response.headers["x-class-volumes-ml"])) == {"1", "2"}
    assert 'filename="ct_042_mask.nii.gz"' in response.headers["content-disposition"]

    encoded = base64.b64encode(volume.read_bytes()).decode()
    body = httpx.post(
        server.url + "/segment/json", json={"nifti_base64": encoded}, timeout=60
    ).json()
    assert body["shape"] == [30, 34, 22]
    again = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["mask_base64"])))
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(mask.dataobj))

    model = httpx.get(server.url + "/model", timeout=10).json()
    assert (model["name"], model["version"], model["alias"]) == (MODEL, "1", "production")
    assert model["dataset"]["name"] == "toy-ct"
    log = server.log.read_text()
    assert f"Serving {MODEL} v1 on cpu at {server.url}" in log or "on cuda" in log


def test_keep_alive_answers_are_not_held_back(server):
    # A listening socket created without proto=IPPROTO_TCP made asyncio skip TCP_NODELAY,
    # and every answer on a kept-alive connection waited ~40 ms for the client's ACK.
    with httpx.Client(base_url=server.url, timeout=10) as client:
        client.get("/health")
        times = []
        for _ in range(20):
            began = time.perf_counter()
            assert client.get("/health").status_code == 200
            times.append(time.perf_counter() - began)
    assert sorted(times)[10] < 0.02, times


def test_serve_refuses_bad_input_and_goes_on_serving(server, tmp_path):
    four_d = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), four_d)
    fine = write_volume(tmp_path / "fine.nii.gz", affine=np.diag([0.2, 0.2, 0.4, 1.0]))
    text = tmp_path / "notes.nii.gz"
    text.write_text("not a volume\n" * 50)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    good = write_volume(tmp_path / "good.nii.gz")
    for path, status in ((text, 415), (empty, 400), (four_d, 422), (fine, 422)):
        response = post_file(server.url, path)
        assert response.status_code == status, response.text
        assert path.name in response.json()["detail"]
        assert "/tmp" not in response.text and "Traceback" not in response.text
        assert post_file(server.url, good).status_code == 200


def _raw_request(port: int, head: bytes, body_chunks, timeout: float = 20.0) -> tuple[str, int]:
    """Send a request head and body chunks without finishing; the status line and bytes sent.

    Returns as soon as the server answers: a server that waited for the whole body would
    never answer, since the body never ends.
    """
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.settimeout(0.05)
        reply = b""
        deadline = time.monotonic() + timeout
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
                sent += len(chunk)
            except OSError:
                break  # the server closed the connection after answering
            with contextlib.suppress(TimeoutError, BlockingIOError):
                reply += sock.recv(65536)
            if reply or time.monotonic() > deadline:
                break
        sock.settimeout(timeout)
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in reply:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
    status = reply.split(b"\r\n", 1)[0].decode(errors="replace")
    return status, sent


@pytest.fixture(scope="module")
def guarded(logged, tmp_path_factory):
    """A server with a token, a 1 MiB upload limit, a run URI and an explicit profile file."""
    root = tmp_path_factory.mktemp("serve-guarded")
    with running_serve(
        f"runs:/{logged.run_id}/model",
        logged.uri,
        "--token-env",
        "SERVE_TOKEN",
        "--max-bytes",
        "1M",
        "--profile-file",
        str(root / "inputs.jsonl"),
        env={"SERVE_TOKEN": TOKEN},
        log=root / "server.log",
    ) as srv:
        srv.profiles = root / "inputs.jsonl"
        yield srv


def test_an_oversized_body_is_refused_before_it_has_all_arrived(guarded):
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    endless = (b"x" * 65536 for _ in range(10_000))  # 650 MB if it were all sent
    head = (
        b"POST /segment HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: multipart/form-data; "
        b"boundary=b\r\nContent-Length: 655360000\r\n\r\n"
    )
    status, sent = _raw_request(guarded.port, head, endless)
    assert status.startswith("HTTP/1.1 413 "), status
    assert sent < 50 * 65536

    chunked = (b"10000\r\n" + b"x" * 65536 + b"\r\n" for _ in range(10_000))
    head = (
        b"POST /segment/json HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: "
        b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    status, sent = _raw_request(guarded.port, head, chunked)
    assert status.startswith("HTTP/1.1 413 "), status
    assert sent < 3 * 1024 * 1024  # the limit is about 1.4 MB for base64 of 1 MiB


def test_token_auth_and_the_run_uri(guarded, logged, tmp_path):
    volume = write_volume(tmp_path / "v.nii.gz")
    assert httpx.get(guarded.url + "/health", timeout=5).status_code == 200
    assert post_file(guarded.url, volume).status_code == 401
    wrong = post_file(guarded.url, volume, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    right = post_file(guarded.url, volume, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    model = httpx.get(
        guarded.url + "/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    ).json()
    assert (model["name"], model["version"], model["run_id"]) == (MODEL, "1", logged.run_id)
    assert model["model_uri"] == f"runs:/{logged.run_id}/model"
    (entry,) = [json.loads(line) for line in guarded.profiles.read_text().splitlines()]
    assert entry["image"] == "v.nii.gz" and entry["model_version"] == "1"
    assert TOKEN not in guarded.log.read_text()


def test_serve_refuses_to_start_with_exit_2(logged, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SERVE_TOKEN"}
    cases = [
        ([f"models:/{MODEL}@production", "--token-env", "SERVE_TOKEN"], "SERVE_TOKEN"),
        ([f"models:/{MODEL}@canary"], "has no alias 'canary'"),
    ]
    for args, message in cases:
        began = time.monotonic()
        result = subprocess.run(
            [mlpipe_bin(), "serve", *args, "--tracking-uri", logged.uri, "--port",
             str(free_port())],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("Error: ") and message in result.stderr
        assert "Traceback" not in result.stderr
        assert time.monotonic() - began < 60


def test_sigterm_stops_the_server_and_removes_its_files(logged, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    volume = write_volume(tmp_path / "v.nii.gz")
    log = tmp_path / "server.log"
    with running_serve(f"models:/{MODEL}/1", logged.uri, env={"TMPDIR": str(temp)}, log=log) as srv:
        assert [p.name[:19] for p in temp.iterdir()] == ["mlpipe-serve-model-"]
        assert post_file(srv.url, volume).status_code == 200
        os.killpg(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 143
    assert list(temp.iterdir()) == []  # the downloaded model and every upload are gone
    assert "Finished server process" in log.read_text()


def test_load_40_requests_at_concurrency_8_without_errors_or_growth(server, tmp_path):
    """Bounded load over loopback: zero errors, and the server's memory does not keep growing."""
    volumes = [write_volume(tmp_path / f"load_{i}.nii.gz", seed=i) for i in range(4)]
    payloads = [(v.name, v.read_bytes()) for v in volumes]
    process = psutil.Process(server.proc.pid)

    def one(i: int) -> tuple[int, float]:
        name, data = payloads[i % len(payloads)]
        began = time.perf_counter()
        response = client.post("/segment", files={"file": (name, data)})
        return response.status_code, time.perf_counter() - began

    limits = httpx.Limits(max_connections=8)
    with httpx.Client(base_url=server.url, timeout=120, limits=limits) as client:
        with ThreadPoolExecutor(8) as pool:  # warm-up: allocator pools, thread pool
            assert [s for s, _ in pool.map(one, range(16))] == [200] * 16
        before = process.memory_info().rss
        began = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(40)))
        seconds = time.perf_counter() - began
        after = process.memory_info().rss
    statuses = [s for s, _ in results]
    latencies = sorted(t for _, t in results)
    print(
        f"40 requests at concurrency 8: {seconds:.1f} s, {40 / seconds:.1f} req/s, p50 "
        f"{latencies[19]:.3f} s, p95 {latencies[37]:.3f} s, RSS {before / 2**20:.0f} -> "
        f"{after / 2**20:.0f} MiB"
    )
    assert statuses == [200] * 40
    assert after - before < 64 * 2**20
    served = [json.loads(line) for line in server.profiles.read_text().splitlines()]
    assert sum(1 for e in served if e["outcome"] == "served" and e["image"].startswith("load_"))
    assert {e["image"] for e in served} >= {f"load_{i}.nii.gz" for i in range(4)}

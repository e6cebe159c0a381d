"""mlpipe serve in process: FastAPI's TestClient against a real logged, registered seg3d model.

One untrained UNet is logged per module with ``seg3d.pyfunc.log_model`` into a SQLite store,
registered as ``seg3d-serve`` with the alias ``production``, in a run that also logged the
dataset, the preprocessing and a data profile of three 32x32x24 volumes (spacing 1.5x1.5x3),
as a training run does. The server is built with ``prepare`` from the registry, as ``mlpipe
serve`` builds it. Uploads are small real NIfTI files written with nibabel.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import io
import json
import threading
import time
from datetime import datetime
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from mlpipe.cli import cli
from mlpipe.core.errors import NotFoundError, UsageError
from mlpipe.inference.geometry import GeometryLimits
from mlpipe.inference.inputs import parse_size
from mlpipe.inference.models import resolve_model
from mlpipe.inference.profile_log import ProfileLog, profiles_path
from mlpipe.inference.segmenter import Segmenter
from mlpipe.registry.promotion import connect
from mlpipe.serve.app import create_app
from mlpipe.serve.service import ServeOptions, prepare, token_from_env
from tests.conftest import free_port, isolated_env, log_served_model

MODEL = "seg3d-serve"
TRAIN_SHAPE = (32, 32, 24)
TRAIN_SPACING = (1.5, 1.5, 3.0)  # write_nifti_dataset's affine
LPS_AFFINE = np.array(
    [
        [-1.4, 0.0, 0.0, 30.0],
        [0.0, -1.6, 0.0, 40.0],
        [0.0, 0.0, 3.2, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
TOKEN = "s3cret-token-value-1234"


def write_volume(
    path: Path,
    shape=TRAIN_SHAPE,
    affine=None,
    *,
    seed: int = 0,
    dtype=np.float32,
) -> Path:
    """A noisy volume with a bright box (like the training data)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape).astype(dtype)
    x, y, z = shape[:3]
    data[x // 4 : x // 2, y // 4 : y // 2, z // 4 : z // 2] += 3
    affine = np.diag([*TRAIN_SPACING, 1.0]) if affine is None else affine
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def isolated(root: Path):
    """For module-scoped fixtures, which run before the per-test ``clean_env``: the same
    isolation (no user config or MLflow variables, cache and current folder under ``root``)."""
    return isolated_env(root)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-model")
    with isolated(root):
        return log_served_model(root)


@pytest.fixture(scope="module")
def base_state(logged, tmp_path_factory):
    """The server state ``mlpipe serve models:/seg3d-serve@production`` builds, loaded once."""
    profile_file = tmp_path_factory.mktemp("serve-profiles") / "profiles.jsonl"
    options = ServeOptions(
        model_uri=f"models:/{MODEL}@production",
        tracking_uri=logged.uri,
        profile_file=str(profile_file),
    )
    with isolated(profile_file.parent):
        state = prepare(options, env={})
    yield state
    state.close()


def make_state(base, tmp_path: Path, *, token: str | None = None, **options):
    """A fresh server state sharing the loaded model: own options, profile file, counters."""
    opts = dataclasses.replace(base.options, **options)
    profile_file = tmp_path / "profiles.jsonl"
    seg = base.segmenter
    segmenter = Segmenter(
        model=options.pop("model", seg.model),
        source=base.source,
        max_bytes=opts.max_bytes,
        limits=GeometryLimits.from_profile(base.source.training_profile, opts.range_factor),
        profiles=ProfileLog(profile_file, opts.max_profiles),
        concurrency=opts.concurrency,
        max_queue=opts.max_queue,
    )
    return dataclasses.replace(
        base,
        options=opts,
        segmenter=segmenter,
        token=token,
        profile_file=profile_file,
        _folder=None,
    )


@pytest.fixture
def client(base_state, tmp_path):
    state = make_state(base_state, tmp_path)
    with TestClient(create_app(state), raise_server_exceptions=False) as test_client:
        test_client.state = state
        yield test_client


def upload(client, path: Path, name: str | None = None, **kwargs):
    with open(path, "rb") as handle:
        return client.post(
            "/segment", files={"file": (name or path.name, handle, "application/gzip")}, **kwargs
        )


def mask_of(response) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


# --- segmenting ---------------------------------------------------------------------------------


def test_segment_returns_the_mask_in_the_inputs_space(client, tmp_path):
    volume = write_volume(tmp_path / "ct_001.nii.gz", shape=(30, 34, 22), affine=LPS_AFFINE)
    started = time.perf_counter()
    response = upload(client, volume)
    print(f"segment 30x34x22: {time.perf_counter() - started:.2f} s")

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert 'filename="ct_001_mask.nii.gz"' in response.headers["content-disposition"]
    mask = mask_of(response)
    assert mask.shape == (30, 34, 22)
    np.testing.assert_allclose(mask.affine, LPS_AFFINE, atol=1e-5)
    assert mask.get_data_dtype() == np.uint8
    values = np.asarray(mask.dataobj)
    volumes = json.loads(response.headers["x-class-volumes-ml"])
    assert set(volumes) == {"1", "2"}
    voxel_ml = 1.4 * 1.6 * 3.2 / 1000
    for c in ("1", "2"):
        assert volumes[c] == pytest.approx((values == int(c)).sum() * voxel_ml, abs=1e-3)
    assert response.headers["x-shape"] == "30x34x22"
    assert response.headers["x-model-version"] == "1"


def test_segment_json_matches_the_upload_and_takes_uncompressed_nii(client, tmp_path):
    volume = write_volume(tmp_path / "a.nii.gz", seed=3)
    plain = tmp_path / "a.nii"
    nib.save(nib.load(volume), plain)
    by_upload = upload(client, plain)
    by_json = client.post(
        "/segment/json",
        json={"nifti_base64": base64.b64encode(volume.read_bytes()).decode(), "filename": "a"},
    )
    assert by_upload.status_code == 200, by_upload.text
    assert by_json.status_code == 200, by_json.text
    body = by_json.json()
    assert body["shape"] == list(TRAIN_SHAPE)
    assert set(body["class_volumes_ml"]) == {"1", "2"}
    assert body["model_version"] == "1"
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["mask_base64"])))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(mask_of(by_upload).dataobj))


# --- refusing bad input ---------------------------------------------------------------------------


def _four_d(tmp_path: Path) -> bytes:
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), path)
    return path.read_bytes()


def _truncated(tmp_path: Path) -> bytes:
    raw = write_volume(tmp_path / "whole.nii.gz").read_bytes()
    return raw[: len(raw) // 2]


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (lambda tmp: b"", 400, "x.nii.gz is empty"),
        (lambda tmp: b"just some text, not a volume" * 40, 415, "x.nii.gz is not a NIfTI"),
        (lambda tmp: gzip.compress(b"text" * 200), 415, "gzip data that is not NIfTI"),
        (_four_d, 422, r"shape \(8, 8, 8, 3\): expected one 3D volume"),
        (_truncated, 400, "x.nii.gz is truncated or corrupt"),
    ],
    ids=["empty", "text", "gzipped-text", "4d", "truncated"],
)
def test_segment_refuses_bad_uploads_with_a_clear_message(client, tmp_path, make, status, message):
    response = client.post("/segment", files={"file": ("x.nii.gz", make(tmp_path))})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert pytest.importorskip("re").search(message, detail), detail
    assert "/tmp" not in response.text and str(tmp_path) not in response.text
    assert "Traceback" not in response.text
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_segment_json_refuses_text_that_is_not_base64(client):
    response = client.post("/segment/json", json={"nifti_base64": "not base64!"})
    assert response.status_code == 400
    assert "nifti_base64 is not base64" in response.json()["detail"]


def test_segment_refuses_spacing_and_shape_far_outside_the_training_data(client, tmp_path):
    fine = write_volume(tmp_path / "fine.nii.gz", affine=np.diag([0.3, 0.3, 0.5, 1.0]))
    response = upload(client, fine)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "fine.nii.gz: spacing (0.3, 0.3, 0.5) mm is far outside the training data" in detail
    assert "1.5, 1.5, 3 mm per axis, 3 volumes" in detail
    assert "shape" not in detail.split(";")[0].split("mm per axis")[1]

    tiny = write_volume(tmp_path / "tiny.nii.gz", shape=(8, 8, 6))
    response = upload(client, tiny)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "shape (8, 8, 6) is far outside the training data (32, 32, 24" in detail
    refused = ProfileLog(client.state.profile_file).read()
    assert [(p["image"], p["outcome"]) for p in refused] == [
        ("fine.nii.gz", "refused"),
        ("tiny.nii.gz", "refused"),
    ]


def test_segment_range_factor_zero_turns_the_geometry_check_off(base_state, tmp_path):
    state = make_state(base_state, tmp_path, range_factor=0)
    volume = write_volume(tmp_path / "tiny.nii.gz", shape=(16, 16, 12))
    with TestClient(create_app(state)) as client:
        assert upload(client, volume).status_code == 200


def test_geometry_limits_compare_axes_in_the_training_orientation():
    profile = {
        "summary": {
            "volumes": 2,
            "spacing": {"min": [0.7, 0.7, 5.0], "max": [0.8, 0.8, 5.0]},
            "shape": {"min": [512, 512, 40], "max": [512, 512, 60]},
            "orientation": {"RAS": 2},
        }
    }
    limits = GeometryLimits.from_profile(profile, factor=3.0)
    assert limits.problems((0.75, 0.75, 5.0), (512, 512, 50), "LPS") == []
    # The same scan stored slice axis first: per voxel axis it would look far off.
    assert limits.problems((5.0, 0.75, 0.75), (50, 512, 512), "SRA") == []
    (problem,) = limits.problems((0.75, 0.75, 20.0), (512, 512, 50), "RAS")
    assert problem.startswith("spacing (0.75, 0.75, 20) mm is far outside")
    assert "axis 2 more than 3x outside" in problem
    assert GeometryLimits.from_profile(profile, factor=0) is None
    assert GeometryLimits.from_profile(None, factor=3.0) is None


def test_a_bad_request_does_not_affect_the_next(client, tmp_path):
    good = write_volume(tmp_path / "good.nii.gz")
    for _ in range(2):
        bad = client.post("/segment", files={"file": ("bad.nii.gz", b"garbage" * 100)})
        assert bad.status_code == 415
        assert upload(client, good).status_code == 200


def test_an_upload_over_max_bytes_is_refused(base_state, tmp_path):
    # Refusal before the whole body is read is checked over a real socket in
    # test_serve_integration.py (the TestClient buffers the body before the app sees it).
    state = make_state(base_state, tmp_path, max_bytes=200_000)

    def chunks():  # a chunked body: no Content-Length to refuse it by
        for _ in range(10):
            yield b"x" * 65_536

    with TestClient(create_app(state)) as client:
        response = client.post(
            "/segment/json", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert "larger than this server accepts" in response.json()["detail"]

        big = np.zeros((80, 80, 40), np.float32)  # 1 MB of voxels, > 200 kB
        path = tmp_path / "big.nii"
        nib.save(nib.Nifti1Image(big, np.eye(4)), path)
        response = upload(client, path)  # Content-Length over the limit: refused at once
        assert response.status_code == 413
        assert "--max-bytes 200000" in response.json()["detail"]

        gz = tmp_path / "big.nii.gz"  # compresses to a few kB: passes the limit
        nib.save(nib.Nifti1Image(big, np.diag([*TRAIN_SPACING, 1.0])), gz)
        assert upload(client, gz).status_code == 200


def test_a_server_error_answers_500_with_an_id_and_nothing_else(base_state, tmp_path, caplog):
    class Broken:
        def predict(self, frame):
            raise RuntimeError("boom in /secret/models/weights.pt")

    state = make_state(base_state, tmp_path)
    state.segmenter.model = Broken()
    volume = write_volume(tmp_path / "ok.nii.gz")
    app = create_app(state)
    with caplog.at_level("ERROR", logger="mlpipe.serve"), TestClient(app) as client:
        response = upload(client, volume)
    assert response.status_code == 500
    body = response.json()
    assert body["error_id"] and body["error_id"] in body["detail"]
    assert "/secret" not in response.text and "boom" not in response.text
    assert "Traceback" not in response.text
    assert body["error_id"] in caplog.text
    assert "boom in /secret/models/weights.pt" in caplog.text  # the log has the details


def test_requests_beyond_the_queue_get_503(base_state, tmp_path):
    release = threading.Event()
    entered = threading.Event()
    real = base_state.segmenter.model

    class Slow:
        def predict(self, frame):
            entered.set()
            release.wait(30)
            return real.predict(frame)

    state = make_state(base_state, tmp_path, max_queue=0)
    state.segmenter.model = Slow()
    volume = write_volume(tmp_path / "v.nii.gz")
    with TestClient(create_app(state)) as client:
        first = {}
        worker = threading.Thread(target=lambda: first.update(r=upload(client, volume)))
        worker.start()
        assert entered.wait(30)
        busy = upload(client, volume)
        release.set()
        worker.join(60)
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "5"
    assert "busy" in busy.json()["detail"]
    assert first["r"].status_code == 200


# --- auth --------------------------------------------------------------------------------------


def test_token_protects_everything_but_health_and_the_page(base_state, tmp_path, caplog):
    state = make_state(base_state, tmp_path, token=TOKEN)
    volume = write_volume(tmp_path / "v.nii.gz")
    with caplog.at_level("DEBUG"), TestClient(create_app(state)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/docs").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        missing = upload(client, volume)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = upload(client, volume, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert client.get("/model").status_code == 401
        right = upload(client, volume, headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200
        assert client.get("/model", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        spec = client.get("/openapi.json").json()
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert TOKEN not in caplog.text


def test_token_from_env_refuses_unset_or_empty():
    assert token_from_env(None, {}) is None
    assert token_from_env("API_TOKEN", {"API_TOKEN": " abc "}) == "abc"
    for env in ({}, {"API_TOKEN": ""}, {"API_TOKEN": "  "}):
        with pytest.raises(UsageError, match="--token-env API_TOKEN: the environment variable"):
            token_from_env("API_TOKEN", env)


# --- model, health, page ------------------------------------------------------------------------


def test_model_says_which_model_run_dataset_and_preprocessing(client, logged):
    info = client.get("/model").json()
    assert info["name"] == MODEL
    assert info["version"] == "1"
    assert info["alias"] == "production"
    assert info["aliases"] == ["production"]
    assert info["run_id"] == logged.run_id
    assert info["dataset"] == {
        "name": "toy-ct",
        "version": "v1",
        "digest": logged.dataset.digest,
    }
    run = MlflowClient(logged.uri).get_run(logged.run_id)
    assert info["preprocessing_digest"] == run.data.tags["mlpipe.preprocessing.digest"]
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info["training_geometry"]["spacing_mm"]["min"] == list(TRAIN_SPACING)
    assert client.get("/health").json() == {"status": "ok"}


def test_docs_page_serves_swagger_ui_without_a_cdn(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    assert '"tryItOutEnabled": true' in page.text
    script = client.get("/static/swagger-ui/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    assert client.get("/static/swagger-ui/swagger-ui.css").status_code == 200
    assert client.get("/", follow_redirects=False).headers["location"] == "/docs"


def test_openapi_describes_the_upload_form_and_the_mask(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/segment"]["post"]
    assert operation["operationId"] == "segment"
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    ref = form["$ref"].rsplit("/", 1)[-1]
    file_field = spec["components"]["schemas"][ref]["properties"]["file"]
    assert file_field.get("format") == "binary" or "contentMediaType" in file_field
    ok = operation["responses"]["200"]
    assert "application/gzip" in ok["content"]
    assert "X-Class-Volumes-ml" in ok["headers"]
    assert {"400", "413", "415", "422", "500"} <= set(operation["responses"])
    assert "/segment/json" in spec["paths"] and "/model" in spec["paths"]


# --- the input profiles ---------------------------------------------------------------------------


def test_every_served_input_profile_is_recorded(client, tmp_path):
    volume = write_volume(tmp_path / "patient_7.nii.gz", shape=(30, 34, 22), affine=LPS_AFFINE)
    assert upload(client, volume, name="scans/patient_7.nii.gz").status_code == 200
    encoded = base64.b64encode(volume.read_bytes()).decode()
    assert client.post("/segment/json", json={"nifti_base64": encoded}).status_code == 200

    first, second = ProfileLog(client.state.profile_file).read()
    assert first["image"] == "patient_7.nii.gz"  # the name only, never a server path
    assert second["image"] == "upload.nii.gz"
    assert first["shape"] == [30, 34, 22]
    assert first["spacing"] == [1.4, 1.6, 3.2]
    assert first["orientation"] == "LPS"
    assert set(first["intensity"]) == {"p0_5", "p50", "p99_5", "mean", "std"}
    assert first["model_version"] == "1" and first["outcome"] == "served"
    assert datetime.fromisoformat(first["received"]).utcoffset().total_seconds() == 0
    assert "/tmp" not in client.state.profile_file.read_text()


def test_profile_log_keeps_the_newest_lines_within_the_bound(tmp_path):
    log = ProfileLog(tmp_path / "p" / "profiles.jsonl", max_lines=10)
    for i in range(25):
        log.append({"i": i})
        assert len(log.read()) <= 10
    assert [e["i"] for e in log.read()][-1] == 24
    assert [e["i"] for e in log.read()] == sorted(e["i"] for e in log.read())
    # A second writer (another server process) appending to the same file is noticed.
    other = ProfileLog(log.path, max_lines=10)
    for i in range(25, 40):
        other.append({"i": i})
        log.append({"i": 100 + i})
    assert len(log.read()) <= 10


def test_profile_log_concurrent_appends_stay_whole_lines(tmp_path):
    log = ProfileLog(tmp_path / "profiles.jsonl", max_lines=100)
    payload = "x" * 3000

    def work(t):
        for i in range(50):
            log.append({"t": t, "i": i, "pad": payload})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = log.path.read_text().splitlines()
    assert 90 <= len(lines) <= 100
    assert all(json.loads(line)["pad"] == payload for line in lines)


def test_profiles_path_follows_the_cache_dir(tmp_path):
    assert profiles_path("seg3d", {"MLPIPE_CACHE_DIR": str(tmp_path)}) == (
        tmp_path / "serving" / "seg3d" / "profiles.jsonl"
    )
    assert profiles_path("seg3d", {"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "mlpipe" / "serving" / "seg3d" / "profiles.jsonl"
    )
    # The name as it is (mlpipe drift finds the file by it), unless it leaves the folder.
    assert profiles_path("CT liver", {"MLPIPE_CACHE_DIR": str(tmp_path)}).parent.name == (
        "CT liver"
    )
    for name in ("../evil", "..", "a/b"):
        path = profiles_path(name, {"MLPIPE_CACHE_DIR": str(tmp_path)})
        assert path.parent.parent == tmp_path / "serving", name


# --- resolving and starting ---------------------------------------------------------------------


def test_resolve_model_by_version_and_by_run(logged):
    tracking = connect(logged.uri)
    by_version = resolve_model(tracking, f"models:/{MODEL}/1")
    assert by_version.version == "1" and by_version.alias is None
    assert by_version.aliases == ("production",)
    assert by_version.load_uri == f"models:/{MODEL}/1"
    assert by_version.training_profile["summary"]["volumes"] == 3
    latest = resolve_model(tracking, f"models:/{MODEL}/latest")
    assert latest.version == "1"
    by_run = resolve_model(tracking, f"runs:/{logged.run_id}/model")
    assert (by_run.name, by_run.version, by_run.run_id) == (MODEL, "1", logged.run_id)
    assert by_run.tags["mlpipe.dataset.name"] == "toy-ct"


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        ("seg3d", UsageError, "'seg3d' is not a model URI. Give models:/NAME@ALIAS"),
        (f"models:/{MODEL}/Production", UsageError, "neither a version number nor 'latest'"),
        ("models:/no-such-model@production", NotFoundError, "no-such-model"),
        (f"models:/{MODEL}@staging", NotFoundError, "staging"),
        (f"models:/{MODEL}/7", NotFoundError, f"{MODEL}/7"),
        ("runs:/0123456789abcdef0123456789abcdef/model", NotFoundError, "0123456789abcdef"),
    ],
)
def test_resolve_model_refuses_what_does_not_resolve(logged, uri, error, message):
    with pytest.raises(error, match=message):
        resolve_model(connect(logged.uri), uri)


def test_parse_size():
    assert parse_size("2048") == 2048
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("1GiB") == 1024**3
    assert parse_size("1.5k") == 1536
    with pytest.raises(UsageError, match="--max-bytes 'lots' is not a size"):
        parse_size("lots")


def test_serve_command_refuses_to_start_with_exit_2(logged, monkeypatch):
    runner = CliRunner()
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    base = ["serve", "--tracking-uri", logged.uri, "--port", str(free_port())]
    cases = [
        (["models:/nope@production"], "nope"),
        ([f"models:/{MODEL}@production", "--token-env", "NO_SUCH_TOKEN"], "NO_SUCH_TOKEN"),
        ([f"models:/{MODEL}@production", "--max-bytes", "huge"], "--max-bytes 'huge'"),
        ([f"models:/{MODEL}@production", "--range-factor", "0.5"], "--range-factor 0.5"),
        (["not-a-uri"], "is not a model URI"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, [*base[:1], *args, *base[1:]])
        assert result.exit_code == 2, result.output
        assert "Error:" in result.output and message in result.output
        assert "Traceback" not in result.output


def test_serve_command_refuses_a_port_in_use(logged):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            cli, ["serve", f"models:/{MODEL}/1", "--tracking-uri", logged.uri, "--port", str(port)]
        )
    assert result.exit_code == 2
    assert f"Cannot listen on 127.0.0.1:{port}" in result.output


def test_upload_read_from_a_file_object_in_chunks(base_state, tmp_path):
    """segment_stream refuses a stream over max_bytes before reading it all."""
    state = make_state(base_state, tmp_path, max_bytes=3 * 1024 * 1024)
    stream = io.BytesIO(b"\0" * (10 * 1024 * 1024))
    from mlpipe.inference.inputs import InputRejected

    with pytest.raises(InputRejected) as caught:
        state.segmenter.segment_stream(stream, "big.nii", "r1")
    assert caught.value.status == 413
    assert stream.tell() <= 4 * 1024 * 1024


def test_bind_makes_a_tcp_socket_so_answers_are_not_delayed():
    import socket

    from mlpipe.serve.listen import bind

    sock = bind("127.0.0.1", 0)
    try:
        # asyncio sets TCP_NODELAY on accepted connections only when proto is TCP; without
        # it every keep-alive answer waited ~40 ms (measured: /health 44 ms instead of 1 ms).
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


# --- DICOM in, DICOM SEG out ---------------------------------------------------------------


def _series_zip(tmp_path: Path, data: np.ndarray, affine, **kwargs) -> Path:
    from tests.dicom_factory import write_series, zip_folder

    folder = tmp_path / f"series-{len(list(tmp_path.iterdir()))}"
    write_series(data, affine, folder, shuffle=True, rename=True, **kwargs)
    return zip_folder(folder, tmp_path / f"{folder.name}.zip")


def _hu_volume(seed: int = 0) -> np.ndarray:
    from tests.dicom_factory import ct_volume

    return ct_volume(TRAIN_SHAPE, seed=seed)


def test_segment_accepts_a_zipped_series_like_its_nifti(client, tmp_path):
    data, affine = _hu_volume(), np.diag([*TRAIN_SPACING, 1.0])
    archive = _series_zip(tmp_path, data, affine)
    nifti = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), nifti)

    from_series = upload(client, archive, "ct_7.zip")
    from_nifti = upload(client, nifti)

    assert from_series.status_code == 200, from_series.text
    assert 'filename="ct_7_mask.nii.gz"' in from_series.headers["content-disposition"]
    series_mask, nifti_mask = mask_of(from_series), mask_of(from_nifti)
    np.testing.assert_allclose(series_mask.affine, nifti_mask.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(series_mask.dataobj), np.asarray(nifti_mask.dataobj))
    assert from_series.headers["x-class-volumes-ml"] == from_nifti.headers["x-class-volumes-ml"]
    recorded = ProfileLog(client.state.profile_file).read()
    assert [p["image"] for p in recorded] == ["ct_7.zip", "same.nii.gz"]
    assert recorded[0]["intensity"] == recorded[1]["intensity"]
    series = recorded[0]["series"]  # named by hashes only, never by a header attribute
    assert series["slices"] == TRAIN_SHAPE[2] and len(series["key"]) == 16
    assert len(series["files_sha256"]) == 64 and "series" not in recorded[1]


def test_segment_format_dicom_seg_answers_a_seg_over_the_source_slices(client, tmp_path):
    import highdicom as hd
    import pydicom

    data, affine = _hu_volume(1), np.diag([*TRAIN_SPACING, 1.0])
    archive = _series_zip(tmp_path, data, affine)
    nifti = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), nifti)
    expected = np.asarray(mask_of(upload(client, nifti)).dataobj)

    with open(archive, "rb") as handle:
        response = client.post(
            "/segment?format=dicom-seg", files={"file": ("ct_8.zip", handle, "application/zip")}
        )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    assert 'filename="ct_8_seg.dcm"' in response.headers["content-disposition"]
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(response.content)))
    sources = [pydicom.dcmread(p) for p in sorted((tmp_path / "series-0").iterdir())]
    present = sorted(int(c) for c in np.unique(expected) if c)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [f"class {c}" for c in present]
    by_z = sorted(sources, key=lambda ds: float(ds.ImagePositionPatient[2]))
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in by_z],
        combine_segments=True,
        skip_overlap_checks=True,
    )
    # Segment numbers run 1..N over the classes present, in class order.
    relabelled = np.zeros_like(expected)
    for number, cls in enumerate(present, start=1):
        relabelled[expected == cls] = number
    np.testing.assert_array_equal(back, relabelled.transpose(2, 1, 0))
    assert seg.SeriesInstanceUID != by_z[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == by_z[0].StudyInstanceUID  # placed in the source's study


def test_segment_dicom_refusals_answer_4xx_with_the_reason(client, tmp_path):
    nifti = write_volume(tmp_path / "v.nii.gz")
    with open(nifti, "rb") as handle:
        response = client.post("/segment?format=dicom-seg", files={"file": ("v.nii.gz", handle)})
    assert response.status_code == 400
    assert "format=dicom-seg needs a DICOM series" in response.json()["detail"]

    archive = _series_zip(tmp_path, _hu_volume(), np.diag([*TRAIN_SPACING, 1.0]), drop=7)
    response = upload(client, archive, "gappy.zip")
    assert response.status_code == 422
    assert response.json()["detail"].startswith("gappy.zip: missing slices")
    assert "/tmp" not in response.text


def _hostile_nifti(path: Path, shape=(1024, 1024, 512)) -> Path:
    """A ~2 MB .nii.gz whose header declares ``shape`` float32 over 2 GiB of zeros: one gzip
    member for the header, then 128 members of 16 MiB of zeros each."""
    import zlib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_zooms((1.0, 1.0, 1.0))
    raw = header.binaryblock + b"\0" * 4  # vox_offset 352
    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = zeros.compress(bytes(16 << 20)) + zeros.flush()
    with open(path, "wb") as out:
        out.write(gzip.compress(raw))
        for _ in range(128):
            out.write(member)
    return path


def test_a_header_declaring_a_huge_volume_is_refused_before_the_body_is_read(client, tmp_path):
    bomb = _hostile_nifti(tmp_path / "bomb.nii.gz")
    assert bomb.stat().st_size < 3 * 1024**2
    segmenter = client.state.segmenter
    timings = []
    for attempt in range(3):
        started = time.perf_counter()
        with pytest.raises(Exception) as info, open(bomb, "rb") as handle:
            segmenter.segment_stream(handle, "bomb.nii.gz", f"r{attempt}")
        timings.append(time.perf_counter() - started)
        assert getattr(info.value, "status", None) == 422
        assert "shape (1024, 1024, 512) is far outside the training data" in info.value.message
    print(f"header refusal of a 2 GiB-declaring .nii.gz: best {min(timings) * 1000:.1f} ms")
    assert min(timings) < 0.1

    huge = _hostile_nifti(tmp_path / "huge.nii.gz", shape=(2048, 1024, 512))
    started = time.perf_counter()
    response = upload(client, huge)
    assert response.status_code == 413
    assert "declares a 2048x1024x512 float32 volume" in response.json()["detail"]
    assert time.perf_counter() - started < 2.0  # includes the 2 MB upload through TestClient


def test_patient_identifiers_never_reach_tracking_logs_or_records(
    logged, client, tmp_path, caplog, monkeypatch
):
    """Planted identifiers in DICOM headers: a dataset run, a served series (both formats) and
    a drift check over series folders; then every byte the stores hold is scanned."""
    import mlpipe.log as mlog
    from tests.dicom_factory import PLANTED, write_dicom_dataset, write_series

    affine = np.diag([*TRAIN_SPACING, 1.0])
    data_root = write_dicom_dataset(
        tmp_path / "dicom-data", cases=2, shape=TRAIN_SHAPE, affine=affine, identifiers=PLANTED
    )
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    caplog.set_level("DEBUG")
    try:
        experiment = mlflow.create_experiment("dicom", artifact_location=str(store / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            info = mlog.dataset(data_root)
            mlog.data_profile(info)
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)

    outputs = []
    for fmt in ("nifti", "dicom-seg"):
        archive = _series_zip(tmp_path, _hu_volume(2), affine, identifiers=PLANTED)
        with open(archive, "rb") as handle:
            response = client.post(f"/segment?format={fmt}", files={"file": ("in.zip", handle)})
        assert response.status_code == 200, response.text
        outputs.append(str(response.headers))
    assert PLANTED["PatientName"].encode() in response.content  # the SEG itself carries them

    new = tmp_path / "new-series"
    for i in range(2):
        write_series(_hu_volume(3 + i), affine, new / f"s{i}", identifiers=PLANTED)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli, ["drift", f"models:/{MODEL}/1", str(new), "--tracking-uri", logged.uri]
    )
    assert result.exit_code in (0, 4), result.output
    outputs.append(result.output)

    scanned = [store / "mlruns.db", client.state.profile_file]
    scanned += [p for p in (store / "artifacts").rglob("*") if p.is_file()]
    scanned += [Path(logged.uri.removeprefix("sqlite:///"))]
    scanned += [p for p in (logged.root / "artifacts").rglob("*") if p.is_file()]
    scanned += [p for p in (tmp_path / "drift-report").rglob("*") if p.is_file()]
    haystacks = [p.read_bytes() for p in scanned] + [
        text.encode() for text in (caplog.text, *outputs)
    ]
    assert len(scanned) > 8
    for key, value in PLANTED.items():
        for needle in {value, *value.split("^")}:
            leaks = [
                str(p)
                for p, hay in zip(scanned, haystacks[: len(scanned)], strict=True)
                if needle.encode() in hay
            ]
            in_text = any(needle.encode() in hay for hay in haystacks[len(scanned) :])
            assert not leaks and not in_text, f"{key} {needle!r} leaked into {leaks or 'logs'}"


def test_drift_over_a_folder_of_bad_series_exits_2_with_the_reason(logged, tmp_path, monkeypatch):
    from tests.dicom_factory import write_series

    folder = tmp_path / "incoming" / "mixed"
    affine = np.diag([*TRAIN_SPACING, 1.0])
    write_series(_hu_volume(), affine, folder, series_uid="1.2.826.0.1.1")
    write_series(_hu_volume()[:, :, :5], affine, tmp_path / "b", series_uid="1.2.826.0.1.2")
    for path in (tmp_path / "b").iterdir():
        path.rename(folder / f"b_{path.name}")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli,
        ["drift", f"models:/{MODEL}/1", str(tmp_path / "incoming"), "--tracking-uri", logged.uri],
    )
    assert result.exit_code == 2, result.output
    assert "holds 2 series, expected one: 1.2.826.0.1.1 (24 slices, CT)" in result.output
    assert "Traceback" not in result.output


def test_request_validation_error_is_short_and_echoes_no_input(client):
    """Issue 20: FastAPI's own 422 echoed the whole request (600 KB of base64)."""
    planted = "QUFB" * 150_000  # 600 KB in a field the endpoint does not know
    response = client.post("/segment/json", json={"wrong_field": planted, "filename": 7})
    assert response.status_code == 422
    assert len(response.content) < 1000
    assert "QUFB" not in response.text
    body = response.json()
    assert "nifti_base64" in body["detail"] and body["detail"].startswith("Invalid request")
    assert response.headers["X-Request-Id"] == body["request_id"]

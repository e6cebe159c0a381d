"""mlpipe predict as separate processes: a batch killed with SIGKILL and resumed, two shards
started as two processes and gathered by ``--summary``, masks into a real moto S3 server, and
``--workers 2``. The model is a real registered seg3d UNet (untrained) in a SQLite store.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlpipe.cli import cli
from mlpipe.predict.outputs import PART_SUFFIX
from tests.conftest import REPO_ROOT, isolated_env, log_served_model

pytestmark = pytest.mark.integration

MODEL = "seg3d-predict-int"
URI = f"models:/{MODEL}@production"
MLPIPE = str(Path(sys.executable).with_name("mlpipe"))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-int-model")
    with isolated_env(root):
        return log_served_model(root, MODEL)


def make_inputs(folder: Path, count: int, shape=(40, 36, 28)) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(count):
        rng = np.random.default_rng(i)
        data = rng.normal(size=shape).astype(np.float32)
        affine = np.diag([1.5 + 0.1 * (i % 3), 1.5, 3.0, 1.0])
        paths[f"ct_{i:02d}"] = folder / f"ct_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), paths[f"ct_{i:02d}"])
    return paths


def command(logged, *args: str) -> list[str]:
    return [MLPIPE, "predict", *args, "--tracking-uri", logged.uri]


def invoke(logged, *args: str):
    """``mlpipe predict ARGS`` in this process (click's CliRunner)."""
    return CliRunner().invoke(cli, ["predict", *args, "--tracking-uri", logged.uri])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "projects" / "seg3d"), str(REPO_ROOT)])
    return env


def runs_of(logged):
    client = MlflowClient(logged.uri)
    experiment = client.get_experiment_by_name(f"{MODEL}-inference")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    return client, runs


def test_a_killed_batch_leaves_no_partial_mask_and_the_rerun_writes_only_the_rest(logged, tmp_path):
    inputs = make_inputs(tmp_path / "in", 14)
    out = tmp_path / "out"
    process = subprocess.Popen(
        command(logged, URI, str(tmp_path / "in"), "--out", str(out), "--batch-id", "killed"),
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("*.nii.gz"))) < 4:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no mask written in time"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stderr.close()

    first = sorted(p.name for p in out.glob("*.nii.gz"))
    assert 4 <= len(first) < len(inputs), first
    for name in first:  # every visible mask is whole
        mask = nib.load(out / name)
        assert mask.shape == nib.load(inputs[name.removesuffix(".nii.gz")]).shape
        np.asarray(mask.dataobj)
    before = {name: (out / name).stat().st_mtime_ns for name in first}

    result = invoke(logged, URI, str(tmp_path / "in"), "--out", str(out), "--batch-id", "killed")

    assert result.exit_code == 0, result.output
    assert {p.name for p in out.glob("*.nii.gz")} == {f"{c}.nii.gz" for c in inputs}
    assert {name: (out / name).stat().st_mtime_ns for name in first} == before
    assert not list(out.rglob(f"*{PART_SUFFIX}"))
    _, runs = runs_of(logged)
    resumed, killed = runs[0], runs[1]
    assert resumed.data.metrics["written"] == len(inputs) - len(first)
    assert resumed.data.metrics["skipped"] == len(first)
    assert resumed.info.status == "FINISHED"
    assert killed.data.tags["mlpipe.predict.batch_id"] == "killed"
    assert killed.info.status == "FAILED"  # the rerun ended what the SIGKILL left RUNNING
    assert resumed.info.run_id in killed.data.tags["mlpipe.failure"]


def test_sigterm_marks_the_run_killed_and_exits_143(logged, tmp_path):
    make_inputs(tmp_path / "in", 10)
    out = tmp_path / "out"
    process = subprocess.Popen(
        command(logged, URI, str(tmp_path / "in"), "--out", str(out), "--batch-id", "termed"),
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("*.nii.gz")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    _, runs = runs_of(logged)
    assert runs[0].data.tags["mlpipe.predict.batch_id"] == "termed"
    assert runs[0].info.status == "KILLED"
    assert 1 <= runs[0].data.metrics["written"] < 10  # what was done before the signal


def test_two_shards_as_two_processes_cover_every_case_once_and_summary_reports_both(
    logged, tmp_path
):
    inputs = make_inputs(tmp_path / "in", 7, shape=(32, 32, 24))
    out = tmp_path / "out"
    processes = [
        subprocess.Popen(
            command(logged, URI, str(tmp_path / "in"), "--out", str(out), "--shard", f"{i}/2"),
            cwd=tmp_path,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    ids = {re.search(r"Batch (\S+) shard", stdout).group(1) for stdout, _ in outputs}
    assert len(ids) == 1, ids  # both derived the same batch id on their own
    batch_id = ids.pop()
    assert {p.name for p in out.glob("*.nii.gz")} == {f"{c}.nii.gz" for c in inputs}

    client, runs = runs_of(logged)
    shard_runs = [r for r in runs if r.data.tags["mlpipe.predict.batch_id"] == batch_id]
    cases = []
    for run in shard_runs:
        local = client.download_artifacts(run.info.run_id, "predictions.csv", str(tmp_path))
        cases += [line.split(",")[0] for line in Path(local).read_text().splitlines()[1:]]
        Path(local).unlink()
    assert sorted(cases) == sorted(inputs)  # every case exactly once
    assert {r.data.tags["mlpipe.predict.shard"] for r in shard_runs} == {"0/2", "1/2"}

    summary = CliRunner().invoke(
        cli, ["predict", "--summary", batch_id, "--tracking-uri", logged.uri]
    )
    assert summary.exit_code == 0, summary.output
    assert "0/2" in summary.output and "1/2" in summary.output
    assert "total: 7 case(s), 7 with a mask, 0 failed, 2/2 shard(s) reported" in summary.output

    # a batch with a shard that never ran: --summary names it and exits 1
    in_three = (URI, str(tmp_path / "in"), "--out", str(tmp_path / "out3"), "--shard", "0/3")
    partial = invoke(logged, *in_three, "--batch-id", "three")
    assert partial.exit_code == 0, partial.output
    summary = CliRunner().invoke(
        cli, ["predict", "--summary", "three", "--tracking-uri", logged.uri]
    )
    assert summary.exit_code == 1
    assert "missing shard(s): 1/3, 2/3" in summary.output


def test_masks_go_to_s3_as_whole_objects_and_a_rerun_skips_them(
    logged, tmp_path, moto_s3, monkeypatch
):
    inputs = make_inputs(tmp_path / "in", 3, shape=(32, 30, 24))
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="masks")
    for key, value in moto_s3.credentials.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_s3.endpoint)
    args = ["predict", URI, str(tmp_path / "in"), "--out", "s3://masks/batch/one"]
    args += ["--tracking-uri", logged.uri]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="masks")["Contents"]}
    assert keys == {f"batch/one/{c}.nii.gz" for c in inputs}
    body = s3.get_object(Bucket="masks", Key="batch/one/ct_01.nii.gz")["Body"].read()
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(body))
    assert mask.shape == nib.load(inputs["ct_01"]).shape
    np.testing.assert_allclose(mask.affine, nib.load(inputs["ct_01"]).affine, atol=1e-5)
    assert moto_s3.credentials["AWS_SECRET_ACCESS_KEY"] not in result.output

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    _, runs = runs_of(logged)
    assert runs[0].data.metrics["skipped"] == 3 and runs[0].data.metrics["written"] == 0
    assert runs[0].data.tags["mlpipe.predict.out"] == "s3://masks/batch/one"

    missing = CliRunner().invoke(cli, [*args[:3], "--out", "s3://no-such-bucket/x", *args[-2:]])
    assert missing.exit_code == 2 and "no-such-bucket" in missing.output


def test_workers_load_the_model_each_and_write_every_case(logged, tmp_path):
    inputs = make_inputs(tmp_path / "in", 4, shape=(32, 32, 24))
    out = tmp_path / "out"

    result = invoke(logged, URI, str(tmp_path / "in"), "--out", str(out), "--workers", "2")

    assert result.exit_code == 0, result.output
    assert {p.name for p in out.glob("*.nii.gz")} == {f"{c}.nii.gz" for c in inputs}
    _, runs = runs_of(logged)
    assert runs[0].data.params["workers"] == "2"
    assert runs[0].data.metrics["written"] == 4

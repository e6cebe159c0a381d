"""docker/predict-job.yaml, checked without a cluster: an Indexed Job whose pods run
``mlpipe predict`` with ``--shard INDEX/N``, N equal to ``completions``, parsed by the real
command's options, and whose secrets come from Kubernetes secrets only."""

from __future__ import annotations

import pytest
import yaml

from mlpipe.cli import cli
from mlpipe.core.settings import SECRET_ENV_VARS
from mlpipe.predict.inputs import parse_shard
from tests.conftest import REPO_ROOT

JOB = REPO_ROOT / "docker" / "predict-job.yaml"
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(JOB.read_text())


def container(job: dict) -> dict:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in args, from the container's env."""
    out = []
    for arg in args:
        for name, value in env.items():
            arg = arg.replace(f"$({name})", value)
        assert "$(" not in arg, f"unexpanded variable in {arg!r}"
        out.append(arg)
    return out


def test_job_is_indexed_and_its_index_comes_from_the_annotation(job):
    spec = job["spec"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] <= spec["completions"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == INDEX_ANNOTATION
    exit_codes = [
        r["onExitCodes"]["values"] for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r
    ]
    assert [1, 2] in exit_codes  # failed cases or bad input: retrying the pod cannot help


def test_every_index_parses_as_a_predict_command_and_the_shards_cover_the_batch(job):
    completions = job["spec"]["completions"]
    args = container(job)["args"]
    assert args[0] == "predict"
    shards, batch_ids = [], set()
    for index in range(completions):
        argv = expand(args[1:], {"JOB_COMPLETION_INDEX": str(index)})
        ctx = cli.commands["predict"].make_context("predict", argv)
        params = ctx.params
        assert params["model_uri"].startswith("models:/")
        assert params["out"].startswith("s3://")  # every pod writes into the same prefix
        shard = parse_shard(params["shard"])
        assert shard.count == completions
        shards.append(shard.index)
        batch_ids.add(params["batch_id"])
    assert sorted(shards) == list(range(completions))
    assert len(batch_ids) == 1


def test_secrets_come_from_kubernetes_secrets_only(job):
    env = container(job)["env"]
    for entry in env:
        if entry["name"] in SECRET_ENV_VARS:
            assert "value" not in entry, entry["name"]
            assert "secretKeyRef" in entry["valueFrom"], entry["name"]
    names = {e["name"] for e in env}
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"} <= names

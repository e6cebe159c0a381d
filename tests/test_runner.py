"""``mlpipe run`` end to end on a real SQLite tracking store, driven through click's runner.

Every bad input must stop with exit code 2 and a message before anything is created: the
tests check that no ``mlruns.db`` appeared at all.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlpipe.cli import cli
from tests.conftest import git, write_nifti_dataset


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["run", *args], env=env, catch_exceptions=False)


def received(client, run) -> dict:
    return client.load_dict(f"runs:/{run.info.run_id}/received.json")


def test_run_checks_types_logs_params_and_tags(project_dir, runs_in, tmp_path):
    proj = project_dir("good")
    result = invoke(str(proj), "-P", "alpha=0.25", "-P", "amp=YES", "-P", "model=segresnet")
    assert result.exit_code == 0, result.output
    (run,) = runs_in()
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "alpha": "0.25",
        "epochs": "2",
        "amp": "true",
        "model": "segresnet",
        "data_dir": "",
    }
    tags = run.data.tags
    assert tags["mlpipe.convention"] == "1"
    assert tags["mlpipe.entry_point"] == "main"
    assert tags["mlpipe.version"]
    assert tags["mlflow.source.type"] == "PROJECT"
    assert run.data.metrics["score"] == 0.5
    assert f"Run {run.info.run_id} finished" in result.output
    assert "mlflow ui --backend-store-uri sqlite:///" in result.output


def test_run_passes_converted_values_to_the_command(project_dir, runs_in):
    import mlflow

    proj = project_dir("good")
    result = invoke(str(proj), "-P", "amp=1", "-P", "epochs=7")
    assert result.exit_code == 0, result.output
    (run,) = runs_in()
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlruns.db'}")
    got = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/received.json")
    assert got["args"]["amp"] == "true"
    assert got["args"]["epochs"] == "7"
    assert got["extra"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-P", "alpha=abc"], r"alpha: 'abc' is not valid for type float"),
        (["-P", "epochs=2.5"], r"epochs: '2.5' is not valid for type int"),
        (["-P", "amp=maybe"], r"amp: 'maybe' is not valid for type bool"),
        (["-P", "alhpa=1"], r"did you mean alpha\?"),
        (["-P", "model=vnet"], r"model: 'vnet' is not one of the allowed choices"),
        (["-e", "train"], r"needs a value for: alpha, data_dir"),
        (["-e", "train", "-P", "alpha=1", "-P", "data_dir=nowhere"], r"data_dir: path 'nowhere'"),
        (["-e", "trian"], r"Entry point 'trian' is not declared.*Did you mean train\?"),
        (["-P", "noequals"], r"expected KEY=VALUE"),
        (["--gpus"], r"--gpus applies to docker_env projects"),
        (["--backend", "kubernetes"], r"needs --backend-config"),
        (["--version", "-x"], r"is not a branch, tag or commit"),
    ],
)
def test_run_refuses_bad_input_before_creating_anything(project_dir, tmp_path, args, message):
    proj = project_dir("good")
    result = invoke(str(proj), *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ")
    import re

    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "mlruns.db").exists()
    assert not (tmp_path / "mlruns").exists()


def test_run_refuses_project_with_errors(tmp_path):
    proj = tmp_path / "broken"
    proj.mkdir()
    (proj / "MLproject").write_text(
        "name: broken\nentry_points:\n  main:\n    command: python x.py {beta}\n"
    )
    result = invoke(str(proj))
    assert result.exit_code == 2
    assert "MLproject:4: error: command of main uses {beta}" in result.output
    assert not (tmp_path / "mlruns.db").exists()


def test_run_dataset_version_needs_a_dataset(project_dir, tmp_path):
    result = invoke(str(project_dir("good")), "--dataset-version", "v1")
    assert result.exit_code == 2
    assert "--dataset-version needs a dataset" in result.output
    assert not (tmp_path / "mlruns.db").exists()


def test_run_failing_command_marks_failed_and_shows_tail(project_dir, runs_in):
    result = invoke(str(project_dir("failing")))
    assert result.exit_code == 1
    (run,) = runs_in()
    assert run.info.status == "FAILED"
    assert "exited with code 3" in result.output
    tail = result.output.split("Last lines of its output:")[1]
    assert "FATAL: the loss went to nan at epoch 7" in tail
    assert "working line 49" in tail
    assert "working line 0\n" not in tail  # only the last lines


def test_run_dry_run_prints_plan_and_creates_nothing(project_dir, tmp_path):
    proj = project_dir("good")
    result = invoke(str(proj), "--dry-run", "-P", "alpha=0.1", "-P", "amp=no")
    assert result.exit_code == 0, result.output
    assert "Dry run: nothing was created." in result.output
    assert "alpha = '0.1' (float)" in result.output
    assert "--alpha 0.1 --epochs 2 --amp false --model unet --data-dir ''" in result.output
    assert "experiment   good" in result.output
    assert not (tmp_path / "mlruns.db").exists()


def test_run_dry_run_json(project_dir, tmp_path):
    result = invoke(str(project_dir("good")), "--dry-run", "--json", "--experiment", "exp1")
    plan = json.loads(result.output[result.output.index("{") :])
    assert plan["experiment"] == "exp1"
    assert plan["parameters"]["epochs"] == {"value": "2", "type": "int"}
    assert plan["tracking_uri"] == f"sqlite:///{tmp_path / 'mlruns.db'}"


def test_run_allow_extra_params_passes_them_through(project_dir, runs_in):
    import mlflow

    result = invoke(str(project_dir("good")), "--allow-extra-params", "-P", "foo=bar")
    assert result.exit_code == 0, result.output
    (run,) = runs_in()
    assert run.data.params["foo"] == "bar"
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlruns.db'}")
    got = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/received.json")
    assert got["extra"] == ["--foo", "bar"]


def test_run_experiment_precedence(project_dir, runs_in, monkeypatch):
    proj = str(project_dir("good"))
    assert invoke(proj).exit_code == 0
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert invoke(proj).exit_code == 0
    assert invoke(proj, "--experiment", "from-flag").exit_code == 0
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{Path.cwd() / 'mlruns.db'}")
    names = [client.get_experiment(r.info.experiment_id).name for r in runs_in()]
    assert names == ["from-flag", "from-env", "good"]


def test_run_tracking_uri_flag_relative_sqlite(project_dir, runs_in, tmp_path):
    result = invoke(str(project_dir("good")), "--tracking-uri", "sqlite:///other.db")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "mlruns.db").exists()
    assert len(runs_in(tmp_path / "other.db")) == 1


def test_run_dataset_tags_from_dataset_json(project_dir, runs_in, tmp_path):
    data = write_nifti_dataset(tmp_path / "Task09_Spleen", name="spleen", version="v3")
    proj = str(project_dir("good"))
    assert invoke(proj, "-P", f"data_dir={data}").exit_code == 0
    assert invoke(proj, "-P", f"data_dir={data}", "--dataset-version", "v4").exit_code == 0
    newer, older = runs_in()
    assert older.data.tags["mlpipe.dataset.name"] == "spleen"
    assert older.data.tags["mlpipe.dataset.version"] == "v3"
    assert older.data.tags["mlpipe.dataset.uri"] == str(data)
    assert newer.data.tags["mlpipe.dataset.version"] == "v4"
    digest = older.data.tags["mlpipe.dataset.digest"]
    assert len(digest) == 64 and digest == newer.data.tags["mlpipe.dataset.digest"]
    assert older.data.tags["mlpipe.dataset.files"] == "6"


def test_run_refuses_a_broken_dataset_before_creating_anything(project_dir, tmp_path):
    data = write_nifti_dataset(tmp_path / "data")
    (data / "labelsTr" / "case_1.nii.gz").unlink()
    result = invoke(str(project_dir("good")), "-P", f"data_dir={data}")
    assert result.exit_code == 2
    assert "Parameter data_dir names a dataset that cannot be used" in result.output
    assert "case_1.nii.gz" in result.output
    assert not (tmp_path / "mlruns.db").exists()


def test_run_from_git_url_with_version_tags_commit(git_repo, runs_in, tmp_path):
    repo = git_repo("good")
    git("tag", "v1", cwd=repo)
    tagged = git("rev-parse", "HEAD", cwd=repo)
    (repo / "projects" / "good" / "train.py").write_text("raise SystemExit(9)\n")
    git("commit", "-qam", "break it", cwd=repo)
    url = f"file://{repo}#projects/good"
    result = invoke(url, "--version", "v1", "-P", "alpha=1")
    assert result.exit_code == 0, result.output
    (run,) = runs_in()
    tags = run.data.tags
    assert tags["mlpipe.git.commit"] == tagged
    assert tags["mlpipe.git.dirty"] == "false"
    assert tags["mlpipe.git.url"] == f"file://{repo}"
    assert tags["mlflow.source.name"] == url
    assert run.data.metrics["score"] == 2.0
    assert not list(tmp_path.glob("mlpipe-src-*"))


def test_run_never_logs_git_credentials(git_repo, runs_in):
    repo = git_repo("good")
    git(
        "remote",
        "add",
        "origin",
        "https://alice:ghp_s3cr3tT0ken@example.com/org/repo.git",
        cwd=repo,
    )
    result = invoke(str(repo / "projects" / "good"))
    assert result.exit_code == 0, result.output
    (run,) = runs_in()
    assert run.data.tags["mlpipe.git.url"] == "https://example.com/org/repo.git"
    logged = json.dumps({**run.data.tags, **run.data.params})
    assert "s3cr3t" not in logged and "alice" not in logged
    assert "s3cr3t" not in result.output


def test_run_local_repo_reports_dirty(git_repo, runs_in):
    repo = git_repo("good")
    (repo / "projects" / "good" / "train.py").write_text(
        (repo / "projects" / "good" / "train.py").read_text() + "\n# edited\n"
    )
    assert invoke(str(repo / "projects" / "good")).exit_code == 0
    (run,) = runs_in()
    assert run.data.tags["mlpipe.git.dirty"] == "true"
    assert run.data.tags["mlpipe.git.commit"] == git("rev-parse", "HEAD", cwd=repo)


def test_mlflow_local_backend_seam_is_still_there():
    """runner._launch swaps mlflow.projects.backend.local._run_entry_point: fail loudly if an
    MLflow upgrade renames it or changes how LocalBackend.run calls it."""
    from mlflow.projects.backend import local

    assert list(inspect.signature(local._run_entry_point).parameters) == [
        "command",
        "work_dir",
        "experiment_id",
        "run_id",
    ]
    assert "_run_entry_point(" in inspect.getsource(local.LocalBackend.run)


def test_run_gpus_adds_docker_arg_for_docker_projects(project_dir, tmp_path):
    result = invoke(str(project_dir("dockerized")), "--gpus", "--dry-run", "-P", "epochs=3")
    assert result.exit_code == 0, result.output
    assert "docker args: -A gpus=all" in result.output
    assert "python -c 'print(3)'" in result.output
    assert not (tmp_path / "mlruns.db").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, r"no such file"),
        ("{not json", r"not a readable JSON file"),
        ('{"repository-uri": "r"}', r"missing kube-job-template-path"),
        ('{"repository-uri": "r", "kube-job-template-path": "nope.yaml"}', r"does not exist"),
    ],
)
def test_run_kubernetes_config_checked_first(project_dir, tmp_path, config, message):
    import re

    path = tmp_path / "kube.json"
    if config is not None:
        path.write_text(config)
    args = ["--backend", "kubernetes", "--backend-config", str(path)]
    result = invoke(str(project_dir("dockerized")), *args)
    assert result.exit_code == 2
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "mlruns.db").exists()


def test_run_kubernetes_needs_docker_env(project_dir, tmp_path):
    (tmp_path / "job.yaml").write_text("kind: Job\n")
    (tmp_path / "kube.json").write_text(
        json.dumps({"repository-uri": "r", "kube-job-template-path": str(tmp_path / "job.yaml")})
    )
    args = ["--backend", "kubernetes", "--backend-config", str(tmp_path / "kube.json")]
    result = invoke(str(project_dir("good")), *args)
    assert result.exit_code == 2
    assert "runs docker_env projects only" in result.output


def test_run_kubernetes_hands_over_to_mlflow(project_dir, tmp_path, runs_in, monkeypatch):
    """No cluster or Docker engine here: mlflow.projects.run, which builds, pushes and starts
    the Job, is replaced by a stand-in that creates the run as MLflow would and reports it
    finished. What is checked is mlpipe's side: what it passes on, tags, and final status."""
    import mlflow
    import mlflow.projects

    (tmp_path / "job.yaml").write_text("kind: Job\n")
    config = tmp_path / "kube.json"
    config.write_text(
        json.dumps({"repository-uri": "r", "kube-job-template-path": str(tmp_path / "job.yaml")})
    )
    calls = []

    class Submitted:
        def __init__(self, run_id):
            self.run_id = run_id

        def wait(self):
            return True

    def fake_run(uri, **kwargs):
        calls.append((uri, kwargs))
        run = mlflow.MlflowClient().create_run(kwargs["experiment_id"])
        return Submitted(run.info.run_id)

    monkeypatch.setattr(mlflow.projects, "run", fake_run)
    proj = project_dir("dockerized")
    result = invoke(str(proj), "--backend", "kubernetes", "--backend-config", str(config))
    assert result.exit_code == 0, result.output
    ((uri, kwargs),) = calls
    assert uri == str(proj)
    assert kwargs["backend"] == "kubernetes"
    assert kwargs["backend_config"] == str(config)
    assert kwargs["parameters"] == {"epochs": "1"}
    (run,) = runs_in()
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlpipe.entry_point"] == "main"


def test_with_params_rechecks_values_and_keeps_the_rest_of_the_plan(project_dir):
    """A sweep's trial: the checked plan with other values (``mlpipe.sweep`` uses this)."""
    from mlpipe.core.errors import ParameterError
    from mlpipe.run.runner import RunRequest, plan_run, with_params

    plan = plan_run(RunRequest(uri=str(project_dir("tuner")), params=["steps=3"]))
    try:
        trial = with_params(plan, {"lr": "0.005", "model": "segresnet"}, run_name="t-001")
        assert trial.params.values["lr"] == "0.005"
        assert trial.params.values["steps"] == "3"  # the fixed -P stays
        assert "--lr 0.005 --model segresnet" in trial.command
        assert trial.request.run_name == "t-001"
        assert trial.tags == plan.tags and trial.tags is not plan.tags
        assert plan.params.values["lr"] == "0.01"  # the base plan is untouched
        with pytest.raises(ParameterError, match="model"):
            with_params(plan, {"model": "vnet"})
    finally:
        plan.source.cleanup()


def test_execute_hooks_see_the_process_and_an_outside_stop_ends_killed(project_dir, runs_in):
    """``LaunchHooks.on_start`` gets the process; stopping it from there is not a failure."""
    import signal
    import threading

    from mlpipe.core.errors import InterruptedRunError
    from mlpipe.run.launcher import LaunchHooks
    from mlpipe.run.runner import RunRequest, execute, plan_run

    plan = plan_run(RunRequest(uri=str(project_dir("sleeper")), params=["seconds=60"]))
    seen = []

    def on_start(run_id, process):
        seen.append(run_id)
        threading.Timer(1.0, process.stop, args=(signal.SIGTERM,)).start()

    with pytest.raises(InterruptedRunError) as info:
        execute(plan, hooks=LaunchHooks(on_start=on_start, env={"MLPIPE_TEST_HOOK": "1"}))
    assert info.value.run_id == seen[0]
    (run,) = runs_in()
    assert run.info.run_id == seen[0] and run.info.status == "KILLED"


@pytest.mark.parametrize("name", ["", "   ", "exp\nfake", "tab\there", "bell\x07"])
def test_run_experiment_blank_or_control_characters_refused(project_dir, runs_in, name):
    """Issue 20: '' fell back silently to the MLproject's name; control characters passed."""
    result = CliRunner().invoke(cli, ["run", str(project_dir("good")), "--experiment", name])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: --experiment")
    assert runs_in() == []


def test_git_source_warnings_name_the_url_not_the_clone(git_repo, tmp_path):
    """Issue 20: warnings named /tmp/mlpipe-src-XXXX/..., a folder gone after the run."""
    repo = git_repo("foreign")
    url = f"file://{repo}#projects/foreign"
    result = CliRunner().invoke(cli, ["run", url, "--dry-run"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert warnings, result.output
    assert all(f"file://{repo}#projects/foreign (MLproject)" in w for w in warnings), warnings
    assert not [w for w in warnings if "mlpipe-src-" in w]

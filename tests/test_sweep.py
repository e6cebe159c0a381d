"""``mlpipe sweep`` without starting trials: options, the space refused before anything exists,
the MLproject's ``mlpipe: sweep:`` section, and how the study counts trials (a real Optuna
SQLite storage in tmp_path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlpipe.cli import cli
from mlpipe.core.errors import NotFoundError, UsageError
from mlpipe.run.project import load_project
from mlpipe.sweep import study as studies
from mlpipe.sweep.plan import SweepRequest, parse_duration, plan_sweep
from tests.conftest import PROJECTS

CONVENTION_MLPROJECT = """\
name: tuned
python_env: python_env.yaml
mlpipe:
  convention: 1
  model: tuned
  dataset_param: data_dir
  primary_metric: score
  primary_metric_goal: max
  sweep:
    entry_point: train
    space:
      lr: loguniform(1e-4, 1e-1)
      model: [unet, segresnet]
    trials: 7
    pruner: hyperband
entry_points:
  main:
    parameters:
      data_dir: {type: string, default: data}
    command: "python tuner.py --lr 0.01 --model unet --layers 2 --steps 2 --delay 0 --script -"
  train:
    parameters:
      data_dir: {type: string, default: data}
      lr: {type: float, default: 0.01}
      model: {type: string, default: unet, choices: [unet, segresnet]}
    command: "python tuner.py --lr {lr} --model {model} --layers 2 --steps 2 --delay 0 --script -"
"""


@pytest.fixture
def tuned(tmp_path) -> Path:
    folder = tmp_path / "tuned"
    shutil.copytree(PROJECTS / "tuner", folder)
    (folder / "MLproject").write_text(CONVENTION_MLPROJECT)
    (folder / "python_env.yaml").write_text("python: '3.11'\ndependencies: []\n")
    return folder


def _sweep(*args: str):
    return CliRunner().invoke(cli, ["sweep", *args], catch_exceptions=False)


def test_cli_bad_space_is_exit_2_with_nothing_created(tmp_path):
    result = _sweep(
        str(PROJECTS / "tuner"),
        "--space",
        "lrr=loguniform(1e-4,1e-2)",
        "--space",
        "model=choice(unet,vnet)",
        "--trials",
        "3",
        "--metric",
        "score",
        "--goal",
        "max",
    )
    assert result.exit_code == 2
    assert "lrr is not a parameter of entry point 'main' (did you mean lr?)" in result.output
    assert "'vnet' is not one of the allowed choices" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "mlruns.db").exists()
    assert not (tmp_path / studies.SWEEP_DB).exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--space", "lr=uniform(0.1,1)", "--metric", "score", "--goal", "max"], "How many"),
        (["--space", "lr=uniform(0.1,1)", "--trials", "2"], "Which metric"),
        (["--space", "lr=uniform(0.1,1)", "--trials", "0"], "--trials must be at least 1"),
        (["--space", "lr=uniform(0.1,1)", "--trials", "2", "--timeout", "soon"], "duration"),
        (["--trials", "2", "--metric", "score", "--goal", "max"], "Nothing to search"),
        (["--space", "lr=uniform(0.1,1)", "-P", "lr=0.5"], "both searched"),
        (["--space", "lr=uniform(0.1,1)", "--gpus", "0,x"], "GPU indices"),
        (["--space", "lr=uniform(0.1,1)", "--study", "a b"], "--study 'a b'"),
    ],
)
def test_cli_refuses_incomplete_or_bad_options_before_anything(tmp_path, args, expected):
    result = _sweep(str(PROJECTS / "tuner"), *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert not (tmp_path / "mlruns.db").exists()


def test_cli_join_of_an_unknown_study_lists_the_known_ones(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    storage = studies.open_storage(url)
    studies.create_study(storage, "known", goal="max", sampler="tpe", pruner="none", config={})
    result = _sweep("--join", "nope", "--storage", url)
    assert result.exit_code == 2
    assert "No study 'nope'" in result.output and "known" in result.output


def test_mlproject_sweep_section_is_linted_and_used(tuned):
    project = load_project(tuned)
    assert project.errors == []
    assert project.conventions.sweep["trials"] == 7
    plan = plan_sweep(SweepRequest(project=str(tuned)))
    try:
        assert plan.base.entry_point.name == "train"
        assert set(plan.space) == {"lr", "model"}
        assert (plan.trials, plan.metric, plan.goal, plan.pruner) == (
            7,
            "score",
            "max",
            "hyperband",
        )
        assert plan.register_as is None
        # the command line overrides the project's search
        again = plan_sweep(
            SweepRequest(project=str(tuned), space=["lr=uniform(0.001,0.01)"], trials=2)
        )
        assert again.space["lr"].describe() == "float(0.001,0.01)"
        assert again.space["model"].choices == ("unet", "segresnet")
        assert again.trials == 2
        again.base.source.cleanup()
    finally:
        plan.base.source.cleanup()


def test_mlproject_sweep_section_problems_are_findings(tuned):
    text = CONVENTION_MLPROJECT.replace("trials: 7", "trials: many").replace(
        "pruner: hyperband", "prunner: hyperband"
    )
    (tuned / "MLproject").write_text(text)
    messages = [f.message for f in load_project(tuned).errors]
    assert any("mlpipe.sweep.trials is 'many'" in m for m in messages)
    assert any("unknown key mlpipe.sweep.prunner (did you mean pruner?)" in m for m in messages)


def test_parse_duration():
    assert parse_duration("90") == 90
    assert parse_duration("90s") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("1h30m") == 5400
    for bad in ("", "1d", "m30", "0"):
        with pytest.raises(UsageError):
            parse_duration(bad)


def test_storage_display_strips_credentials():
    shown = studies.storage_display("postgresql://optuna:s3cret@db.lab:5432/optuna")
    assert "s3cret" not in shown and shown == "postgresql://***@db.lab:5432/optuna"


def test_default_storage_lies_beside_the_local_tracking_store(tmp_path):
    from mlpipe.core.settings import resolve_settings

    settings = resolve_settings(tracking_uri=f"sqlite:///{tmp_path / 'track' / 'mlruns.db'}")
    assert studies.default_storage(settings) == f"sqlite:///{tmp_path / 'track' / studies.SWEEP_DB}"


@pytest.fixture
def study(tmp_path):
    storage = studies.open_storage(f"sqlite:///{tmp_path / 'studies.db'}")
    return studies.create_study(
        storage, "s", goal="max", sampler="random", pruner="median", config={"trials": 4}
    )


def _add(study, state, **attrs):
    import optuna
    from optuna.distributions import FloatDistribution

    study.add_trial(
        optuna.create_trial(
            state=state,
            value=0.5 if state == optuna.trial.TrialState.COMPLETE else None,
            params={"lr": 0.1},
            distributions={"lr": FloatDistribution(0.01, 1.0)},
            user_attrs=attrs,
        )
    )


def test_progress_counts_finished_crashed_running_and_queued_trials(study):
    from optuna.trial import TrialState

    _add(study, TrialState.COMPLETE)
    _add(study, TrialState.PRUNED)
    _add(study, TrialState.FAIL, **{studies.STATE_ATTR: "FAILED"})  # the project crashed
    _add(study, TrialState.FAIL, **{studies.STATE_ATTR: "KILLED"})  # Ctrl-C: run again
    _add(study, TrialState.FAIL)  # stale: its retry is queued
    _add(study, TrialState.WAITING)
    _add(study, TrialState.PRUNED, **{studies.SURPLUS_ATTR: True})
    assert studies.progress(study) == studies.Progress(counted=3, running=0, waiting=1)
    assert studies.study_config(study) == {"trials": 4}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_is_surplus_lets_the_lower_number_take_the_last_place(study):
    from optuna.trial import TrialState

    for _ in range(3):
        _add(study, TrialState.COMPLETE)
    first = study.ask()  # number 3: the fourth and last place
    second = study.ask()  # number 4: started at the same moment by another worker
    assert not studies.is_surplus(study, first.number, 4)
    assert studies.is_surplus(study, second.number, 4)


def test_create_study_twice_says_how_to_join_or_resume(study, tmp_path):
    storage = studies.open_storage(f"sqlite:///{tmp_path / 'studies.db'}")
    with pytest.raises(UsageError, match=r"--resume.*--join s"):
        studies.create_study(storage, "s", goal="max", sampler="tpe", pruner="none", config={})
    with pytest.raises(NotFoundError, match="studies there: s"):
        studies.load_study(storage, "t", "sqlite:///x")


def test_open_storage_refuses_a_non_url():
    with pytest.raises(UsageError, match="expected a database URL"):
        studies.open_storage("sweeps.db")


def test_register_best_registers_the_model_the_run_logged(tracking, tmp_path):
    """``--register``: the best trial's logged model becomes a version, ready for promote."""
    import mlflow

    from mlpipe.core.settings import resolve_settings
    from mlpipe.core.tracking import Tracking
    from mlpipe.sweep.results import register_best

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(name="model", python_model=Echo())
    with mlflow.start_run() as empty:
        pass
    adapter = Tracking(resolve_settings(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}"))
    assert register_best(adapter, run.info.run_id, "tuned") == "1"
    version = tracking.get_model_version("tuned", "1")
    assert version.run_id == run.info.run_id
    with pytest.raises(NotFoundError, match="logged no model"):
        register_best(adapter, empty.info.run_id, "tuned")

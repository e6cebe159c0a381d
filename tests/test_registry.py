"""Promotion, rollback, history and listings on a real SQLite registry; the CLI via CliRunner."""

from __future__ import annotations

import contextlib
import json

import pytest
from click.testing import CliRunner

from mlpipe.cli import cli
from mlpipe.core.errors import GateRefusedError, UsageError
from mlpipe.registry.audit import HistoryEvent, parse_history, rollback_target
from mlpipe.registry.promotion import (
    PromotionRequest,
    connect,
    execute_promotion,
    parse_gate,
    plan_promotion,
    refuse_if_needed,
)

CONVENTION = {
    "mlpipe.dataset.name": "toy",
    "mlpipe.dataset.version": "v1",
    "mlpipe.dataset.digest": "sha256:abc",
    "mlpipe.preprocessing.digest": "sha256:def",
    "mlpipe.primary_metric": "val_dice",
    "mlpipe.primary_metric_goal": "max",
    "mlflow.user": "alice",
}


def make_version(client, model: str, *, metrics=None, tags=None, status="FINISHED") -> str:
    """A registered version whose source run has ``tags`` and ``metrics``; returns its number."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name("train")
    exp_id = experiment.experiment_id if experiment else client.create_experiment("train")
    run = client.create_run(exp_id, tags=CONVENTION if tags is None else tags)
    for key, value in (metrics if metrics is not None else {"val_dice": 0.8}).items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    with contextlib.suppress(MlflowException):
        client.create_registered_model(model)
    mv = client.create_model_version(
        model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    return str(mv.version)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def state(client, model: str, alias: str = "production"):
    import warnings

    aliases = {a: str(v) for a, v in client.get_registered_model(model).aliases.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stages = {
            str(mv.version): mv.current_stage
            for mv in client.search_model_versions(f"name = '{model}'")
        }
    return aliases.get(alias), stages


def test_parse_gate_accepts_operators_and_refuses_junk():
    assert str(parse_gate("val_dice >= 0.8")) == "val_dice>=0.8"
    assert parse_gate("loss<1e-2").threshold == 0.01
    assert parse_gate("a==1").holds(1.0)
    assert not parse_gate("a>1").holds(None)
    with pytest.raises(UsageError, match="not a gate"):
        parse_gate("val_dice => 0.8")


def test_promote_first_version_moves_alias_stage_tags_and_history(tracking):
    v1 = make_version(tracking, "seg3d")
    result = invoke("promote", "seg3d", v1, "--require", "val_dice>=0.5", "--reason", "first")
    assert result.exit_code == 0, result.output
    assert "candidate v1" in result.output and "alice" in result.output
    holder, stages = state(tracking, "seg3d")
    assert holder == v1 and stages[v1] == "Production"
    tags = tracking.get_model_version("seg3d", v1).tags
    assert tags["mlpipe.promotion.reason"] == "first"
    assert tags["mlpipe.promotion.previous"] == ""
    assert "val_dice>=0.5" in json.loads(tags["mlpipe.promotion.gates"])[0]
    assert tags["mlpipe.promoted_at"].endswith("+00:00")
    events = parse_history(tracking.get_registered_model("seg3d").tags)
    assert [(e.action, e.from_version, e.to_version) for e in events] == [("promote", None, v1)]


def test_promote_better_version_archives_previous(tracking):
    v1 = make_version(tracking, "seg3d", metrics={"val_dice": 0.8})
    v2 = make_version(tracking, "seg3d", metrics={"val_dice": 0.9})
    assert invoke("promote", "seg3d", v1).exit_code == 0
    result = invoke("promote", "seg3d", v2, "--reason", "better")
    assert result.exit_code == 0, result.output
    holder, stages = state(tracking, "seg3d")
    assert holder == v2 and stages == {v1: "Archived", v2: "Production"}
    assert tracking.get_model_version("seg3d", v2).tags["mlpipe.promotion.previous"] == v1


def test_promote_refuses_regression_and_failed_gate_together_changing_nothing(tracking):
    v1 = make_version(tracking, "seg3d", metrics={"val_dice": 0.8})
    v2 = make_version(tracking, "seg3d", metrics={"val_dice": 0.7})
    assert invoke("promote", "seg3d", v1).exit_code == 0
    before = state(tracking, "seg3d"), tracking.get_registered_model("seg3d").tags
    result = invoke("promote", "seg3d", v2, "--require", "val_dice>=0.75", "--require", "hd95<5")
    assert result.exit_code == 3, result.output
    assert "regresses" in result.output
    assert "Gate val_dice>=0.75 fails" in result.output
    assert "hd95 is missing" in result.output
    assert (state(tracking, "seg3d"), tracking.get_registered_model("seg3d").tags) == before
    assert "mlpipe.promoted_at" not in tracking.get_model_version("seg3d", v2).tags


def test_allow_regression_needs_a_reason_then_promotes(tracking):
    v1 = make_version(tracking, "seg3d", metrics={"val_dice": 0.8})
    v2 = make_version(tracking, "seg3d", metrics={"val_dice": 0.7})
    assert invoke("promote", "seg3d", v1).exit_code == 0
    result = invoke("promote", "seg3d", v2, "--allow-regression")
    assert result.exit_code == 2 and "needs --reason" in result.output
    result = invoke("promote", "seg3d", v2, "--allow-regression", "--reason", "v1 bad on kids")
    assert result.exit_code == 0, result.output
    assert state(tracking, "seg3d")[0] == v2


def test_min_goal_and_metric_override(tracking):
    tags = {k: v for k, v in CONVENTION.items() if not k.startswith("mlpipe.primary")}
    v1 = make_version(tracking, "m", metrics={"loss": 0.2}, tags=tags)
    v2 = make_version(tracking, "m", metrics={"loss": 0.3}, tags=tags)
    assert invoke("promote", "m", v1).exit_code == 0
    result = invoke("promote", "m", v2)
    assert result.exit_code == 3 and "--metric NAME --goal" in result.output
    result = invoke("promote", "m", v2, "--metric", "loss", "--goal", "min")
    assert result.exit_code == 3 and "loss regresses" in result.output


def test_version_without_convention_tags_needs_force_and_reason(tracking):
    bare = make_version(tracking, "m", tags={})
    result = invoke("promote", "m", bare)
    assert result.exit_code == 3
    assert "mlpipe.dataset.name" in result.output and "mlpipe.preprocessing.digest" in result.output
    assert invoke("promote", "m", bare, "--force").exit_code == 2
    assert invoke("promote", "m", bare, "--force", "--reason", "legacy").exit_code == 0


def test_unfinished_run_is_refused(tracking):
    v1 = make_version(tracking, "m", status="FAILED")
    result = invoke("promote", "m", v1)
    assert result.exit_code == 3 and "FAILED, not FINISHED" in result.output


def test_missing_model_and_version_exit_2_listing_what_exists(tracking):
    make_version(tracking, "seg3d")
    result = invoke("promote", "nope", "1")
    assert result.exit_code == 2 and "Registered models: seg3d" in result.output
    result = invoke("promote", "seg3d", "9")
    assert result.exit_code == 2 and "Versions: 1." in result.output
    assert invoke("promote", "seg3d", "1", "--require", "x=>1").exit_code == 2


def test_no_stage_leaves_stages_alone(tracking):
    v1 = make_version(tracking, "m")
    assert invoke("promote", "m", v1, "--no-stage", "--alias", "staging").exit_code == 0
    holder, stages = state(tracking, "m", "staging")
    assert holder == v1 and stages[v1] == "None"


def test_library_rechecks_against_holder_seen_under_lock(tracking):
    """A promotion planned before a concurrent one landed is checked against the new holder."""
    v1 = make_version(tracking, "m", metrics={"val_dice": 0.8})
    v2 = make_version(tracking, "m", metrics={"val_dice": 0.9})
    t = connect()
    stale_plan = plan_promotion(t, PromotionRequest("m", v1))
    refuse_if_needed(stale_plan)  # passes: nobody holds the alias yet
    execute_promotion(t, plan_promotion(t, PromotionRequest("m", v2)))
    with pytest.raises(GateRefusedError, match="regresses"):
        execute_promotion(t, stale_plan)
    assert state(tracking, "m")[0] == v2
    assert not [m for m in tracking.search_registered_models() if m.name.startswith("mlpipe-lock")]


def test_rollback_walks_back_and_history_records_everything(tracking):
    versions = [make_version(tracking, "m", metrics={"val_dice": 0.7 + i / 10}) for i in range(3)]
    for v in versions:
        assert invoke("promote", "m", v, "--reason", f"r{v}").exit_code == 0
    assert invoke("rollback", "m").exit_code == 2  # --reason is required
    result = invoke("rollback", "m", "--reason", "v3 breaks on MRI")
    assert result.exit_code == 0, result.output
    holder, stages = state(tracking, "m")
    assert holder == versions[1] and stages[versions[1]] == "Production"
    assert stages[versions[2]] == "Archived"
    assert invoke("rollback", "m", "--reason", "again").exit_code == 0
    assert state(tracking, "m")[0] == versions[0]
    result = invoke("rollback", "m", "--reason", "too far")
    assert result.exit_code == 2 and "nothing to roll back" in result.output

    result = invoke("history", "m")
    assert result.exit_code == 0, result.output
    assert "none -> v1" in result.output and "v3 -> v2" in result.output
    assert "v3 breaks on MRI" in result.output
    events = json.loads(invoke("history", "m", "--json").output)
    assert [e["action"] for e in events] == ["promote"] * 3 + ["rollback"] * 2
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]


def test_rollback_target_stack():
    def ev(seq, action, frm, to):
        return HistoryEvent(seq, "t", "u", action, "production", frm, to)

    events = [ev(1, "promote", None, "1"), ev(2, "promote", "1", "2")]
    assert rollback_target(events, "production") == "1"
    assert rollback_target([*events, ev(3, "rollback", "2", "1")], "production") is None
    assert rollback_target(events, "staging") is None


def test_history_event_stays_within_postgres_tag_column():
    event = HistoryEvent(
        1, "t", "u", "promote", "production", "1", "2", "x" * 9000, ["g" * 900] * 20
    )
    assert len(event.to_json()) <= 5000


def test_models_lists_models_and_versions_with_aliases(tracking):
    v1 = make_version(tracking, "seg3d", metrics={"val_dice": 0.81})
    make_version(tracking, "seg3d", metrics={"val_dice": 0.82})
    tracking.create_registered_model("mlpipe-lock.other")  # a lock in flight is hidden
    assert invoke("promote", "seg3d", v1).exit_code == 0
    result = invoke("models")
    assert result.exit_code == 0, result.output
    assert "seg3d" in result.output and "@production=v1" in result.output
    assert "mlpipe-lock" not in result.output
    result = invoke("models", "seg3d")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["version", "aliases", "stage"]
    row1 = next(line for line in lines if line.startswith("1 "))
    assert "production" in row1 and "Production" in row1 and "val_dice=0.81" in row1
    assert invoke("models", "nope").exit_code == 2


def test_stale_lock_is_broken_with_a_warning(tracking):
    import time

    v1 = make_version(tracking, "m")
    tracking.create_registered_model(
        "mlpipe-lock.m",
        tags={"mlpipe.lock.acquired_at": str(time.time() - 600), "mlpipe.lock.owner": "ghost"},
    )
    result = invoke("promote", "m", v1)
    assert result.exit_code == 0, result.output
    assert "stale registry lock" in result.output and "ghost" in result.output


def test_runner_records_primary_metric_tags(project_dir):
    from mlpipe.run.runner import RunRequest, plan_run

    directory = project_dir("good")
    plan = plan_run(RunRequest(uri=str(directory)))
    try:
        assert plan.tags["mlpipe.primary_metric"] == "score"
        assert plan.tags["mlpipe.primary_metric_goal"] == "max"
    finally:
        plan.source.cleanup()


# issue 20 --------------------------------------------------------------------------------------
def test_lock_model_without_mlpipe_tags_is_never_broken(tracking):
    v1 = make_version(tracking, "m")
    tracking.create_registered_model("mlpipe-lock.m")  # someone's model, not an mlpipe lock
    result = invoke("promote", "m", v1)
    assert result.exit_code == 2, result.output
    assert "is not an mlpipe lock" in result.output
    assert "held for" not in result.output  # was: "held for 1796357608 s", then deleted
    assert tracking.get_registered_model("mlpipe-lock.m")  # still there
    assert state(tracking, "m")[0] is None  # nothing promoted


def test_reason_with_newline_refused_and_old_ones_shown_on_one_row(tracking):
    v1 = make_version(tracking, "m")
    forged = "ok\n9  2099-01-01  mallory  promote  @production  none -> v1  fake  -"
    result = invoke("promote", "m", v1, "--reason", forged)
    assert result.exit_code == 2 and "one line" in result.output
    assert state(tracking, "m")[0] is None
    assert invoke("rollback", "m", "--reason", "a\rb", "-y").exit_code == 2
    # a record written before the check (or by another tool) is shown escaped, on its row
    tracking.set_registered_model_tag(
        "m",
        "mlpipe.history.000001",
        HistoryEvent(
            seq=1, time="t", who="w", action="promote", alias="production",
            from_version=None, to_version=v1, reason=forged,
        ).to_json(),
    )  # fmt: skip
    shown = invoke("history", "m")
    assert shown.exit_code == 0, shown.output
    assert "mallory" in shown.output  # the text is kept ...
    assert not any(line.startswith("9 ") for line in shown.output.splitlines())  # ... not a row
    assert "\\n9" in shown.output


@pytest.mark.parametrize(
    "args",
    [
        ["promote", "m", "notanumber"],
        ["promote", "m", "1", "--require", "bogus"],
        ["promote", "m", "1", "--reason", "two\nlines"],
        ["promote", " ", "1"],
        ["history", ""],
        ["history", "m", "--alias", "latest"],
        ["rollback", "m", "--reason", "x\ny"],
        ["models", "\t"],
    ],
)
def test_registry_mistakes_refused_before_connecting(args, tmp_path):
    """Issue 20: these took 4.5-5 s (mlflow import, a store created) for a typo."""
    import subprocess
    import sys
    import time

    began = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom mlpipe.cli import cli\n"
         "try:\n    cli(sys.argv[1:])\nfinally:\n"
         "    print('mlflow imported' if 'mlflow' in sys.modules else '', file=sys.stderr)",
         *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - began
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("Error: ")
    assert "mlflow imported" not in out.stderr
    assert not (tmp_path / "mlruns.db").exists()
    assert elapsed < 4, elapsed

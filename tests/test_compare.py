"""mlpipe compare on a real SQLite store: selection, layout, digest notes, formats, errors."""

from __future__ import annotations

import io
import re
import urllib.parse

import pandas as pd
import pytest
from click.testing import CliRunner

from mlpipe.cli import cli
from mlpipe.core.errors import NotFoundError, UsageError
from mlpipe.monitor.compare import CompareRequest, compare, compare_link, render
from mlpipe.registry.promotion import connect

DATA_A = "sha256:" + "a1b2c3d4e5f6" + "0" * 52
DATA_B = "sha256:" + "c3d4e5f6a7b8" + "1" * 52
PREP = "sha256:" + "9" * 64


def make_run(
    client,
    experiment: str = "seg3d",
    *,
    name: str,
    params: dict,
    metrics: dict,
    tags: dict | None = None,
    seconds: float = 90.0,
    start: int = 1_700_000_000_000,
) -> str:
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    base = {
        "mlpipe.dataset.name": "spleen",
        "mlpipe.dataset.version": "v1",
        "mlpipe.dataset.digest": DATA_A,
        "mlpipe.preprocessing.digest": PREP,
        "mlpipe.git.commit": "0123456789abcdef0123456789abcdef01234567",
        "mlpipe.primary_metric": "val_dice",
        "mlpipe.primary_metric_goal": "max",
    }
    run = client.create_run(exp_id, run_name=name, tags={**base, **(tags or {})}, start_time=start)
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, "FINISHED", end_time=start + int(seconds * 1000))
    return run_id


@pytest.fixture
def runs(tracking):
    """Three runs: lr differs, epochs equal, run c on other data and a dirty tree."""
    common = {"epochs": "50", "model": "unet"}
    a = make_run(
        tracking,
        name="a",
        params={**common, "lr": "0.001"},
        metrics={"val_dice": 0.81, "train_loss": 0.2},
        start=1_700_000_000_000,
    )
    b = make_run(
        tracking,
        name="b",
        params={**common, "lr": "0.0003"},
        metrics={"val_dice": 0.86, "train_loss": 0.15},
        seconds=3725,
        start=1_700_000_100_000,
    )
    c = make_run(
        tracking,
        name="c",
        params={**common, "lr": "0.0003"},
        metrics={"val_dice": 0.79, "train_loss": 0.3},
        tags={"mlpipe.dataset.digest": DATA_B, "mlpipe.dataset.version": "v2",
              "mlpipe.git.dirty": "true"},
        start=1_700_000_200_000,
    )  # fmt: skip
    return {"a": a, "b": b, "c": c}


def invoke(*args: str):
    return CliRunner().invoke(cli, ["compare", *args])


def cells(output: str, field: str) -> list[str]:
    """The cells of one row of the text table (split on runs of 2+ spaces)."""
    for line in output.splitlines():
        if line.startswith(field + "  "):
            return re.split(r"\s{2,}", line.strip())[1:]
    raise AssertionError(f"no row {field!r} in:\n{output}")


def test_compare_two_runs_shows_differing_params_metrics_and_tags(runs):
    result = invoke(runs["a"], runs["b"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert cells(out, "params.lr") == ["0.001", "0.0003"]
    assert "params.epochs" not in out and "params.model" not in out
    assert "2 param(s) are the same in every run" in out
    assert cells(out, "metrics.val_dice") == ["0.81", "0.86"]
    # the primary metric comes first among the metrics
    assert out.index("metrics.val_dice") < out.index("metrics.train_loss")
    assert cells(out, "dataset version") == ["v1", "v1"]
    assert cells(out, "dataset digest") == ["a1b2c3d4e5f6", "a1b2c3d4e5f6"]
    assert cells(out, "git commit") == ["01234567", "01234567"]
    assert cells(out, "duration") == ["1m30s", "1h02m05s"]
    assert cells(out, "status") == ["FINISHED", "FINISHED"]
    assert cells(out, "start (UTC)")[0] == "2023-11-14 22:13:20"
    assert "different data" not in out  # same digest: no note
    assert "Compare in the MLflow UI" not in out  # SQLite: no server link


def test_compare_experiment_name_takes_the_team_prefix(tracking, monkeypatch):
    """``mlpipe run`` files runs under experiment_prefix; ``--experiment seg3d`` finds them."""
    ours = make_run(tracking, "neuro/seg3d", name="ours", params={"lr": "1"}, metrics={})
    theirs = make_run(tracking, "other", name="theirs", params={"lr": "2"}, metrics={})
    monkeypatch.setenv("MLPIPE_EXPERIMENT_PREFIX", "neuro/")
    result = invoke("--experiment", "seg3d")
    assert result.exit_code == 0, result.output
    assert ours[:8] in result.output and theirs[:8] not in result.output
    # a name outside the prefix still works as written
    result = invoke("--experiment", "other")
    assert result.exit_code == 0, result.output
    assert theirs[:8] in result.output


def test_compare_points_out_a_different_dataset_digest(runs):
    result = invoke(runs["b"], runs["c"])
    assert result.exit_code == 0, result.output
    assert (
        "Note: runs used different data: dataset digest differs (a1b2c3d4e5f6… vs "
        "c3d4e5f6a7b8…) — metric differences may come from the data." in result.output
    )
    assert "preprocessing digest differs" not in result.output
    assert cells(result.output, "git commit") == ["01234567", "01234567+dirty"]
    # lr is equal between b and c: no param differs
    assert "params." not in result.output


def test_compare_names_runs_in_digest_note_when_more_than_two(runs, tracking):
    tracking.set_tag(runs["a"], "mlpipe.preprocessing.digest", "sha256:" + "7" * 64)
    result = invoke(runs["a"], runs["b"], runs["c"])
    assert result.exit_code == 0, result.output
    assert "dataset digest differs (a1b2c3d4e5f6… (a, b) vs c3d4e5f6a7b8… (c))" in result.output
    assert "runs used different preprocessing: preprocessing digest differs" in result.output


def test_compare_notes_runs_without_dataset_tags(runs, tracking):
    bare = make_run(tracking, name="bare", params={}, metrics={"val_dice": 0.5})
    tracking.delete_tag(bare, "mlpipe.dataset.digest")
    result = invoke(runs["a"], bare)
    assert result.exit_code == 0, result.output
    assert "no dataset digest recorded (mlpipe.dataset.digest) for bare" in result.output
    assert cells(result.output, "dataset digest") == ["a1b2c3d4e5f6", "-"]


def test_compare_unknown_run_id_exits_2_naming_it(runs):
    result = invoke(runs["a"], "0" * 32, "nope")
    assert result.exit_code == 2
    assert result.output.startswith("Error: Run(s) not found")
    assert "0" * 32 in result.output and "nope" in result.output
    assert runs["a"] not in result.output.split("found")[1].split(".")[0]
    assert "Traceback" not in result.output


def test_compare_top_by_metric_uses_the_goal_tag(runs):
    result = invoke("--experiment", "seg3d", "--top", "2", "--by", "val_dice")
    assert result.exit_code == 0, result.output
    assert cells(result.output, "run name") == ["b", "a"]
    assert "highest first (goal max from tag mlpipe.primary_metric_goal)" in result.output


def test_compare_top_by_metric_min_goal_and_order_flag(runs, tracking):
    for run_id in runs.values():
        tracking.set_tag(run_id, "mlpipe.primary_metric", "train_loss")
        tracking.set_tag(run_id, "mlpipe.primary_metric_goal", "min")
    result = invoke("--experiment", "seg3d", "--top", "2", "--by", "train_loss")
    assert result.exit_code == 0, result.output
    assert cells(result.output, "run name") == ["b", "a"]  # 0.15, 0.2: lowest first
    flipped = invoke("--experiment", "seg3d", "--top", "1", "--by", "train_loss", "--order", "desc")
    assert cells(flipped.output, "run name") == ["c"]


def test_compare_experiment_without_by_shows_most_recent(runs):
    result = invoke("--experiment", "seg3d", "--top", "2")
    assert result.exit_code == 0, result.output
    assert cells(result.output, "run name") == ["c", "b"]
    assert "The 2 most recent run(s) of experiment 'seg3d'" in result.output


def test_compare_filter_selects_runs(runs):
    result = invoke("--experiment", "seg3d", "--filter", "params.lr = '0.0003'")
    assert result.exit_code == 0, result.output
    assert sorted(cells(result.output, "run name")) == ["b", "c"]


def test_compare_bad_filter_exits_2(runs):
    result = invoke("--experiment", "seg3d", "--filter", "params.lr === 3")
    assert result.exit_code == 2
    assert result.output.startswith("Error: runs of experiment 'seg3d' with --filter")
    assert "Traceback" not in result.output


def test_compare_unknown_experiment_and_unknown_by_metric(runs):
    missing = invoke("--experiment", "nope")
    assert missing.exit_code == 2 and "Experiment 'nope' does not exist" in missing.output
    by = invoke("--experiment", "seg3d", "--by", "val_dcie")
    assert by.exit_code == 2 and "has the metric 'val_dcie'" in by.output


def test_compare_unknown_metric_lists_the_runs_metrics(runs):
    result = invoke(runs["a"], runs["b"], "--metric", "val_dcie")
    assert result.exit_code == 2
    assert "--metric val_dcie: none of the runs has it" in result.output
    assert "train_loss, val_dice" in result.output


def test_compare_chosen_metrics_and_all_params(runs):
    result = invoke(runs["a"], runs["b"], "--metric", "train_loss", "--all-params")
    assert result.exit_code == 0, result.output
    assert "metrics.val_dice" not in result.output
    assert cells(result.output, "metrics.train_loss") == ["0.2", "0.15"]
    assert cells(result.output, "params.epochs") == ["50", "50"]


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "Nothing to compare"),
        (("abc", "--experiment", "x"), "not both"),
        (("abc", "--top", "2"), "give it too"),
        (("--experiment", "x", "--top", "0"), "--top must be at least 1"),
        (("--experiment", "x", "--order", "asc"), "give --by too"),
    ],
)
def test_compare_refuses_contradictory_options(args, message, tmp_path):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_compare_csv_has_full_values_and_notes_on_stderr(runs):
    result = CliRunner().invoke(cli, ["compare", runs["b"], runs["c"], "--format", "csv"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.stdout), dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["field", "b", "c"]
    digest = frame.set_index("field").loc["dataset digest"]
    assert list(digest) == [DATA_A, DATA_B]
    assert frame.set_index("field").loc["metrics.val_dice", "b"] == "0.86"
    assert "Note:" not in result.stdout
    assert "runs used different data" in result.stderr


def test_compare_markdown_table(runs):
    result = invoke(runs["a"], runs["b"], "--format", "markdown")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| field | a | b |"
    assert lines[1] == "|---|---|---|"
    assert "| params.lr | 0.001 | 0.0003 |" in lines


def test_compare_labels_repeated_run_names_with_ids(tracking):
    one = make_run(tracking, name="same", params={"lr": "1"}, metrics={"m": 1.0})
    two = make_run(tracking, name="same", params={"lr": "2"}, metrics={"m": 2.0})
    comparison = compare(connect(), CompareRequest(run_ids=[one, two]))
    assert comparison.labels == [f"same {one[:8]}", f"same {two[:8]}"]
    assert "params.lr" in render(comparison, "table")


def test_compare_library_raises_typed_errors(runs):
    with pytest.raises(NotFoundError):
        compare(connect(), CompareRequest(run_ids=["f" * 32]))
    with pytest.raises(UsageError):
        render(compare(connect(), CompareRequest(run_ids=[runs["a"]])), "html")


def test_compare_link_matches_the_mlflow_ui_route():
    link = compare_link("http://user:pw@mlflow.example:5000/", ["r1", "r2"], ["3", "1", "3"])
    assert link is not None and "pw" not in link
    base, query = link.split("#/compare-runs?")
    assert base == "http://***@mlflow.example:5000/"
    parsed = urllib.parse.parse_qs(query)
    assert parsed == {"runs": ['["r1","r2"]'], "experiments": ['["1","3"]']}
    assert compare_link("sqlite:///x.db", ["r1"], ["1"]) is None


def test_mlflow_ui_still_builds_compare_links_this_way():
    """The installed UI bundle's route: an MLflow upgrade that changes it fails here."""
    from pathlib import Path

    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    bundles = [p.read_text(errors="ignore") for p in js.glob("main.*.js")]
    assert bundles, "MLflow UI bundle not found"
    route = re.compile(
        r"getCompareRunPageRoute\(\w,\w\)\{const \w=`\?runs=\$\{JSON\.stringify\(\w\)\}"
        r"&experiments=\$\{JSON\.stringify\(\w\)\}`"
    )
    assert any(route.search(text) for text in bundles)
    assert any('"/compare-runs"' in text for text in bundles)

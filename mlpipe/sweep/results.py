"""A sweep's results: the live table's rows, the best trial on the parent run, Optuna's plots,
and the best trial's model registered for ``mlpipe promote``.

The parent gets ``best_<metric>``, ``best_trial`` and counts of trials by state as metrics,
``best_<param>`` as params, ``mlpipe.sweep.best_run_id`` and ``.best_params`` as tags; Optuna's
matplotlib plots (optimization history, parallel coordinates, parameter importances) as images under
``sweep/``. Any worker that sees the study complete may close it; a parent already FINISHED
is left as it is.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlpipe.core.errors import NotFoundError, ProjectCommandError
from mlpipe.sweep import study as studies
from mlpipe.sweep.space import Space

if TYPE_CHECKING:
    import optuna

    from mlpipe.core.tracking import Tracking
    from mlpipe.sweep.plan import TrialRow

TAG = "mlpipe.sweep."
PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")

Echo = Callable[[str], None]


@dataclass
class SweepSummary:
    best_trial: int
    best_value: float
    best_params: dict[str, object]
    best_run_id: str | None
    counts: dict[str, int]
    plots: list[str] = field(default_factory=list)
    registered: str | None = None


def table_header(space: Space, metric: str) -> list[str]:
    return ["trial", "state", metric, "time", *space, "run"]


def table_row(row: TrialRow, space: Space) -> list[str]:
    """One line of the live table, as cells under :func:`table_header`."""
    value = "-" if row.value is None else f"{row.value:.4g}"
    state = row.state + (f" ({row.note})" if row.note else "")
    return [
        str(row.number),
        state,
        value,
        f"{row.seconds:.1f}s",
        *(_short(_compact(row.params.get(name, ""))) for name in space),
        (row.run_id or "-")[:12],
    ]


def finalize(
    study: optuna.Study,
    tracking: Tracking,
    parent: str,
    *,
    metric: str,
    space: Space,
    register_as: str | None = None,
    echo: Echo = lambda _msg: None,
) -> SweepSummary | None:
    """Put the best trial, counts and plots on the parent run and mark it FINISHED.

    Returns None when another worker closed the sweep already.

    Raises:
        ProjectCommandError: no trial completed; the parent is marked FAILED.
    """
    from mlflow.entities import Metric, Param
    from optuna.trial import TrialState

    if tracking.run_status(parent) == "FINISHED":
        return None
    trials = [
        t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(studies.SURPLUS_ATTR)
    ]
    counts = {
        "trials_complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_failed": sum(
            t.state == TrialState.FAIL and t.user_attrs.get(studies.STATE_ATTR) == "FAILED"
            for t in trials
        ),
    }
    import time

    now = int(time.time() * 1000)
    client = tracking.client
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in counts.items()])
    if not counts["trials_complete"]:
        tracking.finish(parent, "FAILED", reason="no trial of the sweep completed")
        raise ProjectCommandError(
            f"No trial of sweep {study.study_name!r} completed "
            f"({counts['trials_failed']} failed, {counts['trials_pruned']} pruned); parent run "
            f"{parent} is marked FAILED. The trials' logs are artifacts of their runs (mlpipe/).",
            run_id=parent,
        )
    best = study.best_trial
    best_run = best.user_attrs.get(studies.RUN_ATTR)
    client.log_batch(
        parent,
        metrics=[
            Metric(f"best_{metric}", float(best.value), now, 0),
            Metric("best_trial", float(best.number), now, 0),
        ],
    )
    # MLflow params cannot change: a sweep resumed with a new best keeps the first best_*
    # params and says so; the tag mlpipe.sweep.best_params always holds the current best.
    logged = client.get_run(parent).data.params
    best_params = {f"best_{k}": str(v) for k, v in best.params.items()}
    new = {k: v for k, v in best_params.items() if k not in logged}
    if new:
        with contextlib.suppress(Exception):  # another worker closing the sweep at once
            client.log_batch(parent, params=[Param(k, v) for k, v in new.items()])
    if any(logged.get(k, v) != v for k, v in best_params.items()):
        echo(
            "mlpipe: the best trial changed since the parent's best_* params were logged "
            f"(params cannot change); tag {TAG}best_params holds the new best"
        )
    tags = {
        TAG + "best_trial": str(best.number),
        TAG + "best_params": json.dumps({k: str(v) for k, v in best.params.items()}),
    }
    if best_run:
        tags[TAG + "best_run_id"] = best_run
    tracking.set_tags(parent, tags)
    summary = SweepSummary(best.number, float(best.value), dict(best.params), best_run, counts)
    summary.plots = _log_plots(study, client, parent, echo)
    if register_as:
        if not best_run:
            echo("mlpipe: --register: the best trial has no run; nothing registered")
        else:
            summary.registered = register_best(tracking, best_run, register_as)
            echo(
                f"mlpipe: registered the best trial's model as {register_as} version "
                f"{summary.registered} (promote it with `mlpipe promote {register_as} "
                f"{summary.registered}`)"
            )
    tracking.finish(parent, "FINISHED", wait=30.0, echo=echo)
    return summary


def register_best(tracking: Tracking, run_id: str, name: str) -> str:
    """Register the model that run ``run_id`` logged as a new version of ``name``.

    Raises:
        NotFoundError: the run logged no model.
    """
    from mlpipe.core.tracking import translate_errors

    client = tracking.client
    with translate_errors(f"run {run_id}"):
        run = client.get_run(run_id)
        models = [
            m
            for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
            if m.source_run_id == run_id
        ]
    if not models:
        raise NotFoundError(
            f"--register: the best trial's run {run_id} logged no model; the project must log "
            "one (seg3d does with mlflow.pyfunc.log_model) for the sweep to register it."
        )
    model = models[0]
    with translate_errors(f"registered model {name!r}"):
        with contextlib.suppress(Exception):
            client.create_registered_model(name)
        version = client.create_model_version(
            name, source=f"models:/{model.model_id}", run_id=run_id, model_id=model.model_id
        )
    return str(version.version)


def _log_plots(study: optuna.Study, client, parent: str, echo: Echo) -> list[str]:
    """Optuna's matplotlib plots as images on the parent; a plot Optuna cannot draw (too few
    trials for importances) is skipped with a note."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    logged = []
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = getattr(ovm, f"plot_{name}")(study)
            figure = _figure(axes)
            client.log_figure(parent, figure, f"sweep/{name}.png")
            plt.close(figure)
            logged.append(f"sweep/{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            echo(f"mlpipe: plot {name} skipped: {reason}")
    plt.close("all")
    return logged


def _figure(axes):
    if hasattr(axes, "figure"):
        return axes.figure
    first = axes.flat[0] if hasattr(axes, "flat") else axes[0]
    return first.figure


def table_widths(space: Space, metric: str) -> list[int]:
    """Column widths that fit the usual values, so rows line up as they arrive."""
    return [5, 22, max(len(metric), 8), 7, *(max(len(n), 10) for n in space), 12]


def _compact(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return text
    return text if text.lstrip("-").isdigit() else f"{number:.4g}"


def _short(text: str, n: int = 12) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def summary_lines(summary: SweepSummary, metric: str) -> Sequence[str]:
    """What the CLI prints at the end."""
    params = ", ".join(f"{k}={v}" for k, v in summary.best_params.items())
    lines = [
        f"Best trial {summary.best_trial}: {metric} = {summary.best_value:.6g} ({params})",
        "Trials: "
        + ", ".join(f"{v} {k.removeprefix('trials_')}" for k, v in summary.counts.items()),
    ]
    if summary.best_run_id:
        lines.append(f"Best run: {summary.best_run_id}")
    return lines


__all__ = [
    "SweepSummary",
    "finalize",
    "register_best",
    "summary_lines",
    "table_header",
    "table_row",
]

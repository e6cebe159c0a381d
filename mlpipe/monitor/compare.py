"""Runs side by side: what differs between them, and whether the data or preprocessing did.

``select_runs`` picks runs by id or from an experiment (optionally filtered and ranked by a
metric); ``build_comparison`` lays them out as fields by runs: status, timing, git commit,
dataset and preprocessing identity (the ``mlpipe.*`` tags), the chosen metrics and the params
that differ. Runs are the columns because two to five runs are compared far more often than
many, and a field name reads best once at the start of its row. A dataset or preprocessing
digest that differs between runs is pointed out in ``notes``: it explains many metric
differences that the params do not.

Library only: values are returned and typed errors raised; nothing prints.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import NotFoundError, UsageError
from mlpipe.core.settings import is_http_uri, redact_uri
from mlpipe.core.tracking import Tracking, translate_errors
from mlpipe.registry.promotion import PRIMARY_GOAL_TAG, PRIMARY_METRIC_TAG

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import Run

FORMATS = ("table", "csv", "markdown")
DEFAULT_TOP = 5
"""Runs shown from an experiment when --top is not given: a table still fits a terminal."""
SHORT_DIGEST = 12
SHORT_COMMIT = 8

SWEEP_TAG = "mlpipe.sweep."
SWEEP_STUDY_TAG = SWEEP_TAG + "study"
SWEEP_ROLE_TAG = SWEEP_TAG + "role"
DATASET_DIGEST_TAG = "mlpipe.dataset.digest"
PREPROCESSING_DIGEST_TAG = "mlpipe.preprocessing.digest"


@dataclass(frozen=True)
class CompareRequest:
    """What to compare, as the ``mlpipe compare`` options give it.

    Attributes:
        run_ids: explicit runs (exclusive with ``experiment``).
        experiment: take runs from this experiment instead.
        filter: an MLflow search filter, e.g. ``"params.lr = '0.001'"`` (with ``experiment``).
        top: how many runs from the experiment [default: ``DEFAULT_TOP``].
        by: rank the experiment's runs by this metric (best first).
        order: ``asc`` or ``desc`` for ``by`` [default: from the runs'
            ``mlpipe.primary_metric_goal`` tag when ``by`` is their primary metric, else desc].
        metrics: metrics to show [default: all, the primary metric first].
        all_params: show every param, not only those that differ.
        sweep: compare the trials of this ``mlpipe sweep`` study (its child runs), ranked by
            the sweep's metric unless ``by`` is given; ``top`` defaults to all of them.
    """

    run_ids: Sequence[str] = ()
    experiment: str | None = None
    filter: str | None = None
    top: int | None = None
    by: str | None = None
    order: str | None = None
    metrics: Sequence[str] = ()
    all_params: bool = False
    sweep: str | None = None


@dataclass(frozen=True)
class Row:
    """One field of the comparison: its name, one raw value per run, and how to show it."""

    name: str
    values: list[Any]
    kind: str = "text"  # text | digest | commit | metric


@dataclass
class Comparison:
    """The runs' fields side by side, with notes on what explains their differences."""

    labels: list[str]
    run_ids: list[str]
    experiment_ids: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    link: str | None = None

    def frame(self, *, full: bool = False) -> pd.DataFrame:
        """A DataFrame with a ``field`` column and one column per run.

        Args:
            full: full digests, commits and metric precision (for CSV); otherwise shortened
                for reading.
        """
        import pandas as pd

        records = [[row.name, *(_cell(v, row.kind, full) for v in row.values)] for row in self.rows]
        return pd.DataFrame(records, columns=["field", *self.labels])


def select_runs(tracking: Tracking, request: CompareRequest) -> tuple[list[Run], list[str]]:
    """The runs to compare, in the order to show them, and notes on how they were chosen.

    Raises:
        UsageError: contradictory or missing options, a bad filter, or no run with ``by``.
        NotFoundError: a run id or the experiment does not exist (all unknown ids are named).
    """
    _check_request(request)
    if request.run_ids:
        return _runs_by_id(tracking, request.run_ids), []
    if request.sweep:
        return _runs_of_sweep(tracking, request)
    return _runs_of_experiment(tracking, request)


def build_comparison(
    tracking: Tracking, runs: Sequence[Run], request: CompareRequest
) -> Comparison:
    """Lay the runs out side by side and note dataset or preprocessing differences.

    Raises:
        UsageError: a ``--metric`` that none of the runs has (the message lists theirs).
    """
    labels = _labels(runs)
    tags = [r.data.tags for r in runs]
    rows = [
        Row("run id", [r.info.run_id for r in runs]),
        Row("run name", [r.info.run_name or "-" for r in runs]),
    ]
    experiment_ids = list(dict.fromkeys(r.info.experiment_id for r in runs))
    if len(experiment_ids) > 1:
        names = _experiment_names(tracking, experiment_ids)
        rows.append(Row("experiment", [names.get(r.info.experiment_id) for r in runs]))
    rows += [
        Row("status", [r.info.status for r in runs]),
    ]
    if any(SWEEP_TAG + "trial" in t for t in tags):
        rows += [
            Row("sweep trial", [t.get(SWEEP_TAG + "trial") for t in tags]),
            Row("trial state", [t.get(SWEEP_TAG + "trial_state") for t in tags]),
        ]
    rows += [
        Row("start (UTC)", [_time(r.info.start_time) for r in runs]),
        Row("duration", [_duration(r.info.start_time, r.info.end_time) for r in runs]),
        Row("git commit", [_commit(t) for t in tags], "commit"),
        Row("dataset", [t.get("mlpipe.dataset.name") for t in tags]),
        Row("dataset version", [t.get("mlpipe.dataset.version") for t in tags]),
        Row("dataset digest", [t.get(DATASET_DIGEST_TAG) for t in tags], "digest"),
        Row("preprocessing digest", [t.get(PREPROCESSING_DIGEST_TAG) for t in tags], "digest"),
    ]
    for metric in _chosen_metrics(runs, request.metrics):
        rows.append(Row(f"metrics.{metric}", [r.data.metrics.get(metric) for r in runs], "metric"))
    params = sorted({k for r in runs for k in r.data.params})
    shown = [k for k in params if request.all_params or _differs([r.data.params for r in runs], k)]
    for key in shown:
        rows.append(Row(f"params.{key}", [r.data.params.get(key) for r in runs]))

    notes = _digest_notes(runs, labels)
    hidden = len(params) - len(shown)
    if hidden:
        notes.append(
            f"{hidden} param(s) are the same in every run and not shown (--all-params shows them)."
        )
    elif params and not request.all_params and len(runs) > 1:
        notes.append("Every param differs between the runs.")
    run_ids = [r.info.run_id for r in runs]
    return Comparison(
        labels=labels,
        run_ids=run_ids,
        experiment_ids=experiment_ids,
        rows=rows,
        notes=notes,
        link=compare_link(tracking.uri, run_ids, experiment_ids),
    )


def compare(tracking: Tracking, request: CompareRequest) -> Comparison:
    """``select_runs`` then ``build_comparison``; the selection notes come first."""
    runs, notes = select_runs(tracking, request)
    comparison = build_comparison(tracking, runs, request)
    comparison.notes[:0] = notes
    return comparison


def render(comparison: Comparison, fmt: str = "table") -> str:
    """The comparison as a terminal table, CSV (full values) or a Markdown table.

    Raises:
        UsageError: an unknown format.
    """
    from mlpipe.core.tables import format_frame

    if fmt == "table":
        return format_frame(comparison.frame())
    if fmt == "csv":
        return comparison.frame(full=True).to_csv(index=False).rstrip("\n")
    if fmt == "markdown":
        return _markdown(comparison.frame())
    raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")


def compare_link(uri: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str | None:
    """The MLflow UI's compare page for these runs, when tracking goes to a server.

    The 3.17 UI builds it as ``#/compare-runs?runs=<JSON list>&experiments=<JSON list>``
    (``getCompareRunPageRoute`` in its JS bundle) and URI-decodes the query before parsing the
    JSON, so the lists are percent-encoded here: terminals then see one clickable link.
    """
    if not is_http_uri(uri):
        return None
    base = redact_uri(uri).rstrip("/")
    runs = urllib.parse.quote(json.dumps(list(run_ids), separators=(",", ":")), safe=",")
    exps = urllib.parse.quote(
        json.dumps(sorted(set(experiment_ids)), separators=(",", ":")), safe=","
    )
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}"


# --- selection ------------------------------------------------------------------------------


def _check_request(request: CompareRequest) -> None:
    problems = []
    if request.sweep and (request.run_ids or request.experiment or request.filter):
        problems.append(
            "--sweep NAME picks the sweep's trials: drop run ids, --experiment, --filter."
        )
    if request.sweep:
        if request.top is not None and request.top < 1:
            problems.append(f"--top must be at least 1, not {request.top}.")
        if problems:
            raise UsageError("\n  ".join(problems))
        return
    if request.run_ids and request.experiment:
        problems.append("Give RUN_IDs or --experiment NAME, not both.")
    if not request.run_ids and not request.experiment:
        problems.append(
            "Nothing to compare: give run ids (mlpipe compare RUN_ID RUN_ID) or --experiment NAME."
        )
    if request.run_ids and (request.filter or request.top is not None or request.by):
        problems.append("--filter, --top and --by choose runs from --experiment; give it too.")
    if request.top is not None and request.top < 1:
        problems.append(f"--top must be at least 1, not {request.top}.")
    if request.order not in (None, "asc", "desc"):
        problems.append(f"--order must be asc or desc, not {request.order!r}.")
    if request.order and not request.by:
        problems.append("--order orders the ranking by --by METRIC; give --by too.")
    if problems:
        raise UsageError(problems[0] if len(problems) == 1 else "\n  ".join(problems))


def _runs_by_id(tracking: Tracking, run_ids: Sequence[str]) -> list[Run]:
    runs, missing = [], []
    for run_id in dict.fromkeys(run_ids):  # keep order, drop repeats
        try:
            with translate_errors(f"run {run_id}"):
                runs.append(tracking.client.get_run(run_id))
        except NotFoundError:
            missing.append(run_id)
    if missing:
        where = redact_uri(tracking.uri)
        raise NotFoundError(
            f"Run(s) not found in {where}: {', '.join(missing)}. Check the id(s) (the MLflow "
            "UI shows them on each run's page) and --tracking-uri."
        )
    return runs


def _experiment_id(tracking: Tracking, name: str) -> str:
    """The team's prefixed experiment (``neuro/seg3d`` for ``seg3d``), else ``name`` as given.

    ``mlpipe run`` files runs under ``experiment_prefix``, so the name a researcher types
    finds them; a name outside the prefix (another team's) still works as written.
    """
    prefixed = tracking.settings.prefixed(name)
    if prefixed != name:
        try:
            return tracking.experiment_id(prefixed, create=False)
        except NotFoundError:
            pass
    return tracking.experiment_id(name, create=False)


def _runs_of_experiment(tracking: Tracking, request: CompareRequest) -> tuple[list[Run], list[str]]:
    assert request.experiment is not None
    experiment_id = _experiment_id(tracking, request.experiment)
    top = request.top or DEFAULT_TOP
    notes: list[str] = []
    where = f"experiment {request.experiment!r}" + (
        f" with --filter {request.filter!r}" if request.filter else ""
    )
    client = tracking.client
    if not request.by:
        with translate_errors(f"runs of {where}"):
            runs = client.search_runs(
                [experiment_id],
                filter_string=request.filter or "",
                order_by=["attributes.start_time DESC"],
                max_results=top,
            )
        if not runs:
            raise NotFoundError(f"No runs in {where}.")
        notes.append(f"The {len(runs)} most recent run(s) of {where}.")
        return list(runs), notes

    order, why = _order(tracking, experiment_id, request)
    with translate_errors(f"runs of {where}"):
        runs = client.search_runs(
            [experiment_id],
            filter_string=request.filter or "",
            order_by=[f"metrics.`{request.by}` {order.upper()}"],
            max_results=top,
        )
    # MLflow sorts runs without the metric last in either order: drop them.
    ranked = [r for r in runs if request.by in r.data.metrics]
    if not ranked:
        raise UsageError(
            f"No run in {where} has the metric {request.by!r}; check the name with "
            f"`mlpipe compare --experiment {request.experiment}` (it shows all metrics)."
        )
    best = "lowest" if order == "asc" else "highest"
    notes.append(f"Top {len(ranked)} run(s) of {where} by {request.by}, {best} first ({why}).")
    return ranked, notes


def _runs_of_sweep(tracking: Tracking, request: CompareRequest) -> tuple[list[Run], list[str]]:
    """The trial runs of sweep ``request.sweep`` (tag ``mlpipe.sweep.study``): completed trials
    best first by the sweep's metric and goal (its parent run's tags) or by ``--by``, then the
    others (pruned, failed, killed, running) by trial number."""
    assert request.sweep is not None
    escaped = request.sweep.replace("'", "\\'")
    with translate_errors(f"sweep {request.sweep!r}"):
        experiments = [e.experiment_id for e in tracking.client.search_experiments()]
        runs = tracking.client.search_runs(
            experiments, filter_string=f"tags.`{SWEEP_STUDY_TAG}` = '{escaped}'", max_results=5000
        )
    parents = [r for r in runs if r.data.tags.get(SWEEP_ROLE_TAG) == "parent"]
    trials = [r for r in runs if r.data.tags.get(SWEEP_ROLE_TAG) == "trial"]
    if not trials:
        raise NotFoundError(
            f"No trial runs of sweep {request.sweep!r} in {redact_uri(tracking.uri)}. Check the "
            "study name (the parent run's name) and --tracking-uri."
        )
    parent_tags = parents[0].data.tags if parents else {}
    metric = request.by or parent_tags.get(SWEEP_TAG + "metric")
    goal = parent_tags.get(SWEEP_TAG + "goal", "max")
    order = request.order or ("asc" if goal == "min" else "desc")
    # Completed trials rank by the metric (what the study ranks); pruned, failed, killed and
    # running ones follow by trial number, since their last value is not a result.
    scored = [
        r
        for r in trials
        if metric
        and metric in r.data.metrics
        and r.data.tags.get(SWEEP_TAG + "trial_state") == "COMPLETE"
    ]
    rest = sorted(
        (r for r in trials if r not in scored),
        key=lambda r: int(r.data.tags.get(SWEEP_TAG + "trial", 0)),
    )
    scored.sort(key=lambda r: r.data.metrics[metric], reverse=order == "desc")  # type: ignore[index]
    chosen = (scored + rest)[: request.top or len(trials)]
    best = "lowest" if order == "asc" else "highest"
    notes = [
        f"{len(chosen)} of {len(trials)} trial(s) of sweep {request.sweep!r}"
        + (f", by {metric}, {best} first" if metric else "")
        + (f"; parent run {parents[0].info.run_id}" if parents else "")
        + "."
    ]
    return chosen, notes


def _order(tracking: Tracking, experiment_id: str, request: CompareRequest) -> tuple[str, str]:
    """``asc``/``desc`` for ``--by``, and why: the flag, the runs' goal tag, or the default."""
    if request.order:
        return request.order, f"--order {request.order}"
    escaped = (request.by or "").replace("'", "\\'")
    with translate_errors("primary metric goal"):
        tagged = tracking.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PRIMARY_METRIC_TAG}` = '{escaped}'",
            max_results=1,
        )
    goal = tagged[0].data.tags.get(PRIMARY_GOAL_TAG) if tagged else None
    if goal in ("max", "min"):
        return ("desc" if goal == "max" else "asc"), f"goal {goal} from tag {PRIMARY_GOAL_TAG}"
    return "desc", "default; --order asc for lower-is-better metrics"


# --- layout ---------------------------------------------------------------------------------


def _labels(runs: Sequence[Run]) -> list[str]:
    """Column headers: the run name, with the id's start where names repeat or are missing."""
    names = [r.info.run_name or "" for r in runs]
    labels = []
    for run, name in zip(runs, names, strict=True):
        short = run.info.run_id[:8]
        labels.append(name if name and names.count(name) == 1 else f"{name or 'run'} {short}")
    return labels


def _chosen_metrics(runs: Sequence[Run], wanted: Sequence[str]) -> list[str]:
    present = sorted({k for r in runs for k in r.data.metrics})
    if wanted:
        unknown = [m for m in dict.fromkeys(wanted) if m not in present]
        if unknown:
            raise UsageError(
                f"--metric {', '.join(unknown)}: none of the runs has it. Their metrics: "
                f"{', '.join(present) or 'none'}."
            )
        return list(dict.fromkeys(wanted))
    primary = [r.data.tags.get(PRIMARY_METRIC_TAG) for r in runs]
    first = [m for m in dict.fromkeys(primary) if m and m in present]
    return first + [m for m in present if m not in first]


def _differs(params: Sequence[dict[str, str]], key: str) -> bool:
    return len({p.get(key) for p in params}) > 1


def _digest_notes(runs: Sequence[Run], labels: Sequence[str]) -> list[str]:
    notes = []
    checks = (
        (DATASET_DIGEST_TAG, "dataset digest", "different data", "the data"),
        (
            PREPROCESSING_DIGEST_TAG,
            "preprocessing digest",
            "different preprocessing",
            "the preprocessing",
        ),
    )
    for tag, what, used, cause in checks:
        values = [r.data.tags.get(tag) or None for r in runs]
        known = [v for v in values if v]
        if len(set(known)) > 1:
            groups: dict[str, list[str]] = {}
            for value, label in zip(values, labels, strict=True):
                if value:
                    groups.setdefault(value, []).append(label)
            shown = " vs ".join(
                _abbrev(v) + (f" ({', '.join(g)})" if len(runs) > 2 else "")
                for v, g in groups.items()
            )
            notes.append(
                f"runs used {used}: {what} differs ({shown}) — metric differences may come "
                f"from {cause}."
            )
        missing = [label for value, label in zip(values, labels, strict=True) if not value]
        if missing and len(runs) > 1:
            notes.append(
                f"no {what} recorded ({tag}) for {', '.join(missing)}: whether the runs used "
                "the same one is unknown. Log it with mlpipe.log in the training code."
            )
    return notes


def _experiment_names(tracking: Tracking, ids: Sequence[str]) -> dict[str, str]:
    names = {}
    for experiment_id in ids:
        with translate_errors(f"experiment {experiment_id}"):
            names[experiment_id] = tracking.client.get_experiment(experiment_id).name
    return names


def _commit(tags: dict[str, str]) -> str | None:
    commit = tags.get("mlpipe.git.commit") or tags.get("mlflow.source.git.commit")
    if not commit:
        return None
    return commit + ("+dirty" if tags.get("mlpipe.git.dirty") == "true" else "")


def _cell(value: Any, kind: str, full: bool) -> str:
    if value is None or value == "":
        return "" if full else "-"
    if kind == "metric":
        return repr(float(value)) if full else f"{float(value):.6g}"
    if full:
        return str(value)
    if kind == "digest":
        return _short(str(value), SHORT_DIGEST)
    if kind == "commit":
        text = str(value)
        dirty = text.endswith("+dirty")
        return text[:SHORT_COMMIT] + ("+dirty" if dirty else "")
    return str(value)


def _abbrev(digest: str) -> str:
    short = _short(digest, SHORT_DIGEST)
    return short + "…" if len(short) < len(digest.split(":", 1)[-1]) else short


def _short(text: str, n: int) -> str:
    """A digest's first ``n`` hex characters (after any ``sha256:`` prefix)."""
    return text.split(":", 1)[-1][:n]


def _time(millis: int | None) -> str | None:
    if not millis:
        return None
    return datetime.fromtimestamp(millis / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(start: int | None, end: int | None) -> str | None:
    if not start:
        return None
    if not end:
        return "running"
    seconds = max(0.0, (end - start) / 1000)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' ``to_markdown`` needs ``tabulate``, not a dependency)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = [cell(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.astype(str).values.tolist():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)

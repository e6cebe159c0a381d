"""Check a sweep before anything exists: options, project, fixed parameters and space.

``plan_sweep`` gives the project and its fixed parameters ``mlpipe run``'s own pre-flight
(``plan_run``, with one value of each searched dimension so that required parameters are
filled), and checks the space against the entry point's declared types and choices. A joining
or resuming worker reads the sweep's definition from the study instead of the command line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlpipe.core.errors import UsageError
from mlpipe.run.runner import RunPlan, RunRequest, plan_run
from mlpipe.sweep import study as studies
from mlpipe.sweep.space import (
    Dimension,
    Space,
    check_space,
    describe_space,
    format_value,
    parse_space,
    space_from_json,
)

TAG = "mlpipe.sweep."


@dataclass(frozen=True)
class SweepRequest:
    """What the user asked for, as plain values (the CLI builds it from options)."""

    project: str | None = None
    entry_point: str | None = None
    params: Sequence[str] = ()
    space: Sequence[str] = ()
    trials: int | None = None
    parallel: int | None = None
    study: str | None = None
    storage: str | None = None
    metric: str | None = None
    goal: str | None = None
    pruner: str | None = None
    sampler: str | None = None
    timeout: str | None = None
    register: bool = False
    gpus: str | None = None
    resume: bool = False
    join: str | None = None
    experiment: str | None = None
    tracking_uri: str | None = None
    env_manager: str = "local"
    version: str | None = None


@dataclass
class SweepPlan:
    """A checked sweep: what ``--dry-run`` would print and ``run_sweep`` needs."""

    request: SweepRequest
    mode: str  # new | resume | join
    base: RunPlan
    space: Space
    fixed: dict[str, str]
    trials: int
    metric: str
    goal: str
    pruner: str
    sampler: str
    study_name: str
    storage_url: str
    parallel: int
    gpus: list[str]
    timeout_s: float | None
    register_as: str | None

    def config(self) -> dict[str, Any]:
        """What a joining worker needs, stored in the study (no credentials)."""
        return {
            "project": (
                str(self.base.source.directory)
                if self.base.source.temporary is None
                else self.base.source.display_uri
            ),
            "version": self.request.version,
            "entry_point": self.base.entry_point.name,
            "params": self.fixed,
            "space": describe_space(self.space),
            "trials": self.trials,
            "metric": self.metric,
            "goal": self.goal,
            "pruner": self.pruner,
            "sampler": self.sampler,
            "experiment": self.base.experiment,
            "register": self.register_as,
        }

    def parent_tags(self) -> dict[str, str]:
        tags = {k: v for k, v in self.base.tags.items() if not k.startswith("mlflow.project.")}
        tags.update(
            {
                TAG + "study": self.study_name,
                TAG + "storage": studies.storage_display(self.storage_url),
                TAG + "space": describe_space(self.space),
                TAG + "sampler": self.sampler,
                TAG + "pruner": self.pruner,
                TAG + "metric": self.metric,
                TAG + "goal": self.goal,
                TAG + "trials": str(self.trials),
                TAG + "role": "parent",
                "mlpipe.entry_point": self.base.entry_point.name,
            }
        )
        return tags


@dataclass(frozen=True)
class TrialRow:
    """One line of the live table."""

    number: int
    state: str  # COMPLETE | PRUNED | FAILED | KILLED
    value: float | None
    seconds: float
    params: dict[str, str]
    run_id: str | None
    note: str = ""


def plan_sweep(request: SweepRequest) -> SweepPlan:
    """Resolve and check everything; creates nothing (a joining worker reads the study).

    The caller owns ``plan.base.source`` and must call ``plan.base.source.cleanup()``.

    Raises:
        UsageError: (and subclasses) a bad option, project, parameter, space or study.
    """
    _check_options(request)
    mode = "join" if request.join else "resume" if request.resume else "new"
    config: dict[str, Any] = {}
    if mode != "new":
        name = request.join or request.study
        if not name:
            raise UsageError("--resume needs --study NAME: the study to continue.")
        url = request.storage or _default_storage_for(request)
        storage = studies.open_storage(url)
        config = studies.study_config(studies.load_study(storage, name, url))
        if mode == "join" and (request.space or request.trials or request.params):
            raise UsageError(
                "--join takes the space, trials and parameters from the study; "
                "drop --space, --trials and -P."
            )
    project_uri = request.project or config.get("project")
    if not project_uri:
        raise UsageError("Give the PROJECT to sweep (a folder or git URL).")
    local = Path(project_uri)
    declared: dict[str, Any] = {}
    if not config and local.is_dir():
        from mlpipe.run.project import load_project

        conventions = load_project(local).conventions
        declared = (conventions.sweep if conventions else None) or {}
    entry = request.entry_point or config.get("entry_point") or declared.get("entry_point")
    entry = entry or "main"
    if config:
        space = space_from_json(config["space"])
        if request.space and mode == "resume":
            given = parse_space(request.space)
            if describe_space(given) != describe_space(space):
                raise UsageError(
                    f"Study {request.study!r} searches {config['space']}; --resume continues "
                    "it as it is: drop --space or start a new --study."
                )
        fixed_items = [f"{k}={v}" for k, v in config.get("params", {}).items()]
    else:
        space = parse_space(request.space, declared.get("space"))
        fixed_items = list(request.params)
    from mlpipe.run.params import parse_assignments

    fixed = parse_assignments(fixed_items)
    if local.is_dir():
        from mlpipe.run.project import load_project

        project = load_project(local)
        if not project.errors:
            ep = project.entry_point(entry)
            check_space(space, ep.params, fixed=fixed, entry_point=ep.name)
    representative = {name: _representative(dim) for name, dim in space.items()}
    base = plan_run(
        RunRequest(
            uri=project_uri,
            entry_point=entry,
            params=[*fixed_items, *(f"{k}={v}" for k, v in representative.items())],
            version=request.version or config.get("version"),
            experiment=request.experiment or config.get("experiment"),
            tracking_uri=request.tracking_uri,
            env_manager=request.env_manager,
        )
    )
    try:
        check_space(space, base.entry_point.params, fixed=fixed, entry_point=base.entry_point.name)
        conv = base.project.conventions
        declared = declared or ((conv.sweep if conv else None) or {})
        metric = request.metric or config.get("metric") or declared.get("metric")
        metric = metric or (conv.primary_metric if conv else None)
        if not metric:
            raise UsageError(
                "Which metric does the sweep optimise? Give --metric NAME --goal max|min, or "
                "set mlpipe.primary_metric (or mlpipe.sweep.metric) in the MLproject."
            )
        goal = request.goal or config.get("goal") or declared.get("goal")
        if not goal and conv and metric == conv.primary_metric:
            goal = conv.primary_metric_goal
        if goal not in ("max", "min"):
            raise UsageError(f"--goal for metric {metric!r}: give max or min.")
        trials = request.trials or config.get("trials") or declared.get("trials")
        if not trials:
            raise UsageError("How many trials? Give --trials N (or mlpipe.sweep.trials).")
        pruner = request.pruner or config.get("pruner") or declared.get("pruner") or "median"
        sampler = request.sampler or config.get("sampler") or declared.get("sampler") or "tpe"
        studies.make_pruner(pruner)
        studies.make_sampler(sampler)
        register_as = config.get("register") if config else None
        if request.register:
            register_as = conv.model if conv else None
            if not register_as:
                raise UsageError(
                    "--register needs the model name: set mlpipe.model in the MLproject."
                )
        gpus = _gpus(request.gpus)
        parallel = request.parallel or (len(gpus) if gpus else 1)
        if gpus and parallel > len(gpus):
            raise UsageError(
                f"--parallel {parallel} with --gpus {request.gpus}: one trial per GPU at a time; "
                f"use --parallel {len(gpus)} or list more GPUs."
            )
        name = request.join or request.study or _default_study(base)
        return SweepPlan(
            request=request,
            mode=mode,
            base=base,
            space=space,
            fixed=fixed,
            trials=int(trials),
            metric=metric,
            goal=goal,
            pruner=pruner,
            sampler=sampler,
            study_name=name,
            storage_url=request.storage or studies.default_storage(base.settings),
            parallel=parallel,
            gpus=gpus,
            timeout_s=parse_duration(request.timeout) if request.timeout else None,
            register_as=register_as,
        )
    except BaseException:
        base.source.cleanup()
        raise


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1h30m`` as seconds.

    Raises:
        UsageError: anything else.
    """
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        seconds = float(raw)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise UsageError(f"--timeout {text!r}: expected a duration such as 90s, 30m or 2h.")
        scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
        seconds = sum(float(n) * scale[u] for n, u in parts)
    if seconds <= 0:
        raise UsageError(f"--timeout {text!r}: expected a positive duration.")
    return seconds


def _representative(dim: Dimension) -> str:
    """A value of the dimension for the pre-flight check of the whole parameter set."""
    if dim.kind == "choice":
        return dim.choices[0]
    return format_value(dim, dim.low)


def _check_options(request: SweepRequest) -> None:
    if request.join and request.resume:
        raise UsageError(
            "--join adds a worker to a running sweep; --resume continues a stopped "
            "one: give one of them."
        )
    if request.join and request.study and request.study != request.join:
        raise UsageError("--join NAME names the study; drop --study.")
    if request.trials is not None and request.trials < 1:
        raise UsageError(f"--trials must be at least 1, not {request.trials}.")
    if request.parallel is not None and request.parallel < 1:
        raise UsageError(f"--parallel must be at least 1, not {request.parallel}.")
    if request.goal not in (None, "max", "min"):
        raise UsageError(f"--goal {request.goal!r}: expected max or min.")
    if request.pruner not in (None, *studies.PRUNERS):
        raise UsageError(
            f"--pruner {request.pruner!r}: expected one of {', '.join(studies.PRUNERS)}."
        )
    if request.timeout:
        parse_duration(request.timeout)
    _gpus(request.gpus)
    if request.study and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", request.study):
        raise UsageError(
            f"--study {request.study!r}: use letters, digits, '.', '_' and '-' (it becomes a "
            "run name and a tag)."
        )


def _gpus(text: str | None) -> list[str]:
    if not text:
        return []
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(
        re.fullmatch(r"\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-fA-F-]+", g) for g in gpus
    ):
        raise UsageError(f"--gpus {text!r}: expected GPU indices such as 0,1,2,3.")
    if len(set(gpus)) != len(gpus):
        raise UsageError(f"--gpus {text!r} lists a GPU twice.")
    return gpus


def _default_storage_for(request: SweepRequest) -> str:
    from mlpipe.core.settings import resolve_settings

    project = Path(request.project) if request.project else None
    settings = resolve_settings(
        tracking_uri=request.tracking_uri,
        project_dir=project if project is not None and project.is_dir() else None,
    )
    return studies.default_storage(settings)


def _default_study(plan: RunPlan) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", plan.project.name or "sweep").strip("-") or "sweep"
    return f"{base}-{stamp}"

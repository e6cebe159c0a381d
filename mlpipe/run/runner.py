"""``mlpipe run``: check a project and its parameters, then run it through MLflow Projects.

Everything that can be wrong with the input is found before a run exists (``plan_run``);
``execute`` then creates the run with mlpipe's tags, hands the entry point to MLflow's local
backend (its env managers, docker and command building), and owns the child process, so a
failure ends FAILED with the output's last lines and Ctrl-C or SIGTERM ends KILLED.

Kept whole: the life of one run, from the checks to its end, reads in order here; ``mlpipe
sweep`` runs its trials through the same path (``with_params``, ``execute`` with
``LaunchHooks``) rather than a copy of it.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlpipe import __version__
from mlpipe.core.errors import (
    InterruptedRunError,
    MlpipeError,
    ProjectCommandError,
    ProjectError,
    TrackingUnavailableError,
    UsageError,
)
from mlpipe.core.settings import Settings, client_environ, redact_uri, resolve_settings
from mlpipe.run.launcher import LaunchHooks, entry_point_command
from mlpipe.run.params import CheckedParams, check_params, parse_assignments
from mlpipe.run.preflight import PreflightOutcome, run_preflight
from mlpipe.run.project import EntryPoint, Project, load_project
from mlpipe.run.source import ProjectSource, resolve_source, strip_credentials

ENV_MANAGERS = ("local", "uv", "virtualenv", "conda")
BACKENDS = ("local", "kubernetes")
KUBE_CONFIG_KEYS = ("kube-job-template-path", "repository-uri")
FINISH_TIMEOUT_ENV = "MLPIPE_FINISH_TIMEOUT"
FINISH_TIMEOUT_S = 300.0
"""How long ``mlpipe run`` keeps trying to mark a run's end when the tracking server is down
(``$MLPIPE_FINISH_TIMEOUT`` overrides it); a training of hours can wait minutes for a restart."""
INTERRUPT_FINISH_S = 10.0

Echo = Callable[[str], None]

_LAUNCH_LOCK = threading.Lock()
"""``_launch`` swaps a module-level function of MLflow's local backend for the time of one
launch; runs started from several threads at once (``mlpipe sweep --parallel``) take turns."""


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for, as plain values (the CLI builds it from options)."""

    uri: str
    entry_point: str = "main"
    params: Sequence[str] = ()
    version: str | None = None
    experiment: str | None = None
    tracking_uri: str | None = None
    env_manager: str = "local"
    backend: str = "local"
    backend_config: str | None = None
    gpus: bool = False
    dataset_version: str | None = None
    allow_extra_params: bool = False
    run_name: str | None = None

    def params_dict(self) -> dict[str, str]:
        """The ``-P`` values as a mapping (already checked for form by ``plan_run``)."""
        return parse_assignments(self.params)


@dataclass
class RunPlan:
    """A checked run: everything ``--dry-run`` prints and ``execute`` needs."""

    request: RunRequest
    source: ProjectSource
    project: Project
    entry_point: EntryPoint
    params: CheckedParams
    settings: Settings
    experiment: str
    command: str
    tags: dict[str, str] = field(default_factory=dict)
    docker_args: dict[str, object] = field(default_factory=dict)
    preflight: PreflightOutcome | None = None
    """What the project's own check said (``mlpipe: preflight:``); None when it has none."""

    @property
    def all_params(self) -> dict[str, str]:
        return {**self.params.values, **self.params.extras}

    def describe(self) -> dict[str, object]:
        """The plan as plain data, secrets stripped, for ``--dry-run`` and logs."""
        return {
            "project": self.source.display_uri,
            "directory": str(self.project.directory),
            "entry_point": self.entry_point.name,
            "parameters": {
                name: {"value": value, "type": spec.type}
                for name, value in self.params.values.items()
                for spec in [self.entry_point.params[name]]
            },
            "extra_parameters": dict(self.params.extras),
            "experiment": self.experiment,
            "tracking_uri": redact_uri(self.settings.tracking_uri.value),
            "tracking_uri_source": self.settings.tracking_uri.source,
            "env_manager": self.request.env_manager,
            "backend": self.request.backend,
            "docker_args": dict(self.docker_args),
            "command": self.command,
            "tags": self.tags,
            "preflight": self.preflight.note or self.preflight.warning if self.preflight else None,
        }


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    experiment_id: str
    experiment: str
    status: str
    metrics: dict[str, float]
    tracking_uri: str
    ui_link: str | None


def plan_run(request: RunRequest) -> RunPlan:
    """Resolve and check everything; creates nothing but a temporary clone.

    The last check is the project's own (``mlpipe.run.preflight``), when it declares one for
    this entry point: it sees the values as they will be passed.

    The caller owns ``plan.source`` and must call ``plan.source.cleanup()``.

    Raises:
        UsageError: (and subclasses) a bad URI, version, project, parameter or option, or
            input the project's pre-flight check refused (``PreflightRefusedError``).
    """
    _check_options(request)
    given = parse_assignments(request.params)
    source = resolve_source(request.uri, request.version)
    try:
        project = load_project(source.directory)
        if source.temporary is not None:  # name files by the URL given, not the clone
            project = project.shown_as(source.directory, source.display_uri)
        if project.errors:
            listed = "\n  ".join(str(f) for f in project.errors)
            raise ProjectError(
                f"The project has {len(project.errors)} error(s):\n  {listed}\n"
                "Fix them (`mlpipe validate` lists them with warnings too)."
            )
        entry = project.entry_point(request.entry_point)
        checked = check_params(
            entry.params,
            given,
            allow_extra=request.allow_extra_params or entry.script,
            entry_point=entry.name,
        )
        settings = resolve_settings(
            tracking_uri=request.tracking_uri,
            experiment=request.experiment,
            project_dir=source.directory,
        )
        experiment = settings.experiment_name(project.name or "Default")
        docker_args = _docker_args(request, project)
        _check_backend_config(request, project)
        plan = RunPlan(
            request=request,
            source=source,
            project=project,
            entry_point=entry,
            params=checked,
            settings=settings,
            experiment=experiment,
            command=entry_point_command(project, entry, checked),
            docker_args=docker_args,
        )
        plan.tags = run_tags(plan)
        plan.preflight = run_preflight(
            project,
            entry.name,
            checked.values,
            env_manager=request.env_manager,
            backend=request.backend,
        )
        return plan
    except BaseException:
        source.cleanup()
        raise


def with_params(
    plan: RunPlan, params: Mapping[str, str], *, run_name: str | None = None
) -> RunPlan:
    """The same checked project with other parameter values (a sweep's trial).

    The values are checked as ``-P`` values are; the source, settings and experiment are
    reused, and the dataset is described again only when its parameter changed.

    Raises:
        ParameterError: a value that does not fit its declared parameter.
    """
    given = {**plan.request.params_dict(), **params}
    entry = plan.entry_point
    checked = check_params(
        entry.params,
        given,
        allow_extra=plan.request.allow_extra_params or entry.script,
        entry_point=entry.name,
    )
    request = replace(
        plan.request,
        params=tuple(f"{k}={v}" for k, v in given.items()),
        run_name=run_name or plan.request.run_name,
    )
    new = replace(
        plan,
        request=request,
        params=checked,
        command=entry_point_command(plan.project, entry, checked),
        tags={},
    )
    conv = plan.project.conventions
    param = conv.dataset_param if conv else None
    if param and checked.values.get(param) != plan.params.values.get(param):
        new.tags = run_tags(new)
    else:
        new.tags = dict(plan.tags)
    return new


def run_tags(plan: RunPlan) -> dict[str, str]:
    """The ``mlpipe.*`` tags (DESIGN.md) plus MLflow's own project tags, credentials stripped."""
    conv = plan.project.conventions
    git = plan.source.git
    tags = {
        "mlpipe.convention": str(conv.convention) if conv and conv.convention else "none",
        "mlpipe.version": __version__,
        "mlpipe.entry_point": plan.entry_point.name,
        "mlflow.user": _user(),
        "mlflow.source.name": plan.source.display_uri,
        "mlflow.source.type": "PROJECT",
        "mlflow.project.entryPoint": plan.entry_point.name,
        "mlflow.project.backend": plan.request.backend,
        "mlflow.project.env": plan.request.env_manager,
    }
    if conv and conv.primary_metric:
        # Recorded on the run so `mlpipe promote` compares versions on it without the project.
        tags["mlpipe.primary_metric"] = conv.primary_metric
        tags["mlpipe.primary_metric_goal"] = conv.primary_metric_goal or "max"
    if git.url:
        tags["mlpipe.git.url"] = git.url
        tags["mlflow.source.git.repoURL"] = git.url
    if git.commit:
        tags["mlpipe.git.commit"] = git.commit
        tags["mlflow.source.git.commit"] = git.commit
    if git.dirty is not None:
        tags["mlpipe.git.dirty"] = "true" if git.dirty else "false"
    if git.branch:
        tags["mlflow.source.git.branch"] = git.branch
    tags.update(_dataset_tags(plan))
    return tags


def execute(
    plan: RunPlan, echo: Echo = lambda _msg: None, *, hooks: LaunchHooks | None = None
) -> RunOutcome:
    """Create the run and run the entry point; returns when it has finished.

    When the tracking server is down as the run ends, its end is retried for
    ``$MLPIPE_FINISH_TIMEOUT`` seconds (300), with a progress line every 15 s; what the
    project's process could not send (``mlpipe.core.outbox``) is sent first.

    Raises:
        TrackingUnavailableError: the tracking server does not answer at the start (nothing
            created), or did not answer for ``$MLPIPE_FINISH_TIMEOUT`` at the end (the end is
            kept in the outbox for the next ``mlpipe run`` or ``mlpipe doctor``).
        ProjectCommandError: the command exited non-zero; the run is FAILED.
        InterruptedRunError: Ctrl-C or SIGTERM; the process group is stopped, the run KILLED.
            Also when ``hooks.on_start``'s caller stopped the process.
    """
    with client_environ(plan.settings):
        return _execute(plan, echo, hooks or LaunchHooks())


def _execute(plan: RunPlan, echo: Echo, hooks: LaunchHooks) -> RunOutcome:
    from mlpipe.core.tracking import Tracking, check_reachable

    uri = plan.settings.tracking_uri.value or ""
    finish_wait = _finish_wait()
    check_reachable(uri)
    tracking = Tracking(plan.settings)
    _replay_outbox(tracking, echo)
    experiment_id = tracking.experiment_id(plan.experiment)
    if plan.request.backend == "kubernetes":
        return _execute_kubernetes(plan, tracking, experiment_id, echo)
    run_id = tracking.create_run(
        experiment_id, tags=plan.tags, params=plan.all_params, run_name=plan.request.run_name
    )
    echo(f"mlpipe: run {run_id} in experiment {plan.experiment!r} ({redact_uri(uri)})")
    link = tracking.ui_link(experiment_id, run_id)
    if link:
        echo(f"mlpipe: follow it at {link}")
    process = None
    try:
        with _signals_raise_interrupt(run_id):
            process = _launch(plan, tracking, experiment_id, run_id, hooks)
            if hooks.on_start is not None:
                hooks.on_start(run_id, process)
            code = process.wait()
    except InterruptedRunError as exc:
        if process is not None:
            process.stop(exc.signum)
        _finish_or_report(tracking, run_id, "KILLED", echo, wait=INTERRUPT_FINISH_S)
        raise
    except BaseException:
        if process is not None:
            process.stop(signal.SIGTERM)
        _finish_or_report(tracking, run_id, "FAILED", echo, wait=INTERRUPT_FINISH_S)
        raise
    if code != 0 and process.stopped_by is not None:
        # Stopped on purpose from outside (``hooks.on_start``'s caller), not a failure.
        _finish_or_report(tracking, run_id, "KILLED", echo, wait=INTERRUPT_FINISH_S)
        raise InterruptedRunError(
            f"Run {run_id} was stopped and marked KILLED.",
            signum=process.stopped_by,
            run_id=run_id,
        )
    if code != 0:
        _finish_or_report(tracking, run_id, "FAILED", echo, wait=finish_wait)
        tail = "\n".join(
            [f"  out| {line}" for line in process.tail.lines("out")]
            + [f"  err| {line}" for line in process.tail.lines("err")]
        )
        raise ProjectCommandError(
            f"The project's command exited with code {code}; run {run_id} is marked FAILED. "
            f"Last lines of its output:\n{tail}",
            run_id=run_id,
            returncode=code,
        )
    tracking.finish(run_id, "FINISHED", wait=finish_wait, echo=echo)
    summary = tracking.run_summary(run_id)
    return RunOutcome(
        run_id,
        experiment_id,
        plan.experiment,
        "FINISHED",
        summary["metrics"],
        redact_uri(uri),
        link,
    )


def _finish_wait() -> float:
    raw = os.environ.get(FINISH_TIMEOUT_ENV, "")
    try:
        return max(float(raw), 0.0) if raw else FINISH_TIMEOUT_S
    except ValueError:
        raise UsageError(
            f"{FINISH_TIMEOUT_ENV}={raw!r}: expected a number of seconds (default "
            f"{FINISH_TIMEOUT_S:g})."
        ) from None


def _finish_or_report(tracking, run_id: str, status: str, echo: Echo, *, wait: float) -> None:
    """Mark the run's end when it already failed: a tracking error must not hide that one."""
    try:
        tracking.finish(run_id, status, wait=wait, echo=echo)
    except MlpipeError as exc:
        echo(f"mlpipe: {exc}")


def _replay_outbox(tracking, echo: Echo) -> None:
    """Send what earlier runs could not (their server was down), before starting a new one."""
    try:
        replayed = tracking.replay_outbox()
    except (TrackingUnavailableError, UsageError) as exc:
        echo(f"mlpipe: warning: earlier unsent data stays in the outbox: {exc}")
        return
    for item in replayed:
        if item.gone:
            echo(f"mlpipe: dropped unsent data of run {item.run_id}: the run no longer exists")
            continue
        marked = f"; marked it {item.status}" if item.status else ""
        echo(
            f"mlpipe: sent {item.metrics} metric points and {item.params} params that run "
            f"{item.run_id} left unsent when the tracking server was down{marked}"
        )


def _launch(plan: RunPlan, tracking, experiment_id: str, run_id: str, hooks: LaunchHooks):
    """Run the entry point through MLflow's local backend, started by our launcher.

    MLflow resolves the environment (local, uv, virtualenv, conda, docker) and builds the
    command; its module-level ``_run_entry_point`` is the one step swapped for ours, for the
    reasons in ``mlpipe.run.launcher``. ``tests/test_runner.py`` guards this seam against MLflow
    upgrades.
    """
    import mlflow
    from mlflow.projects.backend import local as mlflow_local
    from mlflow.projects.utils import (
        MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG,
        PROJECT_BUILD_IMAGE,
        PROJECT_DOCKER_ARGS,
        PROJECT_DOCKER_AUTH,
        PROJECT_ENV_MANAGER,
        PROJECT_STORAGE_DIR,
        PROJECT_SYNCHRONOUS,
        get_run_env_vars,
    )

    from mlpipe.log.batching import PARENT_RUN_ENV
    from mlpipe.run.launcher import ProjectProcess

    settings = plan.settings
    started: list[ProjectProcess] = []

    def run_entry_point(command, work_dir, experiment_id, run_id):
        env = dict(os.environ)
        env.update(get_run_env_vars(run_id, experiment_id))
        # mlpipe marks this run's end itself: the project's process leaves it to us.
        env[PARENT_RUN_ENV] = run_id
        env["MLFLOW_TRACKING_URI"] = settings.tracking_uri.value or ""
        if (
            settings.registry_uri.value
            and settings.registry_uri.value != env["MLFLOW_TRACKING_URI"]
        ):
            env["MLFLOW_REGISTRY_URI"] = settings.registry_uri.value
        env["PYTHONUNBUFFERED"] = "1"  # the output goes through a pipe: keep it flowing
        env.update(hooks.env)
        if plan.request.env_manager == "local":
            # "local" means mlpipe's own environment, even when it was not activated.
            bin_dir = os.path.dirname(sys.executable)
            env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        process = ProjectProcess(command, work_dir, env, hooks.stdout, hooks.stderr)
        started.append(process)
        return process

    backend_config = {
        MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG: run_id,
        PROJECT_ENV_MANAGER: plan.request.env_manager,
        PROJECT_SYNCHRONOUS: True,
        PROJECT_DOCKER_ARGS: plan.docker_args,
        PROJECT_STORAGE_DIR: None,
        PROJECT_BUILD_IMAGE: True,
        PROJECT_DOCKER_AUTH: None,
    }
    mlflow.set_tracking_uri(settings.tracking_uri.value)
    if settings.registry_uri.value:
        mlflow.set_registry_uri(settings.registry_uri.value)
    with _LAUNCH_LOCK:
        original = mlflow_local._run_entry_point
        mlflow_local._run_entry_point = run_entry_point
        try:
            with _mlflow_errors():
                mlflow_local.LocalBackend().run(
                    str(plan.project.directory),
                    plan.entry_point.name,
                    plan.all_params,
                    None,
                    backend_config,
                    settings.tracking_uri.value,
                    experiment_id,
                )
        finally:
            mlflow_local._run_entry_point = original
    if not started:
        raise UsageError("MLflow's local backend did not start the entry point.")
    return started[0]


def _execute_kubernetes(plan: RunPlan, tracking, experiment_id: str, echo: Echo) -> RunOutcome:
    """Hand the run to MLflow's Kubernetes backend (docker build, push, Job), then wait."""
    import mlflow
    import mlflow.projects

    mlflow.set_tracking_uri(plan.settings.tracking_uri.value)
    with _mlflow_errors():
        submitted = mlflow.projects.run(
            str(plan.project.directory),
            entry_point=plan.entry_point.name,
            parameters=plan.all_params,
            experiment_id=experiment_id,
            backend="kubernetes",
            backend_config=plan.request.backend_config,
            synchronous=False,
            run_name=plan.request.run_name,
        )
    run_id = submitted.run_id
    tracking.set_tags(run_id, plan.tags)
    echo(f"mlpipe: run {run_id} submitted to Kubernetes")
    try:
        with _signals_raise_interrupt(run_id):
            ok = submitted.wait()
    except InterruptedRunError:
        submitted.cancel()
        _finish_or_report(tracking, run_id, "KILLED", echo, wait=INTERRUPT_FINISH_S)
        raise
    status = "FINISHED" if ok else "FAILED"
    tracking.finish(run_id, status, wait=_finish_wait(), echo=echo)
    if not ok:
        raise ProjectCommandError(f"The Kubernetes job of run {run_id} failed.", run_id=run_id)
    summary = tracking.run_summary(run_id)
    return RunOutcome(
        run_id,
        experiment_id,
        plan.experiment,
        status,
        summary["metrics"],
        redact_uri(tracking.uri),
        tracking.ui_link(experiment_id, run_id),
    )


@contextmanager
def _signals_raise_interrupt(run_id: str):
    """Turn SIGINT, SIGTERM and SIGHUP into ``InterruptedRunError`` while the project runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        raise InterruptedRunError(
            f"{name}: run {run_id} stopped and marked KILLED.", signum=signum, run_id=run_id
        )

    # SIGHUP too: the project runs in its own session, so a closed terminal reaches only us.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in handled}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _mlflow_errors():
    from mlflow.exceptions import ExecutionException, MlflowException

    try:
        yield
    except (ExecutionException, MlflowException) as exc:
        raise UsageError(str(getattr(exc, "message", exc))) from exc


def _check_options(request: RunRequest) -> None:
    if request.experiment is not None:
        # '' used to fall back silently to the MLproject's name; a control character makes
        # an experiment nobody can type or see.
        if not request.experiment.strip():
            raise UsageError(
                f"--experiment {request.experiment!r} is blank; give a name, or leave the "
                "option out to use $MLFLOW_EXPERIMENT_NAME or the MLproject's name."
            )
        if not request.experiment.isprintable():
            raise UsageError(
                f"--experiment {request.experiment!r} holds control characters (a newline, a "
                "tab); give a name of printable characters."
            )
    if request.env_manager not in ENV_MANAGERS:
        raise UsageError(
            f"--env-manager {request.env_manager!r}: expected one of {', '.join(ENV_MANAGERS)}."
        )
    if request.backend not in BACKENDS:
        raise UsageError(f"--backend {request.backend!r}: expected one of {', '.join(BACKENDS)}.")
    if request.backend == "kubernetes" and not request.backend_config:
        raise UsageError(
            "--backend kubernetes needs --backend-config FILE (a JSON file with "
            "kube-job-template-path and repository-uri)."
        )
    if request.backend_config and request.backend == "local":
        raise UsageError("--backend-config applies to --backend kubernetes only.")


def _check_backend_config(request: RunRequest, project: Project) -> None:
    if request.backend != "kubernetes":
        return
    if project.env_kind != "docker_env":
        raise UsageError(
            "--backend kubernetes runs docker_env projects only; this project "
            "declares " + (project.env_kind or "no environment") + "."
        )
    path = Path(request.backend_config or "")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--backend-config {path}: no such file.") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--backend-config {path}: not a readable JSON file ({exc}).") from None
    missing = [key for key in KUBE_CONFIG_KEYS if not config.get(key)]
    if missing:
        raise UsageError(f"--backend-config {path}: missing {', '.join(missing)}.")
    template = Path(config["kube-job-template-path"])
    if not template.is_absolute():
        template = path.parent / template
    if not template.is_file():
        raise UsageError(
            f"--backend-config {path}: kube-job-template-path {template} does not exist."
        )


def _docker_args(request: RunRequest, project: Project) -> dict[str, object]:
    if not request.gpus:
        return {}
    if project.env_kind != "docker_env":
        raise UsageError(
            "--gpus applies to docker_env projects (it adds -A gpus=all to docker "
            "run); this project runs in the local environment, which sees the "
            "GPUs already."
        )
    return {"gpus": "all"}


def _dataset_tags(plan: RunPlan) -> dict[str, str]:
    """Tag the dataset the ``dataset_param`` names, digest included, before the run exists.

    So a run is tagged even when the project's code forgets ``mlog.dataset``; a local dataset
    that does not hold together is refused here, before anything is created.
    """
    conv = plan.project.conventions
    version = plan.request.dataset_version
    param = conv.dataset_param if conv else None
    value = plan.params.values.get(param or "", "") if param else ""
    if not value:
        if version:
            raise UsageError(
                "--dataset-version needs a dataset: the project's mlpipe.dataset_param "
                f"({param or 'not set'}) has no value in entry point {plan.entry_point.name!r}."
            )
        return {}
    if not Path(value).exists():  # a remote URI: the project's code may log its digest
        name = Path(value.rstrip("/")).name or value
        tags = {"mlpipe.dataset.uri": strip_credentials(value), "mlpipe.dataset.name": name}
        return tags | ({"mlpipe.dataset.version": version} if version else {})
    from mlpipe.data.dataset import build_manifest
    from mlpipe.log import dataset_tags

    try:
        info = build_manifest(value, version=version)
    except UsageError as exc:
        raise UsageError(f"Parameter {param} names a dataset that cannot be used: {exc}") from exc
    return dataset_tags(info)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

"""``mlpipe sweep``: check the search, then run its trials, each one an ``mlpipe run``.

``plan_sweep`` finds everything that can be wrong before anything exists: the project and its
fixed parameters get ``mlpipe run``'s own pre-flight (``plan_run``), and the space is checked
against the entry point's declared types and choices. ``run_sweep`` then creates (or joins,
or resumes) the Optuna study and the parent run, and lets ``study.optimize`` drive the trials
(its heartbeat works only there). Each trial is ``mlpipe.run.runner.execute`` of the checked
plan with the trial's values: the same process group, dataset tags and run ends as ``mlpipe
run``, with ``LaunchHooks`` to follow the process (pruning, Ctrl-C) and keep its output in a
log file.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import (
    InterruptedRunError,
    ProjectCommandError,
    UsageError,
)
from mlpipe.core.settings import client_environ, redact_uri
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

if TYPE_CHECKING:
    import optuna

    from mlpipe.core.tracking import Tracking
    from mlpipe.run.launcher import ProjectProcess

TAG = "mlpipe.sweep."
WAIT_POLL_S = 2.0
"""How often a worker with nothing to start looks again (other workers' trials may go stale)."""
POLL_ENV = "MLPIPE_SWEEP_POLL"
WORKER = f"{socket.gethostname()}:{os.getpid()}"
"""The ``mlpipe.sweep.worker`` tag of a trial's run: which machine and process ran it."""

Echo = Callable[[str], None]


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


@dataclass
class SweepOutcome:
    study: str
    parent_run_id: str
    rows: list[TrialRow] = field(default_factory=list)
    complete: bool = False
    finalized: Any = None  # results.SweepSummary when this worker closed the sweep


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


def run_sweep(
    plan: SweepPlan,
    echo: Echo = lambda _msg: None,
    on_row: Callable[[TrialRow], None] = lambda _row: None,
) -> SweepOutcome:
    """Create, resume or join the study and run trials until ``plan.trials`` count.

    Raises:
        UsageError: the study exists (new) or the storage or tracking server cannot be used;
            nothing was created.
        InterruptedRunError: Ctrl-C, SIGTERM or SIGHUP: this worker's running trials are
            stopped and their runs KILLED; the parent too when no other worker runs a trial.
        ProjectCommandError: no trial completed.
    """
    import optuna

    from mlpipe.core.tracking import Tracking, check_reachable

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with client_environ(plan.base.settings):
        check_reachable(plan.base.settings.tracking_uri.value or "")
        tracking = Tracking(plan.base.settings)
        storage = studies.open_storage(plan.storage_url)
        study, parent = _open(plan, storage, tracking, echo)
        worker = _Worker(plan, study, tracking, parent, echo, on_row)
        outcome = SweepOutcome(plan.study_name, parent, worker.rows)
        try:
            outcome.complete = worker.loop()
        except InterruptedRunError as exc:
            others = studies.progress(study).running
            if others == 0:
                tracking.finish(parent, "KILLED", wait=10.0, echo=echo)
                where = f"parent run {parent} marked KILLED"
            else:
                where = f"{others} trial(s) of other workers still run; parent run left RUNNING"
            raise InterruptedRunError(
                f"{'Ctrl-C' if exc.signum == signal.SIGINT else signal.Signals(exc.signum).name}"
                f": sweep {plan.study_name!r} stopped, its running trials marked KILLED; "
                f"{where}. Continue it with --resume --study {plan.study_name}.",
                signum=exc.signum,
                run_id=parent,
            ) from None
        if outcome.complete:
            from mlpipe.sweep.results import finalize

            outcome.finalized = finalize(
                study,
                tracking,
                parent,
                metric=plan.metric,
                space=plan.space,
                register_as=plan.register_as,
                echo=echo,
            )
        return outcome


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


# --- the study and the parent run ----------------------------------------------------------


def _open(plan: SweepPlan, storage, tracking: Tracking, echo: Echo) -> tuple[optuna.Study, str]:
    """The study and the parent run id: created (new), reopened (resume) or read (join)."""
    where = studies.storage_display(plan.storage_url)
    if plan.mode == "new":
        study = studies.create_study(
            storage,
            plan.study_name,
            goal=plan.goal,
            sampler=plan.sampler,
            pruner=plan.pruner,
            config={**plan.config(), "parent_run_id": None},
        )
        experiment_id = tracking.experiment_id(plan.base.experiment)
        parent = tracking.create_run(
            experiment_id,
            tags=plan.parent_tags(),
            params=plan.fixed,
            run_name=plan.study_name,
        )
        study.set_user_attr(studies.CONFIG_ATTR, {**plan.config(), "parent_run_id": parent})
        echo(
            f"mlpipe: sweep {plan.study_name!r}: parent run {parent} in experiment "
            f"{plan.base.experiment!r}; study in {where}"
        )
        link = tracking.ui_link(experiment_id, parent)
        if link:
            echo(f"mlpipe: follow it at {link}")
        return study, parent
    study = studies.load_study(storage, plan.study_name, plan.storage_url)
    parent = studies.study_config(study).get("parent_run_id")
    if not parent:
        raise UsageError(
            f"Study {plan.study_name!r} has no parent run yet (its first worker is still "
            "starting, or died before creating it); try again in a moment."
        )
    if plan.mode == "resume":
        tracking.client.update_run(parent, status="RUNNING")
        done = studies.progress(study).counted
        echo(
            f"mlpipe: resuming sweep {plan.study_name!r} ({done} of {plan.trials} trials "
            f"done); parent run {parent}"
        )
    else:
        echo(f"mlpipe: joined sweep {plan.study_name!r} in {where}; parent run {parent}")
    return study, parent


# --- the worker ----------------------------------------------------------------------------


class _Worker:
    """Runs trials of one study in this process until the study has its count."""

    def __init__(self, plan, study, tracking, parent: str, echo: Echo, on_row):
        self.plan: SweepPlan = plan
        self.study = study
        self.tracking: Tracking = tracking
        self.parent = parent
        self.echo = echo
        self.on_row = on_row
        self.rows: list[TrialRow] = []
        self.poll = float(os.environ.get(POLL_ENV) or WAIT_POLL_S)
        self._active: dict[int, ProjectProcess] = {}
        self._lock = threading.Lock()
        self._interrupt: int | None = None
        self._slots: queue.Queue[str] = queue.Queue()
        for gpu in plan.gpus:
            self._slots.put(gpu)
        self._logs = Path(tempfile.mkdtemp(prefix="mlpipe-sweep-"))

    # the loop -------------------------------------------------------------------------------
    def loop(self) -> bool:
        """Start trials while the count is short; wait while only others' trials run.

        Returns:
            True when the study has its count of trials; False on ``--timeout``.
        """
        deadline = time.monotonic() + self.plan.timeout_s if self.plan.timeout_s else None
        with self._signals():
            while True:
                for stale in studies.fail_stale(self.study):
                    self._settle_stale(stale.user_attrs.get(studies.RUN_ATTR), stale.number)
                state = studies.progress(self.study)
                if state.counted >= self.plan.trials:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.echo(f"mlpipe: --timeout reached with {state.counted} trial(s) done")
                    return False
                if state.pending < self.plan.trials or state.waiting:
                    self.study.optimize(
                        self._objective,
                        n_jobs=self.plan.parallel,
                        timeout=left,
                        catch=(ProjectCommandError,),
                        callbacks=[self._enough],
                    )
                    continue
                time.sleep(self.poll)  # others' trials run: wait for them, or for them to go stale

    def _enough(self, study, _trial) -> None:
        if self._interrupt is not None or studies.progress(study).pending >= self.plan.trials:
            study.stop()

    # one trial ------------------------------------------------------------------------------
    def _objective(self, trial: optuna.Trial) -> float:
        import optuna

        from mlpipe.run.runner import LaunchHooks, execute, with_params
        from mlpipe.sweep.pruning import MetricWatcher

        if self._interrupt is not None:
            raise InterruptedRunError("stopped", signum=self._interrupt)
        retry_of = self.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retry_of is not None:
            self._settle_stale(trial.user_attrs.get(studies.RUN_ATTR), retry_of)
        if studies.is_surplus(self.study, trial.number, self.plan.trials):
            # Two workers started a trial for the last place; the higher number gives way.
            trial.set_user_attr(studies.SURPLUS_ATTR, True)
            self.study.stop()
            raise optuna.TrialPruned("surplus: the study has its count of trials")
        values = {
            name: format_value(dim, _suggest(trial, dim)) for name, dim in self.plan.space.items()
        }
        name = f"{self.plan.study_name}-{trial.number:03d}"
        trial_plan = with_params(self.plan.base, values, run_name=name)
        trial_plan.tags.update(
            {
                "mlflow.parentRunId": self.parent,
                TAG + "study": self.plan.study_name,
                TAG + "trial": str(trial.number),
                TAG + "trial_state": "RUNNING",
                TAG + "role": "trial",
                TAG + "worker": WORKER,
            }
        )
        if retry_of is not None:
            trial_plan.tags[TAG + "retry_of"] = str(retry_of)
        gpu = self._slots.get() if self.plan.gpus else None
        began = time.monotonic()
        log_path = self._logs / f"trial-{trial.number:03d}.log"
        run_id: list[str] = []
        watcher = MetricWatcher(
            self.tracking.client,
            trial,
            self.plan.metric,
            stop=lambda: self._stop(trial.number, signal.SIGTERM),
            poll=self.poll,
        )

        def on_start(rid: str, process: ProjectProcess) -> None:
            run_id.append(rid)
            trial.set_user_attr(studies.RUN_ATTR, rid)
            with self._lock:
                self._active[trial.number] = process
            if self._interrupt is not None:
                process.stop(self._interrupt)
            elif self.plan.pruner != "none":
                watcher.start(rid)

        state, value = "FAILED", None
        note = f"retry of {retry_of}" if retry_of is not None else ""
        try:
            with log_path.open("wb") as log:
                hooks = LaunchHooks(
                    on_start=on_start,
                    env={"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {},
                    stdout=log,
                    stderr=log,
                )
                try:
                    outcome = execute(trial_plan, hooks=hooks)
                finally:
                    watcher.close()
            value = outcome.metrics.get(self.plan.metric)
            if value is None:
                note = f"metric {self.plan.metric!r} was not logged"
                raise ProjectCommandError(
                    f"Trial {trial.number}: the run finished without the metric "
                    f"{self.plan.metric!r}; check --metric.",
                    run_id=outcome.run_id,
                )
            state = "COMPLETE"
            return float(value)
        except InterruptedRunError:
            if watcher.pruned:
                state, note = "PRUNED", f"at step {watcher.pruned_at}"
                raise optuna.TrialPruned(f"pruned at step {watcher.pruned_at}") from None
            state = "KILLED"
            raise
        except ProjectCommandError as exc:
            if exc.returncode is not None:
                note = f"exit code {exc.returncode}"
            raise
        finally:
            with self._lock:
                self._active.pop(trial.number, None)
            if gpu is not None:
                self._slots.put(gpu)
            trial.set_user_attr(studies.STATE_ATTR, state)
            rid = run_id[0] if run_id else None
            if rid is not None:
                self._close_trial_run(rid, state, log_path)
            row = TrialRow(trial.number, state, value, time.monotonic() - began, values, rid, note)
            self.rows.append(row)
            self.on_row(row)

    def _close_trial_run(self, run_id: str, state: str, log_path: Path) -> None:
        try:
            self.tracking.set_tags(run_id, {TAG + "trial_state": state})
            if log_path.is_file() and log_path.stat().st_size:
                self.tracking.client.log_artifact(run_id, str(log_path), "mlpipe")
        except Exception as exc:  # the trial's end is recorded by Optuna either way
            self.echo(f"mlpipe: warning: could not tag run {run_id} {state}: {exc}")

    # stale trials and stopping ---------------------------------------------------------------
    def _settle_stale(self, run_id: str | None, number: int) -> None:
        """A dead worker's trial: stop its process if it runs here, mark its run KILLED.

        Its project's process runs in its own session, so it outlives a SIGKILLed worker; on
        this machine it is stopped here, elsewhere it ends by itself. Either way the run is
        tagged ``STALE``: the study counts the retry, not this run.
        """
        if not run_id:
            return
        try:
            run = self.tracking.client.get_run(run_id)
        except Exception:
            return
        if run.data.tags.get(TAG + "trial_state") not in (None, "RUNNING"):
            return  # settled already (by another worker)
        stopped = _stop_run_processes(run_id)
        self.tracking.set_tags(run_id, {TAG + "trial_state": "STALE"})
        if self.tracking.run_status(run_id) == "RUNNING":
            self.tracking.finish(run_id, "KILLED", wait=10.0)
        extra = f"; stopped {stopped} leftover process group(s) here" if stopped else ""
        self.echo(
            f"mlpipe: trial {number} lost its worker (no heartbeat): run {run_id} tagged "
            f"STALE, the trial is queued again{extra}"
        )

    def _stop(self, number: int, signum: int) -> None:
        with self._lock:
            process = self._active.get(number)
        if process is not None:
            process.stop(signum)

    def _stop_all(self, signum: int) -> None:
        with self._lock:
            processes = list(self._active.values())
        threads = [threading.Thread(target=p.stop, args=(signum,)) for p in processes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @contextlib.contextmanager
    def _signals(self):
        """Ctrl-C, SIGTERM, SIGHUP: stop every running trial here, then raise in the main thread.

        With ``--parallel 1`` the trial runs in the main thread and ``execute``'s own handler
        is in force while it runs; with more, Optuna's threads run them and this one stops
        their processes (each trial's runner then marks its run KILLED).
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            if self._interrupt is not None:
                return
            self._interrupt = signum
            threading.Thread(target=self._stop_all, args=(signum,), daemon=True).start()
            raise InterruptedRunError("interrupted", signum=signum)

        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, handler) for sig in handled}
        try:
            yield
        except InterruptedRunError as exc:
            self._interrupt = self._interrupt or exc.signum
            self._stop_all(exc.signum)
            raise
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _suggest(trial: optuna.Trial, dim: Dimension) -> object:
    if dim.kind == "choice":
        return trial.suggest_categorical(dim.name, list(dim.choices))
    assert dim.low is not None and dim.high is not None
    if dim.kind == "int":
        return trial.suggest_int(
            dim.name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log
        )
    return trial.suggest_float(dim.name, dim.low, dim.high, step=dim.step, log=dim.log)


def _representative(dim: Dimension) -> str:
    """A value of the dimension for the pre-flight check of the whole parameter set."""
    if dim.kind == "choice":
        return dim.choices[0]
    return format_value(dim, dim.low)


def _stop_run_processes(run_id: str) -> int:
    """Stop this machine's processes of a run (a dead worker's trial) by their MLFLOW_RUN_ID."""
    import psutil

    groups = set()
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get("MLFLOW_RUN_ID") == run_id:
                groups.add(os.getpgid(proc.pid))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return len(groups)


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


__all__ = [
    "SweepOutcome",
    "SweepPlan",
    "SweepRequest",
    "TrialRow",
    "parse_duration",
    "plan_sweep",
    "redact_uri",
    "run_sweep",
]

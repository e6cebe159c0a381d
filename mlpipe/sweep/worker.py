"""Run a study's trials in this process until the study has its count.

``study.optimize`` drives the trials (Optuna's heartbeat works only there); each trial is
``mlpipe.run.runner.execute`` of the checked plan with the trial's values, with
``LaunchHooks`` to follow its process (pruning, Ctrl-C) and to keep its output in a log file
that becomes an artifact of its run. Between trials the worker fails stale trials of dead
workers (their retry is queued), and waits while only other workers' trials run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mlpipe.core.errors import InterruptedRunError, ProjectCommandError
from mlpipe.sweep import study as studies
from mlpipe.sweep.plan import TAG, SweepPlan, TrialRow
from mlpipe.sweep.space import Dimension, format_value

if TYPE_CHECKING:
    import optuna

    from mlpipe.core.tracking import Tracking
    from mlpipe.run.launcher import ProjectProcess

WAIT_POLL_S = 2.0
"""How often a worker with nothing to start looks again (other workers' trials may go stale)."""
POLL_ENV = "MLPIPE_SWEEP_POLL"
WORKER = f"{socket.gethostname()}:{os.getpid()}"
"""The ``mlpipe.sweep.worker`` tag of a trial's run: which machine and process ran it."""

Echo = Callable[[str], None]


class Worker:
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
        try:
            with self._signals():
                return self._loop(deadline)
        finally:
            shutil.rmtree(self._logs, ignore_errors=True)  # each log is an artifact of its run

    def _loop(self, deadline: float | None) -> bool:
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

        from mlpipe.run.launcher import LaunchHooks
        from mlpipe.run.runner import execute, with_params
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

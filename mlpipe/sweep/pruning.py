"""Prune a trial without touching the project's code: follow its metric in the tracking store.

The project already logs its validation metric per step (seg3d: ``val_dice`` per validation);
a watcher thread reads the child run's history of that metric as it arrives, reports each new
step to Optuna (``trial.report``, stored in the study, so pruners on any machine see it) and,
when the pruner says so, stops the trial's process group. The runner then ends the run KILLED.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

POLL_S = 2.0
"""How often the tracking store is asked for new points; ``MLPIPE_SWEEP_POLL`` overrides it."""


class MetricWatcher:
    """A daemon thread that feeds a run's metric to a trial and stops the trial when pruned.

    Args:
        client: a client of the tracking store the run logs to.
        trial: the Optuna trial the run belongs to.
        metric: the metric to follow.
        stop: called once, from the watcher's thread, when the pruner prunes.
        poll: seconds between reads.
    """

    def __init__(
        self,
        client: MlflowClient,
        trial: optuna.Trial,
        metric: str,
        stop: Callable[[], None],
        poll: float = POLL_S,
    ):
        self.client = client
        self.trial = trial
        self.metric = metric
        self.poll = poll
        self.pruned = False
        self.pruned_at: int | None = None
        self.errors = 0
        self._stop = stop
        self._reported: set[int] = set()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_id: str | None = None

    def start(self, run_id: str) -> None:
        self._run_id = run_id
        self._thread = threading.Thread(
            target=self._loop, name=f"mlpipe-prune-{self.trial.number}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop following (the run has ended); reads once more so the last points count."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def check_once(self) -> bool:
        """Report the points not reported yet; True when the trial should be pruned."""
        assert self._run_id is not None
        history = self.client.get_metric_history(self._run_id, self.metric)
        for point in sorted(history, key=lambda m: (m.step, m.timestamp)):
            step = int(point.step)
            if step in self._reported or not math.isfinite(point.value):
                continue
            self._reported.add(step)
            self.trial.report(float(point.value), step)
            if self.trial.should_prune():
                self.pruned_at = step
                return True
        return False

    def _loop(self) -> None:
        while not self._done.wait(self.poll):
            try:
                prune = self.check_once()
            except Exception:  # a store hiccup must not end the trial: try again later
                self.errors += 1
                continue
            if prune:
                self.pruned = True
                self._stop()
                return

"""``mlpipe sweep``: create, resume or join the study and its parent run, then run trials.

``mlpipe.sweep.plan`` has checked everything before; here the study is created once (with the
sweep's definition in its user attributes, for joining workers) together with the parent run,
or loaded; ``mlpipe.sweep.worker`` runs trials until the study has its count; the worker that
sees it complete closes the sweep (``mlpipe.sweep.results``).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import InterruptedRunError, UsageError
from mlpipe.core.settings import client_environ
from mlpipe.sweep import study as studies
from mlpipe.sweep.plan import TAG, SweepPlan, TrialRow
from mlpipe.sweep.worker import Worker

if TYPE_CHECKING:
    import optuna

    from mlpipe.core.tracking import Tracking

Echo = Callable[[str], None]


@dataclass
class SweepOutcome:
    study: str
    parent_run_id: str
    rows: list[TrialRow] = field(default_factory=list)
    complete: bool = False
    finalized: Any = None  # results.SweepSummary when this worker closed the sweep


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
        worker = Worker(plan, study, tracking, parent, echo, on_row)
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
        except BaseException:
            # Not a trial's failure (those are caught per trial): the sweep itself broke.
            with contextlib.suppress(Exception):
                if studies.progress(study).running == 0:
                    tracking.finish(
                        parent, "FAILED", wait=10.0, reason="the sweep stopped on an error"
                    )
            raise
        if not outcome.complete:
            # --timeout: close the sweep with what it has, unless other workers still run
            # trials (the last of them closes it); --resume reopens it.
            if studies.progress(study).running:
                return outcome
            tracking.set_tags(parent, {TAG + "stopped": "timeout"})
        if outcome.complete or plan.timeout_s:
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

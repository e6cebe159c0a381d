"""Where a sweep's study lives (an Optuna RDB storage), and how workers create and join it.

The study is created once, by ``mlpipe sweep``, with everything a worker needs in its user
attributes (project, entry point, fixed params, space, metric, parent run); ``mlpipe sweep
--join`` only loads it. Optuna's own advice, and a race measured on PostgreSQL: many workers
creating the same study at once collide. Each worker's storage has a heartbeat, so a worker
that dies leaves its trial stale; another worker fails it and Optuna's
``RetryHeartbeatStaleTrialCallback`` queues it again (the heartbeat runs only under
``study.optimize()``, which is why the driver uses it rather than ask/tell).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import NotFoundError, UsageError
from mlpipe.core.settings import Settings, redact_uri

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

HEARTBEAT_ENV = "MLPIPE_SWEEP_HEARTBEAT"
GRACE_ENV = "MLPIPE_SWEEP_GRACE"
HEARTBEAT_S = 60
GRACE_S = 600
"""A trial whose worker has not beaten for this long is failed and queued again. Well above a
3D epoch: the heartbeat thread beats in the worker, whatever the project's process does, but a
stalled database connection must not cost a running trial."""
MAX_RETRY = 3
SWEEP_DB = "mlpipe-sweeps.db"

PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")

# Trial user attributes (Optuna's, seen in optuna-dashboard); the retry copies them over.
STATE_ATTR = "mlpipe.state"
RUN_ATTR = "mlpipe.run_id"
SURPLUS_ATTR = "mlpipe.surplus"
# Study user attributes: the sweep's definition, for joining workers and --resume.
CONFIG_ATTR = "mlpipe.sweep"


@dataclass(frozen=True)
class Progress:
    """Trials of the study as the sweep counts them toward ``--trials``."""

    counted: int
    running: int
    waiting: int

    @property
    def pending(self) -> int:
        return self.counted + self.running + self.waiting


def default_storage(settings: Settings) -> str:
    """A SQLite file beside the local SQLite tracking store, else in the current folder."""
    uri = settings.tracking_uri.value or ""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
    else:
        folder = Path(os.getcwd())
    return f"sqlite:///{folder / SWEEP_DB}"


def storage_display(url: str) -> str:
    """The storage URL fit for a tag or a message: user and password replaced."""
    return redact_uri(url)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with a heartbeat and stale-trial retry.

    ``$MLPIPE_SWEEP_HEARTBEAT`` and ``$MLPIPE_SWEEP_GRACE`` (seconds) override the interval and
    grace period (tests use short ones).

    Raises:
        UsageError: the URL is not an RDB URL or the database cannot be reached.
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if "://" not in url:
        raise UsageError(
            f"--storage {url!r}: expected a database URL, e.g. sqlite:///sweeps.db or "
            "postgresql://user@host:5432/optuna."
        )
    heartbeat = _seconds(HEARTBEAT_ENV, HEARTBEAT_S)
    grace = _seconds(GRACE_ENV, GRACE_S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=heartbeat,
                grace_period=grace,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRY
                ),
            )
        except Exception as exc:  # SQLAlchemy's errors: bad driver, refused, no database
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"Optuna storage {storage_display(url)} cannot be opened: "
                f"{redact_uri(first) if '://' in first else first}. Check the URL and that the "
                "database exists and answers (PostgreSQL needs psycopg[binary])."
            ) from None


def create_study(
    storage: optuna.storages.RDBStorage,
    name: str,
    *,
    goal: str,
    sampler: str,
    pruner: str,
    config: dict[str, Any],
) -> optuna.Study:
    """Create the study (once) with the sweep's definition in its user attributes.

    Raises:
        UsageError: a study of that name exists already (the message says how to join or
            resume it).
    """
    import optuna

    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction="maximize" if goal == "max" else "minimize",
            sampler=make_sampler(sampler),
            pruner=make_pruner(pruner),
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise UsageError(
            f"Study {name!r} exists already in this storage. Continue it with --resume, add a "
            f"worker with `mlpipe sweep --join {name} --storage URL`, or pick another --study."
        ) from None
    study.set_user_attr(CONFIG_ATTR, config)
    return study


def load_study(storage: optuna.storages.RDBStorage, name: str, url: str) -> optuna.Study:
    """Load an existing study with the sampler and pruner it was created with.

    Raises:
        NotFoundError: no such study (the known ones are listed).
        UsageError: the study was not made by ``mlpipe sweep``.
    """
    import optuna

    names = [
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    ]
    if name not in names:
        listed = ", ".join(names) or "none"
        raise NotFoundError(
            f"No study {name!r} in {storage_display(url)} (studies there: {listed}). Start it "
            "with `mlpipe sweep PROJECT --study NAME --storage URL` first."
        )
    bare = optuna.load_study(study_name=name, storage=storage)
    config = bare.user_attrs.get(CONFIG_ATTR)
    if not isinstance(config, dict):
        raise UsageError(f"Study {name!r} was not created by `mlpipe sweep`: it cannot be joined.")
    return optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(config.get("sampler", "tpe")),
        pruner=make_pruner(config.get("pruner", "median")),
    )


def study_config(study: optuna.Study) -> dict[str, Any]:
    return dict(study.user_attrs.get(CONFIG_ATTR) or {})


def make_sampler(name: str) -> optuna.samplers.BaseSampler:
    """TPE (``constant_liar`` on by default in Optuna 5: parallel trials spread out) or random."""
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler()
    if name == "tpe":
        return optuna.samplers.TPESampler()
    raise UsageError(f"--sampler {name!r}: expected one of {', '.join(SAMPLERS)}.")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The pruner; it reads intermediate values from the storage, so it works across machines."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UsageError(f"--pruner {name!r}: expected one of {', '.join(PRUNERS)}.")


def progress(study: optuna.Study) -> Progress:
    """How many trials count toward ``--trials``, run now, and wait in the queue.

    Counted: COMPLETE and PRUNED trials, and FAIL trials whose project crashed (the sweep
    moves on). Not counted: trials stopped by Ctrl-C (``--resume`` runs them again), stale
    trials (their retry is queued) and surplus trials (started in a race, never run).
    """
    trials = study.get_trials(deepcopy=False)
    return _progress(trials)


def is_surplus(study: optuna.Study, number: int, target: int) -> bool:
    """Whether trial ``number`` would go beyond ``target``: the trials numbered before it
    already fill the count (finished, running or queued). Trial numbers are unique in the
    storage, so two workers that start a trial at the same moment agree on which is extra."""
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < number]
    return _progress(earlier).pending >= target


def _progress(trials: list[FrozenTrial]) -> Progress:
    from optuna.trial import TrialState

    counted = running = waiting = 0
    for t in trials:
        if t.user_attrs.get(SURPLUS_ATTR):
            continue
        crashed = t.state == TrialState.FAIL and t.user_attrs.get(STATE_ATTR) == "FAILED"
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or crashed:
            counted += 1
        elif t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
    return Progress(counted, running, waiting)


def fail_stale(study: optuna.Study) -> list[FrozenTrial]:
    """Fail trials whose worker stopped beating (their retry gets queued); those trials."""
    import optuna
    from optuna.trial import TrialState

    before = {t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number in before and t.state == TrialState.FAIL and STATE_ATTR not in t.user_attrs
    ]


def _seconds(env: str, default: int) -> int:
    raw = os.environ.get(env, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{env}={raw!r}: expected a whole number of seconds.") from None
    if value < 1:
        raise UsageError(f"{env}={raw!r}: expected at least 1 second.")
    return value


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Threads of one worker share the file; wait for the lock rather than fail at once.
        return {"connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True}

"""Gated promotion and rollback of registered models.

The production pointer is an alias (``models:/NAME@production``). ``plan_promotion`` reads
and checks everything and changes nothing; ``execute_promotion`` takes the model's registry
lock (``mlpipe.registry.locks``), checks again against whoever holds the alias now, moves
the alias and the deprecated stage, tags the version and appends the move to the history
(``mlpipe.registry.audit``). Library only: values are returned and typed errors raised;
nothing prints.

Kept whole: planning, checking and executing a move share one set of rules (the gates, the
regression check against the alias holder, the lock); the history and listings are in
``mlpipe.registry.views``.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from mlpipe.core.errors import GateRefusedError, NotFoundError, UsageError
from mlpipe.core.settings import resolve_settings
from mlpipe.core.tracking import Tracking, check_reachable, translate_errors
from mlpipe.registry.audit import HistoryEvent, event_key, next_seq, parse_history, rollback_target
from mlpipe.registry.locks import is_lock_name, model_lock

if TYPE_CHECKING:
    from mlflow import MlflowClient


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:\n  " + "\n  ".join(problems)


Echo = Callable[[str], None]


CONVENTION_TAGS = (
    "mlpipe.dataset.name",
    "mlpipe.dataset.version",
    "mlpipe.dataset.digest",
    "mlpipe.preprocessing.digest",
)


PRIMARY_METRIC_TAG = "mlpipe.primary_metric"


PRIMARY_GOAL_TAG = "mlpipe.primary_metric_goal"


PRODUCTION_STAGE = "Production"


_GATE_RE = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|==|>|<)\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$")


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}


_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def connect(tracking_uri: str | None = None) -> Tracking:
    """Resolve settings (flag > environment > config > default), check the server, connect.

    Raises:
        TrackingUnavailableError: an ``http(s)`` server that does not answer.
    """
    from mlpipe.core.tracking import quiet_mlflow_logs

    settings = resolve_settings(tracking_uri=tracking_uri)
    check_reachable(settings.tracking_uri.value or "")
    quiet_mlflow_logs()
    return Tracking(settings)


@dataclass(frozen=True)
class Gate:
    """``METRIC OP THRESHOLD`` from ``--require``."""

    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def holds(self, value: float | None) -> bool:
        return value is not None and _OPS[self.op](value, self.threshold)


def parse_gate(text: str) -> Gate:
    """Parse ``'val_dice>=0.8'`` (also ``>``, ``<=``, ``<``, ``==``).

    Raises:
        UsageError: naming the text and the expected form.
    """
    match = _GATE_RE.match(text)
    if not match:
        raise UsageError(
            f"--require {text!r} is not a gate; expected METRIC OP NUMBER with OP one of "
            ">=, >, <=, <, == (for example --require 'val_dice>=0.8')."
        )
    return Gate(match.group(1), match.group(2), float(match.group(3)))


@dataclass(frozen=True)
class VersionInfo:
    """A model version with what promotion looks at from its source run."""

    model: str
    version: str
    stage: str
    run_id: str | None
    run_status: str | None
    metrics: dict[str, float]
    trained_by: str | None
    created: int
    tags: dict[str, str]

    def convention(self, key: str) -> str | None:
        return self.tags.get(key) or None


def version_info(client: MlflowClient, model: str, version: str) -> VersionInfo:
    """Read a version and its source run; run tags fill in what the version lacks."""
    with translate_errors(f"model {model!r} version {version}"):
        mv = client.get_model_version(model, version)
    tags: dict[str, str] = {}
    metrics: dict[str, float] = {}
    status = user = None
    if mv.run_id:
        try:
            with translate_errors(f"run {mv.run_id}"):
                run = client.get_run(mv.run_id)
            tags.update(run.data.tags)
            metrics = dict(run.data.metrics)
            status = run.info.status
            user = run.data.tags.get("mlflow.user") or run.info.user_id or None
        except NotFoundError:
            status = "DELETED"
    tags.update({k: v for k, v in (mv.tags or {}).items() if v})
    return VersionInfo(
        model=model,
        version=str(mv.version),
        stage=mv.current_stage or "None",
        run_id=mv.run_id or None,
        run_status=status,
        metrics=metrics,
        trained_by=user,
        created=int(mv.creation_timestamp or 0),
        tags=tags,
    )


def _aliases(client: MlflowClient, model: str) -> dict[str, str]:
    # search_model_versions returns versions without their aliases; the model has them all.
    with translate_errors(f"model {model!r}"):
        return {a: str(v) for a, v in client.get_registered_model(model).aliases.items()}


def _versions(client: MlflowClient, model: str) -> list:
    escaped = model.replace("'", "\\'")
    with translate_errors(f"model {model!r}"):
        found = client.search_model_versions(f"name = '{escaped}'")
    return sorted(found, key=lambda mv: int(mv.version))


def _require_model(client: MlflowClient, model: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            with translate_errors(f"model {model!r}"):
                raise
        names = sorted(
            m.name for m in client.search_registered_models() if not is_lock_name(m.name)
        )
        listed = ", ".join(names[:20]) or "none"
        raise NotFoundError(
            f"Registered model {model!r} does not exist. Registered models: {listed}."
        ) from exc


@dataclass(frozen=True)
class PromotionRequest:
    model: str
    version: str
    alias: str = "production"
    requires: Sequence[str] = ()
    metric: str | None = None
    goal: str | None = None
    allow_regression: bool = False
    reason: str | None = None
    no_stage: bool = False
    force: bool = False


@dataclass
class PromotionPlan:
    """What a promotion would do, with every check's outcome. Nothing was changed."""

    request: PromotionRequest
    candidate: VersionInfo
    current: VersionInfo | None
    metric: str | None
    goal: str | None
    gates: list[tuple[Gate, float | None, bool]]
    refusals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gate_summary(self) -> list[str]:
        out = []
        for gate, value, ok in self.gates:
            shown = "missing" if value is None else f"{value:.6g}"
            out.append(f"{gate} ({shown}: {'pass' if ok else 'FAIL'})")
        if self.metric and self.current is not None:
            out.append(f"{self.metric} not worse than v{self.current.version} ({self.goal})")
        return out

    @property
    def is_noop(self) -> bool:
        return self.current is not None and self.current.version == self.candidate.version

    def comparison(self) -> list[tuple[str, str, str]]:
        """Rows (what, candidate, current holder) for a side-by-side table."""
        cand, cur = self.candidate, self.current

        def metric(info: VersionInfo | None, name: str | None) -> str:
            if info is None or not name:
                return "-"
            value = info.metrics.get(name)
            return "missing" if value is None else f"{value:.6g}"

        def tag(info: VersionInfo | None, key: str) -> str:
            return "-" if info is None else info.convention(key) or "missing"

        rows = [
            ("version", cand.version, cur.version if cur else "(alias not set)"),
            ("stage", cand.stage, cur.stage if cur else "-"),
            (
                f"{self.metric} ({self.goal})" if self.metric else "primary metric",
                metric(cand, self.metric),
                metric(cur, self.metric),
            ),
        ]
        for gate, _value, _ok in self.gates:
            rows.append((f"gate {gate}", metric(cand, gate.metric), metric(cur, gate.metric)))
        rows += [
            ("dataset", tag(cand, "mlpipe.dataset.name"), tag(cur, "mlpipe.dataset.name")),
            (
                "dataset version",
                tag(cand, "mlpipe.dataset.version"),
                tag(cur, "mlpipe.dataset.version"),
            ),
            ("run", cand.run_id or "-", (cur.run_id or "-") if cur else "-"),
            ("run status", cand.run_status or "-", (cur.run_status or "-") if cur else "-"),
            ("trained by", cand.trained_by or "-", (cur.trained_by or "-") if cur else "-"),
        ]
        return rows


@dataclass(frozen=True)
class PromotionResult:
    model: str
    alias: str
    version: str
    previous: str | None
    staged: bool
    event: HistoryEvent | None


def plan_promotion(tracking: Tracking, request: PromotionRequest) -> PromotionPlan:
    """Check a promotion without changing anything; ``refusals`` lists what failed.

    Raises:
        UsageError: bad options (a gate that does not parse, ``--force`` without a reason).
        NotFoundError: the model or version does not exist (the message lists the versions).
    """
    _check_request(request)
    client = tracking.client
    _require_model(client, request.model)
    versions = _versions(client, request.model)
    if request.version not in {str(mv.version) for mv in versions}:
        listed = ", ".join(str(mv.version) for mv in versions) or "none"
        raise NotFoundError(
            f"Model {request.model!r} has no version {request.version}. Versions: {listed}."
        )
    candidate = version_info(client, request.model, request.version)
    holder = _aliases(client, request.model).get(request.alias)
    current = version_info(client, request.model, holder) if holder else None
    return _check(request, candidate, current)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_model_name(model: str, what: str = "MODEL") -> None:
    """A registered model name fit to look up: not blank, no control characters.

    Raises:
        UsageError: naming the argument and the value.
    """
    if not model or not model.strip():
        raise UsageError(f"{what} must be a registered model name, not {model!r}.")
    if _CONTROL.search(model):
        raise UsageError(f"{what} {model!r} holds control characters; give the model's name.")


def check_reason(reason: str | None) -> None:
    """``--reason`` is one line of text: a newline would forge a row of ``mlpipe history``.

    Raises:
        UsageError: the reason holds a newline or another control character.
    """
    if reason and _CONTROL.search(reason.replace("\t", " ")):
        raise UsageError(
            f"--reason {reason!r} holds a newline or control character; give one line of text."
        )


def check_alias(alias: str) -> None:
    """An alias mlpipe may move (letters, digits, _ and -; not 'latest' nor 'v<N>').

    Raises:
        UsageError: naming the alias.
    """
    if not _ALIAS_RE.match(alias) or alias == "latest":
        raise UsageError(
            f"--alias {alias!r} is not a usable alias (letters, digits, _ and -; not 'latest')."
        )
    if re.fullmatch(r"[vV]\d+", alias):
        raise UsageError(f"--alias {alias!r} is reserved by MLflow for version numbers.")


def check_request(request: PromotionRequest) -> None:
    """Every check of a promotion that needs no tracking server: run before connecting.

    Raises:
        UsageError: all problems found, together.
    """
    _check_request(request)


def _check_request(request: PromotionRequest) -> None:
    problems = []
    for check in (
        lambda: check_model_name(request.model),
        lambda: check_reason(request.reason),
    ):
        try:
            check()
        except UsageError as exc:
            problems.append(str(exc))
    if not _ALIAS_RE.match(request.alias) or request.alias == "latest":
        problems.append(
            f"--alias {request.alias!r} is not a usable alias (letters, digits, _ and -; "
            "not 'latest')."
        )
    elif re.fullmatch(r"[vV]\d+", request.alias):
        problems.append(f"--alias {request.alias!r} is reserved by MLflow for version numbers.")
    if not re.fullmatch(r"\d+", request.version):
        problems.append(f"VERSION must be a version number, not {request.version!r}.")
    for text in request.requires:
        try:
            parse_gate(text)
        except UsageError as exc:
            problems.append(str(exc))
    if request.goal not in (None, "max", "min"):
        problems.append(f"--goal must be max or min, not {request.goal!r}.")
    reason = (request.reason or "").strip()
    if request.force and not reason:
        problems.append("--force needs --reason TEXT saying why the checks are overridden.")
    if request.allow_regression and not reason:
        problems.append("--allow-regression needs --reason TEXT saying why.")
    if problems:
        raise UsageError(_join(problems))


def _check(
    request: PromotionRequest, candidate: VersionInfo, current: VersionInfo | None
) -> PromotionPlan:
    refusals: list[str] = []
    notes: list[str] = []
    if candidate.run_id is None:
        refusals.append(f"Version {candidate.version} has no source run to check.")
    elif candidate.run_status != "FINISHED":
        refusals.append(
            f"Version {candidate.version}'s source run {candidate.run_id} is "
            f"{candidate.run_status}, not FINISHED."
        )
    missing = [key for key in CONVENTION_TAGS if not candidate.convention(key)]
    if missing:
        text = (
            f"Version {candidate.version} lacks the convention tag(s) {', '.join(missing)}: "
            "which data and preprocessing trained it is unknown. Train it with `mlpipe run` "
            "and mlpipe.log, or pass --force with --reason."
        )
        if request.force:
            notes.append("Overridden by --force: " + text)
        else:
            refusals.append(text)

    gates = []
    for text in request.requires:
        gate = parse_gate(text)
        value = candidate.metrics.get(gate.metric)
        ok = gate.holds(value)
        gates.append((gate, value, ok))
        if not ok:
            got = "is missing from the run" if value is None else f"is {value:.6g}"
            refusals.append(f"Gate {gate} fails: {gate.metric} {got}.")

    metric = request.metric or candidate.tags.get(PRIMARY_METRIC_TAG)
    goal = request.goal or (
        candidate.tags.get(PRIMARY_GOAL_TAG)
        if candidate.tags.get(PRIMARY_METRIC_TAG) == metric
        else None
    )
    if metric and goal not in ("max", "min"):
        goal = None
    if current is not None and current.version != candidate.version:
        if not metric or not goal:
            refusals.append(
                "The primary metric to compare with the current holder is unknown: the run has "
                f"no {PRIMARY_METRIC_TAG} tag (set primary_metric in the MLproject's mlpipe: "
                "section), or its goal is unknown. Pass --metric NAME --goal max|min."
            )
        else:
            new, old = candidate.metrics.get(metric), current.metrics.get(metric)
            if new is None:
                refusals.append(f"Primary metric {metric} is missing from the candidate's run.")
            elif old is None:
                notes.append(f"v{current.version} has no {metric}; nothing to compare with.")
            elif (new < old) if goal == "max" else (new > old):
                text = (
                    f"{metric} regresses: {new:.6g} for v{candidate.version} against "
                    f"{old:.6g} for v{current.version} (goal {goal})."
                )
                if request.allow_regression:
                    notes.append("Allowed by --allow-regression: " + text)
                else:
                    refusals.append(text + " Pass --allow-regression with --reason to override.")
    return PromotionPlan(request, candidate, current, metric, goal, gates, refusals, notes)


def refuse_if_needed(plan: PromotionPlan) -> None:
    """Raise the plan's refusals together.

    Raises:
        GateRefusedError: one or more checks failed; nothing was changed.
    """
    if plan.refusals:
        raise GateRefusedError(
            f"Promotion of {plan.request.model} v{plan.candidate.version} to "
            f"@{plan.request.alias} refused; nothing was changed:\n  " + "\n  ".join(plan.refusals)
        )


def execute_promotion(
    tracking: Tracking, plan: PromotionPlan, *, echo: Echo = lambda _msg: None
) -> PromotionResult:
    """Move the alias under the model's registry lock, after checking again.

    The holder may have changed between planning and locking (a concurrent promotion): the
    checks are run again against the holder seen under the lock.

    Raises:
        GateRefusedError: a check fails (again); nothing was changed.
    """
    request = plan.request
    client = tracking.client
    with _locked(tracking, request.model, echo):
        holder = _aliases(client, request.model).get(request.alias)
        current = version_info(client, request.model, holder) if holder else None
        candidate = version_info(client, request.model, request.version)
        plan = _check(request, candidate, current)
        refuse_if_needed(plan)
        if plan.is_noop:
            return PromotionResult(
                request.model, request.alias, request.version, holder, False, None
            )
        gates = plan.gate_summary
        event = _move(
            client,
            model=request.model,
            alias=request.alias,
            to=request.version,
            previous=holder,
            action="promote",
            reason=request.reason,
            gates=gates,
            stage=not request.no_stage,
        )
    return PromotionResult(
        request.model, request.alias, request.version, holder, not request.no_stage, event
    )


@dataclass(frozen=True)
class RollbackPlan:
    model: str
    alias: str
    current: str | None
    target: str


def plan_rollback(tracking: Tracking, model: str, alias: str = "production") -> RollbackPlan:
    """Which version ``alias`` goes back to, from the recorded history.

    Raises:
        NotFoundError: no such model, or no earlier version recorded for the alias.
    """
    client = tracking.client
    _require_model(client, model)
    with translate_errors(f"model {model!r}"):
        registered = client.get_registered_model(model)
    events = parse_history(registered.tags)
    target = rollback_target(events, alias)
    if target is None:
        raise NotFoundError(
            f"No earlier version of {model}@{alias} is recorded in the history; nothing to roll "
            f"back to. `mlpipe history {model}` shows the record; promote a version instead."
        )
    current = {a: str(v) for a, v in registered.aliases.items()}.get(alias)
    return RollbackPlan(model, alias, current, target)


def execute_rollback(
    tracking: Tracking,
    plan: RollbackPlan,
    *,
    reason: str,
    no_stage: bool = False,
    echo: Echo = lambda _msg: None,
) -> PromotionResult:
    """Move the alias back to ``plan.target`` under the lock and record it.

    Raises:
        UsageError: no reason, or the history changed since the plan (run it again).
        NotFoundError: the target version was deleted.
    """
    if not (reason or "").strip():
        raise UsageError("rollback needs --reason TEXT saying why.")
    client = tracking.client
    with _locked(tracking, plan.model, echo):
        fresh = plan_rollback(tracking, plan.model, plan.alias)
        if (fresh.current, fresh.target) != (plan.current, plan.target):
            raise UsageError(
                f"{plan.model}@{plan.alias} moved while you confirmed (now v{fresh.current}); "
                "nothing was changed. Run rollback again."
            )
        version_info(client, plan.model, plan.target)  # NotFoundError if deleted meanwhile
        event = _move(
            client,
            model=plan.model,
            alias=plan.alias,
            to=plan.target,
            previous=plan.current,
            action="rollback",
            reason=reason,
            gates=[],
            stage=not no_stage,
        )
    return PromotionResult(plan.model, plan.alias, plan.target, plan.current, not no_stage, event)


@contextmanager
def _locked(tracking: Tracking, model: str, echo: Echo) -> Iterator[None]:
    with model_lock(tracking.client, model, owner=who(), warn=echo):
        yield


def _move(
    client: MlflowClient,
    *,
    model: str,
    alias: str,
    to: str,
    previous: str | None,
    action: str,
    reason: str | None,
    gates: list[str],
    stage: bool,
) -> HistoryEvent:
    """Set the alias, the stage and the version tags, then append the event. Lock held."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    user = who()
    with translate_errors(f"{action} of {model} v{to}"):
        events = parse_history(client.get_registered_model(model).tags)
        event = HistoryEvent(
            seq=next_seq(events),
            time=now,
            who=user,
            action=action,
            alias=alias,
            from_version=previous,
            to_version=to,
            reason=(reason or "").strip() or None,
            gates=gates,
        )
        client.set_registered_model_alias(model, alias, to)
        if stage:
            _move_stage(client, model, to)
        tags = {
            "mlpipe.promoted_at": now,
            "mlpipe.promoted_by": user,
            "mlpipe.promotion.reason": event.reason or "",
            "mlpipe.promotion.previous": previous or "",
            "mlpipe.promotion.gates": json.dumps(gates),
            "mlpipe.promotion.action": action,
        }
        for key, value in tags.items():
            client.set_model_version_tag(model, to, key, value)
        client.set_registered_model_tag(model, event_key(event.seq), event.to_json())
    return event


def _move_stage(client: MlflowClient, model: str, to: str) -> None:
    """``to`` to stage Production, every other Production version to Archived. Lock held.

    ``archive_existing_versions=True`` is not used: through a server on PostgreSQL it fails
    with "operator does not exist: integer <> character varying" (MLflow issue 24592), so
    the other versions are archived one by one, which the lock makes as safe.
    """
    with warnings.catch_warnings():
        # Stages are deprecated since MLflow 2.9 (FutureWarning) but still shown in the UI's
        # Stage column, which people read; the alias is the real pointer.
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(
            model, to, PRODUCTION_STAGE, archive_existing_versions=False
        )
        for mv in _versions(client, model):
            if str(mv.version) != to and mv.current_stage == PRODUCTION_STAGE:
                client.transition_model_version_stage(
                    model, str(mv.version), "Archived", archive_existing_versions=False
                )


def who() -> str:
    """The tracking username when one is set (the server knows the person by it), else login."""
    name = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

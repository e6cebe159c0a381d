"""What a tracking store accepts in one ``log_batch``, checked where the caller logs: names,
values, steps and timestamps that MLflow would refuse later, when the batch is sent and every
point in it would be lost with the bad one.
"""

from __future__ import annotations

import operator
import posixpath
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


MAX_METRICS_PER_BATCH = 1000
"""MLflow's limit on metrics in one ``log_batch`` (also its limit on entities of all kinds)."""


MAX_PARAMS_PER_BATCH = 100
"""MLflow's limit on params in one ``log_batch``."""


MAX_PARAM_BATCH_CHARS = 800_000
"""MLflow refuses ``log_batch`` requests over 1e6 bytes; 100 long params can exceed that."""


MAX_KEY_LENGTH = 250


MAX_PARAM_VALUE_LENGTH = 6000


# MLflow's rule for metric and param names on POSIX (mlflow.utils.validation): checked here, at
# the call, so that a bad name fails in the caller's line rather than in a lost batch.
_NAME = re.compile(r"^[/\w.\- :]*$")


# validation -------------------------------------------------------------------------------------
def check_name(key: object, kind: str) -> None:
    if not isinstance(key, str):
        raise ValueError(f"{kind} name {key!r}: must be a string, not {type(key).__name__}")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{kind} name {key!r}: must have 1 to {MAX_KEY_LENGTH} characters")
    norm = posixpath.normpath(key)
    if not _NAME.match(key) or norm != key or norm == "." or norm.startswith(("..", "/")):
        raise ValueError(
            f"{kind} name {key!r}: MLflow accepts only letters, digits, _ - . : space and / "
            "in names, as a relative path with no '.' or '..' parts"
        )


def finite(key: str, value: object) -> float:
    if type(value) is float:
        number = value
    elif isinstance(value, (str, bytes)):
        raise ValueError(f"metric {key!r}: {value!r} is a string, not a number")
    else:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ValueError(
                f"metric {key!r}: {value!r} ({type(value).__name__}) is not a number"
            ) from None
    # NaN and infinity are kept, as mlflow.log_metric keeps them: a loss that diverged is a
    # result worth seeing in the UI, and raising here would kill the training loop instead.
    return number


INT64_MIN = -(2**63)


INT64_MAX = 2**63 - 1
"""Steps and timestamps are 64-bit integers in every MLflow store (SQL ``BIGINT``, protobuf
``int64``): a larger one passes ``log_metric``'s checks, then fails the whole batch it is in."""


def as_int(value: object, what: str) -> int:
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what}: {value!r} is not an integer") from None
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(
            f"{what}: {number} is outside the range MLflow stores (a 64-bit integer, "
            f"{INT64_MIN} to {INT64_MAX}); the tracking store would refuse it."
        )
    return number


_NOT_ABOUT_CONTENT = frozenset(
    {"RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED", "TEMPORARILY_UNAVAILABLE"}
)


MAX_REFUSED_PER_BATCH = 50
"""Bisection stops after this many refused points: the rest of the batch is reported failed
with the same reason, instead of one request per point against a store refusing them all."""


def _status(getter: Callable[[], object]) -> int | None:
    try:
        return int(getter())  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def is_refusal(exc: Exception) -> bool:
    """The store (or the client serialising for it) said no to the batch's content.

    Then resending it unchanged cannot help, but splitting it can: the other points of the
    batch go through. Transport failures (server down, timeouts) are not refusals.
    """
    code = str(getattr(exc, "error_code", "") or "")
    text = str(getattr(exc, "message", None) or exc).lower()
    # About the run or the caller, not the points: splitting would only repeat the refusal.
    if code in _NOT_ABOUT_CONTENT or "lifecycle" in text or "must be in the 'active'" in text:
        return False
    status = getattr(exc, "get_http_status_code", None)
    if callable(status) and _status(status) in (401, 403, 404):
        return False
    if not is_retryable(exc):  # HTTP 4xx from a tracking server
        return True
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return True  # the client's protobuf/JSON encoding refused a value ("out of range")
    if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"):
        return True
    if "api request" in text or "max retries" in text or "connection" in text:
        return False
    # A SQL store refusing a value ("Python int too large to convert to SQLite INTEGER",
    # PostgreSQL's "out of range for type bigint").
    return any(
        phrase in text for phrase in ("too large", "out of range", "integrityerror", "not null")
    )


def param_value(value: object) -> str:
    text = str(value)
    if len(text) <= MAX_PARAM_VALUE_LENGTH:
        return text
    return text[: MAX_PARAM_VALUE_LENGTH - 15] + "...[truncated]"


def is_retryable(exc: Exception) -> bool:
    """A refusal (HTTP 4xx: bad value, unknown run) will not change by retrying; rate limits do."""
    status = getattr(exc, "get_http_status_code", None)
    if callable(status):
        try:
            code = int(status())
        except (TypeError, ValueError):
            return True
        return code == 429 or not 400 <= code < 500
    return True


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Delivery(Generic[T]):
    """What became of a batch: how many items arrived, which the store refused (each with its
    error), and which could not be sent at all (a transport failure, after the retries)."""

    sent: int = 0
    refused: list[tuple[T, Exception]] = field(default_factory=list)
    failed: list[tuple[list[T], Exception]] = field(default_factory=list)


def deliver(
    items: Sequence[T],
    send: Callable[[Sequence[T]], object],
    attempt: Callable[[Callable[[], object]], Exception | None],
) -> Delivery[T]:
    """Send ``items`` in one request; when the store refuses the batch, split it in halves and
    send each (a bisection), so only the items it refuses are dropped: ``log_batch`` is
    all-or-nothing, and one bad point used to take 1000 good ones down with it.

    A batch with one bad point costs about ``2 * log2(len(items))`` extra requests.

    Args:
        items: what to send, in order.
        send: sends one chunk (raises when it is not taken).
        attempt: calls a sender with retries for transport failures; returns the last error.

    Returns:
        The delivery: counts and the refused items with the store's reason.
    """
    result: Delivery[T] = Delivery()
    chunks: list[Sequence[T]] = [items]
    while chunks:
        chunk = chunks.pop()
        if not chunk:
            continue
        error = attempt(lambda c=chunk: send(c))
        if error is None:
            result.sent += len(chunk)
        elif not is_refusal(error) or len(result.refused) >= MAX_REFUSED_PER_BATCH:
            result.failed.append((list(chunk), error))
        elif len(chunk) == 1:
            result.refused.append((chunk[0], error))
        else:
            middle = len(chunk) // 2
            chunks += [chunk[middle:], chunk[:middle]]  # popped first half first: in order
    return result


def metric_points(
    metrics: Mapping[str, object],
    step: object = None,
    timestamp_ms: object = None,
    known_names: set[str] | None = None,
) -> list[tuple[str, float, int, int]]:
    """Check one ``log_metrics`` call and return its points as ``(key, value, ms, step)``.

    Pure and cheap (microseconds): called in the caller's thread, before any run is started or
    anything is queued, so a bad value fails in the caller's line with the key named.

    Args:
        metrics: name -> number.
        step: an integer in MLflow's 64-bit range [default: 0].
        timestamp_ms: milliseconds since the epoch, an integer [default: now].
        known_names: names already checked (a cache the caller keeps); checked ones are added.

    Raises:
        ValueError: naming the key and the value: not a mapping, a name MLflow refuses, a value
            that is not a number, a step or timestamp that is not a 64-bit integer.
    """
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"metrics must be a mapping of name -> number, not {type(metrics).__name__}"
        )
    try:
        step = 0 if step is None else as_int(step, "step")
        stamp = (
            int(time.time() * 1000)
            if timestamp_ms is None
            else as_int(timestamp_ms, "timestamp_ms")
        )
    except ValueError as exc:  # the names only now: building them costs on every call
        names = ", ".join(repr(k) for k in list(metrics)[:5])
        what, _, rest = str(exc).partition(":")
        raise ValueError(f"{what} of metric(s) {names}:{rest}") from None
    points = []
    for key, value in metrics.items():
        if known_names is None or key not in known_names:
            check_name(key, "metric")
            if known_names is not None:
                known_names.add(key)
        points.append((key, finite(key, value), stamp, step))
    return points


def param_values(params: Mapping[str, object]) -> dict[str, str]:
    """Check one ``log_params`` call: names MLflow accepts, values as text within its limit.

    Raises:
        ValueError: not a mapping, or a name MLflow refuses (named).
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping of name -> value, not {type(params).__name__}")
    values: dict[str, str] = {}
    for key, raw in params.items():
        check_name(key, "param")
        values[key] = param_value(raw)
    return values

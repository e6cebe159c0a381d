"""What a tracking store accepts in one ``log_batch``, checked where the caller logs: names,
values, steps and timestamps that MLflow would refuse later, when the batch is sent and every
point in it would be lost with the bad one.
"""

from __future__ import annotations

import operator
import posixpath
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


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


def as_int(value: object, what: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what}: {value!r} is not an integer") from None


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

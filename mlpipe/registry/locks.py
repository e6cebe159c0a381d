"""A per-model lock that the tracking server itself provides, so it holds across machines.

Creating a registered model is atomic in every MLflow store (the name is a unique key in SQLite
and PostgreSQL), so ``create_registered_model("mlpipe-lock.<model>")`` acquires the lock and
``RESOURCE_ALREADY_EXISTS`` means someone else holds it; ``delete_registered_model`` releases
it. A lock older than ``stale_after`` seconds (its holder crashed) is broken with a warning.
The lock is a normal registered model while held; ``mlpipe models`` hides the prefix.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

from mlpipe.core.errors import TrackingUnavailableError, UsageError

if TYPE_CHECKING:
    from mlflow import MlflowClient

LOCK_PREFIX = "mlpipe-lock."
ACQUIRED_TAG = "mlpipe.lock.acquired_at"
OWNER_TAG = "mlpipe.lock.owner"
STALE_AFTER_S = 60.0
WAIT_S = 120.0


def lock_name(model: str) -> str:
    return f"{LOCK_PREFIX}{model}"


def is_lock_name(name: str) -> bool:
    return name.startswith(LOCK_PREFIX)


@contextmanager
def model_lock(
    client: MlflowClient,
    model: str,
    *,
    owner: str,
    wait: float = WAIT_S,
    stale_after: float = STALE_AFTER_S,
    warn: Callable[[str], None] = lambda _msg: None,
) -> Iterator[None]:
    """Hold the registry lock of ``model`` for the body; released in ``finally``.

    Args:
        client: the registry client.
        model: the registered model the lock protects.
        owner: who holds it (user, host, pid), recorded in a tag for whoever waits.
        wait: seconds to wait for a held lock before giving up.
        stale_after: a lock older than this is taken as left by a crashed holder and broken.
        warn: called with a message when a stale lock is broken.

    Raises:
        UsageError: the lock stayed held for ``wait`` seconds (names the holder).
        TrackingUnavailableError: the server failed in a way that is not "held".
    """
    name = lock_name(model)
    owner = f"{owner}@{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait
    delay = 0.05
    while True:
        if _try_acquire(client, name, owner):
            break
        holder = _holder(client, name)
        if holder is not None:
            held_owner, acquired_at = holder
            if acquired_at is None and _untagged_for_good(client, name):
                # create_registered_model sets the tags atomically with the name, so a model
                # that keeps none was made by someone else: never break (delete) it.
                raise UsageError(
                    f"A registered model named {name!r} exists but is not an mlpipe lock (it "
                    f"has no {ACQUIRED_TAG} tag), so mlpipe cannot lock {model!r}. Rename or "
                    "delete that registered model in the MLflow UI if it is not needed."
                )
            age = 0.0 if acquired_at is None else time.time() - acquired_at
            if acquired_at is not None and age > stale_after:
                warn(
                    f"Breaking a stale registry lock on {model!r} held by {held_owner} for "
                    f"{age:.0f} s (its process probably died)."
                )
                # Re-read right before deleting, so a lock retaken meanwhile is left alone.
                if _holder(client, name) == holder:
                    with suppress(Exception):
                        client.delete_registered_model(name)
                continue
        if time.monotonic() > deadline:
            who = holder[0] if holder else "another process"
            raise UsageError(
                f"The registry lock on {model!r} is held by {who} for longer than {wait:.0f} s. "
                f"Try again; if no mlpipe command is running, delete the registered model "
                f"{name!r} in the MLflow UI."
            )
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 1.6, 1.0)
    try:
        yield
    finally:
        _release(client, name)


def _untagged_for_good(client: MlflowClient, name: str, reads: int = 3) -> bool:
    """Whether ``name`` stays a registered model without mlpipe's lock tag over a few reads.

    One read can see a lock model without its tags: the store reads the model row and its tags
    in two queries, and a holder that releases (deletes) in between leaves the tags query empty.
    A real lock is gone or tagged again a moment later; a model that is not a lock stays so.
    """
    for _ in range(reads):
        time.sleep(0.2)
        holder = _holder(client, name)
        if holder is None or holder[1] is not None:
            return False
    return True


def _try_acquire(client: MlflowClient, name: str, owner: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={ACQUIRED_TAG: f"{time.time():.3f}", OWNER_TAG: owner},
            description="mlpipe registry lock: held while a promotion or rollback runs.",
        )
        return True
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        message = str(exc).lower()
        # RESOURCE_ALREADY_EXISTS: held. The store answers a lost race by reading the winner,
        # which may be gone already (RESOURCE_DOES_NOT_EXIST); SQLite may answer "locked".
        if code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST") or (
            "already exists" in message or "database is locked" in message
        ):
            return False
        raise TrackingUnavailableError(f"Could not take the registry lock {name!r}: {exc}") from exc


def _holder(client: MlflowClient, name: str) -> tuple[str, float | None] | None:
    """Who holds the lock and since when (epoch seconds); ``None`` as the time when the model
    carries no readable ``mlpipe.lock.acquired_at`` (it is not an mlpipe lock)."""
    try:
        model = client.get_registered_model(name)
    except Exception:
        return None
    try:
        acquired: float | None = float(model.tags[ACQUIRED_TAG])
    except (KeyError, ValueError):
        acquired = None
    if acquired is not None and not math.isfinite(acquired):
        acquired = None
    return model.tags.get(OWNER_TAG, "unknown"), acquired


def _release(client: MlflowClient, name: str) -> None:
    last: Exception | None = None
    for attempt in range(5):
        try:
            client.delete_registered_model(name)
            return
        except Exception as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return
            last = exc
            time.sleep(0.2 * (attempt + 1))
    raise TrackingUnavailableError(
        f"Could not release the registry lock {name!r} ({last}); it is broken automatically "
        f"after {STALE_AFTER_S:.0f} s, or delete that registered model in the MLflow UI."
    )

"""What ``mlpipe serve`` does around HTTP: check its options, resolve and load the model once
(through the inference core in ``mlpipe.inference``), bind the socket before the model loads,
and run uvicorn until Ctrl-C or SIGTERM. The routes are in ``mlpipe.serve.app``; nothing here
prints.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlpipe import __version__
from mlpipe.core.errors import UsageError
from mlpipe.inference.geometry import DEFAULT_RANGE_FACTOR, GeometryLimits
from mlpipe.inference.inputs import DEFAULT_MAX_BYTES
from mlpipe.inference.models import ModelSource, load_pyfunc, model_device, resolve_model
from mlpipe.inference.profile_log import DEFAULT_MAX_PROFILES, ProfileLog, profiles_path
from mlpipe.inference.segmenter import DEFAULT_MAX_QUEUE, Segmenter
from mlpipe.log import PROFILE_ARTIFACT

if TYPE_CHECKING:
    pass


logger = logging.getLogger("mlpipe.serve")


Echo = Callable[[str], None]


@dataclass(frozen=True)
class ServeOptions:
    """What ``mlpipe serve`` was asked for (the command's options, checked by ``check``)."""

    model_uri: str
    host: str = "127.0.0.1"
    port: int = 8080
    token_env: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    range_factor: float = DEFAULT_RANGE_FACTOR
    concurrency: int = 1
    max_queue: int = DEFAULT_MAX_QUEUE
    profile_file: str | None = None
    max_profiles: int = DEFAULT_MAX_PROFILES
    tracking_uri: str | None = None

    def check(self) -> None:
        """Refuse values no server can use, naming the option.

        Raises:
            UsageError: naming the option, the value and what is expected.
        """
        if self.max_bytes < 1:
            raise UsageError(f"--max-bytes {self.max_bytes}: expected a positive size.")
        if self.range_factor != 0 and self.range_factor < 1:
            raise UsageError(
                f"--range-factor {self.range_factor}: expected 1 or more (how many times "
                "outside the training range a spacing or shape may be), or 0 to turn it off."
            )
        if self.concurrency < 1:
            raise UsageError(f"--concurrency {self.concurrency}: expected 1 or more.")
        if self.max_queue < 0:
            raise UsageError(f"--max-queue {self.max_queue}: expected 0 or more.")
        if self.max_profiles < 1:
            raise UsageError(f"--max-profiles {self.max_profiles}: expected 1 or more.")


def token_from_env(name: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from environment variable ``name`` (``None`` when no name is given).

    Raises:
        UsageError: the variable is unset or empty (the server would be open to anyone).
    """
    if not name:
        return None
    env = os.environ if env is None else env
    token = env.get(name, "")
    if not token.strip():
        raise UsageError(
            f"--token-env {name}: the environment variable {name} is unset or empty. Set it "
            f"to the token clients must send (e.g. export {name}=$(openssl rand -hex 32)), or "
            "leave out --token-env to serve without authentication."
        )
    return token.strip()


@dataclass
class ServeState:
    """Everything the HTTP layer needs: the loaded model and the checked options."""

    options: ServeOptions
    source: ModelSource
    segmenter: Segmenter
    token: str | None
    device: str
    profile_file: Path
    started: float = field(default_factory=time.time)
    _folder: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def describe(self) -> dict:
        """What ``GET /model`` answers: the model, its data and preprocessing, the limits."""
        tags = self.source.tags
        limits = self.segmenter.limits
        return {
            "name": self.source.name,
            "version": self.source.version,
            "alias": self.source.alias,
            "aliases": list(self.source.aliases),
            "model_uri": self.source.uri,
            "run_id": self.source.run_id,
            "dataset": {
                "name": tags.get("mlpipe.dataset.name"),
                "version": tags.get("mlpipe.dataset.version"),
                "digest": tags.get("mlpipe.dataset.digest"),
            },
            "preprocessing_digest": tags.get("mlpipe.preprocessing.digest"),
            "git_commit": tags.get("mlpipe.git.commit"),
            "device": self.device,
            "training_geometry": limits.describe() if limits else None,
            "max_bytes": self.options.max_bytes,
            "mlpipe_version": __version__,
        }

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def prepare(
    options: ServeOptions, *, env: Mapping[str, str] | None = None, echo: Echo | None = None
) -> ServeState:
    """Check the options, resolve and load the model: everything before the first request.

    Raises:
        UsageError: a bad option, an unset token variable, a URI that does not resolve or a
            model that does not load; NotFoundError, TrackingUnavailableError.
    """
    from mlpipe.registry.promotion import connect

    echo = echo or (lambda _msg: None)
    options.check()
    token = token_from_env(options.token_env, env)
    tracking = connect(options.tracking_uri)
    source = resolve_model(tracking, options.model_uri)
    echo(f"Loading {source.label} ({source.load_uri}) ...")
    folder = tempfile.TemporaryDirectory(prefix="mlpipe-serve-model-")
    try:
        model = load_pyfunc(source, tracking, Path(folder.name))
    except BaseException:
        folder.cleanup()
        raise
    limits = GeometryLimits.from_profile(source.training_profile, options.range_factor)
    if limits is None and options.range_factor:
        echo(
            f"Warning: run {source.run_id} logged no data profile ({PROFILE_ARTIFACT}); "
            "spacing and shape are not checked against the training data."
        )
    profile_file = (
        Path(options.profile_file).expanduser()
        if options.profile_file
        else profiles_path(source.profile_key, env)
    )
    segmenter = Segmenter(
        model=model,
        source=source,
        max_bytes=options.max_bytes,
        limits=limits,
        profiles=ProfileLog(profile_file, options.max_profiles),
        concurrency=options.concurrency,
        max_queue=options.max_queue,
    )
    return ServeState(
        options=options,
        source=source,
        segmenter=segmenter,
        token=token,
        device=model_device(model),
        profile_file=profile_file,
        _folder=folder,
    )

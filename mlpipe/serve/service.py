"""What ``mlpipe serve`` does around HTTP: check its options, resolve and load the model once
(through the inference core in ``mlpipe.inference``), bind the socket before the model loads,
and run uvicorn until Ctrl-C or SIGTERM. The routes are in ``mlpipe.serve.app``; nothing here
prints.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpipe import __version__
from mlpipe.core.errors import UsageError
from mlpipe.inference.inputs import DEFAULT_MAX_BYTES
from mlpipe.inference.limits import DEFAULT_RANGE_FACTOR, GeometryLimits
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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so a busy port fails at once.

    Uvicorn is handed this socket (``Server.run(sockets=...)``), so there is no window
    between checking the port and listening on it.

    Raises:
        UsageError: the address cannot be bound (in use, not an address of this host).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets whose proto is
    # IPPROTO_TCP, and without it every keep-alive answer waits ~40 ms (Nagle's algorithm
    # against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise UsageError(
            f"Cannot listen on {host}:{port} ({reason}). Pick another port with --port, or "
            "stop what is using it."
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(state: ServeState, sock: socket.socket, *, log_level: str = "info") -> None:
    """Serve until Ctrl-C or SIGTERM (uvicorn's graceful shutdown), then clean up.

    Raises:
        KeyboardInterrupt: after Ctrl-C (the CLI exits 130); SystemExit(143) after SIGTERM.
    """
    import uvicorn

    from mlpipe.serve.app import create_app

    _configure_logging()
    config = uvicorn.Config(
        create_app(state),
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    # Uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the
    # handler that was there before. SIGTERM's default would kill the process on the spot,
    # leaving the downloaded model behind; this handler turns it into an exit that runs the
    # clean-up below (SIGINT already becomes KeyboardInterrupt: exit 130).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        state.close()


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _configure_logging() -> None:
    """``mlpipe.serve`` messages on stderr next to uvicorn's, unless logging is set up."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

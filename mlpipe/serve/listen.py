"""The socket and the server loop: bind before the model loads (a busy port fails at once),
then uvicorn on that very socket until Ctrl-C or SIGTERM, and clean-up either way.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import UsageError
from mlpipe.serve.service import ServeState

if TYPE_CHECKING:
    pass

logger = logging.getLogger("mlpipe.serve")


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

"""Exception classes and the exit codes of the CLI contract (DESIGN.md), in one table.

Library code raises these; only ``cli.py`` turns them into a message and an exit code.
This module imports nothing, so every other module can depend on it.
"""

from __future__ import annotations


class MlpipeError(Exception):
    """Base of every error a user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class UsageError(MlpipeError):
    """Bad input: a parameter, option, file or value that is wrong. Nothing was created."""

    exit_code = 2


class ProjectError(UsageError):
    """The MLproject cannot be loaded or breaks the rules it must follow to run."""


class ParameterError(UsageError):
    """A ``-P key=value`` that does not fit the entry point's declared parameters."""


class SourceError(UsageError):
    """The project URI, git URL or ``--version`` cannot be resolved or fetched."""


class NotFoundError(UsageError):
    """A model, version, run or experiment that does not exist."""


class ConfigError(UsageError):
    """A settings file that cannot be read or holds unknown keys."""


class DatasetError(UsageError):
    """A dataset that cannot be read or does not hold together; the message names the file."""


class PreprocessingError(UsageError):
    """A transform chain that cannot be described, logged or rebuilt exactly."""


class TrackingUnavailableError(MlpipeError):
    """The tracking server does not answer; nothing was created."""

    exit_code = 2


class MetricsNotSentError(TrackingUnavailableError):
    """Queued metrics or params did not reach the tracking server.

    ``failed`` points were given up on after the retries (they are lost); ``pending`` points
    were still queued when the flush timed out (the background thread keeps trying).
    """

    def __init__(self, message: str, *, failed: int = 0, pending: int = 0):
        super().__init__(message)
        self.failed = failed
        self.pending = pending


class BatcherClosedError(RuntimeError):
    """Logging to a closed ``mlpipe.log.batching.MetricBatcher``: a bug in the caller, not input."""


class ProjectCommandError(MlpipeError):
    """The project's own command exited non-zero; the run is marked FAILED."""

    exit_code = 1

    def __init__(self, message: str, *, run_id: str | None = None, returncode: int | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.returncode = returncode


class CasesFailedError(MlpipeError):
    """A batch ran, but some of its cases failed (each is listed); the others were written."""

    exit_code = 1


class GateRefusedError(MlpipeError):
    """A promotion gate refused; nothing in the registry was changed."""

    exit_code = 3


class DriftFoundError(MlpipeError):
    """New data differs from the training data beyond the thresholds."""

    exit_code = 4


class InterruptedRunError(MlpipeError):
    """A signal stopped a run (exit 128 + signal: Ctrl-C 130, SIGTERM 143, SIGHUP 129).

    The run is marked KILLED.
    """

    def __init__(self, message: str, *, signum: int = 2, run_id: str | None = None):
        super().__init__(message)
        self.signum = signum
        self.run_id = run_id

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum

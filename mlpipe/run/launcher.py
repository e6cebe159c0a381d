"""Start a project's command in its own process group, stream its output, and stop it cleanly.

MLflow's local backend starts ``bash -c COMMAND`` in mlpipe's own process group with the
output going straight to the terminal; its ``cancel()`` then terminates only ``bash``, and
nothing of the output is kept. Here the child leads a new session (so one signal reaches the
whole tree: DataLoader workers, env activations, ``docker run``), and its output is copied to
ours as it comes while the last lines are kept for the failure message.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from mlpipe.core.errors import ProjectError

if TYPE_CHECKING:
    from mlpipe.run.params import CheckedParams
    from mlpipe.run.project import EntryPoint, Project

TAIL_LINES = 15
STOP_GRACE_S = 10.0
"""How long the project gets to exit after SIGINT/SIGTERM before the group is killed."""


class OutputTail:
    """The last ``lines`` lines of each stream the child wrote.

    Kept per stream: stdout and stderr arrive through separate pipes, so a merged tail
    could let earlier stdout lines, read late, push the error line out.
    """

    def __init__(self, lines: int = TAIL_LINES):
        self._lines: dict[str, collections.deque[str]] = {}
        self._partial: dict[str, str] = {}
        self._size = lines
        self._lock = threading.Lock()

    def feed(self, stream: str, data: bytes) -> None:
        with self._lock:
            text = self._partial.pop(stream, "") + data.decode("utf-8", errors="replace")
            *complete, rest = text.replace("\r\n", "\n").split("\n")
            kept = self._lines.setdefault(stream, collections.deque(maxlen=self._size))
            for line in complete:
                # a progress bar rewrites its line with \r: keep its last state only
                kept.append(line.rsplit("\r", 1)[-1])
            if rest:
                self._partial[stream] = rest

    def lines(self, stream: str) -> list[str]:
        with self._lock:
            kept = list(self._lines.get(stream, ()))
            if stream in self._partial:
                kept.append(self._partial[stream].rsplit("\r", 1)[-1])
            return kept[-self._size :]


class ProjectProcess:
    """A running project command; ``wait()`` returns its exit code."""

    def __init__(
        self,
        command: str,
        cwd: str,
        env: Mapping[str, str],
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
    ):
        self.command = command
        self.tail = OutputTail()
        self.stopped_by: int | None = None
        """The signal ``stop()`` was first called with: set when someone (the runner on
        Ctrl-C, a sweep's pruner) ended the process on purpose, rather than it failing."""
        self.proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        self._pumps = [
            threading.Thread(
                target=self._pump,
                args=(self.proc.stdout, stdout or _binary(sys.stdout), "out"),
                daemon=True,
            ),
            threading.Thread(
                target=self._pump,
                args=(self.proc.stderr, stderr or _binary(sys.stderr), "err"),
                daemon=True,
            ),
        ]
        for pump in self._pumps:
            pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout=timeout)
        for pump in self._pumps:
            pump.join(timeout=5)
        return code

    def stop(self, signum: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> int:
        """Send ``signum`` to the whole process group, then SIGKILL after ``grace`` seconds."""
        if self.stopped_by is None:
            self.stopped_by = signum
        self._signal_group(signum)
        deadline = time.monotonic() + grace
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
        # Children that outlived the leader (same group) get the same end.
        self._signal_group(signal.SIGKILL)
        return self.wait(timeout=grace)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def _pump(self, pipe, sink: BinaryIO, name: str) -> None:
        fd = pipe.fileno()
        broken = False
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            self.tail.feed(name, data)
            if broken:
                continue
            try:
                sink.write(data)
                sink.flush()
            except (BrokenPipeError, ValueError, OSError):
                broken = True  # keep draining so the child never blocks on a full pipe
        pipe.close()


@dataclass(frozen=True)
class LaunchHooks:
    """What a caller that runs many projects at once (``mlpipe sweep``) adds to ``execute``.

    ``mlpipe run`` passes none. Attributes:
        on_start: called with the run id and the started process, so the caller can stop it
            (a pruned trial, Ctrl-C in another thread); a process stopped that way ends the
            run KILLED and ``execute`` raises ``InterruptedRunError``.
        env: extra environment variables for the project's process (``CUDA_VISIBLE_DEVICES``).
        stdout, stderr: where the project's output goes instead of ours (a trial's log file).
    """

    on_start: Callable[[str, ProjectProcess], None] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    stdout: BinaryIO | None = None
    stderr: BinaryIO | None = None


def _binary(stream) -> BinaryIO:
    return getattr(stream, "buffer", stream)


def entry_point_command(project: Project, entry: EntryPoint, checked: CheckedParams) -> str:
    """The shell command MLflow will run, built by MLflow's own project loader."""
    from mlflow.projects import _project_spec

    from mlpipe.core.tracking import quiet_mlflow_logs

    quiet_mlflow_logs()

    try:
        spec = _project_spec.load_project(str(project.directory))
        return spec.get_entry_point(entry.name).compute_command(
            {**checked.values, **checked.extras}, None
        )
    except Exception as exc:
        raise ProjectError(f"MLflow cannot load the project: {exc}") from exc

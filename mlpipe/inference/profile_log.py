"""A bounded JSON-lines log of the profiles of the volumes a model was asked to segment: what
``mlpipe drift`` compares with the training profile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mlpipe.data.hash_cache import default_cache_path
from mlpipe.inference.inputs import safe_name

if TYPE_CHECKING:
    pass

logger = logging.getLogger("mlpipe.serve")


DEFAULT_MAX_PROFILES = 10_000


SERVING_DIR = "serving"


PROFILES_FILE = "profiles.jsonl"


def profiles_path(model_name: str, env: Mapping[str, str] | None = None) -> Path:
    """``<cache>/serving/<model>/profiles.jsonl``: where served inputs' profiles go.

    ``<cache>`` is ``$MLPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlpipe``, else
    ``~/.cache/mlpipe`` (the folder of the dataset hash cache). ``mlpipe drift
    --from-serving`` reads the same file.
    """
    return default_cache_path(env).parent / SERVING_DIR / _folder_name(model_name) / PROFILES_FILE


def _folder_name(name: str) -> str:
    """The model name as it is (``mlpipe drift`` looks for it so), unless it would leave the
    serving folder: a name with a path separator, or ``.``/``..``, is made safe."""
    if name and name not in (".", "..") and not re.search(r"[\\/\x00]", name):
        return name
    return safe_name(name, default="model")


class ProfileLog:
    """Served inputs' profiles, one JSON line each, at most ``max_lines`` (oldest dropped).

    Appends are one ``write`` in append mode under a thread lock and an ``flock`` on a side
    ``.lock`` file, so two servers of one model on one host do not interleave lines. When the
    next line would exceed ``max_lines``, the file is rewritten (to a temporary file, then
    ``os.replace``) keeping the newest ``max_lines - max_lines // 10`` lines, so the rewrite
    happens once every tenth of the bound rather than on every request. A reader (``mlpipe
    drift``) sees whole lines, except possibly a last line being written.
    """

    def __init__(self, path: str | os.PathLike[str], max_lines: int = DEFAULT_MAX_PROFILES):
        self.path = Path(path)
        self.max_lines = max_lines
        self._lock = threading.Lock()
        self._count: int | None = None
        self._size: int | None = None

    def append(self, entry: dict) -> None:
        """Append one entry; failures are logged, never raised (serving goes on)."""
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        try:
            with self._lock, self._file_lock():
                size = self.path.stat().st_size if self.path.exists() else 0
                if self._count is None or size != self._size:  # first use, or another writer
                    self._count = self._count_lines()
                if self._count + 1 > self.max_lines:
                    self._count = self._trim(self.max_lines - max(1, self.max_lines // 10))
                with open(self.path, "ab") as out:
                    out.write(line)
                self._count += 1
                self._size = self.path.stat().st_size
        except OSError as exc:
            logger.warning("Could not record the input profile in %s: %s", self.path, exc)

    def read(self) -> list[dict]:
        """Every entry (for tests and ``mlpipe drift``); a torn last line is skipped."""
        if not self.path.exists():
            return []
        entries = []
        for text in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(text))
        return entries

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _count_lines(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))

    def _trim(self, keep: int) -> int:
        lines = self.path.read_bytes().splitlines(keepends=True)[-keep:] if keep > 0 else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(b"".join(lines))
        os.replace(tmp, self.path)
        return len(lines)

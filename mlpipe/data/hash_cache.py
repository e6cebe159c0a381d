"""The content-hash cache: a SQLite file keyed by path, size, mtime and inode, so an unchanged
dataset is digested again in milliseconds; a file changed within the file system's timestamp
resolution is hashed again rather than trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path


def default_cache_path(env: Mapping[str, str] | None = None) -> Path:
    """Where the hash cache lives when ``build_manifest`` is given no ``cache``.

    ``hashes.sqlite`` in ``$MLPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlpipe``, else
    ``~/.cache/mlpipe``: a per-user cache, as pip and uv keep theirs, so that every project
    of a user shares the hashes of a dataset they all read.
    """
    env = os.environ if env is None else env
    if env.get(CACHE_ENV):
        base = Path(env[CACHE_ENV]).expanduser()
    else:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = Path(xdg) / "mlpipe"
    return base / CACHE_FILE


@dataclass(frozen=True)
class _Facts:
    size: int
    mtime_ns: int
    sha256: str
    shape: tuple[int, ...]
    series: dict | None = None  # a DICOM series folder's manifest fields


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(","))


CACHE_ENV = "MLPIPE_CACHE_DIR"


CACHE_FILE = "hashes.sqlite"


_RACY_WINDOW_NS = 2_000_000_000


_CACHE_SCHEMA = 2  # 2: a DICOM series folder's manifest fields (series)


_LOOKUP_BATCH = 500  # stays under SQLite's bound-parameter limit on old builds


def _cache_path(cache: str | os.PathLike[str] | bool | None) -> Path | None:
    if cache is False:
        return None
    if cache is None or cache is True:
        return default_cache_path()
    return Path(os.fspath(cache)).expanduser()


class _HashCache:
    """(path, size, mtime_ns) -> facts, in SQLite. Failures degrade to "not cached".

    WAL mode lets readers and one writer in other processes work at once; writes are one short
    transaction at the end of a build, with a busy timeout. A file that is not a database (or
    is corrupt) is deleted and created anew; a cache that stays locked or cannot be created is
    skipped for this build.
    """

    def __init__(self, connection: sqlite3.Connection | None, path: Path | None) -> None:
        self._db = connection
        self._path = path
        self._broken = False

    @classmethod
    def open(cls, path: Path | None) -> _HashCache:
        if path is None:
            return cls(None, None)
        try:
            return cls(_connect(path), path)
        except sqlite3.OperationalError:
            return cls(None, None)  # locked, read-only or unreachable: go without this time
        except sqlite3.DatabaseError:
            pass  # not a database, or corrupt: start a new one below
        except OSError:
            return cls(None, None)  # the cache folder cannot be created
        if not _remove_cache(path):
            return cls(None, None)
        try:
            return cls(_connect(path), path)
        except (sqlite3.Error, OSError):
            return cls(None, None)

    def lookup(self, wanted: Mapping[str, tuple[int, int]]) -> dict[str, _Facts]:
        if self._db is None or not wanted:
            return {}
        keys = list(wanted)
        out: dict[str, _Facts] = {}
        try:
            for start in range(0, len(keys), _LOOKUP_BATCH):
                batch = keys[start : start + _LOOKUP_BATCH]
                marks = ",".join("?" * len(batch))
                rows = self._db.execute(
                    "SELECT path, size, mtime_ns, sha256, shape, series FROM files "
                    f"WHERE path IN ({marks})",
                    batch,
                )
                for path, size, mtime_ns, sha256, shape, series in rows:
                    if (size, mtime_ns) == wanted[path]:
                        out[path] = _Facts(
                            size,
                            mtime_ns,
                            sha256,
                            _parse_shape(shape),
                            json.loads(series) if series else None,
                        )
        except sqlite3.OperationalError:
            return {}
        except (sqlite3.DatabaseError, ValueError, TypeError):
            self._broken = True  # corrupt pages or rows: removed on close, rebuilt next time
            return {}
        return out

    def store(self, facts: Mapping[str, _Facts]) -> None:
        if self._db is None or not facts:
            return
        rows = [
            (
                path,
                f.size,
                f.mtime_ns,
                f.sha256,
                ",".join(map(str, f.shape)),
                json.dumps(f.series, separators=(",", ":")) if f.series else None,
            )
            for path, f in facts.items()
        ]
        try:
            with _transaction(self._db):
                self._db.executemany(
                    "INSERT OR REPLACE INTO files (path, size, mtime_ns, sha256, shape, series) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
        except sqlite3.OperationalError:
            pass  # locked past the timeout, or read-only: a re-hash next time, nothing more
        except sqlite3.DatabaseError:
            self._broken = True

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        if self._broken and self._path is not None:
            _remove_cache(self._path)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Autocommit mode; transactions are explicit and short (``_transaction``).
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    try:
        # "file is not a database" surfaces on the first statement, here. Where WAL is not
        # available (some network file systems) SQLite keeps its rollback journal.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if db.execute("PRAGMA user_version").fetchone()[0] != _CACHE_SCHEMA:
            with _transaction(db):
                # Checked again under the write lock: another process may have just done it.
                if db.execute("PRAGMA user_version").fetchone()[0] != _CACHE_SCHEMA:
                    db.execute("DROP TABLE IF EXISTS files")
                    db.execute(
                        "CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                        "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, shape TEXT NOT NULL, "
                        "series TEXT) WITHOUT ROWID"
                    )
                    db.execute(f"PRAGMA user_version={_CACHE_SCHEMA}")
    except BaseException:
        db.close()
        raise
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the lock at once (waiting up to the busy timeout)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _remove_cache(path: Path) -> bool:
    """Delete a broken cache and its WAL files; another process may have done it already."""
    try:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    except OSError:
        return False
    return True

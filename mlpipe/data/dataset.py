"""Dataset manifests: which files, which pairs, and one content digest that names the data.

``build_manifest`` reads one of three layouts and returns a ``DatasetInfo``:

1. a Medical Segmentation Decathlon folder: ``imagesTr/``, ``labelsTr/``, optional
   ``imagesTs/`` (and ``labelsTs/``), optional ``dataset.json`` with ``name`` and ``version``;
   images and labels are paired by file name (the ``training`` list is not needed);
2. a folder (searched recursively) of ``<case>_image.nii[.gz]`` / ``<case>_label.nii[.gz]``;
3. a CSV (columns ``image``, ``label``, optional ``case``, ``split``) or JSON manifest (a list
   of such objects, or ``{"name", "version", "pairs": [...]}``) whose relative paths are
   relative to the manifest's folder.

The digest is a sha256 over the sorted file list (relative path, size, content sha256, role,
case, split), so the same data has the same digest in any folder on any machine, and changing
one voxel changes it. Hidden files (``.DS_Store``, the ``._*.nii.gz`` macOS leftovers inside the
Decathlon archives) are skipped.

Hashing a CT dataset takes minutes, so content hashes are cached in a small SQLite file
(``hashes.sqlite`` under ``$MLPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlpipe``, else
``~/.cache/mlpipe``), keyed by (absolute path, size, mtime in ns) as git and make do: a file
rewritten with a new mtime is hashed again; a file whose content changed while size and mtime
were restored is not noticed. Files modified in the last two seconds are hashed but not
cached, because a second write within the file system's timestamp granularity could keep the
mtime (git's "racy clean" problem). The cache also keeps what validation needs (header shape,
gzip stream complete), so an unchanged dataset is checked without opening a file. The cache is
an optimisation only: a broken or locked cache file is rebuilt or skipped, never an error.

Pure library code: no mlflow, no printing; ``progress`` lets the caller show progress.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePath

from mlpipe.core.errors import DatasetError
from mlpipe.data.volumes import is_volume, read_header

__all__ = [
    "CACHE_ENV",
    "DatasetInfo",
    "FileEntry",
    "Pair",
    "build_manifest",
    "default_cache_path",
    "digest_of",
]

CACHE_ENV = "MLPIPE_CACHE_DIR"
CACHE_FILE = "hashes.sqlite"
SPLITS = ("train", "val", "test")
"""Accepted split names; every split but ``test`` needs a label for each image."""

Progress = Callable[[int, int, int], None]
"""``progress(done_files, total_files, bytes_done)``, called from the calling thread."""

_CHUNK = 1 << 20
_GZIP_OUT_LIMIT = 1 << 24  # labels compress ~1000:1; bound what one chunk may inflate to
_RACY_WINDOW_NS = 2_000_000_000
_CACHE_SCHEMA = 1
_LOOKUP_BATCH = 500  # stays under SQLite's bound-parameter limit on old builds
_MAX_LISTED = 10
_PLAIN_NAME = re.compile(r"^(?P<case>.+)_(?P<role>image|label)\.nii(?:\.gz)?$", re.IGNORECASE)
_FIX_LAYOUT = (
    "Use the Decathlon layout (imagesTr/, labelsTr/), name files <case>_image.nii.gz and "
    "<case>_label.nii.gz, or list the pairs in a CSV/JSON manifest."
)


@dataclass(frozen=True)
class FileEntry:
    """One file of the manifest.

    Attributes:
        path: POSIX path relative to the dataset folder (or to the manifest file's folder).
        size: bytes on disk.
        sha256: hex sha256 of the file's bytes as stored (compressed for ``.nii.gz``).
        role: ``"image"`` or ``"label"``.
        case: the pair it belongs to, e.g. ``"spleen_12"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """

    path: str
    size: int
    sha256: str
    role: str
    case: str
    split: str


@dataclass(frozen=True)
class Pair:
    """An image and its label (``None`` for an unlabelled test image), absolute, for loading."""

    case: str
    image: Path
    label: Path | None
    split: str


@dataclass(frozen=True)
class DatasetInfo:
    """A checked dataset: its identity (name, version, digest) and its files and pairs.

    Attributes:
        name: given, else ``dataset.json``/manifest ``name``, else the folder's name.
        version: given, else the declared ``version``, else ``digest[:12]``.
        version_declared: False when ``version`` fell back to the digest (callers warn).
        digest: hex sha256 of the canonical file list (``digest_of``).
        source: absolute path of the dataset folder or manifest file.
        files: every file, sorted by path.
        pairs: image/label pairs, train before val before test, then by case.
    """

    name: str
    version: str
    version_declared: bool
    digest: str
    source: str
    files: tuple[FileEntry, ...]
    pairs: tuple[Pair, ...]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def manifest(self) -> dict:
        """The JSON-ready manifest: name, version, digest and the file list."""
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "files": [_record(entry) for entry in self.files],
        }


def build_manifest(
    source: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str | None = None,
    progress: Progress | None = None,
    cache: str | os.PathLike[str] | bool | None = None,
) -> DatasetInfo:
    """Find, pair, hash and check every volume of a dataset; nothing partial is returned.

    Args:
        source: a Decathlon folder, a folder of ``<case>_image``/``<case>_label`` volumes, or a
            ``.csv``/``.json`` manifest file.
        name: dataset name [default: the declared name, else the folder's name].
        version: dataset version [default: the declared version, else the digest's first 12
            characters, with ``version_declared=False``].
        progress: called as files are hashed (cached files count as done at once).
        cache: the SQLite hash cache file; ``None``/``True`` for the default location
            (``default_cache_path``), ``False`` to hash everything and cache nothing.

    Returns:
        The dataset's identity, files and pairs.

    Raises:
        DatasetError: a missing folder or file, no volumes, an image without its label (or a
            label without its image), an unreadable, truncated or non-NIfTI file, or
            image/label shapes that differ. The message names every offending file.
    """
    layout = _discover(source)
    paths = _unique_paths(layout)
    facts = _examine_all(paths, layout.origins, progress, _cache_path(cache))
    _check_shapes(layout.pairs, facts)
    entries = tuple(sorted(_entries(layout, facts), key=lambda e: e.path))
    digest = digest_of(entries)
    declared = version if version is not None else layout.version
    return DatasetInfo(
        name=name or layout.name,
        version=declared if declared is not None else digest[:12],
        version_declared=declared is not None,
        digest=digest,
        source=str(layout.source),
        files=entries,
        pairs=tuple(sorted(layout.pairs, key=_pair_order)),
    )


def digest_of(entries: Iterable[FileEntry]) -> str:
    """The content digest of a file list: sha256 of its canonical JSON, sorted by path.

    Canonical (sorted keys, no spaces, relative paths) so that it depends on the data only,
    not on where the folder lives or in which order the files were found.
    """
    records = sorted((_record(entry) for entry in entries), key=lambda r: (r["path"], r["role"]))
    text = json.dumps(records, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


# Discovery: which files, paired how ---------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    source: Path  # the folder or manifest file, absolute
    root: Path  # what entry paths are relative to
    name: str
    version: str | None
    pairs: list[Pair]
    origins: dict[Path, str]  # path -> where it was listed, for messages ("rows.csv row 4")


def _discover(source: str | os.PathLike[str]) -> _Layout:
    given = os.fspath(source)
    path = Path(given).expanduser().absolute()
    if not path.exists():
        raise DatasetError(
            f"Dataset {given} does not exist (looked for {path}). Give the dataset folder or a "
            ".csv/.json manifest file."
        )
    path = path.resolve()
    if path.is_dir():
        if (path / "imagesTr").is_dir():
            return _decathlon(path)
        if (path / "dataset.json").is_file():
            raise DatasetError(
                f"{path} has a dataset.json but no imagesTr/ folder; a Decathlon dataset keeps "
                "its training images in imagesTr/ and their labels in labelsTr/."
            )
        return _plain_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _manifest(path, _csv_rows(path), name=None, version=None)
    if suffix == ".json":
        return _json_manifest(path)
    if is_volume(path):
        raise DatasetError(
            f"{path} is a single volume, not a dataset. Give the folder that holds it, or a "
            ".csv/.json manifest listing image/label pairs."
        )
    raise DatasetError(
        f"{path} is neither a folder nor a .csv/.json manifest. Give the dataset folder or a "
        "manifest file."
    )


def _decathlon(root: Path) -> _Layout:
    meta = _read_json(root / "dataset.json") if (root / "dataset.json").is_file() else {}
    if not isinstance(meta, dict):
        raise DatasetError(f"{root / 'dataset.json'} must hold a JSON object.")
    problems: list[str] = []
    pairs = _pair_folders(root, "imagesTr", "labelsTr", "train", problems)
    if (root / "imagesTs").is_dir() or (root / "labelsTs").is_dir():
        pairs += _pair_folders(root, "imagesTs", "labelsTs", "test", problems)
    _raise_all(problems)
    if not pairs:
        raise DatasetError(
            f"No volumes found in {root / 'imagesTr'}: expected .nii or .nii.gz files."
        )
    return _Layout(
        source=root,
        root=root,
        name=_declared(meta, "name", root / "dataset.json") or root.name,
        version=_declared(meta, "version", root / "dataset.json"),
        pairs=pairs,
        origins={},
    )


def _pair_folders(
    root: Path, image_dir: str, label_dir: str, split: str, problems: list[str]
) -> list[Pair]:
    images = _volumes_by_case(root / image_dir, problems)
    labels = _volumes_by_case(root / label_dir, problems)
    pairs = []
    for case, image in sorted(images.items()):
        label = labels.get(case)
        if label is None and split != "test":
            expected = root / label_dir / image.name
            problems.append(f"Image {image} has no label: expected {expected}.")
        pairs.append(Pair(case=case, image=image, label=label, split=split))
    for case, label in sorted(labels.items()):
        if case not in images:
            expected = root / image_dir / label.name
            problems.append(f"Label {label} has no image: expected {expected}.")
    return pairs


def _volumes_by_case(folder: Path, problems: list[str]) -> dict[str, Path]:
    """Volumes directly in a folder, by case id (file name without ``.nii[.gz]``)."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not is_volume(entry.name) or entry.is_dir():
            continue
        case = _strip_suffix(entry.name)
        if case in found:
            problems.append(
                f"{found[case]} and {entry.path} are the same case {case!r}; keep one of them."
            )
            continue
        found[case] = Path(entry.path)
    return found


def _plain_folder(root: Path) -> _Layout:
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    problems: list[str] = []
    unmatched: list[Path] = []
    for path in _walk_volumes(root):
        match = _PLAIN_NAME.match(path.name)
        if match is None:
            unmatched.append(path)
            continue
        rel_dir = path.parent.relative_to(root).as_posix()
        case = match["case"] if rel_dir == "." else f"{rel_dir}/{match['case']}"
        found = images if match["role"].lower() == "image" else labels
        if case in found:
            problems.append(f"{found[case]} and {path} are the same {match['role']} of {case!r}.")
        found[case] = path
    if not images and not labels and not unmatched:
        raise DatasetError(f"No volumes (.nii, .nii.gz) found in {root}. {_FIX_LAYOUT}")
    for path in unmatched:
        problems.append(f"{path} is neither <case>_image nor <case>_label. {_FIX_LAYOUT}")
    pairs = []
    for case, image in sorted(images.items()):
        label = labels.get(case)
        if label is None:
            expected = image.parent / f"{_plain_case(image)}_label{_suffix(image.name)}"
            problems.append(f"Image {image} has no label: expected {expected}.")
        pairs.append(Pair(case=case, image=image, label=label, split="train"))
    for case, label in sorted(labels.items()):
        if case not in images:
            expected = label.parent / f"{_plain_case(label)}_image{_suffix(label.name)}"
            problems.append(f"Label {label} has no image: expected {expected}.")
    _raise_all(problems)
    return _Layout(source=root, root=root, name=root.name, version=None, pairs=pairs, origins={})


def _plain_case(path: Path) -> str:
    match = _PLAIN_NAME.match(path.name)
    return match["case"] if match else _strip_suffix(path.name)


def _walk_volumes(root: Path) -> Iterator[Path]:
    """Volumes under ``root`` in a stable order, skipping hidden files and folders."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and is_volume(name):
                yield Path(folder) / name


def _json_manifest(path: Path) -> _Layout:
    data = _read_json(path)
    name = version = None
    if isinstance(data, dict):
        if "pairs" not in data:
            raise DatasetError(
                f"{path} is a JSON object without 'pairs'; expected a list of "
                '{"image": ..., "label": ...} objects, or {"name", "version", "pairs": [...]}.'
            )
        name = _declared(data, "name", path)
        version = _declared(data, "version", path)
        data = data["pairs"]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: 'pairs' must be a list of image/label objects.")
    rows = []
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise DatasetError(
                f"{path} item {number} is {type(item).__name__}, not an object with 'image' "
                "and 'label'."
            )
        rows.append((f"item {number}", item))
    return _manifest(path, rows, name=name, version=version)


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            if "image" not in columns:
                raise DatasetError(
                    f"{path} has no 'image' column (columns: {', '.join(columns) or 'none'}). "
                    "Its first line must name the columns: image,label[,case,split]."
                )
            # Row 1 is the header line, so data rows start at 2 as in a spreadsheet.
            rows = [
                (f"row {number}", {k.strip().lower(): v for k, v in row.items() if k})
                for number, row in enumerate(reader, start=2)
                if any((v or "").strip() for v in row.values() if isinstance(v, str))
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path} cannot be read as CSV: {exc}.") from exc
    return rows


def _manifest(
    path: Path, rows: Sequence[tuple[str, dict]], *, name: str | None, version: str | None
) -> _Layout:
    """Pairs from manifest rows; relative paths are relative to the manifest's folder."""
    root = path.parent
    pairs: list[Pair] = []
    origins: dict[Path, str] = {}
    cases: dict[str, str] = {}
    problems: list[str] = []
    for where, row in rows:
        image_text = _cell(row, "image")
        label_text = _cell(row, "label")
        split = (_cell(row, "split") or "train").lower()
        if not image_text:
            problems.append(f"{path} {where}: no image path.")
            continue
        image = _resolve(root, image_text)
        label = _resolve(root, label_text) if label_text else None
        case = _cell(row, "case") or _case_from_name(image.name)
        if split not in SPLITS:
            problems.append(f"{path} {where}: split {split!r} is not one of {', '.join(SPLITS)}.")
        if label is None and split != "test":
            problems.append(
                f"Image {image} ({path} {where}) has no label; give a label path, or split "
                "'test' for unlabelled images."
            )
        if case in cases:
            problems.append(f"{path} {where}: case {case!r} is already used by {cases[case]}.")
        cases[case] = where
        for file in (image, label):
            if file is None:
                continue
            if file in origins:
                problems.append(f"{file} is listed twice ({origins[file]} and {where}).")
            origins[file] = f"{path.name} {where}"
        pairs.append(Pair(case=case, image=image, label=label, split=split))
    _raise_all(problems)
    if not pairs:
        raise DatasetError(f"{path} lists no image/label pairs.")
    return _Layout(
        source=path,
        root=root,
        name=name or root.name,
        version=version,
        pairs=pairs,
        origins=origins,
    )


# Examination: hash, gzip check and header, in parallel, through the cache -------------------------


@dataclass(frozen=True)
class _Facts:
    size: int
    mtime_ns: int
    sha256: str
    shape: tuple[int, ...]


def _unique_paths(layout: _Layout) -> list[Path]:
    paths = []
    seen: set[Path] = set()
    for pair in layout.pairs:
        for path in (pair.image, pair.label):
            if path is None:
                continue
            if path in seen:
                raise DatasetError(f"{path} is used by more than one pair; each file once.")
            seen.add(path)
            paths.append(path)
    return paths


def _examine_all(
    paths: Sequence[Path],
    origins: Mapping[Path, str],
    progress: Progress | None,
    cache_path: Path | None,
) -> dict[Path, _Facts]:
    """Facts of every file: from the cache where size and mtime match, else read in parallel.

    Files are read in worker threads (hashlib and zlib release the GIL); the progress callback
    and all cache access stay in the calling thread. Every file is examined even after one
    fails, so that one error lists all bad files and the good ones are cached for the rerun.
    """
    problems: list[str] = []
    stats: dict[Path, os.stat_result] = {}
    for path in paths:
        try:
            stats[path] = os.stat(path)
        except OSError as exc:
            listed = f" (listed in {origins[path]})" if path in origins else ""
            reason = "does not exist" if isinstance(exc, FileNotFoundError) else "cannot be read"
            problems.append(f"{path} {reason}{listed}. Check the path.")
    _raise_all(problems)
    cache = _HashCache.open(cache_path)
    try:
        facts = cache.lookup({str(p): (s.st_size, s.st_mtime_ns) for p, s in stats.items()})
        found = {Path(p): f for p, f in facts.items()}
        missing = [p for p in paths if p not in found]
        done, total = len(found), len(paths)
        bytes_done = sum(f.size for f in found.values())
        if progress is not None:
            progress(done, total, bytes_done)
        fresh: dict[Path, _Facts] = {}
        started_ns = time.time_ns()
        pool = ThreadPoolExecutor(max_workers=_workers(len(missing))) if missing else None
        try:
            futures = {pool.submit(_examine, path): path for path in missing} if pool else {}
            for future in as_completed(futures):
                done += 1
                try:
                    result = future.result()
                except DatasetError as exc:
                    problems.append(str(exc))
                else:
                    fresh[futures[future]] = result
                    bytes_done += result.size
                if progress is not None:
                    progress(done, total, bytes_done)
        finally:
            if pool is not None:
                # On Ctrl-C or a bug, drop the queued files instead of hashing them all first.
                pool.shutdown(wait=True, cancel_futures=True)
            settled = started_ns - _RACY_WINDOW_NS
            cache.store({str(p): f for p, f in fresh.items() if f.mtime_ns < settled})
    finally:
        cache.close()
    _raise_all(sorted(problems))
    found.update(fresh)
    return found


def _examine(path: Path) -> _Facts:
    """Hash one file and check it is whole: a complete gzip stream, a readable header."""
    name = str(path)
    gz = _GzipCheck(name) if name.lower().endswith(".gz") else None
    digest = hashlib.sha256()
    read = 0
    try:
        with open(path, "rb") as stream:
            before = os.fstat(stream.fileno())
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                read += len(chunk)
                if gz is not None:
                    gz.feed(chunk)
            after = os.fstat(stream.fileno())
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read: {exc.strerror or exc}.") from exc
    if read == 0:
        raise DatasetError(f"{path} is empty (0 bytes). Copy or export it again from its source.")
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
        read != before.st_size
    ):
        raise DatasetError(
            f"{path} changed while it was being read. Wait until whatever writes it has "
            "finished, then try again."
        )
    unpacked = gz.finish() if gz is not None else None
    header = read_header(path)
    if unpacked is not None and unpacked < header.data_end:
        raise DatasetError(
            f"{path} is truncated: its header promises {header.data_end} bytes of NIfTI data "
            f"but the gzip stream holds {unpacked}. Copy or export it again from its source."
        )
    return _Facts(
        size=before.st_size,
        mtime_ns=before.st_mtime_ns,
        sha256=digest.hexdigest(),
        shape=header.shape,
    )


class _GzipCheck:
    """Decompress a gzip stream chunk by chunk, only to learn whether it is whole.

    A truncated download leaves a stream whose decompressor never reaches end-of-stream
    (``eof`` stays False); zlib also verifies each member's CRC-32 and length. Several members
    and trailing zero padding are accepted, as Python's ``gzip`` (which nibabel uses) accepts
    them. Output is discarded; only its length is kept.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.unpacked = 0
        self.members = 0
        self._inflater: zlib._Decompress | None = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> None:
        try:
            while data:
                if self._inflater is None:  # between members: padding, or another member
                    data = data.lstrip(b"\0")
                    if not data:
                        return
                    self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self.unpacked += len(self._inflater.decompress(data, _GZIP_OUT_LIMIT))
                if self._inflater.eof:
                    data = self._inflater.unused_data
                    self._inflater = None
                    self.members += 1
                else:
                    data = self._inflater.unconsumed_tail
        except zlib.error as exc:
            raise DatasetError(self._corrupt(exc)) from exc

    def finish(self) -> int:
        """The decompressed length of a complete stream."""
        if self._inflater is not None:
            raise DatasetError(
                f"{self.name} is a truncated .nii.gz: the gzip stream ends before its "
                f"end-of-stream marker (after {self.unpacked} decompressed bytes). Copy or "
                "export it again from its source (check the download finished)."
            )
        return self.unpacked

    def _corrupt(self, exc: zlib.error) -> str:
        if self.members == 0 and self.unpacked == 0 and "header" in str(exc):
            return (
                f"{self.name} is not gzip-compressed although its name ends in .gz, so it is "
                "not a .nii.gz volume. Rename it (.nii) if it is uncompressed NIfTI, or "
                "replace it."
            )
        return f"{self.name} is a corrupt .nii.gz ({exc}). Copy or export it again."


def _workers(jobs: int) -> int:
    return max(1, min(jobs, 32, (os.cpu_count() or 1) + 4))


# The hash cache -----------------------------------------------------------------------------------


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
                    "SELECT path, size, mtime_ns, sha256, shape FROM files "
                    f"WHERE path IN ({marks})",
                    batch,
                )
                for path, size, mtime_ns, sha256, shape in rows:
                    if (size, mtime_ns) == wanted[path]:
                        out[path] = _Facts(size, mtime_ns, sha256, _parse_shape(shape))
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
            (path, f.size, f.mtime_ns, f.sha256, ",".join(map(str, f.shape)))
            for path, f in facts.items()
        ]
        try:
            with _transaction(self._db):
                self._db.executemany(
                    "INSERT OR REPLACE INTO files (path, size, mtime_ns, sha256, shape) "
                    "VALUES (?, ?, ?, ?, ?)",
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
                        "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, shape TEXT NOT NULL) "
                        "WITHOUT ROWID"
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


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(","))


# Checks and records -------------------------------------------------------------------------------


def _check_shapes(pairs: Sequence[Pair], facts: Mapping[Path, _Facts]) -> None:
    """Images 3D or 4D (channels last), labels 3D, same spatial shape within a pair."""
    problems = []
    for pair in sorted(pairs, key=_pair_order):
        image_shape = facts[pair.image].shape
        if len(image_shape) not in (3, 4):
            problems.append(
                f"Image {pair.image} has shape {_shape(image_shape)}; expected a 3D volume or "
                "a 4D one with channels last."
            )
            continue
        if pair.label is None:
            continue
        label_shape = facts[pair.label].shape
        if len(label_shape) != 3:
            problems.append(
                f"Label {pair.label} has shape {_shape(label_shape)}; a label must be 3D (one "
                "class index per voxel). Save it without the extra axes (e.g. numpy.squeeze)."
            )
        elif label_shape != image_shape[:3]:
            problems.append(
                f"Image {pair.image} has spatial shape {_shape(image_shape[:3])} but its label "
                f"{pair.label} has {_shape(label_shape)}; they must match voxel for voxel. "
                "Resample the label onto the image grid, or pair the right files."
            )
    _raise_all(problems)


def _entries(layout: _Layout, facts: Mapping[Path, _Facts]) -> Iterator[FileEntry]:
    for pair in layout.pairs:
        for role, path in (("image", pair.image), ("label", pair.label)):
            if path is None:
                continue
            fact = facts[path]
            yield FileEntry(
                path=_relative(path, layout.root),
                size=fact.size,
                sha256=fact.sha256,
                role=role,
                case=pair.case,
                split=pair.split,
            )


def _record(entry: FileEntry) -> dict:
    return {
        "path": entry.path,
        "size": entry.size,
        "sha256": entry.sha256,
        "role": entry.role,
        "case": entry.case,
        "split": entry.split,
    }


def _raise_all(problems: Sequence[str]) -> None:
    """One error for all problems found, so a user fixes them in one go."""
    if not problems:
        return
    if len(problems) == 1:
        raise DatasetError(problems[0])
    listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    tail = f"\n  ... and {more} more." if more > 0 else ""
    raise DatasetError(f"{len(problems)} problems in the dataset:\n{listed}{tail}")


# Small helpers ------------------------------------------------------------------------------------


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read: {exc.strerror or exc}.") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}. Fix the file.") from exc


def _declared(meta: Mapping[str, object], key: str, where: Path) -> str | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, (dict, list, bool)) or not str(value).strip():
        raise DatasetError(f"{where}: {key!r} must be a non-empty string, not {value!r}.")
    return str(value).strip()


def _cell(row: Mapping[str, object], key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value).strip()


def _resolve(root: Path, text: str) -> Path:
    return Path(os.path.abspath(root / Path(text).expanduser()))


def _relative(path: Path, root: Path) -> str:
    try:
        return PurePath(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return path.as_posix()


def _suffix(name: str) -> str:
    return ".nii.gz" if name.lower().endswith(".nii.gz") else ".nii"


def _strip_suffix(name: str) -> str:
    return name[: -len(_suffix(name))]


def _case_from_name(name: str) -> str:
    stem = _strip_suffix(name) if is_volume(name) else name
    return stem[: -len("_image")] if stem.lower().endswith("_image") else stem


def _pair_order(pair: Pair) -> tuple[int, str]:
    rank = SPLITS.index(pair.split) if pair.split in SPLITS else len(SPLITS)
    return rank, pair.case


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))

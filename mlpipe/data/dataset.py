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

A DICOM series folder is one entry: its path is the folder, its size the sum of its files,
its sha256 one hash over the sorted hashes of its files, so the digest does not change when
the series is copied or its files renamed, and changes when any slice's bytes change. The
manifest names the series by a salted hash of its SeriesInstanceUID (``series_key``) and
lists its file hashes; no patient or study attribute is read into it. The cache keys a
series by its folder, its files' total size and the newest mtime among its files and the
folder itself (adding, removing or renaming a file changes the folder's mtime).

Pure library code: no mlflow, no printing; ``progress`` lets the caller show progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from mlpipe.core.errors import DatasetError
from mlpipe.data.dicom_labels import is_seg_file, load_seg_label
from mlpipe.data.hash_cache import (
    _RACY_WINDOW_NS,
    CACHE_ENV,
    _cache_path,
    _Facts,
    _HashCache,
    default_cache_path,
)
from mlpipe.data.layouts import Pair, _discover, _Layout, _pair_order, _raise_all, _relative
from mlpipe.data.volumes import file_kind, is_series, read_header

__all__ = [
    "CACHE_ENV",
    "DatasetInfo",
    "FileEntry",
    "Pair",
    "build_manifest",
    "default_cache_path",
    "digest_of",
    "examine_file",
]


Progress = Callable[[int, int, int], None]
"""``progress(done_files, total_files, bytes_done)``, called from the calling thread."""


_CHUNK = 1 << 20


_GZIP_OUT_LIMIT = 1 << 24  # labels compress ~1000:1; bound what one chunk may inflate to


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
    series: dict | None = None
    """For a DICOM series: ``{"key", "slices", "files"}`` (salted UID hash, slice count, sorted
    file hashes); not part of the digest, which the salt would make machine-dependent."""


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
            "files": [
                _record(entry) | ({"series": entry.series} if entry.series else {})
                for entry in self.files
            ],
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
    try:
        layout = _discover(source)
        paths = _unique_paths(layout)
        facts = _examine_all(paths, layout.origins, progress, _cache_path(cache))
    except OSError as exc:  # anything the checks above did not foresee still names its path
        where = exc.filename or source
        raise DatasetError(f"{where} cannot be read: {exc.strerror or exc}.") from exc
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
    stats: dict[Path, tuple[int, int]] = {}
    for path in paths:
        kind, info = file_kind(path)  # lstat/stat only: a FIFO must never be opened
        listed = f" (listed in {origins[path]})" if path in origins else ""
        if kind == "file":
            stats[path] = (info.st_size, info.st_mtime_ns)  # type: ignore[union-attr]
        elif kind == "dir" and is_series(path):
            try:
                # A DICOM series folder is keyed by its files' total size and newest mtime.
                stats[path] = _series_stat(path)
            except OSError as exc:
                problems.append(f"{path} cannot be read: {exc.strerror or exc}{listed}.")
        elif kind == "missing":
            problems.append(f"{path} does not exist{listed}. Check the path.")
        elif kind == "dir":
            problems.append(f"{path} is a folder, not a volume file or a DICOM series{listed}.")
        else:
            problems.append(f"{info}{listed}" if listed else str(info))
    _raise_all(problems)
    cache = _HashCache.open(cache_path)
    try:
        facts = cache.lookup({str(p): key for p, key in stats.items()})
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
            cache.store({str(p): f for p, f in fresh.items() if f.mtime_ns < settled and f.shape})
    finally:
        cache.close()
    _raise_all(sorted(problems))
    found.update(fresh)
    return found


def examine_file(path: Path) -> _Facts:
    """Hash one volume and check it is whole (gzip stream complete, header readable).

    The check ``build_manifest`` runs on every file, for callers that take files one by one
    (``mlpipe predict`` lists a bad file as a failed case instead of refusing the batch).

    Returns:
        ``size``, ``mtime_ns``, ``sha256`` and header ``shape``.

    Raises:
        DatasetError: empty, unreadable, changed while read, truncated, or not NIfTI.
    """
    return _examine(path)


def _examine(path: Path) -> _Facts:
    """Hash one file and check it is whole: a complete gzip stream, a readable header."""
    if path.is_dir():
        return _examine_series(path)
    name = str(path)
    if name.lower().endswith(".dcm") and is_seg_file(path):
        # A DICOM SEG label: placed on its image in _check_shapes (it has no grid of its own).
        return _hash_only(path)
    header = read_header(path)  # the header decides first: a hostile size is refused unread
    gz = _GzipCheck(name, header.data_end) if name.lower().endswith(".gz") else None
    digest = hashlib.sha256()
    read = 0
    try:
        # O_NONBLOCK: should a FIFO replace the file after the check, opening it returns at
        # once instead of waiting for a writer; it is then refused as not a regular file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DatasetError(f"{path} is not a regular file; mlpipe does not read it.")
        with open(fd, "rb") as stream:
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


def _series_stat(folder: Path) -> tuple[int, int]:
    """A series folder's cache key: total size of its files, and the newest mtime of its files
    and of the folder itself (which changes when a file is added, removed or renamed)."""
    from mlpipe.data.dicom import series_files

    size, mtime = 0, os.stat(folder).st_mtime_ns
    for file in series_files(folder):
        stat = os.stat(file)
        size += stat.st_size
        mtime = max(mtime, stat.st_mtime_ns)
    return size, mtime


def _hash_only(path: Path) -> _Facts:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        stat = os.stat(path)
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read: {exc.strerror or exc}.") from exc
    return _Facts(size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256=digest.hexdigest(), shape=())


def _examine_series(folder: Path) -> _Facts:
    """A DICOM series folder: its checked geometry, and one hash over its files' hashes."""
    from mlpipe.data.dicom import scan_series, series_file_digest, series_files, series_key

    series = scan_series(folder)  # the same refusals as reading it (one series, no gaps...)
    try:
        size, mtime = _series_stat(folder)
    except OSError as exc:
        raise DatasetError(f"{folder} cannot be read: {exc.strerror or exc}.") from exc
    hashes = {}
    for file in series_files(folder):
        digest = hashlib.sha256()
        try:
            with open(file, "rb") as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise DatasetError(f"{file} cannot be read: {exc.strerror or exc}.") from exc
        hashes[file] = digest.hexdigest()
    if _series_stat(folder) != (size, mtime):
        raise DatasetError(
            f"{folder} changed while it was being read. Wait until whatever writes it has "
            "finished, then try again."
        )
    return _Facts(
        size=size,
        mtime_ns=mtime,
        sha256=series_file_digest(list(hashes.values())),
        shape=series.shape,
        series={
            "key": series_key(series.series_uid),
            "slices": len(series.files),
            "files": sorted(hashes.values()),
        },
    )


class _GzipCheck:
    """Decompress a gzip stream chunk by chunk, only to learn whether it is whole.

    A truncated download leaves a stream whose decompressor never reaches end-of-stream
    (``eof`` stays False); zlib also verifies each member's CRC-32 and length. Several members
    and trailing zero padding are accepted, as Python's ``gzip`` (which nibabel uses) accepts
    them. Output is discarded; only its length is kept, and a stream that inflates beyond what
    the header declares is refused at once rather than inflated to its end.
    """

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
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
                if self.unpacked > self.limit:
                    raise DatasetError(
                        f"{self.name} inflates beyond the {self.limit} bytes its NIfTI header "
                        "declares; refused (a .nii.gz holds exactly its header and voxels). "
                        "Re-export it."
                    )
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
        if not label_shape:  # a DICOM SEG: placed on its image series, which checks it
            try:
                label_shape = load_seg_label(pair.label, pair.image)[0].shape
            except DatasetError as exc:
                problems.append(str(exc))
                continue
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
                series=fact.series,
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


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))

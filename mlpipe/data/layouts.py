"""Which files make a dataset: the Decathlon layout (``dataset.json``, ``imagesTr/``,
``labelsTr/``), folders of ``*_image``/``*_label`` pairs, plain folders of volumes, and CSV/JSON
manifests, each resolved to image/label pairs with the split they belong to.

An image may be a DICOM series folder: ``imagesTr/<case>/`` (files of one series), or
``<case>_image/`` in a plain folder, or a folder named in a manifest.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from mlpipe.core.errors import DatasetError
from mlpipe.data.volumes import file_kind, is_series, is_volume

_MAX_LISTED = 10

SPLITS = ("train", "val", "test")
"""Accepted split names; every split but ``test`` needs a label for each image."""


@dataclass(frozen=True)
class Pair:
    """An image and its label (``None`` for an unlabelled test image), absolute, for loading."""

    case: str
    image: Path
    label: Path | None
    split: str


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


_PLAIN_NAME = re.compile(r"^(?P<case>.+)_(?P<role>image|label)\.nii(?:\.gz)?$", re.IGNORECASE)


_PLAIN_SEG = re.compile(r"^(?P<case>.+)_(?P<role>label)\.dcm$", re.IGNORECASE)
"""A DICOM SEG label in a plain layout: ``<case>_label.dcm``."""


_PLAIN_SERIES = re.compile(r"^(?P<case>.+)_(?P<role>image)$", re.IGNORECASE)
"""A DICOM series folder in a plain layout: ``<case>_image/``."""


def _plain_match(path: Path) -> re.Match[str] | None:
    return (
        _PLAIN_NAME.match(path.name)
        or _PLAIN_SEG.match(path.name)
        or (_PLAIN_SERIES.match(path.name) if path.is_dir() else None)
    )


_FIX_LAYOUT = (
    "Use the Decathlon layout (imagesTr/, labelsTr/), name files <case>_image.nii.gz and "
    "<case>_label.nii.gz, or list the pairs in a CSV/JSON manifest."
)


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
    kind, info = file_kind(path)
    if kind == "missing":
        raise DatasetError(
            f"Dataset {given} does not exist (looked for {path}). Give the dataset folder or a "
            ".csv/.json manifest file."
        )
    if kind == "bad":
        raise DatasetError(f"Dataset {given}: {info}")
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
    if kind != "file":  # not a folder either: a manifest must be a regular file
        raise DatasetError(f"Dataset {given}: {path} is not a regular file or folder.")
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
        expected = root / label_dir / (f"{case}.nii.gz" if image.is_dir() else image.name)
        # A label that is there but unusable (a dangling link, a FIFO) was reported as such.
        if label is None and split != "test" and not os.path.lexists(expected):
            problems.append(f"Image {image} has no label: expected {expected}.")
        pairs.append(Pair(case=case, image=image, label=label, split=split))
    for case, label in sorted(labels.items()):
        expected = root / image_dir / label.name
        if case not in images and not os.path.lexists(expected):
            problems.append(f"Label {label} has no image: expected {expected}.")
    return pairs


def _volumes_by_case(folder: Path, problems: list[str]) -> dict[str, Path]:
    """Volumes directly in a folder, by case id (file name without ``.nii[.gz]``)."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        problems.append(f"{folder} cannot be listed: {exc.strerror or exc}.")
        return found
    for entry in entries:
        if entry.name.startswith("."):
            continue
        kind, info = file_kind(entry.path)  # never opens: a FIFO here would block forever
        if kind == "dir":
            if not is_series(entry.path):
                continue
            case = entry.name  # a DICOM series folder: imagesTr/<case>/
        elif is_volume(entry.name) or entry.name.lower().endswith(".dcm"):
            if kind != "file":
                problems.append(str(info))
                continue
            # a NIfTI volume, or a DICOM SEG label (or a one-slice image)
            case = _strip_suffix(entry.name) if is_volume(entry.name) else entry.name[:-4]
        else:
            continue
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
    for path in _walk_volumes(root, problems):
        match = _plain_match(path)
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
            suffix = ".nii.gz" if image.is_dir() else _suffix(image.name)
            expected = image.parent / f"{_plain_case(image)}_label{suffix}"
            problems.append(f"Image {image} has no label: expected {expected}.")
        pairs.append(Pair(case=case, image=image, label=label, split="train"))
    for case, label in sorted(labels.items()):
        if case not in images:
            expected = label.parent / f"{_plain_case(label)}_image{_suffix(label.name)}"
            problems.append(f"Label {label} has no image: expected {expected}.")
    _raise_all(problems)
    return _Layout(source=root, root=root, name=root.name, version=None, pairs=pairs, origins={})


def _plain_case(path: Path) -> str:
    match = _plain_match(path)
    return match["case"] if match else _strip_suffix(path.name)


def _walk_volumes(root: Path, problems: list[str]) -> Iterator[Path]:
    """Regular-file volumes under ``root`` in a stable order, skipping hidden files and folders;
    a ``<case>_image/`` DICOM series folder counts as one volume.

    Linked folders are not descended (``os.walk``'s default), so a link loop cannot recurse;
    a volume name that is not a regular file (a FIFO, a dangling or looping link) is a problem.
    """

    def unreadable(exc: OSError) -> None:
        problems.append(f"{exc.filename} cannot be listed: {exc.strerror or exc}.")

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        series = [d for d in dirs if _PLAIN_SERIES.match(d) and is_series(Path(folder) / d)]
        dirs[:] = [d for d in dirs if d not in series]  # a series folder is one volume
        yield from (Path(folder) / d for d in series)
        for name in sorted(files):
            if name.startswith(".") or not (is_volume(name) or _PLAIN_SEG.match(name)):
                continue
            path = Path(folder) / name
            kind, info = file_kind(path)
            if kind == "file":
                yield path
            elif kind != "dir":
                problems.append(str(info))


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

"""Which cases a batch segments: the volumes INPUT names (files, folders, a Decathlon folder's
``imagesTs/``, CSV/JSON manifests as ``mlog.dataset`` reads them), each named by a case id that
is also its output name, sorted, then this shard's share, and the label of each case.

Everything here runs before the run is created: a missing path, a bad manifest, two inputs
that give one case name or a bad ``--shard`` stop the batch with a one-line error (exit 2).
A file that exists but is broken (truncated, 4D, not NIfTI) is not refused here: it becomes a
failed case of the batch, so the other cases still get their masks.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from mlpipe.core.errors import DatasetError, UsageError
from mlpipe.data.volumes import is_volume

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


_MAX_LISTED = 5


@dataclass(frozen=True)
class Case:
    """One volume to segment.

    Attributes:
        name: the case id, a relative POSIX path without suffix (``ct_001``, ``site_a/ct_7``);
            the mask is written as ``<name>.nii.gz`` under ``--out``.
        image: the input file, absolute.
        label: its label file (``--labels``), or ``None``.
    """

    name: str
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class CaseList:
    """Every case of the batch (all shards), sorted by name, and where they came from.

    Attributes:
        cases: the cases, sorted by name.
        name: the dataset's name (``dataset.json``'s, a manifest's, else the first input's).
        version: its declared version, if any.
        source: the inputs, absolute, joined with ``;``.
    """

    cases: tuple[Case, ...]
    name: str
    version: str | None
    source: str


@dataclass(frozen=True)
class Shard:
    """``--shard I/N``: this machine's share, the cases whose position modulo N is I (0-based)."""

    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, cases: Sequence[Case]) -> tuple[Case, ...]:
        """Every N-th case starting at I: shards cover the sorted list exactly once, and a
        sorted list of similar cases gives each shard a similar share of large ones."""
        return tuple(cases[self.index :: self.count])


def parse_shard(text: str | None) -> Shard:
    """``"2/8"`` -> ``Shard(2, 8)``; ``None`` -> the whole batch.

    Raises:
        UsageError: not ``I/N`` with ``0 <= I < N``.
    """
    if text is None:
        return Shard()
    match = _SHARD_RE.match(text)
    if not match:
        raise UsageError(
            f"--shard {text!r} is not I/N; give this machine's index and the number of "
            "machines, e.g. --shard 0/4 ... --shard 3/4 (a Kubernetes Indexed Job passes "
            "$JOB_COMPLETION_INDEX as I)."
        )
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise UsageError(
            f"--shard {text}: the index is 0-based and must be below the count, so with "
            f"{count} machine(s) give 0/{count} to {max(count - 1, 0)}/{count}."
        )
    return Shard(index, count)


def list_cases(inputs: Sequence[str]) -> CaseList:
    """Find every input volume and name its case.

    Args:
        inputs: files (``.nii``/``.nii.gz``), folders (searched recursively; labels and
            ``labels*/`` skipped), Decathlon folders (their ``imagesTs/``), or ``.csv``/
            ``.json`` manifests (every image they list).

    Returns:
        The cases sorted by name.

    Raises:
        UsageError: no input, a path that does not exist, a Decathlon folder without
            ``imagesTs/``, no volume at all, or two volumes with one case name.
        DatasetError: a manifest that does not read.
    """
    if not inputs:
        raise UsageError("Give at least one INPUT: a NIfTI file, a folder or a manifest.")
    found: list[Case] = []
    name, version = None, None
    for given in inputs:
        cases, declared_name, declared_version = _cases_of(given)
        found += cases
        name = name or declared_name
        version = version or declared_version
    by_name: dict[str, Case] = {}
    clashes = []
    for case in found:
        if case.name in by_name and by_name[case.name].image != case.image:
            clashes.append(f"{by_name[case.name].image} and {case.image} are both {case.name!r}")
        by_name.setdefault(case.name, case)
    if clashes:
        listed = "; ".join(clashes[:_MAX_LISTED]) + ("; ..." if len(clashes) > _MAX_LISTED else "")
        raise UsageError(
            f"{len(clashes)} case name(s) would write the same mask: {listed}. Give the inputs "
            "as one folder (cases are named by their path under it) or rename the files."
        )
    first = Path(inputs[0]).expanduser().absolute()
    return CaseList(
        cases=tuple(sorted(by_name.values(), key=lambda c: c.name)),
        name=name or (first.name if first.is_dir() else first.parent.name) or "inputs",
        version=version,
        source=";".join(str(Path(i).expanduser().absolute()) for i in inputs),
    )


def attach_labels(cases: Sequence[Case], labels: str | None) -> tuple[Case, ...]:
    """Give each case its label from ``--labels DIR``: ``<case>.nii[.gz]`` or
    ``<case>_label.nii[.gz]`` (the image's own name works too for Decathlon ``labelsTs/``).

    Raises:
        UsageError: DIR is not a folder, or some cases have no label there (listed).
    """
    if labels is None:
        return tuple(cases)
    root = Path(labels).expanduser()
    if not root.is_dir():
        raise UsageError(f"--labels {labels} is not a folder; give the folder of label files.")
    out, missing = [], []
    for case in cases:
        candidates = [
            root / f"{case.name}{suffix}"
            for suffix in (".nii.gz", ".nii", "_label.nii.gz", "_label.nii")
        ] + [root / PurePosixPath(case.name).parent / case.image.name]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            missing.append(case.name)
        out.append(replace(case, label=label.absolute() if label else None))
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (", ..." if len(missing) > _MAX_LISTED else "")
        raise UsageError(
            f"--labels {labels}: no label for {len(missing)} case(s) ({listed}); expected "
            f"<case>.nii.gz or <case>_label.nii.gz there. Leave out --labels to segment "
            "without scoring."
        )
    return tuple(out)


def batch_id_for(model: str, cases: Sequence[Case], out: str) -> str:
    """A batch id that every shard and every rerun of the same command derives alike.

    From the model (pinned version), the full sorted case list and ``--out``: machines that
    run shards of one batch agree on it without being told, and a resumed batch keeps it.
    """
    digest = hashlib.sha256()
    for part in (model, out, *(f"{c.name}\0{c.image}" for c in cases)):
        digest.update(part.encode("utf-8") + b"\n")
    return "b-" + digest.hexdigest()[:12]


def _cases_of(given: str) -> tuple[list[Case], str | None, str | None]:
    path = Path(given).expanduser().absolute()
    if not path.exists():
        raise UsageError(
            f"INPUT {given} does not exist (looked for {path}). Give NIfTI files, folders of "
            "them, or a .csv/.json manifest."
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".json"):
            return _manifest_cases(path)
        if not (is_volume(path) or suffix in (".zip", ".dcm")):
            raise UsageError(
                f"INPUT {given} is neither a .nii/.nii.gz volume, a DICOM series (.zip, .dcm) "
                "nor a .csv/.json manifest."
            )
        return [Case(_case_name(path.name), path)], None, None
    if (path / "imagesTr").is_dir() or (path / "dataset.json").is_file():
        return _decathlon_cases(path)
    return _folder_cases(path, path), None, None


def _decathlon_cases(root: Path) -> tuple[list[Case], str | None, str | None]:
    from mlpipe.data.layouts import _declared, _read_json

    test = root / "imagesTs"
    if not test.is_dir():
        raise UsageError(
            f"INPUT {root} is a Decathlon dataset without imagesTs/, the images to segment. "
            f"Give {root / 'imagesTr'} to segment the training images instead."
        )
    meta = _read_json(root / "dataset.json") if (root / "dataset.json").is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    where = root / "dataset.json"
    return (
        _folder_cases(test, test),
        _declared(meta, "name", where) or root.name,
        _declared(meta, "version", where),
    )


def _folder_cases(folder: Path, root: Path) -> list[Case]:
    from mlpipe.monitor.new_volumes import find_images

    try:
        images = find_images(folder)
    except UsageError as exc:
        raise UsageError(f"INPUT {folder}: {exc}") from None
    cases = []
    for image in images:
        relative = PurePosixPath(Path(os.path.relpath(image, root)).as_posix())
        cases.append(Case(str(relative.parent / _case_name(relative.name)), image))
    return cases


def _manifest_cases(path: Path) -> tuple[list[Case], str | None, str | None]:
    from mlpipe.data.layouts import _discover

    try:
        layout = _discover(path)
    except DatasetError as exc:
        raise UsageError(f"INPUT {path}: {exc}") from None
    cases = [Case(_safe_case(pair.case), pair.image) for pair in layout.pairs]
    return cases, layout.name, layout.version


def _case_name(file_name: str) -> str:
    stem = re.sub(r"\.(nii(\.gz)?|zip|dcm)$", "", file_name, flags=re.IGNORECASE)
    return re.sub(r"_image$", "", stem, flags=re.IGNORECASE) or stem


def _safe_case(name: str) -> str:
    """A manifest's case id as an output name: no absolute path, no ``..``."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", "..", ".")]
    return "/".join(parts) or "case"

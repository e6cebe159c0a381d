"""The loop of one worker: a reader thread checks the next volume while the model segments the
current one, and every case ends as a :class:`CaseRow` (written, skipped or failed).

Per case, the reader thread hashes the file and checks that it is whole (``examine_file``, the
check ``build_manifest`` runs), reads its header (3D only) and profiles it against the training
geometry (``Segmenter.check``: the voxels are read here, so inference finds the file in the page
cache). The calling thread runs ``Segmenter.predict`` (the pyfunc, once loaded), writes the mask
through the output writers and, given a label, scores it (``mlpipe.inference.scores``). One bad
case becomes a failed row with its reason; the loop goes on.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import DatasetError, InterruptedRunError
from mlpipe.inference.inputs import InputRejected

if TYPE_CHECKING:
    from mlpipe.inference.segmenter import CheckedVolume, Segmenter
    from mlpipe.predict.inputs import Case
    from mlpipe.predict.outputs import MaskWriter, OutputStore

logger = logging.getLogger("mlpipe.predict")

WRITTEN, SKIPPED, FAILED = "written", "skipped", "failed"

PREFETCH = 1
"""Volumes checked ahead of the one being segmented: reading overlaps inference, and at most
three volumes (one segmented, one ready, one being read) are in memory."""


@dataclass
class CaseRow:
    """What became of one case: a row of ``predictions.csv``.

    ``profile`` (the input's ``profile_volume``) feeds the batch's drift summary and is not
    a column; ``scores`` are ``dice_<c>``/``hd95_<c>``/``volume_error_<c>`` with ``--labels``.
    """

    case: str
    status: str
    sha256: str = ""
    shape: str = ""
    spacing: str = ""
    seconds: float | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    error: str = ""
    outputs: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    profile: dict | None = None
    file: str = ""
    bytes: int = 0

    def record(self) -> dict[str, Any]:
        """The CSV columns: case, input sha256, shape, spacing, seconds, volumes, status, error."""
        row: dict[str, Any] = {
            "case": self.case,
            "sha256": self.sha256,
            "shape": self.shape,
            "spacing": self.spacing,
            "seconds": None if self.seconds is None else round(self.seconds, 4),
        }
        row.update({f"volume_ml_{c}": v for c, v in self.volumes_ml.items()})
        row.update({"status": self.status, "error": self.error})
        row.update(self.scores)
        return row


@dataclass
class _Prepared:
    case: Case
    row: CaseRow
    checked: CheckedVolume | None = None
    scratch: tempfile.TemporaryDirectory | None = None  # a series read into a NIfTI


def process_cases(
    segmenter: Segmenter,
    cases: Sequence[Case],
    store: OutputStore,
    writers: Sequence[MaskWriter],
    *,
    skip: Iterable[str] = (),
    on_row: Callable[[CaseRow], None],
    hash_skipped: bool = True,
    stop: threading.Event | None = None,
) -> None:
    """Segment ``cases`` in order; ``on_row`` gets each case's row as it ends.

    Args:
        segmenter: the loaded model with its geometry limits.
        cases: this worker's cases.
        store: where outputs go; writers: the output formats.
        skip: case names whose outputs already exist (resume): hashed, not segmented.
        on_row: called in this thread for every case, in order.
        hash_skipped: hash skipped cases too, so the run's dataset digest covers the batch.
        stop: set by a SIGTERM handler: the case in progress finishes, then the loop ends.

    Raises:
        InterruptedRunError: ``stop`` was set (exit 143; the run is marked KILLED).
    """
    skip = set(skip)
    ready: queue.Queue[_Prepared | None] = queue.Queue(maxsize=PREFETCH)
    ended = threading.Event()  # the loop no longer listens: the reader stops
    failure: list[BaseException] = []

    def read() -> None:
        try:
            for case in cases:
                if ended.is_set():
                    return
                item = _prepare(segmenter, case, skipped=case.name in skip, hash_it=hash_skipped)
                while not ended.is_set():
                    try:
                        ready.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # a bug in the reader: hand it to the loop
            failure.append(exc)
        _put_end(ready, ended)

    reader = threading.Thread(target=read, name="mlpipe-predict-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                break
            raise_if_stopped(stop)
            try:
                if item.checked is not None:
                    _segment(segmenter, item, store, writers)
            finally:
                if item.scratch is not None:
                    item.scratch.cleanup()
            on_row(item.row)
        if failure:
            raise failure[0]
    finally:
        ended.set()
        reader.join(timeout=5)


def raise_if_stopped(stop: threading.Event | None) -> None:
    """Raise once SIGTERM asked the batch to stop: between cases, never inside one (a signal
    raised inside the model's reading code would pass for a bad input file)."""
    if stop is not None and stop.is_set():
        raise InterruptedRunError(
            "Terminated (SIGTERM) after the case in progress; run the same command again to "
            "finish the batch.",
            signum=15,
        )


def _put_end(ready: queue.Queue, ended: threading.Event) -> None:
    """Tell the loop the reader is done (unless the loop already stopped listening)."""
    while not ended.is_set():
        try:
            ready.put(None, timeout=0.2)
            return
        except queue.Full:
            continue


def _prepare(segmenter: Segmenter, case: Case, *, skipped: bool, hash_it: bool) -> _Prepared:
    """Hash and check one case (the reader thread's part); failures become the row's error."""
    from mlpipe.data.dataset import examine_file
    from mlpipe.data.volumes import is_series

    name = case.image.name
    series = is_series(case.image)
    suffix = "" if series else ".nii.gz" if name.lower().endswith(".gz") else ".nii"
    row = CaseRow(case=case.name, status=SKIPPED if skipped else FAILED, file=case.name + suffix)
    if skipped and not hash_it:
        return _Prepared(case, row)
    scratch = None
    try:
        facts = examine_file(case.image)  # a series: one hash over its files' hashes
        row.sha256, row.bytes = facts.sha256, facts.size
        row.shape = "x".join(str(n) for n in facts.shape)
        if skipped:
            return _Prepared(case, row)
        volume, extra = case.image, None
        if series:
            # The pyfunc reads NIfTI: the series goes in as a NIfTI on its own grid, as serve does
            scratch = tempfile.TemporaryDirectory(prefix="mlpipe-predict-series-")
            volume, extra = _series_as_nifti(case.image, Path(scratch.name))
        header = segmenter.read_header(volume, name)
        row.spacing = "x".join(f"{s:g}" for s in header.spacing)
        checked = segmenter.check(volume, name, case.name, header=header, extra=extra)
    except (DatasetError, InputRejected) as exc:
        if scratch is not None:
            scratch.cleanup()
        row.error = _scrub(exc.message if isinstance(exc, InputRejected) else str(exc), case)
        return _Prepared(case, row)
    row.profile = checked.profile
    return _Prepared(case, row, checked, scratch)


def _series_as_nifti(image: Path, folder: Path) -> tuple[Path, dict]:
    """A DICOM series written as a NIfTI on its own grid, and how the profile names it (salted
    UID hash and file hashes: never a header attribute)."""
    import nibabel as nib

    from mlpipe.data.dicom import load_series, open_series
    from mlpipe.inference.segmenter import series_record

    with open_series(image) as series:
        path = folder / "series.nii"
        nib.save(nib.Nifti1Image(load_series(series), series.affine), path)
        return path, {"series": series_record(series)}


def _segment(
    segmenter: Segmenter, item: _Prepared, store: OutputStore, writers: Sequence[MaskWriter]
) -> None:
    """Predict, write and score one checked case (the calling thread's part)."""
    row, case = item.row, item.case
    started = time.perf_counter()
    try:
        assert item.checked is not None
        result = segmenter.predict(item.checked, case.name)
        for writer in writers:
            row.outputs += writer.write(store, case, result)
        row.volumes_ml = {c: float(v) for c, v in result.class_volumes_ml.items()}
        if case.label is not None:
            row.scores = _score(result, case, num_classes=len(result.class_volumes_ml) + 1)
    except InputRejected as exc:
        row.error = _scrub(exc.message, case)
        return
    except Exception as exc:  # one case's bug or a refused write must not stop the batch
        logger.debug("case %s failed", case.name, exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.error = _scrub(f"{type(exc).__name__}: {first}"[:500], case)
        return
    row.seconds = time.perf_counter() - started
    row.status = WRITTEN


def _score(result: Any, case: Case, *, num_classes: int) -> dict[str, float]:
    import gzip

    import nibabel as nib
    import numpy as np

    from mlpipe.inference.scores import score_against_label

    mask = nib.Nifti1Image.from_bytes(gzip.decompress(result.mask))
    prediction = np.asarray(mask.dataobj)
    assert case.label is not None
    return score_against_label(prediction, case.label, num_classes=num_classes)


def _scrub(message: str, case: Case) -> str:
    """The message with the input's folder left out: the run records the case, not paths."""
    message = message.replace(str(case.image), case.image.name)
    return message.replace(str(case.image.parent) + "/", "").strip()

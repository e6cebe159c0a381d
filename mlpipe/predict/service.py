"""``mlpipe predict``: check everything, resolve and load the model once, segment this shard's
cases, and record the batch as an inference run.

Order matters for the exit codes: options, the model URI, the inputs, ``--labels``, ``--out``
and the model's loading are all checked before the run is created (exit 2, nothing created);
from then on a bad case is a failed row (exit 1 at the end), and Ctrl-C or SIGTERM marks the
run KILLED. The model and inputs come through the inference core ``mlpipe serve`` uses
(``resolve_model``, ``download_model``/``load_local``, ``GeometryLimits``, ``Segmenter``).
"""

from __future__ import annotations

import contextlib
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpipe.core.errors import InterruptedRunError, UsageError
from mlpipe.inference.geometry import DEFAULT_RANGE_FACTOR
from mlpipe.predict.batch import FAILED, SKIPPED, WRITTEN, CaseRow

if TYPE_CHECKING:
    from mlpipe.core.tracking import Tracking
    from mlpipe.inference.geometry import GeometryLimits
    from mlpipe.inference.models import ModelSource
    from mlpipe.predict.inputs import Case, CaseList, Shard
    from mlpipe.predict.outputs import MaskWriter, OutputStore

Echo = Callable[[str], None]

_BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class PredictRequest:
    """What ``mlpipe predict`` was asked for.

    Attributes:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``.
        inputs: files, folders, Decathlon folders or manifests.
        out: a local folder or ``s3://bucket/prefix``.
        labels: a folder of labels: score each mask (Dice, HD95).
        device: ``cpu`` or ``cuda`` [default: where the model loads, CUDA if there].
        workers: processes on this machine, each loading the model once.
        shard: ``I/N``: this machine's share of the sorted cases.
        overwrite: segment cases whose output already exists.
        batch_id: names the batch across shards [default: derived from model, cases, out].
        formats: output formats (``mlpipe.predict.outputs.WRITERS``).
        range_factor: as ``mlpipe serve --range-factor`` (0: no geometry check).
        tracking_uri: the tracking server.
    """

    model_uri: str
    inputs: tuple[str, ...]
    out: str
    labels: str | None = None
    device: str | None = None
    workers: int = 1
    shard: str | None = None
    overwrite: bool = False
    batch_id: str | None = None
    formats: tuple[str, ...] = ("nifti",)
    range_factor: float = DEFAULT_RANGE_FACTOR
    tracking_uri: str | None = None

    def check(self) -> None:
        """Raises: UsageError naming the option, the value and what is expected."""
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers}: expected 1 or more.")
        if self.batch_id is not None and not _BATCH_ID_RE.match(self.batch_id):
            raise UsageError(
                f"--batch-id {self.batch_id!r}: use letters, digits, '.', '_' and '-' (at most "
                "100, starting with a letter or digit), e.g. --batch-id ct-2026-03."
            )
        if self.range_factor != 0 and self.range_factor < 1:
            raise UsageError(f"--range-factor {self.range_factor}: expected 1 or more, or 0.")
        if not self.out:
            raise UsageError("--out is required: a folder or s3://bucket/prefix for the masks.")


def _refuse_nifti_for_dicom_seg(cases: Sequence[Case]) -> None:
    """A DICOM SEG references its source series: a NIfTI case has none to reference.

    Raises:
        UsageError: naming the first NIfTI cases.
    """
    from mlpipe.data.volumes import is_series

    nifti = [case.name for case in cases if not is_series(case.image)]
    if nifti:
        listed = ", ".join(nifti[:5]) + (", ..." if len(nifti) > 5 else "")
        raise UsageError(
            f"--format dicom-seg needs DICOM series inputs to reference, but {len(nifti)} "
            f"case(s) are NIfTI ({listed}). Use --format nifti for them, or give the series."
        )


@dataclass
class BatchResult:
    """The outcome of one batch (one shard): its rows, metrics and where the run is."""

    batch_id: str
    shard: str
    rows: list[CaseRow]
    metrics: dict[str, float]
    run_id: str
    experiment: str
    model_label: str
    out: str
    link: str | None = None
    drift_verdict: str = "not checked"
    drifted: list[str] = field(default_factory=list)
    removed_partials: int = 0

    @property
    def failed(self) -> list[CaseRow]:
        return [r for r in self.rows if r.status == FAILED]


def run_batch(request: PredictRequest, *, echo: Echo | None = None) -> BatchResult:
    """Segment this shard's cases into ``request.out`` and record the batch as a run.

    Returns:
        The result; ``failed`` lists the cases that did not get a mask (the CLI exits 1).

    Raises:
        UsageError, NotFoundError, TrackingUnavailableError, DatasetError: before anything
            is created (exit 2).
        InterruptedRunError, KeyboardInterrupt: Ctrl-C or SIGTERM; the run is KILLED.
    """
    from mlpipe.inference.geometry import GeometryLimits
    from mlpipe.inference.models import (
        check_device,
        download_model,
        load_local,
        place_model,
        resolve_model,
    )
    from mlpipe.predict.inputs import attach_labels, batch_id_for, list_cases, parse_shard
    from mlpipe.predict.outputs import done_cases, make_writers, open_store
    from mlpipe.registry.promotion import connect

    echo = echo or (lambda _msg: None)
    request.check()
    check_device(request.device)
    shard = parse_shard(request.shard)
    writers = make_writers(request.formats)
    listed = list_cases(request.inputs)
    mine = attach_labels(shard.take(listed.cases), request.labels)
    if "dicom-seg" in request.formats:
        _refuse_nifti_for_dicom_seg(listed.cases)
    tracking = connect(request.tracking_uri)
    source = resolve_model(tracking, request.model_uri)
    store = open_store(request.out, tracking.settings)
    batch_id = request.batch_id or batch_id_for(source.load_uri, listed.cases, store.uri)
    removed = store.remove_partials()
    skip = set() if request.overwrite else done_cases(mine, writers, store.existing())
    limits = GeometryLimits.from_profile(source.training_profile, request.range_factor)
    if limits is None and request.range_factor and source.training_profile is None:
        echo(f"Warning: {source.label} has no training data profile; geometry is not checked.")

    with tempfile.TemporaryDirectory(prefix="mlpipe-predict-model-") as folder:
        echo(f"Loading {source.label} ({source.load_uri}) ...")
        local = download_model(source, tracking, Path(folder))
        model, device = None, request.device or "auto"
        if request.workers == 1:
            model = load_local(local, source)
            device = place_model(model, request.device)
        batch = _Batch(
            request=request,
            tracking=tracking,
            source=source,
            listed=listed,
            mine=mine,
            skip=skip,
            store=store,
            writers=writers,
            limits=limits,
            model=model,
            model_dir=str(local),
            batch_id=batch_id,
            shard=shard,
            device=device,
        )
        echo(
            f"Batch {batch_id}, shard {shard}: {len(mine)} of {len(listed.cases)} case(s); "
            f"{len(skip)} already written under {store.uri}"
            + (" (skipped; --overwrite redoes them)" if skip else "")
            + f"; {source.label} on {device}"
            + (f", {request.workers} workers" if request.workers > 1 else "")
        )
        result = _run_recorded(batch, echo)
        result.removed_partials = removed
        return result


@dataclass(frozen=True)
class _Batch:
    """Everything checked and loaded before the run exists: what the recorded part needs."""

    request: PredictRequest
    tracking: Tracking
    source: ModelSource
    listed: CaseList
    mine: tuple[Case, ...]
    skip: set[str]
    store: OutputStore
    writers: list[MaskWriter]
    limits: GeometryLimits | None
    model: Any  # the loaded pyfunc; None with --workers > 1 (each worker loads its own)
    model_dir: str
    batch_id: str
    shard: Shard
    device: str


def _run_recorded(batch: _Batch, echo: Echo) -> BatchResult:
    """Create the run, run the loop (in this process or in workers), record, end the run."""
    from mlpipe.inference.segmenter import Segmenter
    from mlpipe.predict.batch import process_cases
    from mlpipe.predict.outputs import store_spec
    from mlpipe.predict.record import (
        RunPlan,
        dataset_of,
        drift_summary,
        drift_tags,
        record_results,
        start_run,
    )
    from mlpipe.predict.workers import WorkerSpec, run_in_workers, threads_per_worker

    request, tracking, source, listed = batch.request, batch.tracking, batch.source, batch.listed
    mine, skip, store, writers = batch.mine, batch.skip, batch.store, batch.writers
    plan = RunPlan(
        batch_id=batch.batch_id,
        shard=batch.shard,
        out=store.uri,
        inputs=listed.source,
        device=batch.device,
        workers=request.workers,
        overwrite=request.overwrite,
        labels=request.labels is not None,
        formats=tuple(w.format for w in writers),
        cases=len(mine),
        skipped=len(skip),
    )
    run_id, experiment_id, experiment = start_run(tracking, source, plan)
    rows: list[CaseRow] = []
    progress = _Progress(len(mine) - len(skip), echo)
    status, began = "FAILED", time.perf_counter()

    def on_row(row: CaseRow) -> None:
        rows.append(row)
        progress(row)

    stop = threading.Event()
    try:
        with _sigterm_sets(stop):
            if batch.model is not None:
                segmenter = Segmenter(model=batch.model, source=source, limits=batch.limits)
                process_cases(segmenter, mine, store, writers, skip=skip, on_row=on_row, stop=stop)
            else:
                spec = WorkerSpec(
                    model_dir=batch.model_dir,
                    source=source,
                    limits=batch.limits,
                    device=request.device,
                    store=dict(store_spec(store)),
                    formats=plan.formats,
                    threads=threads_per_worker(request.workers),
                )
                run_in_workers(spec, mine, skip, request.workers, on_row, stop)
        status = "FINISHED"
    except (KeyboardInterrupt, InterruptedRunError):
        status = "KILLED"
        raise
    finally:
        seconds = time.perf_counter() - began
        order = {c.name: i for i, c in enumerate(mine)}
        rows.sort(key=lambda r: order.get(r.case, len(order)))
        try:
            drift = drift_summary(source, rows, listed.source)
            metrics = record_results(
                tracking,
                run_id,
                rows,
                seconds=seconds,
                dataset=dataset_of(listed, rows),
                drift=drift,
            )
        finally:
            tracking.finish(run_id, status, echo=echo)
    tags = drift_tags(drift)
    return BatchResult(
        batch_id=batch.batch_id,
        shard=str(batch.shard),
        rows=rows,
        metrics=metrics,
        run_id=run_id,
        experiment=experiment,
        model_label=source.label,
        out=store.uri,
        link=tracking.ui_link(experiment_id, run_id),
        drift_verdict=tags["mlpipe.drift.verdict"],
        drifted=list(drift.drifted) if drift else [],
    )


class _Progress:
    """One line per case with the rate so far and the time left; skipped cases stay quiet."""

    def __init__(self, total: int, echo: Echo):
        self.total, self.echo = total, echo
        self.done = 0
        self.began = time.perf_counter()

    def __call__(self, row: CaseRow) -> None:
        if row.status == SKIPPED:
            return
        self.done += 1
        elapsed = time.perf_counter() - self.began
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        width = len(str(self.total))
        what = f"{row.seconds:.2f} s" if row.status == WRITTEN and row.seconds is not None else ""
        if row.status == FAILED:
            what = f"FAILED: {row.error}"
        self.echo(
            f"[{self.done:>{width}}/{self.total}] {row.case} {what} | {rate:.2f} cases/s, "
            f"ETA {_clock(left)}"
        )


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


@contextlib.contextmanager
def _sigterm_sets(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (Kubernetes stopping a pod, ``kill``) sets ``stop``: the batch ends after the
    case in progress, its run KILLED, exit 143. Raising from the handler instead would land
    inside whatever library code runs, which may take it for a bad input file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

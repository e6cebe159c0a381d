"""``--workers N``: N processes on one machine, each loading the model once and running the
batch loop (with its own reader thread) on every N-th case of this shard.

The parent downloads the model once; each worker loads that folder. Rows come back through a
queue, so the parent alone prints progress and records the run. A worker that dies (out of
memory, a crash in a native library) does not hang the batch: its remaining cases are listed
as failed with the reason.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlpipe.predict.batch import FAILED, CaseRow, raise_if_stopped

if TYPE_CHECKING:
    from mlpipe.inference.geometry import GeometryLimits
    from mlpipe.inference.models import ModelSource
    from mlpipe.predict.inputs import Case

_POLL_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its own segmenter and store (all picklable)."""

    model_dir: str
    source: ModelSource
    limits: GeometryLimits | None
    device: str | None
    store: dict
    formats: tuple[str, ...]
    threads: int


def run_in_workers(
    spec: WorkerSpec,
    cases: Sequence[Case],
    skip: set[str],
    workers: int,
    on_row: Callable[[CaseRow], None],
    stop: threading.Event | None = None,
) -> None:
    """Run the cases in ``workers`` processes; ``on_row`` is called here for every case.

    Raises:
        KeyboardInterrupt, InterruptedRunError: passed on after the workers are stopped.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    results = context.Queue()
    parts = [list(cases[w::workers]) for w in range(workers)]
    processes = [
        context.Process(
            target=_worker_main,
            args=(spec, w, parts[w], skip & {c.name for c in parts[w]}, results),
            name=f"mlpipe-predict-{w}",
            daemon=True,
        )
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    seen: list[set[str]] = [set() for _ in range(workers)]
    pending = {w for w in range(workers) if parts[w]}
    try:
        while pending:
            raise_if_stopped(stop)
            try:
                kind, w, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                for w in sorted(pending):
                    if not processes[w].is_alive() and results.empty():
                        code = processes[w].exitcode
                        _fail_rest(parts[w], seen[w], f"worker {w} exited (code {code})", on_row)
                        pending.discard(w)
                continue
            if kind == "row":
                seen[w].add(payload.case)
                on_row(payload)
            elif kind == "error":
                _fail_rest(parts[w], seen[w], f"worker {w}: {payload}", on_row)
                pending.discard(w)
            else:
                pending.discard(w)
    finally:
        for process in processes:
            if process.is_alive() and pending:
                process.terminate()
        for process in processes:
            process.join(timeout=10)


def _fail_rest(
    part: Sequence[Case], seen: set[str], reason: str, on_row: Callable[[CaseRow], None]
) -> None:
    for case in part:
        if case.name not in seen:
            seen.add(case.name)
            on_row(CaseRow(case=case.name, status=FAILED, error=reason))


def _worker_main(spec: WorkerSpec, index: int, cases: list, skip: set, results) -> None:
    """A worker process: load the model once, run the loop, send each row to the parent."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        import torch

        from mlpipe.core.tracking import quiet_mlflow_logs
        from mlpipe.inference.models import load_local, place_model
        from mlpipe.inference.segmenter import Segmenter
        from mlpipe.predict.batch import process_cases
        from mlpipe.predict.outputs import make_writers, reopen_store

        torch.set_num_threads(max(1, spec.threads))
        quiet_mlflow_logs()
        model = load_local(spec.model_dir, spec.source)
        place_model(model, spec.device)
        segmenter = Segmenter(model=model, source=spec.source, limits=spec.limits)
        process_cases(
            segmenter,
            cases,
            reopen_store(spec.store),
            make_writers(spec.formats),
            skip=skip,
            on_row=lambda row: results.put(("row", index, row)),
        )
        results.put(("done", index, None))
    except BaseException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        results.put(("error", index, f"{type(exc).__name__}: {first}"[:500]))


def threads_per_worker(workers: int) -> int:
    """CPU threads each worker's torch may use, so N workers do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))

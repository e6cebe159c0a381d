"""``mlpipe predict --summary BATCH_ID``: the shards of one batch gathered from their inference
runs into one table, with the shards that never reported.

A shard may have several runs (a crash, then a resumed run): the newest FINISHED one speaks for
it (its ``predictions.csv`` lists every case of the shard, written now or before), else the
newest run at all, shown with its status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlpipe.core.errors import NotFoundError, UsageError
from mlpipe.core.tracking import translate_errors
from mlpipe.predict.record import INFERENCE_SUFFIX, TAG

if TYPE_CHECKING:
    from mlpipe.core.tracking import Tracking


@dataclass(frozen=True)
class ShardRow:
    """One shard as its newest (FINISHED first) run reports it."""

    index: int
    run_id: str
    status: str
    runs: int
    cases: int
    done: int
    failed: int
    cases_per_second: float | None
    drift: str


@dataclass
class BatchSummary:
    """All shards of a batch; ``missing`` are the indices no run reported."""

    batch_id: str
    model: str
    count: int
    shards: list[ShardRow]
    missing: list[int] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return sum(s.cases for s in self.shards)

    @property
    def done(self) -> int:
        return sum(s.done for s in self.shards)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.shards)

    @property
    def complete(self) -> bool:
        """Every shard reported, finished, with no failed case."""
        return (
            not self.missing
            and not self.failed
            and all(s.status == "FINISHED" for s in self.shards)
        )

    def render(self) -> str:
        """The table for the terminal, then the totals and what is missing."""
        header = ("shard", "run", "status", "cases", "done", "failed", "cases/s", "drift")
        body = [
            (
                f"{s.index}/{self.count}",
                s.run_id[:12] + (f" (+{s.runs - 1})" if s.runs > 1 else ""),
                s.status,
                str(s.cases),
                str(s.done),
                str(s.failed),
                "-" if s.cases_per_second is None else f"{s.cases_per_second:.2f}",
                s.drift,
            )
            for s in self.shards
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [f"Batch {self.batch_id} ({self.model}): {self.count} shard(s)"]
        for row in [header, *body]:
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        lines.append(
            f"total: {self.cases} case(s), {self.done} with a mask, {self.failed} failed, "
            f"{len(self.shards)}/{self.count} shard(s) reported"
        )
        if self.missing:
            lines.append(
                "missing shard(s): "
                + ", ".join(f"{i}/{self.count}" for i in self.missing)
                + " (no run; start them with --shard I/N)"
            )
        return "\n".join(lines)


def summarize_batch(tracking: Tracking, batch_id: str) -> BatchSummary:
    """Find the batch's inference runs in every ``*-inference`` experiment and gather them.

    Raises:
        UsageError: a batch id with a quote; NotFoundError: no run has this batch id.
    """
    if "'" in batch_id or "\\" in batch_id:
        raise UsageError(f"--summary {batch_id!r}: a batch id has no quotes or backslashes.")
    client = tracking.client
    with translate_errors("inference experiments"):
        experiments = client.search_experiments(filter_string=f"name LIKE '%{INFERENCE_SUFFIX}'")
        ids = [e.experiment_id for e in experiments]
        runs = []
        if ids:
            runs = client.search_runs(
                ids,
                filter_string=f"tags.`{TAG}batch_id` = '{batch_id}'",
                order_by=["attributes.start_time DESC"],
                max_results=5000,
            )
    if not runs:
        raise NotFoundError(
            f"No inference run has batch id {batch_id!r} (looked in {len(ids)} *-inference "
            "experiment(s)). The id is printed by `mlpipe predict` and tagged "
            f"{TAG}batch_id on its runs."
        )
    by_shard: dict[int, list] = {}
    count = 1
    for run in runs:
        tags = run.data.tags
        count = max(count, int(tags.get(TAG + "shard_count", "1")))
        by_shard.setdefault(int(tags.get(TAG + "shard_index", "0")), []).append(run)
    shards = []
    for index in sorted(by_shard):
        group = by_shard[index]  # newest first
        run = next((r for r in group if r.info.status == "FINISHED"), group[0])
        metrics = run.data.metrics
        shards.append(
            ShardRow(
                index=index,
                run_id=run.info.run_id,
                status=run.info.status,
                runs=len(group),
                cases=int(metrics.get("cases", 0)),
                done=int(metrics.get("written", 0) + metrics.get("skipped", 0)),
                failed=int(metrics.get("failed", 0)),
                cases_per_second=metrics.get("cases_per_second"),
                drift=run.data.tags.get("mlpipe.drift.verdict", "-"),
            )
        )
    first = runs[0].data.tags
    model = f"{first.get(TAG + 'model') or first.get(TAG + 'model_uri', '?')}"
    if first.get(TAG + "model_version"):
        model += f" v{first[TAG + 'model_version']}"
    return BatchSummary(
        batch_id=batch_id,
        model=model,
        count=count,
        shards=shards,
        missing=[i for i in range(count) if i not in by_shard],
    )

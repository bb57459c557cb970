"""Retention: the background pruner of `appt serve`, and `appt prune`.

Nothing stored is needed for ever: an inbox entry only while its message can
still come again, a finished workflow only for audit, the state log for as
long as the operator chooses. The pruner deletes what is past its table's
retention in small batches, each its own short transaction, pausing between
them so the worker's commits interleave instead of queueing behind one long
delete. What a table's rule keeps (``schema.PRUNABLE``: unfinished
workflows, their records, histories being paged) stays whatever its age.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

from consumer import metrics
from consumer.logs import get_logger
from consumer.messages import utcnow
from consumer.periodic import every
from consumer.settings import Settings
from consumer.store.base import Store

log = get_logger(__name__)

# A history read protects that appointment's records this long (seconds): a
# reader paging through it (`appt history`, the read API) never loses its middle.
PAGING_GRACE = 3600.0
# Between two batches of one table: room for the worker's commits.
BATCH_PAUSE = 0.05


def retentions(settings: Settings) -> dict[str, float]:
    """Seconds to keep each prunable table's rows (0: keep), in the order they are pruned."""
    return {
        "history_reads": PAGING_GRACE,
        "inbox": settings.inbox_retention,
        "workflows": settings.workflow_retention,
        "state_log": settings.state_log_retention,
    }


@dataclass(frozen=True)
class TableReport:
    """One table after a pass: rows pruned (or, dry, that would be) and its oldest row."""

    table: str
    retention: float
    cutoff: datetime | None
    pruned: int
    oldest: datetime | None

    def as_json(self) -> dict[str, object]:
        return {
            "table": self.table,
            "retention_s": self.retention or None,
            "cutoff": self.cutoff.isoformat() if self.cutoff else None,
            "pruned": self.pruned,
            "oldest": self.oldest.isoformat() if self.oldest else None,
        }


async def prune_once(
    store: Store,
    keep_for: dict[str, float],
    *,
    batch: int,
    dry_run: bool = False,
    now: datetime | None = None,
    pause: float = BATCH_PAUSE,
) -> list[TableReport]:
    """One pass over every table; ``dry_run`` only counts what would go."""
    now = now or utcnow()
    reports = []
    for table, retention in keep_for.items():
        cutoff = now - timedelta(seconds=retention) if retention else None
        pruned = 0
        if cutoff is not None and dry_run:
            pruned = await store.prunable(table, cutoff)
        elif cutoff is not None:
            pruned = await _prune_table(store, table, cutoff, batch, pause)
        reports.append(TableReport(table, retention, cutoff, pruned, await store.oldest(table)))
    if not dry_run:
        await store.compact()
    return reports


async def _prune_table(store: Store, table: str, cutoff: datetime, batch: int, pause: float) -> int:
    total = 0
    while True:
        deleted = await store.prune(table, cutoff, batch)
        total += deleted
        metrics.PRUNED.labels(table).inc(deleted)
        if deleted < batch:
            return total
        await asyncio.sleep(pause)


async def run_pruner(store: Store, settings: Settings, stop: asyncio.Event) -> None:
    """A pass every ``APPT_PRUNE_INTERVAL``, then the oldest-row gauges and one log line."""
    keep_for = retentions(settings)

    async def prune_and_report() -> None:
        reports = await prune_once(store, keep_for, batch=settings.prune_batch)
        now = utcnow()
        for report in reports:
            age = (now - report.oldest).total_seconds() if report.oldest else 0.0
            metrics.OLDEST_ROW.labels(report.table).set(max(age, 0.0))
        if pruned := {r.table: r.pruned for r in reports if r.pruned}:
            log.info("pruned", **pruned)

    await every(settings.prune_interval, stop, prune_and_report, "prune pass")

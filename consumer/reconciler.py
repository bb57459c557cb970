"""Catch-up polling: what the webhooks missed is found by ``updated_after`` and fed in.

The PMS switches webhooks off after 50 failures, and any single delivery can
be lost; polling makes that cost latency, never correctness. Changes enter
the same pipeline as webhooks, with ids derived from (appointment, updated_at),
so a change seen twice (two polls, or a poll and a retry) is the same message
and the worker's inbox drops the repeat.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

from consumer.broker import Broker
from consumer.logs import get_logger
from consumer.messages import DEFAULT_PRACTICE, ObservedEvent
from consumer.pms import PmsAppointment, PmsClient
from consumer.practices import Practices
from consumer.store.base import Store

WATERMARK = "pms.updated_after"
EPOCH = "1970-01-01T00:00:00Z"
# Polls reach back this far before the watermark: a change stamped just before
# the watermark but committed after the last poll would otherwise be missed
# forever. What the overlap finds again has the same message id: deduped.
DEFAULT_OVERLAP = timedelta(seconds=2)
# Polling never spends the last tenth of a practice's hourly budget: that is kept for commands.
COMMAND_RESERVE = 0.1

log = get_logger(__name__)


def _parse(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _query_from(start: str, overlap: timedelta) -> str:
    if not overlap:
        return start
    return (_parse(start) - overlap).isoformat().replace("+00:00", "Z")


def event_for(appointment: PmsAppointment, practice: str = DEFAULT_PRACTICE) -> ObservedEvent:
    return ObservedEvent(
        type="appointment.updated",
        event_id=f"reconcile:{appointment.id}:{appointment.updated_at}",
        source="reconcile",
        appointment=appointment.model_dump(mode="json"),
        practice=practice,
    )


def watermark_for(practice: str) -> str:
    """Each practice polls its own PMS, so each has its own watermark (the default's keeps its name)."""
    return WATERMARK if practice == DEFAULT_PRACTICE else f"{WATERMARK}.{practice}"


def _latest(appointments: list[PmsAppointment], current: str) -> str:
    """The greatest ``updated_at`` among the current watermark and what was seen."""
    stamps = [a.updated_at for a in appointments if a.updated_at is not None]
    return max([current, *stamps], key=_parse)


async def reconcile_once(
    pms: PmsClient,
    broker: Broker,
    store: Store,
    *,
    practice: str = DEFAULT_PRACTICE,
    since: str | None = None,
    overlap: timedelta = DEFAULT_OVERLAP,
    page_size: int = 100,
    reserve: float = COMMAND_RESERVE,
) -> int:
    """Publish every appointment changed after the watermark; return how many were published.

    Walks forward one page at a time with the last ``updated_at`` seen as the
    cursor (page numbers over a changing list can skip a row). The watermark
    moves after each page's publishes are confirmed: a failure part-way
    (``PublishFailed``) leaves it at the last whole page, and the next run
    republishes from there under the same ids. ``since`` (``appt reconcile
    --since``) starts from that time instead of the stored watermark.

    Polling stops for this run once the practice's remaining budget is down to
    ``reserve`` (a share of its hourly limit): the rest of the hour is kept for
    commands, and the next run goes on from the watermark.
    """
    watermark_name = watermark_for(practice)
    start = since or await store.get_watermark(watermark_name) or EPOCH
    cursor, watermark, published = _query_from(start, overlap), start, 0
    while True:
        if _in_reserve(pms, reserve):
            log.info("reconcile.deferred", practice=practice, reason="the rest of the budget is kept for commands",
                     budget=pms.budget())
            break
        page = await pms.changed_after(cursor, per_page=page_size)
        for appointment in page:
            event = event_for(appointment, practice)
            await broker.publish_inbound(
                event.model_dump_json().encode(), practice=practice, appointment_id=appointment.id,
                message_id=event.event_id,
            )
        published += len(page)
        latest = _latest(page, watermark)
        if latest != watermark:
            watermark = latest
            await store.set_watermark(watermark_name, watermark)
        if len(page) < page_size or page[-1].updated_at in (None, cursor):
            break  # the last page (or a page of one instant only: the next run goes on from it)
        cursor = page[-1].updated_at
    log.info("reconcile.done", practice=practice, published=published, watermark=watermark)
    return published


def _in_reserve(pms: PmsClient, reserve: float) -> bool:
    budget = pms.budget()
    limit, remaining, reset = budget["limit"], budget["remaining"], budget["reset"]
    if limit is None or remaining is None or reset is None or time.time() >= reset:
        return False  # nothing known, or a new hour since the last answer
    return remaining <= limit * reserve


async def run_reconciler(
    practices: Practices, broker: Broker, store: Store, interval: float, stop: asyncio.Event
) -> None:
    """Reconcile every practice every ``interval`` seconds until ``stop`` is set.

    Nothing here may end the loop but ``stop``: a PMS or broker outage is
    exactly when catching up matters afterwards; one practice's failure
    waits one interval and never skips another practice.
    """
    if interval <= 0:
        raise ValueError("the reconcile interval must be positive")
    while not stop.is_set():
        for practice in practices:
            if practice.waiting:  # its resumer tries it again; polling would only spend or fail
                continue
            try:
                await reconcile_once(practice.pms, broker, store, practice=practice.name)
            except Exception as exc:  # logged and retried: the loop must outlive every outage
                log.error("reconcile.failed", practice=practice.name, error=f"{type(exc).__name__}: {exc}")
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass

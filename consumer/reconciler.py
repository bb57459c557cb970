"""Catch-up polling: what the webhooks missed is found by ``updated_after`` and fed in.

The PMS switches webhooks off after 50 failures, and any single delivery can
be lost; polling makes that cost latency, never correctness. Changes enter
the same pipeline as webhooks, with ids derived from (appointment, updated_at),
so a change seen twice (two polls, or a poll and a retry) is the same message
and the worker's inbox drops the repeat.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from consumer.broker import Broker
from consumer.logs import get_logger
from consumer.messages import ObservedEvent
from consumer.pms import PmsAppointment, PmsClient
from consumer.store.base import Store

WATERMARK = "pms.updated_after"
EPOCH = "1970-01-01T00:00:00Z"
# Polls reach back this far before the watermark: a change stamped just before
# the watermark but committed after the last poll would otherwise be missed
# forever. What the overlap finds again has the same message id: deduped.
DEFAULT_OVERLAP = timedelta(seconds=2)

log = get_logger(__name__)


def _parse(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _query_from(start: str, overlap: timedelta) -> str:
    if not overlap:
        return start
    return (_parse(start) - overlap).isoformat().replace("+00:00", "Z")


def event_for(appointment: PmsAppointment) -> ObservedEvent:
    return ObservedEvent(
        type="appointment.updated",
        event_id=f"reconcile:{appointment.id}:{appointment.updated_at}",
        source="reconcile",
        appointment=appointment.model_dump(mode="json"),
    )


def _latest(appointments: list[PmsAppointment], current: str) -> str:
    """The greatest ``updated_at`` among the current watermark and what was seen."""
    stamps = [a.updated_at for a in appointments if a.updated_at is not None]
    return max([current, *stamps], key=_parse)


async def reconcile_once(
    pms: PmsClient,
    broker: Broker,
    store: Store,
    *,
    since: str | None = None,
    watermark_name: str = WATERMARK,
    overlap: timedelta = DEFAULT_OVERLAP,
    page_size: int = 100,
) -> int:
    """Publish every appointment changed after the watermark; return how many were published.

    Walks forward one page at a time with the last ``updated_at`` seen as the
    cursor (page numbers over a changing list can skip a row). The watermark
    moves after each page's publishes are confirmed: a failure part-way
    (``PublishFailed``) leaves it at the last whole page, and the next run
    republishes from there under the same ids. ``since`` (``appt reconcile
    --since``) starts from that time instead of the stored watermark.
    """
    start = since or await store.get_watermark(watermark_name) or EPOCH
    cursor, watermark, published = _query_from(start, overlap), start, 0
    while True:
        page = await pms.changed_after(cursor, per_page=page_size)
        for appointment in page:
            event = event_for(appointment)
            await broker.publish_observed(
                event.model_dump_json().encode(), appointment_id=appointment.id, message_id=event.event_id,
            )
        published += len(page)
        latest = _latest(page, watermark)
        if latest != watermark:
            watermark = latest
            await store.set_watermark(watermark_name, watermark)
        if len(page) < page_size or page[-1].updated_at in (None, cursor):
            break  # the last page (or a page of one instant only: the next run goes on from it)
        cursor = page[-1].updated_at
    log.info("reconcile.done", published=published, watermark=watermark)
    return published


async def run_reconciler(
    pms: PmsClient, broker: Broker, store: Store, interval: float, stop: asyncio.Event
) -> None:
    """Reconcile every ``interval`` seconds until ``stop`` is set; an error waits one interval.

    Nothing here may end the loop but ``stop``: a PMS or broker outage is
    exactly when catching up matters afterwards.
    """
    if interval <= 0:
        raise ValueError("the reconcile interval must be positive")
    while not stop.is_set():
        try:
            await reconcile_once(pms, broker, store)
        except Exception as exc:  # logged and retried: the loop must outlive every outage
            log.error("reconcile.failed", error=f"{type(exc).__name__}: {exc}")
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass

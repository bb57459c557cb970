"""Background refreshes (gauges, alerts) that must outlive a store hiccup and stop promptly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from consumer.logs import get_logger

log = get_logger(__name__)


async def every(interval: float, stop: asyncio.Event, action: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``action`` now and then every ``interval`` seconds until ``stop`` is set."""
    while not stop.is_set():
        try:
            await action()
        except Exception:  # logged, and tried again next time
            log.exception(f"{what} failed")
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass

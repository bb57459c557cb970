"""Small helpers for tests (import from tests.helpers)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    check: Callable[[], Any | Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll an async or sync predicate until it returns a truthy value; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        await asyncio.sleep(interval)


def starts_in(days: float) -> dict[str, str]:
    """A 30-minute slot at 09:00 UTC ``days`` from today: inside the reconciler's windows."""
    start = datetime.now(timezone.utc).replace(hour=9, minute=0, second=0, microsecond=0) + timedelta(days=days)
    return {"start_time": start.isoformat(), "finish_time": (start + timedelta(minutes=30)).isoformat()}

"""Try once, and set up tenacity only when that first attempt failed.

Building an ``AsyncRetrying`` and iterating it costs about as much as a
small store read, and nearly every call succeeds at once. So the first
attempt runs bare; if it fails, the retry policy (still the one
``AsyncRetrying`` its caller defines) takes over as if it had made that
attempt itself: its failure is handed to tenacity as attempt 1, and tenacity
decides from there whether, when and how often to try again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying

T = TypeVar("T")


async def first_then_retried(attempt: Callable[[int], Awaitable[T]], policy: Callable[[], AsyncRetrying]) -> T:
    """``attempt(n)`` for n = 1, 2, ... until it succeeds or ``policy`` gives up (and re-raises)."""
    try:
        return await attempt(1)
    except Exception as exc:
        failed: Exception | None = exc
    number = 1

    async def again() -> T:
        nonlocal failed, number
        if failed is not None:  # tenacity's attempt 1 is the one already made
            error, failed = failed, None
            raise error
        number += 1
        return await attempt(number)

    return await policy()(again)

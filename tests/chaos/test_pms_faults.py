"""PMS faults on ~20% of requests (500, 503, 429, timeouts) under load: no command ends silently.

Each command ends with a result: succeeded, or rejected/failed with reasons (a
dead-lettered command's is failed, and its dead letter carries the reason).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consumer.broker import REASON_HEADER
from tests.chaos.common import chaos_marks, publish_until_confirmed, random_command, scaled, seed_slots
from tests.helpers import eventually
from tests.stack import Stack, running_stack

pytestmark = chaos_marks

FAULT_RATE = 0.2
FAULTS = ("500", "503", "429", "timeout")


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    # A 1 s client timeout, so an injected hang costs a second, not a minute.
    async with running_stack(amqp_url, sqlite_url, sandbox.url, pms_timeout=1.0) as running:
        yield running


async def inject_faults(sandbox: Any, rng: random.Random, injected: Counter[str], stop: asyncio.Event) -> None:
    """Keep about one request in five faulty, by looking at how many calls were made so far."""
    while not stop.is_set():
        due = int(len(sandbox.state.calls) * FAULT_RATE) - sum(injected.values())
        for _ in range(max(0, due)):
            kind = rng.choice(FAULTS)
            injected[kind] += 1
            if kind == "timeout":
                sandbox.state.timeout_next("*", 1)
            else:
                sandbox.state.fail_next("*", 1, int(kind), retry_after=0.2 if kind == "429" else None)
        await asyncio.sleep(0.01)


async def test_pms_faults_at_20_percent_every_command_ends_loudly(stack: Stack, sandbox: Any) -> None:
    rng = random.Random()
    ids = seed_slots(sandbox, scaled(20, 60))
    injected: Counter[str] = Counter()
    stop = asyncio.Event()
    chaos = asyncio.create_task(inject_faults(sandbox, rng, injected, stop))
    sent: list[str] = []
    try:
        for _ in range(scaled(120, 1000)):
            command = random_command(rng, ids)
            await publish_until_confirmed(stack.broker, command)
            sent.append(command["command_id"])
            await asyncio.sleep(0.01)
        await eventually(lambda: ended(stack) >= set(sent), timeout=scaled(100, 600))
    finally:
        stop.set()
        await chaos
        outcomes = Counter(r["outcome"] for r in stack.observer.results.values())
        dead = {str(m.message_id): str((m.headers or {}).get(REASON_HEADER) or "") for m in stack.observer.dead}
        silent = set(sent) - ended(stack)
        print(
            f"\nchaos pms_faults commands={len(sent)} requests={len(sandbox.state.calls)} "
            f"faults={sum(injected.values())} ({dict(injected)}) succeeded={outcomes['succeeded']} "
            f"rejected={outcomes['rejected']} failed={outcomes['failed']} dead={len(dead)} "
            f"silent={len(silent)}"
        )
    assert not silent
    assert set(stack.observer.results) == set(sent), "every command, dead-lettered ones too, has a result"
    unexplained = [r for r in stack.observer.results.values() if r["outcome"] != "succeeded" and not r["reasons"]]
    assert unexplained == [], "a rejection or failure must carry its reasons"
    assert all(dead.values()), f"dead letters without a reason: {dead}"


def ended(stack: Stack) -> set[str]:
    """Commands with a terminal result (a dead-lettered one's is ``failed``)."""
    return set(stack.observer.results)

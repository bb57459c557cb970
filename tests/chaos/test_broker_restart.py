"""`rabbitmqctl stop_app` / `start_app` under load: nothing lost, nothing applied twice.

The broker restarted is a node this test starts for itself (``scripts/rabbitmq-node``: its own
name, ports and data directory), never the machine's shared RabbitMQ. The stack runs in-process (tests/stack.py) on robust connections, so it must
reconnect by itself; the test's publisher resends what was not confirmed, as
any client would, under the same command id.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.common import (
    applied_twice,
    chaos_marks,
    publish_until_confirmed,
    random_command,
    scaled,
    seed_slots,
)
from tests.helpers import RabbitNode, eventually
from tests.stack import Stack, running_stack

pytestmark = chaos_marks


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this test's own: the only broker it may stop."""
    node = RabbitNode(tmp_path / "rabbit", f"appt-restart-{uuid.uuid4().hex[:8]}")
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
async def stack(node: RabbitNode, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    async with running_stack(node.url, sqlite_url, sandbox.url, pms_timeout=2.0) as running:
        yield running


async def load(stack: Stack, ids: list[int], count: int, rng: random.Random, sent: list[str]) -> None:
    for _ in range(count):
        command = random_command(rng, ids, reassign=False)
        await publish_until_confirmed(stack.broker, command)
        sent.append(command["command_id"])
        await asyncio.sleep(0.01)


async def restart_broker(node: RabbitNode, down_for: float) -> None:
    """stop_app, wait, start_app on the test's own node."""
    try:
        await asyncio.to_thread(node.ctl, "stop_app")
        await asyncio.sleep(down_for)
    finally:
        await asyncio.to_thread(node.ctl, "start_app")


async def test_broker_restart_under_load_loses_nothing_and_applies_nothing_twice(
    stack: Stack, sandbox: Any, node: RabbitNode
) -> None:
    rng = random.Random()
    restarts = scaled(1, 4)
    ids = seed_slots(sandbox, scaled(20, 60))
    sandbox.state.set_latency(0.005)
    sent: list[str] = []
    sending = asyncio.create_task(load(stack, ids, scaled(150, 1200), rng, sent))
    try:
        for _ in range(restarts):
            await eventually(lambda: len(stack.observer.results) >= len(sent) // 3 and sent, timeout=30)
            await restart_broker(node, rng.uniform(1.0, 3.0))
        await sending
        await eventually(lambda: set(stack.observer.results) | dead_ids(stack) >= set(sent), timeout=scaled(90, 300))
    finally:
        sending.cancel()
        lost = [c for c in sent if c not in stack.observer.results]
        twice = await applied_twice(stack.store, ids)
        repeats = sum(n - 1 for n in stack.observer.result_counts.values())
        print(
            f"\nchaos broker_restart restarts={restarts} commands={len(sent)} "
            f"results={len(stack.observer.results)} lost={len(lost)} dead={len(stack.observer.dead)} "
            f"applied_twice={len(twice)} duplicated={repeats}"
        )
    assert lost == [], f"commands without a result: {lost[:10]}; dead: {reasons(stack)}"
    assert twice == []


def dead_ids(stack: Stack) -> set[str]:
    return {str(m.message_id) for m in stack.observer.dead}


def reasons(stack: Stack) -> dict[str, str]:
    return {str(m.message_id): str((m.headers or {}).get("x-appt-reason")) for m in stack.observer.dead}

"""A command's publishes go one after the other in the caller's task, and stop at the first failure."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from consumer.broker import PublishFailed
from consumer.worker import publish_in_turn


async def test_each_publish_starts_once_the_one_before_it_is_done() -> None:
    events: list[str] = []

    async def publish(name: str) -> None:
        events.append(f"{name} sent")
        await asyncio.sleep(0)  # the confirm
        events.append(f"{name} confirmed")

    await publish_in_turn([publish("state"), publish("result")])

    assert events == ["state sent", "state confirmed", "result sent", "result confirmed"]


async def test_the_first_failure_raises_and_the_rest_are_never_sent() -> None:
    sent: list[str] = []

    async def publish(name: str, *, nacked: bool = False) -> None:
        sent.append(name)
        if nacked:
            raise PublishFailed(f"{name} nacked")

    reply = publish("reply")
    with pytest.raises(PublishFailed, match="result nacked"):
        await publish_in_turn([publish("state"), publish("result", nacked=True), reply])

    assert sent == ["state", "result"]
    assert inspect.getcoroutinestate(reply) == "CORO_CLOSED"  # closed unstarted: no "never awaited" warning

"""Fixtures of the end-to-end tests: what the real processes publish, seen from outside."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest

from consumer.broker import EVENTS_EXCHANGE


@dataclass
class Results:
    """Every result published on appointments.events, from a durable queue bound before any start."""

    published: list[dict[str, Any]] = field(default_factory=list)
    received: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The last result of each command."""

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        self.published.append(body)
        self.received[body["command_id"]] = body
        await message.ack()

    def of(self, command_id: str) -> list[dict[str, Any]]:
        """Every result published for the command: more than one is a re-send."""
        return [r for r in self.published if r["command_id"] == command_id]

    async def wait(self, command_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = asyncio.get_running_loop().time() + timeout
        while command_id not in self.received and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        return self.received.get(command_id)


@pytest.fixture
async def results(amqp_url: str) -> AsyncIterator[Results]:
    collected = Results()
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("e2e.results", durable=True)
        await queue.bind(exchange, routing_key="result.#")
        await queue.consume(collected.on_message)
        yield collected

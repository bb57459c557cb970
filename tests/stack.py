"""The service's pipeline assembled in-process for integration tests.

Real RabbitMQ (a test vhost), a real store, the sandbox over HTTP: the same
objects `appt serve` wires, minus the HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika

from consumer.broker import DEAD_EXCHANGE, EVENTS_EXCHANGE, Broker
from consumer.deadletters import DeadLetterCollector
from consumer.messages import DEFAULT_PRACTICE
from consumer.pms.client import PmsClient
from consumer.practices import PracticeConfig, Practices
from consumer.store.base import Store
from consumer.store.opening import open_store
from consumer.waiting import Resumer
from consumer.worker import Worker
from consumer.workflow_watch import WorkflowWatcher
from consumer.workflows import WorkflowRunner
from tests.helpers import eventually


@dataclass
class Observer:
    """Everything published to appointments.events, and everything dead-lettered
    (a copy from appointments.dead's fanout exchange)."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    result_counts: dict[str, int] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)
    dead: list[aio_pika.abc.AbstractIncomingMessage] = field(default_factory=list)

    async def on_event(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        if message.routing_key and message.routing_key.startswith("result."):
            self.results[body["command_id"]] = body
            self.result_counts[body["command_id"]] = self.result_counts.get(body["command_id"], 0) + 1
        else:
            self.logs.append(body)
        await message.ack()

    async def on_dead(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.dead.append(message)
        await message.ack()


@dataclass
class Stack:
    broker: Broker
    store: Store
    practices: Practices
    worker: Worker
    workflows: WorkflowRunner
    watcher: WorkflowWatcher
    observer: Observer

    @property
    def pms(self) -> PmsClient:
        """The default practice's client (the single-practice tests' PMS)."""
        return self.practices.get(DEFAULT_PRACTICE).pms

    async def send(self, command: dict[str, Any]) -> str:
        command.setdefault("command_id", str(uuid.uuid4()))
        await self.broker.publish_inbound(
            json.dumps(command).encode(),
            practice=command.get("practice", DEFAULT_PRACTICE),
            appointment_id=command["appointment_id"],
            message_id=command["command_id"],
        )
        return str(command["command_id"])

    async def result(self, command_id: str, timeout: float = 15.0) -> dict[str, Any]:
        return await eventually(lambda: self.observer.results.get(command_id), timeout=timeout)  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def running_stack(
    amqp_url: str,
    store_url: str,
    pms_url: str,
    *,
    partitions: int = 4,
    prefetch: int = 64,
    max_deliveries: int = 5,
    retry_delay: float = 0.1,
    pms_retry_attempts: int = 3,
    pms_timeout: float = 5.0,
    pms_concurrency: int = 16,
    compensation_backoff: float = 0.01,
    practices: dict[str, PracticeConfig] | None = None,
    pms_max_retry_after: float = 60.0,
    probe_interval: float = 0.2,
    workflow_deadline: float = 300.0,
    watch_interval: float | None = None,
    broker_addresses: str | None = None,
) -> AsyncIterator[Stack]:
    """``practices`` defaults to one, ``default``, on ``pms_url`` with the sandbox's token;
    ``watch_interval`` runs the workflow watcher (gauges, and the overdue sweep) as `appt serve` does;
    ``broker_addresses``: the service's ``APPT_AMQP_URL`` when it is not ``amqp_url`` (an address
    list); the test's observer always uses ``amqp_url``."""
    store = open_store(store_url)
    await store.open()
    broker = Broker(broker_addresses or amqp_url, partitions=partitions, prefetch=prefetch)
    await broker.connect()
    registry = Practices(
        practices or {DEFAULT_PRACTICE: PracticeConfig(pms_url=pms_url, token="sandbox-token")},
        lambda config, token: PmsClient(
            config.pms_url,
            token,
            timeout=pms_timeout,
            retry_attempts=pms_retry_attempts,
            backoff_base=0.01,
            max_backoff=0.1,
            concurrency=pms_concurrency,
            max_retry_after=pms_max_retry_after,
        ),
    )
    observer = Observer()
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    # Durable, not exclusive: it must outlive a killed connection (the vhost is dropped after the test).
    events = await channel.declare_queue("test.observer.events", durable=True)
    await events.bind(EVENTS_EXCHANGE, routing_key="#")
    await events.consume(observer.on_event)
    # Our own copy of each dead letter: appointments.dead itself is the collector's intake.
    dead = await channel.declare_queue("test.observer.dead", durable=True)
    await dead.bind(DEAD_EXCHANGE)
    await dead.consume(observer.on_dead)
    workflows = WorkflowRunner(
        practices=registry,
        store=store,
        broker=broker,
        compensation_backoff=compensation_backoff,
    )
    watcher = WorkflowWatcher(store=store, broker=broker, deadline=workflow_deadline)
    worker = Worker(
        broker=broker,
        store=store,
        practices=registry,
        reassign=workflows.reassign,
        partitions=list(range(partitions)),
        max_deliveries=max_deliveries,
        retry_delay=retry_delay,
        probe_interval=probe_interval,
    )
    await worker.start()
    await DeadLetterCollector(broker=broker, store=store, retry_delay=0.1).start()
    stop = asyncio.Event()
    resumer = asyncio.create_task(Resumer(practices=registry, store=store, broker=broker, interval=0.1).run(stop))
    watching = asyncio.create_task(watcher.watch(stop, watch_interval)) if watch_interval else None
    try:
        yield Stack(broker, store, registry, worker, workflows, watcher, observer)
    finally:
        stop.set()
        await resumer
        if watching is not None:
            await watching
        await worker.stop(timeout=5)
        await connection.close()
        await registry.close()
        await broker.close()
        await store.close()
        await asyncio.sleep(0)

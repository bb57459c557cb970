"""The broker adapter against the real RabbitMQ: topology, confirms, and behaviour in an outage."""

from __future__ import annotations

import asyncio
import json
import subprocess
from urllib.parse import urlsplit

import aio_pika
import pytest

from consumer.broker import DEAD_EXCHANGE, Broker, PublishFailed, partition_queue


async def test_partitions_are_durable_quorum_queues_with_a_single_active_consumer(amqp_url: str) -> None:
    broker = Broker(amqp_url, partitions=3)
    await broker.connect()
    await broker.close()
    vhost = urlsplit(amqp_url).path.lstrip("/")
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, "--formatter", "json", "name", "type", "arguments"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    queues = {q["name"]: q for q in json.loads(listed.stdout)}
    for index in range(3):
        queue = queues[partition_queue(index)]
        assert queue["type"] == "quorum"
        arguments = {name: value for name, _type, value in queue["arguments"]}  # [name, type, value]
        assert arguments["x-single-active-consumer"] is True
        assert arguments["x-dead-letter-exchange"] == DEAD_EXCHANGE
    assert queues["appointments.dead"]["type"] == "quorum"


async def test_one_appointment_always_lands_in_the_same_partition(amqp_url: str) -> None:
    broker = Broker(amqp_url, partitions=4)
    await broker.connect()
    for n in range(5):
        await broker.publish_inbound(b"{}", appointment_id=42, message_id=f"m{n}")
    await broker.close()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        counts = []
        for index in range(4):
            queue = await channel.declare_queue(partition_queue(index), passive=True)
            counts.append(queue.declaration_result.message_count)
    assert sorted(counts) == [0, 0, 0, 5]


async def test_publishing_while_disconnected_is_a_publish_failure_not_a_hang(amqp_url: str) -> None:
    broker = Broker(amqp_url, partitions=2, publish_timeout=2.0)
    await broker.connect()
    await broker.close()
    with pytest.raises(PublishFailed):
        await broker.publish_inbound(b"{}", appointment_id=1, message_id="x")
    with pytest.raises(PublishFailed):
        await broker.publish_event("state.appointment.Pending", b"{}", message_id="y")


async def test_stopping_consumers_after_the_connection_is_gone_returns_at_once(amqp_url: str) -> None:
    broker = Broker(amqp_url, partitions=2)
    await broker.connect()

    async def ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()

    await broker.consume([0, 1], ack)
    await broker.close()
    async with asyncio.timeout(5):  # a SIGTERM during an outage must not hang the shutdown
        await broker.stop_consuming()


async def test_each_delivery_runs_its_handler_in_one_task(amqp_url: str) -> None:
    """aio-pika's consumer wrapper ran each handler in a second task of its own (issue 18)."""
    broker = Broker(amqp_url, partitions=2)
    await broker.connect()
    count = 50
    for n in range(count):
        await broker.publish_inbound(b"{}", appointment_id=n, message_id=f"m{n}")
    loop = asyncio.get_running_loop()
    created: list[asyncio.Task[object]] = []
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: object, **kwargs: object) -> asyncio.Task[object]:
        task = asyncio.Task(coro, loop=loop, **kwargs)  # type: ignore[arg-type]
        created.append(task)
        return task

    handled: list[asyncio.Task[object] | None] = []
    done = asyncio.Event()

    async def handler(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        handled.append(asyncio.current_task())
        await message.ack()
        if len(handled) == count:
            done.set()

    loop.set_task_factory(counting_factory)  # type: ignore[arg-type]
    try:
        await broker.consume([0, 1], handler)
        await asyncio.wait_for(done.wait(), 30)
    finally:
        loop.set_task_factory(default_factory)
        await broker.stop_consuming()
        await broker.close()
    assert len(set(map(id, handled))) == count  # each delivery its own task...
    per_delivery = [task for task in created if task in handled]
    assert len(per_delivery) == count
    # ...and no other task per delivery: a handful for consuming itself (basic.consume, qos), none per message.
    assert len(created) - count < 10, f"{len(created)} tasks for {count} deliveries"

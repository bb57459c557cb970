"""``APPT_AMQP_URL`` as an address list: connect to whichever node answers, and when the node in
use goes away, carry on through another, publishers and consumers alike, losing nothing.

The nodes here are two relays to the one shared broker (tests/helpers.TcpRelay): what fails
over is the client, which is what this tests; a dying cluster node is the chaos suite's
(tests/chaos/README.md).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from aio_pika.exceptions import AMQPConnectionError

from consumer.broker import EVENTS_EXCHANGE, Broker, PublishFailed, broker_addresses
from tests.chaos.common import applied_twice, publish_until_confirmed, random_command, seed_slots
from tests.conftest import RABBIT_PORT
from tests.helpers import TcpRelay, eventually, free_port
from tests.stack import running_stack


def via(port: int, amqp_url: str) -> str:
    """``amqp_url`` (its vhost and credentials) at another port."""
    parts = urlsplit(amqp_url)
    return parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}").geturl()


def test_the_address_list_is_split_on_commas() -> None:
    assert broker_addresses(" amqp://a:5672/v , amqp://b:5672/v,") == ["amqp://a:5672/v", "amqp://b:5672/v"]
    assert broker_addresses("amqp://a/") == ["amqp://a/"]
    with pytest.raises(ValueError):
        broker_addresses(" , ")


async def test_connects_through_whichever_address_answers(amqp_url: str) -> None:
    addresses = f"{via(free_port(), amqp_url)},{amqp_url},{via(free_port(), amqp_url)}"
    for _ in range(4):  # shuffled: the live address comes first, second or last
        broker = Broker(addresses)
        await broker.connect(timeout=5)
        try:
            await broker.publish_inbound(b"{}", appointment_id=1, message_id="m")  # confirmed
        finally:
            await broker.close()


async def test_no_address_answering_is_a_connection_error() -> None:
    with pytest.raises(AMQPConnectionError):
        await Broker(
            f"amqp://guest:guest@127.0.0.1:{free_port()}/,amqp://guest:guest@127.0.0.1:{free_port()}/"
        ).connect(timeout=5)


async def test_publisher_and_pipeline_fail_over_when_their_node_goes_under_load(
    amqp_url: str, sqlite_url: str, sandbox: Any
) -> None:
    first, second = TcpRelay(RABBIT_PORT), TcpRelay(RABBIT_PORT)
    await first.start()  # the second node is down at first: everything starts on the first
    addresses = f"{via(first.port, amqp_url)},{via(second.port, amqp_url)}"
    rng = random.Random()
    async with running_stack(amqp_url, sqlite_url, sandbox.url, broker_addresses=addresses) as stack:
        publisher = Broker(addresses)
        await publisher.connect(timeout=5)
        ids = seed_slots(sandbox, 10)
        sandbox.state.set_latency(0.005)
        sent: list[str] = []

        async def load(count: int) -> None:
            for _ in range(count):
                command = random_command(rng, ids, reassign=False)
                await publish_until_confirmed(publisher, command, give_up=30)
                sent.append(command["command_id"])
                await asyncio.sleep(0.01)

        sending = asyncio.create_task(load(120))
        try:
            await eventually(lambda: len(stack.observer.results) >= 30, timeout=30)
            await second.start()
            await first.close()  # the first node dies with everything connected to it
            died, answered_before = time.monotonic(), len(stack.observer.results)
            await eventually(lambda: len(stack.observer.results) > answered_before, timeout=30)
            recovery = time.monotonic() - died
            await sending
            await eventually(lambda: set(stack.observer.results) >= set(sent), timeout=60)
        finally:
            sending.cancel()
            await publisher.close()
            await second.close()
        lost = [c for c in sent if c not in stack.observer.results]
        twice = await applied_twice(stack.store, ids)
        print(
            f"\nfailover relays commands={len(sent)} results={len(stack.observer.results)} lost={len(lost)} "
            f"applied_twice={len(twice)} dead={len(stack.observer.dead)} recovery_s={recovery:.2f} "
            f"connections_to_second={second.connections}"
        )
    assert second.connections >= 2, "the service and the publisher reconnected through the second address"
    assert lost == [] and twice == [] and stack.observer.dead == []


async def test_a_nacked_publish_moves_publishing_to_a_fresh_channel(amqp_url: str) -> None:
    """A channel restored on a survivor while a quorum queue's leader dies can go on nacking
    that queue's publishes (RabbitMQ 3.10, tests/chaos/test_cluster_failover.py). A nack here
    comes from a queue that refuses everything; the broker must leave the channel that had it."""
    broker = Broker(amqp_url)
    await broker.connect(timeout=5)
    try:
        channel = await broker.channel()
        refusing = await channel.declare_queue(
            "", exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await refusing.bind(EVENTS_EXCHANGE, routing_key="refused")
        nacked = broker._publish_channel
        with pytest.raises(PublishFailed, match="Nack"):
            await broker.publish_event("refused", b"{}", message_id="m1")
        assert broker._publish_channel is not nacked and nacked is not None and nacked.is_closed
        await broker.publish_event("accepted", b"{}", message_id="m2")  # confirmed on the fresh channel
    finally:
        await broker.close()

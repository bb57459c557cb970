"""The RabbitMQ users of docker/rabbitmq/permissions.json enforce the trust boundary.

The service may declare its topology and publish observed events; a partner
may publish commands and read results, but neither publish an observed event
nor read the service's queues. Applied to a fresh vhost of the real broker.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.exceptions import AMQPError

from consumer.broker import EVENTS_EXCHANGE, INBOUND_EXCHANGE, OBSERVED_EXCHANGE, Broker, partition_queue
from tests.conftest import RABBIT_HOST, RABBIT_PORT

PERMISSIONS = Path(__file__).resolve().parents[2] / "docker" / "rabbitmq" / "permissions.json"


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def urls(amqp_url: str) -> Iterator[dict[str, str]]:
    """A URL per user of permissions.json, on this test's vhost; the users are removed after."""
    vhost = amqp_url.rsplit("/", 1)[1]
    suffix = uuid.uuid4().hex[:8]
    created: list[str] = []
    urls: dict[str, str] = {}
    try:
        for user, rights in json.loads(PERMISSIONS.read_text()).items():
            name, password = f"{user}-{suffix}", uuid.uuid4().hex
            rabbitmqctl("add_user", name, password)
            created.append(name)
            rabbitmqctl("set_permissions", "-p", vhost, name, rights["configure"], rights["write"], rights["read"])
            urls[user] = f"amqp://{name}:{password}@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
        yield urls
    finally:
        for name in created:
            subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=60)


async def test_the_service_user_runs_the_topology_and_publishes_observed_events(urls: dict[str, str]) -> None:
    broker = Broker(urls["appt-service"])
    await broker.connect()
    try:
        await broker.publish_observed(b"{}", appointment_id=7, message_id="e-1")
        await broker.publish_inbound(b"{}", appointment_id=7, message_id="c-1")
        await broker.publish_reply("amq.gen-nobody", b"{}", correlation_id=None)
        channel = await broker.channel()
        queue = await channel.get_queue(partition_queue(0))
        assert queue.name == partition_queue(0)
    finally:
        await broker.close()


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer that is never called: the broker refuses the subscription."""


async def test_a_partner_publishes_commands_and_reads_results_only(urls: dict[str, str]) -> None:
    declaring = Broker(urls["appt-service"])
    await declaring.connect()
    await declaring.close()
    async with await aio_pika.connect(urls["appt-partner"]) as connection:
        channel = await connection.channel(publisher_confirms=True)
        inbound = await channel.get_exchange(INBOUND_EXCHANGE, ensure=False)
        await inbound.publish(aio_pika.Message(b"{}"), "7")
        results = await channel.declare_queue("partner.results", exclusive=True)
        await results.bind(EVENTS_EXCHANGE, routing_key="result.#")
        replies = await channel.declare_queue(exclusive=True)  # server-named, for reply_to
        assert replies.name.startswith("amq.gen-")

    async def refused(attempt: str) -> None:
        async with await aio_pika.connect(urls["appt-partner"]) as connection:
            channel = await connection.channel(publisher_confirms=True)
            with pytest.raises(AMQPError, match="ACCESS_REFUSED"):
                if attempt == "publish an observed event":
                    observed = await channel.get_exchange(OBSERVED_EXCHANGE, ensure=False)
                    await observed.publish(aio_pika.Message(b"{}"), "7")
                elif attempt == "consume a partition":
                    await (await channel.get_queue(partition_queue(0), ensure=False)).consume(ignore)
                else:
                    await channel.declare_exchange("appointments.mine", aio_pika.ExchangeType.FANOUT)

    for attempt in ("publish an observed event", "consume a partition", "declare in the service's namespace"):
        await refused(attempt)

"""RabbitMQ topology, publishing with confirms, and consuming the partitions.

At-least-once needs persistent messages on durable quorum queues, publisher
confirms and manual acks after the store commit; this module owns the first
two. Every publish is mandatory (an unroutable message is an error, not a
silent drop) and bounded in time (a publish during an outage must not hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPConnectionError,
    AMQPError,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from aio_pika.message import IncomingMessage
from aio_pika.robust_channel import RobustChannel
from aio_pika.robust_connection import RobustConnection
from aio_pika.robust_queue import RobustQueue
from aiormq.abc import DeliveredMessage

from consumer import tracing
from consumer.messages import DEFAULT_PRACTICE, inbound_routing_key

INBOUND_EXCHANGE = "appointments.inbound"
# Observed events (webhooks, reconciler) enter here, never through the partners' exchange:
# bound into appointments.inbound, so they share its partitions and per-appointment order,
# while a delivery still names the exchange it was published to (see worker.trusted).
OBSERVED_EXCHANGE = "appointments.observed"
EVENTS_EXCHANGE = "appointments.events"
DEAD_EXCHANGE = "appointments.dead"
DEAD_QUEUE = "appointments.dead"
REASON_HEADER = "x-appt-reason"
REASON_CLASS_HEADER = "x-appt-reason-class"
DELIVERIES_HEADER = "x-appt-deliveries"
ROUTING_KEY_HEADER = "x-appt-routing-key"
REPLAY_HEADER = "x-appt-replay"

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


class PublishFailed(Exception):
    """The broker did not confirm the message (down, unroutable, nacked or timed out)."""


def partition_queue(index: int) -> str:
    return f"{INBOUND_EXCHANGE}.p{index}"


def broker_addresses(amqp_url: str) -> list[str]:
    """``APPT_AMQP_URL`` is one URL or a comma-separated list (one per cluster node)."""
    addresses = [url.strip() for url in amqp_url.split(",") if url.strip()]
    if not addresses:
        raise ValueError("no broker URL given")
    return addresses


async def ack(message: AbstractIncomingMessage) -> None:
    """Ack once the frame is queued for the socket, without waiting for it to be written
    (aiormq's ``wait=False``).

    The wait told nothing more: an ack written to the socket can still be lost with the
    connection, and the redelivery then finds its message in the inbox. It cost the worker
    a wake-up per message, ~4 % of its CPU (bench/README.md, issue 18).
    """
    if message.delivery_tag is not None:
        await message.channel.basic_ack(message.delivery_tag, wait=False)


class OneTaskQueue(RobustQueue):
    """A robust queue whose consumer callback runs in the task aiormq starts for the delivery.

    aio-pika's own consumer wrapper starts a second task per delivery just to run the
    callback, and waits for it: a task created and scheduled more per message, for
    nothing. The consumer is still registered as RobustQueue registers it, so a
    reconnect consumes again (``RobustQueue.restore`` calls this method).
    """

    async def consume(
        self,
        callback: Handler,
        no_ack: bool = False,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
        consumer_tag: str | None = None,
        timeout: float | None = None,
        robust: bool = True,
    ) -> str:
        async def deliver(message: DeliveredMessage) -> None:
            await callback(IncomingMessage(message, no_ack=no_ack))

        channel = await self.channel.get_underlay_channel()
        consumed = await channel.basic_consume(
            queue=self.name,
            consumer_callback=deliver,
            exclusive=exclusive,
            no_ack=no_ack,
            arguments=arguments,
            consumer_tag=consumer_tag,
            timeout=timeout,
        )
        tag = consumed.consumer_tag
        if tag is None:
            raise RuntimeError(f"the broker gave no consumer tag for {self.name}")
        if robust:
            self._consumers[tag] = {
                "callback": callback,
                "no_ack": no_ack,
                "exclusive": exclusive,
                "arguments": arguments,
            }
        return tag


class OneTaskChannel(RobustChannel):
    """Channels whose queues are OneTaskQueues (aio-pika makes them through QUEUE_CLASS)."""

    QUEUE_CLASS = OneTaskQueue


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection over an address list: each (re)connection attempt takes
    the next address in turn, so a dead cluster node is left for a live one instead of being
    retried forever. Channels, queues and consumers are restored on the new node by aio-pika
    as after any reconnect (a quorum queue lives on every node of the cluster).
    """

    CHANNEL_CLASS = OneTaskChannel

    def __init__(self, addresses: list[str], **kwargs: Any) -> None:
        super().__init__(aio_pika.connection.make_url(addresses[0]), **kwargs)
        self._addresses = addresses
        self._next = 0

    async def _RobustConnection__connect_transport(self) -> None:
        """RobustConnection's one step that opens a socket (to ``self.url``), in its reconnect
        loop and on first connect: point ``self.url`` at the next address first."""
        self.url = aio_pika.connection.make_url(self._addresses[self._next % len(self._addresses)])
        self._next += 1
        await getattr(super(), "_RobustConnection__connect_transport")()  # noqa: B009 (private to aio-pika: untyped)


async def connect_failover(addresses: list[str], *, timeout: float) -> AbstractRobustConnection:
    """Connect to the first address that answers, trying them in a shuffled order (so
    processes spread over the nodes); raise the last error when none does."""
    order = random.sample(addresses, len(addresses))
    error: Exception = AMQPConnectionError("no broker address")
    for start in range(len(order)):
        connection = FailoverConnection(order[start:] + order[:start])
        try:
            await connection.connect(timeout=timeout)
            return connection
        except (AMQPConnectionError, ConnectionError, OSError, TimeoutError) as exc:
            await connection.close()
            error = exc
    raise error


class Broker:
    """One robust connection (failing over along the address list), a confirm channel for
    publishing, one for consuming."""

    def __init__(self, url: str, *, partitions: int = 4, prefetch: int = 64, publish_timeout: float = 5.0) -> None:
        self._addresses = broker_addresses(url)
        self._partitions = partitions
        self._prefetch = prefetch
        self._publish_timeout = publish_timeout
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._renewing = asyncio.Lock()
        self._consume_channel: AbstractChannel | None = None
        self._dead_channel: AbstractChannel | None = None
        # Strong references: aio-pika's robust objects are restored only while referenced.
        self._queues: dict[str, AbstractQueue] = {}
        self._consumer_tags: dict[str, str] = {}

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    async def connect(self, *, timeout: float = 10.0) -> None:
        """Connected once the topology is declared: no publish sees a half-made broker."""
        connection = await connect_failover(self._addresses, timeout=timeout)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await self.declare_topology(channel)
        except BaseException:
            await connection.close()
            raise
        self._connection, self._publish_channel = connection, channel

    async def declare_topology(self, channel: AbstractChannel) -> None:
        """Declare everything idempotently; any process may start first."""
        inbound = await channel.declare_exchange(
            INBOUND_EXCHANGE, aio_pika.ExchangeType.X_CONSISTENT_HASH, durable=True
        )
        observed = await channel.declare_exchange(OBSERVED_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        await inbound.bind(observed)
        await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await channel.declare_queue(DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        await dead_queue.bind(dead, routing_key="")
        for index in range(self._partitions):
            queue = await channel.declare_queue(
                partition_queue(index), durable=True, arguments=self._partition_arguments()
            )
            await queue.bind(inbound, routing_key="1")  # equal weight per partition

    @staticmethod
    def _partition_arguments() -> dict[str, Any]:
        """Quorum + single active consumer: one ordered reader per partition across all workers.

        The delivery limit is a backstop only: the worker dead-letters with its
        own reason first (see worker). At-least-once dead-lettering needs
        reject-publish overflow (RabbitMQ 3.10+).
        """
        return {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-dead-letter-exchange": DEAD_EXCHANGE,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": 50,
        }

    async def channel(self) -> AbstractChannel:
        """A fresh channel for tools (reply queues, observers); closed with the connection."""
        assert self._connection is not None, "connect() first"
        return await self._connection.channel()

    async def close(self) -> None:
        connection, self._connection, self._publish_channel = self._connection, None, None
        if connection is not None:
            await connection.close()

    async def _publish(
        self,
        exchange: str,
        body: bytes,
        routing_key: str,
        properties: aiormq.spec.Basic.Properties,
        *,
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm; a nack, a return or a timeout raises.

        Straight to aiormq's ``basic_publish`` with ready-made properties, and
        without waiting for the socket write apart from the confirm (which
        comes after it anyway): two thirds of the CPU of aio-pika's
        ``Message`` + ``Exchange.publish`` (bench/bench_publish.py). Memory
        stays bounded without that wait: every caller still waits for its
        confirm, at most ``publish_timeout``.
        """
        publish_channel = self._publish_channel
        if publish_channel is None or not self.connected:
            raise PublishFailed("not connected to the broker")
        try:
            # The bound covers waiting for a robust channel to come back, too.
            async with asyncio.timeout(self._publish_timeout):
                channel = cast(aiormq.Channel, await publish_channel.get_underlay_channel())
                # A nack, or a return (mandatory + on_return_raises), raises here.
                with tracing.publish_span(exchange, routing_key, properties):
                    await channel.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=mandatory,
                        wait=False,
                    )
        except DeliveryError as exc:  # a nack, or a return (PublishError) of an unroutable message
            if not isinstance(exc, PublishError):
                await self._renew_publish_channel(publish_channel)
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc
        except (
            AMQPError,
            ChannelInvalidStateError,
            TimeoutError,
            ConnectionError,
        ) as exc:  # ChannelInvalidStateError: mid-reconnect
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc

    async def _renew_publish_channel(self, nacked: AbstractChannel) -> None:
        """Publish on a fresh channel from now on, after ``nacked`` had a message nacked.

        A channel that reconnects to a survivor while a quorum queue's leader is dying (the
        service's own node killed: the common failover case) can keep a stale idea of that
        queue's leader: RabbitMQ 3.10 then nacks every later publish to the queue on that
        channel, for as long as the old leader stays down, while a new channel on the same
        connection publishes fine (tests/chaos/test_cluster_failover.py). The nacked message
        itself is resent by its publisher (PublishFailed), now on the new channel.
        """
        async with self._renewing:
            if self._publish_channel is not nacked or self._connection is None:
                return  # renewed already by a publish nacked at the same time
            try:
                async with asyncio.timeout(self._publish_timeout):
                    self._publish_channel = await self._connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
            except (AMQPError, ChannelInvalidStateError, TimeoutError, ConnectionError):
                return  # the connection is going: its reconnect restores the old channel
        with contextlib.suppress(AMQPError, ChannelInvalidStateError, ConnectionError, RuntimeError):
            await nacked.close()

    async def publish_inbound(
        self,
        body: bytes,
        *,
        appointment_id: int,
        message_id: str,
        practice: str = DEFAULT_PRACTICE,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        properties = json_properties(
            message_id=message_id,
            reply_to=reply_to,
            correlation_id=correlation_id,
            headers=headers,
        )
        await self._publish(INBOUND_EXCHANGE, body, inbound_routing_key(practice, appointment_id), properties)

    async def publish_observed(
        self, body: bytes, *, appointment_id: int, message_id: str, practice: str = DEFAULT_PRACTICE
    ) -> None:
        """An observed event (webhook or reconciler), on the exchange only the service may write."""
        properties = json_properties(message_id=message_id)
        await self._publish(OBSERVED_EXCHANGE, body, inbound_routing_key(practice, appointment_id), properties)

    async def publish_raw_inbound(
        self,
        body: bytes,
        routing_key: str,
        properties: aiormq.spec.Basic.Properties,
        *,
        observed: bool = False,
    ) -> None:
        """A message exactly as given (``appt dead replay`` puts a dead letter back); an observed
        event through appointments.observed, the only way the worker takes one."""
        await self._publish(OBSERVED_EXCHANGE if observed else INBOUND_EXCHANGE, body, routing_key, properties)

    async def publish_event(self, routing_key: str, body: bytes, *, message_id: str) -> None:
        """Not mandatory: a topic nobody observes yet is normal; the store keeps the history."""
        properties = json_properties(message_id=message_id)
        await self._publish(EVENTS_EXCHANGE, body, routing_key, properties, mandatory=False)

    async def publish_reply(self, reply_to: str, body: bytes, *, correlation_id: str | None) -> None:
        """Replies go through the default exchange to the caller's queue.

        Not mandatory: a caller that stopped waiting must not make the command fail.
        """
        properties = json_properties(message_id=None, correlation_id=correlation_id)
        await self._publish("", body, reply_to, properties, mandatory=False)

    async def publish_dead(
        self, message: AbstractIncomingMessage, reason: str, *, reason_class: str, deliveries: int
    ) -> None:
        """Dead-letter with our own reason in the headers, keeping the original body and the
        properties a replay and the ``failed`` result need (``reply_to``, ``correlation_id``)."""
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:1000]
        headers[REASON_CLASS_HEADER] = reason_class
        headers[DELIVERIES_HEADER] = deliveries
        headers[ROUTING_KEY_HEADER] = message.routing_key or ""
        properties = aiormq.spec.Basic.Properties(
            content_type=message.content_type,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            headers=headers,
            delivery_mode=PERSISTENT,
        )
        await self._publish(DEAD_EXCHANGE, message.body, "", properties)

    async def consume(self, partitions: list[int], handler: Handler) -> None:
        assert self._connection is not None
        self._consume_channel = await self._connection.channel(publisher_confirms=False)
        await self._consume_channel.set_qos(prefetch_count=self._prefetch)
        for index in partitions:
            name = partition_queue(index)
            queue = await self._consume_channel.get_queue(name, ensure=True)
            self._queues[name] = queue
            self._consumer_tags[name] = await queue.consume(handler)

    async def consume_dead(self, handler: Handler, *, prefetch: int = 16) -> None:
        """Take ``appointments.dead`` into the store (see consumer.deadletters)."""
        assert self._connection is not None
        self._dead_channel = await self._connection.channel(publisher_confirms=False)
        await self._dead_channel.set_qos(prefetch_count=prefetch)
        queue = await self._dead_channel.get_queue(DEAD_QUEUE, ensure=True)
        self._queues[DEAD_QUEUE] = queue
        self._consumer_tags[DEAD_QUEUE] = await queue.consume(handler)

    async def stop_consuming(self) -> None:
        for name, tag in list(self._consumer_tags.items()):
            if not self.connected:
                break  # nothing to cancel: the broker requeues unacked messages itself
            try:
                async with asyncio.timeout(self._publish_timeout):  # a cancel mid-outage can hang
                    await self._queues[name].cancel(tag)
            except (AMQPError, ConnectionError, RuntimeError, TimeoutError):
                pass  # connection gone meanwhile: the broker requeues unacked messages itself
        self._consumer_tags.clear()


def json_properties(
    *,
    message_id: str | None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> aiormq.spec.Basic.Properties:
    return aiormq.spec.Basic.Properties(
        content_type="application/json",
        message_id=message_id,
        reply_to=reply_to,
        correlation_id=correlation_id,
        headers=headers or {},
        delivery_mode=PERSISTENT,
    )

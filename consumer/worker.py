"""The pipeline: parse, dedupe, order per appointment, decide, commit, publish, ack.

Failures are sorted, never swallowed: transient ones are retried here, then
redelivered after a delay, then dead-lettered with the reason; rejections are
results; invalid input is dead-lettered at once. The ack comes last, after the
store commit and the confirmed publishes, so a crash anywhere means a
redelivery, and the inbox makes a redelivery harmless.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from consumer import metrics
from consumer.broker import REPLAY_HEADER, Broker, PublishFailed
from consumer.commands import execute
from consumer.logs import get_logger
from consumer.messages import (
    INBOUND,
    MAX_MESSAGE_BYTES,
    CommandResult,
    ObservedEvent,
    Reassign,
    StateLogRecord,
)
from consumer.observed import observe
from consumer.pms.client import PmsClient
from consumer.pms.errors import RateLimited, Unavailable
from consumer.records import Decision, Origin
from consumer.store.base import (
    Commit,
    DeadLetterQuery,
    InboxEntry,
    StaleVersion,
    Store,
    StoreUnavailable,
    records_of,
)

log = get_logger(__name__)

STORE_PROBE_INTERVAL = 1.0  # seconds between pings while the store is down
TRANSIENT = (Unavailable, RateLimited, StoreUnavailable, StaleVersion, PublishFailed)
ReassignHandler = Callable[[Reassign], Awaitable[Decision]]


class AlreadyProcessed(Exception):
    """Found in the inbox on a retry: another delivery of the same id committed first."""

    def __init__(self, entry: InboxEntry) -> None:
        super().__init__(entry.message_id)
        self.entry = entry


class InvalidMessage(Exception):
    """The message can never be processed: dead-letter it with this reason."""


def parse(body: bytes) -> Any:
    if len(body) > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"body of {len(body)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: deeply nested arrays/objects; left uncaught it killed the task unsettled.
        raise InvalidMessage(f"not JSON: {exc}") from None
    try:
        return INBOUND.validate_python(data)
    except (ValidationError, ValueError, RecursionError) as exc:
        raise InvalidMessage(f"invalid message: {exc}") from None


def message_key(inbound: Any) -> str:
    """The idempotency key: the command id or the webhook / reconcile event id."""
    return inbound.event_id if isinstance(inbound, ObservedEvent) else command_key(inbound.command_id)


def command_key(command_id: str) -> str:
    """A command's inbox key (also written by the dead-letter collector, for its ``failed`` result)."""
    return command_id


def replay_number(message: AbstractIncomingMessage) -> int:
    """N when `appt dead replay` put this message back for the Nth time, else 0."""
    value = (message.headers or {}).get(REPLAY_HEADER)
    return value if type(value) is int and value > 0 else 0


def replay_key(key: str, replay: int) -> str:
    """A replay's own inbox key: it must not be taken for a duplicate of its own failure,
    while a second copy of the same replay (a replay tool killed and run again) must be."""
    return f"{key}#replay-{replay}" if replay else key


def dead_letter_key(inbound_kind: str, ident: str, replay: int) -> str:
    """The store's key of a dead letter: ``command:<id>`` or ``event:<id>``, per replay."""
    return replay_key(f"{inbound_kind}:{ident}", replay)


def deliveries_of(message: AbstractIncomingMessage) -> int:
    """This delivery's number (quorum queues count redeliveries in ``x-delivery-count``)."""
    count = (message.headers or {}).get("x-delivery-count")
    return (count if isinstance(count, int) else 0) + 1


def result_publishes(
    broker: Broker, result: CommandResult, *, reply_to: str | None, correlation_id: str | None
) -> list[Awaitable[None]]:
    """A result on ``result.<type>.<outcome>``, and to the sender's ``reply_to`` if it gave one."""
    body = result.model_dump_json().encode()
    publishes: list[Awaitable[None]] = [
        broker.publish_event(result.routing_key(), body, message_id=result.message_id())]
    if reply_to:
        publishes.append(broker.publish_reply(
            reply_to, body, correlation_id=correlation_id or result.correlation_id))
    return publishes


class KeyedSerializer:
    """FIFO per key, concurrent across keys.

    ``submit`` is called synchronously in delivery order, and each task waits
    for the previous task of its key, so arrival order is application order.
    """

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, key: str, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._after(self._tails.get(key), work))
        self._tails[key] = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._forget(key, done))
        return task

    @staticmethod
    async def _after(previous: asyncio.Task[None] | None, work: Callable[[], Awaitable[None]]) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await work()

    def _forget(self, key: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._tails.get(key) is task:
            del self._tails[key]

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> bool:
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending


class Worker:
    def __init__(
        self,
        *,
        broker: Broker,
        store: Store,
        pms: PmsClient,
        reassign: ReassignHandler,
        partitions: list[int],
        max_deliveries: int = 5,
        retry_delay: float = 1.0,
        attempts: int = 3,
    ) -> None:
        self._broker = broker
        self._store = store
        self._pms = pms
        self._reassign = reassign
        self._partitions = partitions
        self._max_deliveries = max_deliveries
        self._retry_delay = retry_delay
        self._attempts = attempts
        self._serializer = KeyedSerializer()
        self._stopping = False
        self._store_probe = asyncio.Lock()  # one prober for all messages waiting on the store

    async def start(self) -> None:
        await self._broker.consume(self._partitions, self._on_message)
        log.info("worker consuming", partitions=self._partitions)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop taking messages, let in-flight ones finish; unfinished ones are redelivered."""
        self._stopping = True
        await self._broker.stop_consuming()
        drained = await self._serializer.drain(timeout)
        log.info("worker stopped", drained=drained, in_flight=self._serializer.in_flight)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._serializer.submit(message.routing_key or "", lambda: self._handle(message))

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        kind = "invalid"
        try:
            inbound = parse(message.body)
            kind = inbound.type
            # Every log line written while handling this message carries its ids.
            with structlog.contextvars.bound_contextvars(
                message_id=message_key(inbound), appointment_id=inbound.appointment_id,
                correlation_id=message.correlation_id or getattr(inbound, "correlation_id", None),
            ):
                outcome = await self._process(message, inbound)
        except InvalidMessage as exc:
            outcome = await self._dead_letter(message, str(exc), "invalid", deliveries_of(message))
        metrics.MESSAGES.labels(kind, outcome).inc()
        metrics.PROCESSING_SECONDS.labels(kind).observe(time.perf_counter() - started)

    async def _process(self, message: AbstractIncomingMessage, inbound: Any) -> str:
        try:
            replay = await self._replay_of(message, inbound)
            key = replay_key(message_key(inbound), replay)
            entry = await self._store.inbox_get(key)
            if entry is None:
                try:
                    decision, logs = await self._decide_and_commit(key, inbound, replay)
                except AlreadyProcessed as done:  # the same id, delivered twice at once
                    entry = done.entry
            if entry is not None:
                await self._republish(message, message_key(inbound), inbound, entry)
                await _settle(message.ack())
                return "duplicate"
            await self._publish(message, decision.republish + logs, decision.result)
        except TRANSIENT as exc:
            return await self._retry_later(message, message_key(inbound), exc)
        except Exception as exc:  # a bug must not stop the worker nor lose the message
            log.exception("unexpected error", message_id=message_key(inbound))
            return await self._retry_later(message, message_key(inbound), exc)
        await _settle(message.ack())
        return decision.result.outcome if decision.result else ("applied" if logs else "unchanged")

    async def _replay_of(self, message: AbstractIncomingMessage, inbound: Any) -> int:
        """The replay number `appt dead replay` gave this message, if what it replays was
        dead-lettered: the header alone can't make a publisher's command run twice."""
        replay = replay_number(message)
        if not replay:
            return 0
        kind, ident = ("event", inbound.event_id) if isinstance(inbound, ObservedEvent) else (
            "command", inbound.command_id)
        replayed = DeadLetterQuery(key=dead_letter_key(kind, ident, replay - 1), status=None)
        if await self._store.dead_letters(replayed):
            return replay
        log.warning("replay header on a message that was never dead-lettered: processed as sent", replay=replay)
        return 0

    async def _decide_and_commit(
        self, key: str, inbound: Any, replay: int
    ) -> tuple[Decision, list[StateLogRecord]]:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type(TRANSIENT),
            before_sleep=lambda state: metrics.RETRIES.labels("worker").inc(),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    await self._raise_if_processed(key)  # the conflict may have been this very message
                decision = await self._decide(inbound)
                if replay and decision.result:
                    decision.result = decision.result.model_copy(update={"replay": replay})
                result = decision.result.model_dump(mode="json") if decision.result else None
                logs = await self._store.commit(Commit(
                    appointment=decision.record,
                    workflow=decision.workflow,
                    logs=decision.logs,
                    inbox=InboxEntry(key, result),
                    latest=InboxEntry(message_key(inbound), result) if replay else None,
                ))
        return decision, logs

    async def _raise_if_processed(self, key: str) -> None:
        entry = await self._store.inbox_get(key)
        if entry is not None:
            raise AlreadyProcessed(entry)

    async def _decide(self, inbound: Any) -> Decision:
        if isinstance(inbound, ObservedEvent):
            return await observe(inbound, self._pms, self._store)
        if isinstance(inbound, Reassign):
            return await self._reassign(inbound)
        origin = Origin("command", command_id=inbound.command_id, correlation_id=inbound.correlation_id)
        return await execute(inbound, self._pms, self._store, origin)

    async def _publish(
        self, message: AbstractIncomingMessage, logs: list[StateLogRecord], result: CommandResult | None
    ) -> None:
        publishes: list[Awaitable[None]] = [
            self._broker.publish_event(
                record.routing_key(), record.model_dump_json().encode(), message_id=f"log-{record.seq}"
            )
            for record in logs
        ]
        if result is not None:
            publishes += result_publishes(
                self._broker, result, reply_to=message.reply_to, correlation_id=message.correlation_id)
        # Sent in order on one channel; the confirms are awaited together (one round trip, not N).
        outcomes = await asyncio.gather(*publishes, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        for record in logs:
            log.info("state", **record.model_dump(mode="json", exclude={"detail"}))
        if result is not None:
            log.info("command result", command_id=result.command_id, type=result.type,
                     appointment_id=result.appointment_id, outcome=result.outcome, reasons=result.reasons)

    async def _republish(
        self, message: AbstractIncomingMessage, key: str, inbound: Any, entry: InboxEntry
    ) -> None:
        """A redelivered message: publish again what the first delivery may not have published."""
        logs = await records_of(self._store, inbound.appointment_id, key)
        result = CommandResult.model_validate(entry.result) if entry.result else None
        await self._publish(message, logs, result)

    async def _retry_later(self, message: AbstractIncomingMessage, key: str, exc: BaseException) -> str:
        deliveries = deliveries_of(message)
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, StoreUnavailable):
            return await self._requeue_when_store_answers(message, key, reason)
        if deliveries >= self._max_deliveries:
            return await self._dead_letter(
                message, f"gave up after {deliveries} deliveries: {reason}", "exhausted", deliveries)
        log.warning("transient failure, redelivering", message_id=key, delivery=deliveries, error=reason)
        metrics.RETRIES.labels("redelivery").inc()
        if not self._stopping:
            await asyncio.sleep(self._retry_delay * deliveries)
        await _settle(message.nack(requeue=True))
        return "retried"

    async def _requeue_when_store_answers(self, message: AbstractIncomingMessage, key: str, reason: str) -> str:
        """The store is down (a PostgreSQL restart, a full disk): no fault of the message, so it
        is never dead-lettered for it. It keeps its prefetch slot until the store answers again,
        then goes back to the queue: the partition waits instead of spinning through deliveries."""
        log.error("store unavailable, message held until it answers", message_id=key, error=reason)
        metrics.RETRIES.labels("store").inc()
        if not self._stopping:  # never straight back, even if a ping answers (a write may still fail)
            await asyncio.sleep(STORE_PROBE_INTERVAL)
        async with self._store_probe:
            while not self._stopping:
                try:
                    await self._store.ping()
                    break
                except StoreUnavailable:
                    await asyncio.sleep(STORE_PROBE_INTERVAL)
        await _settle(message.nack(requeue=True))
        return "retried"

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, reason_class: str, deliveries: int
    ) -> str:
        """Into appointments.dead; the dead-letter collector keeps it and answers its command."""
        log.error("dead-lettered", message_id=message.message_id, reason=reason[:500])
        try:
            await self._broker.publish_dead(message, reason, reason_class=reason_class, deliveries=deliveries)
        except PublishFailed:
            await _settle(message.nack(requeue=True))  # try again later rather than lose it
            return "retried"
        metrics.DEAD_LETTERED.labels(reason_class).inc()
        await _settle(message.ack())
        return "dead_lettered"


async def _settle(action: Awaitable[None]) -> None:
    """Ack/nack; after a reconnect the delivery is gone and the broker redelivers it."""
    try:
        await action
    except (ChannelInvalidStateError, AMQPError):  # AMQPError: the connection died under the ack
        log.warning("could not settle a message from a closed channel; it will be redelivered")

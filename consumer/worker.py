"""The pipeline: parse, dedupe, order per appointment, decide, commit, publish, ack.

Failures are sorted, never swallowed: transient ones are retried here, then
redelivered after a delay, then dead-lettered with the reason; rejections are
results; invalid input is dead-lettered at once. The ack comes last, after the
store commit and the confirmed publishes, so a crash anywhere means a
redelivery, and the inbox makes a redelivery harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
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

from consumer import metrics, tracing
from consumer.broker import OBSERVED_EXCHANGE, REPLAY_HEADER, Broker, PublishFailed, ack
from consumer.commands import ReadBeforeWrite, execute
from consumer.logs import get_logger
from consumer.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    INBOUND,
    CommandResult,
    ObservedEvent,
    Reassign,
    StateLogRecord,
    routing_key_names,
)
from consumer.observed import observe
from consumer.pms.errors import Unavailable
from consumer.practices import UNKNOWN_PRACTICE, Practices
from consumer.records import UNREAD, Decision, Origin, Unread, result_for
from consumer.retrying import first_then_retried
from consumer.store.base import (
    AppointmentRecord,
    Commit,
    DeadLetterQuery,
    InboxEntry,
    ParkedMessage,
    StaleVersion,
    Store,
    StoreUnavailable,
    records_of,
)
from consumer.waiting import PARKED_SEQ_HEADER, WAIT_ERRORS, waiting_status

log = get_logger(__name__)

STORE_PROBE_INTERVAL = 1.0  # seconds between pings while the store is down
TRANSIENT = (Unavailable, StoreUnavailable, StaleVersion, PublishFailed)
# Replies may not be sent into the service's own queues (the partitions, the dead letters).
RESERVED_QUEUE_PREFIX = "appointments."
# How long /readyz reports a handler that failed in an unforeseen way.
FAILING_WINDOW = 60.0
ReassignHandler = Callable[[Reassign], Awaitable[Decision]]


class AlreadyProcessed(Exception):
    """Found in the inbox on a retry: another delivery of the same id committed first."""

    def __init__(self, entry: InboxEntry) -> None:
        super().__init__(entry.message_id)
        self.entry = entry


@dataclass(frozen=True)
class Decided:
    """A decision committed: its log records as stored (``seq`` assigned), and its result's body."""

    decision: Decision
    logs: list[StateLogRecord]
    result_body: str | None


class InvalidMessage(Exception):
    """The message can never be processed: dead-letter it with this reason."""


def parse(body: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """Decode and validate in one pass (pydantic's own JSON parser: no dict built twice)."""
    if len(body) > max_bytes:
        raise InvalidMessage(f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        return INBOUND.validate_json(body)
    except ValidationError as exc:
        if exc.errors(include_url=False)[0]["type"] == "json_invalid":
            raise InvalidMessage(f"not JSON: {str(exc)[:200]}") from None
        raise InvalidMessage(f"invalid message: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # Left uncaught, either left the message unsettled.
        raise InvalidMessage(f"invalid message: {exc}") from None


def sender_id(inbound: Any) -> str:
    """The id the sender gave: the command id, or the webhook / reconcile event id."""
    return str(inbound.event_id if isinstance(inbound, ObservedEvent) else inbound.command_id)


def message_key(inbound: Any) -> str:
    """The idempotency key, namespaced by kind and source (``command:``, ``webhook:``, ``reconcile:``).

    One shared space let a command squat the id of a webhook yet to come, which
    was then dropped as a duplicate.
    """
    if isinstance(inbound, ObservedEvent):
        return f"{inbound.source}:{inbound.event_id}"
    return command_key(inbound.command_id)


def command_key(command_id: str) -> str:
    """A command's inbox key (also written by the dead-letter collector, for its ``failed`` result)."""
    return f"command:{command_id}"


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
    broker: Broker,
    result: CommandResult,
    *,
    reply_to: str | None,
    correlation_id: str | None,
    body: str | None = None,
) -> list[Coroutine[Any, Any, None]]:
    """A result on ``result.<type>.<outcome>``, and to the sender's ``reply_to`` if it gave one.
    ``body``: the result already serialised (``result.model_dump_json()``), if it was."""
    payload = (body if body is not None else result.model_dump_json()).encode()
    publishes: list[Coroutine[Any, Any, None]] = [
        broker.publish_event(result.routing_key(), payload, message_id=result.message_id())
    ]
    if reply_to := reply_queue(reply_to):
        publishes.append(
            broker.publish_reply(reply_to, payload, correlation_id=correlation_id or result.correlation_id)
        )
    return publishes


async def publish_in_turn(publishes: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Each publish sent once the one before it is confirmed, all in the caller's task.

    Sent together (``gather``), each publish had a task of its own, and those cost the
    worker more CPU than the extra confirm round trips cost it time (bench/README.md,
    issue 18). In turn, an observer also never sees a command's result before its state
    records are confirmed. The first failure raises; the publishes after it are not sent.
    """
    remaining = iter(publishes)
    try:
        for publish in remaining:
            await publish
    finally:
        for unsent in remaining:
            unsent.close()


def check_trusted(inbound: Any, exchange: str) -> None:
    """Observed events are the PMS's truth: only the service itself may publish them.

    Partners can write to appointments.inbound only (see the README's
    security model), so an event arriving through it is a forgery or a bug.
    """
    if isinstance(inbound, ObservedEvent) and exchange != OBSERVED_EXCHANGE:
        raise InvalidMessage(f"an observed event must come through {OBSERVED_EXCHANGE}, not {exchange!r}")


def reply_queue(reply_to: str | None) -> str | None:
    """Where to send the reply: the caller's queue, never one of the service's own."""
    if reply_to and reply_to.startswith(RESERVED_QUEUE_PREFIX):
        log.warning("reply_to names a queue of the service; no reply sent", reply_to=reply_to)
        return None
    return reply_to or None


class KeyedSerializer:
    """FIFO per key, concurrent across keys, in the delivery's own task (no task of its own).

    ``run`` is entered in delivery order (each delivery's task starts in the
    order the broker delivered), registers itself as its key's tail before its
    first await, and waits for the previous tail of its key: arrival order is
    application order.
    """

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._running: set[asyncio.Future[None]] = set()

    async def run(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        previous = self._tails.get(key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[key] = done
        self._running.add(done)
        try:
            if previous is not None:
                await asyncio.wait([previous])
            await work()
        finally:
            done.set_result(None)
            self._running.discard(done)
            if self._tails.get(key) is done:
                del self._tails[key]

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def drain(self, timeout: float) -> bool:
        if not self._running:
            return True
        _, pending = await asyncio.wait(set(self._running), timeout=timeout)
        return not pending


class Worker:
    def __init__(
        self,
        *,
        broker: Broker,
        store: Store,
        practices: Practices,
        reassign: ReassignHandler,
        partitions: list[int],
        max_deliveries: int = 5,
        retry_delay: float = 1.0,
        attempts: int = 3,
        probe_interval: float = 5.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        read_before_write: ReadBeforeWrite = "always",
    ) -> None:
        self._broker = broker
        self._read_before_write = read_before_write
        self._store = store
        self._practices = practices
        self._reassign = reassign
        self._partitions = partitions
        self._max_deliveries = max_deliveries
        self._retry_delay = retry_delay
        self._attempts = attempts
        self._probe_interval = probe_interval  # how soon an unreachable PMS is tried again
        self._max_message_bytes = max_message_bytes
        self._serializer = KeyedSerializer()
        self._stopping = False
        self._store_probe = asyncio.Lock()  # one prober for all messages waiting on the store
        self._last_unforeseen: float | None = None

    @property
    def failing(self) -> bool:
        """True for a while after a handler failed in a way no branch foresaw (see ``_handle``)."""
        last = self._last_unforeseen
        return last is not None and time.monotonic() - last < FAILING_WINDOW

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
        await self._serializer.run(
            message.routing_key or "", lambda: tracing.processing(message, self._handle(message))
        )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """Every delivery is settled, whatever its bytes: a message left unsettled holds its
        prefetch slot and, with its siblings, stops the partition.

        The counters come after the guarded part: every settle is the last thing its
        branch does, so a failure caught here happened before the message was settled,
        and the nack never follows an ack (an ack is not waited for, see ``broker.ack``,
        and the broker closes a channel that settles one delivery twice).
        """
        started = time.perf_counter()
        try:
            kind, outcome = await self._handle_delivery(message)
        except Exception:
            self._last_unforeseen = time.monotonic()
            metrics.messages("unknown", "unforeseen").inc()
            log.exception(
                "unforeseen failure handling a message; the broker dead-letters it", message_id=message.message_id
            )
            with contextlib.suppress(Exception):  # the queue's dead-letter exchange takes it
                await _settle(message.nack(requeue=False))
            return
        metrics.messages(kind, outcome).inc()
        metrics.processing_seconds(kind).observe(time.perf_counter() - started)

    async def _handle_delivery(self, message: AbstractIncomingMessage) -> tuple[str, str]:
        """The message's kind and what became of it."""
        kind = "invalid"
        try:
            inbound = parse(message.body, self._max_message_bytes)
            check_trusted(inbound, message.exchange or "")
            kind = inbound.type
            # Every log line written while handling this message carries its ids. Tokens, not
            # ``bound_contextvars``: that copies the whole context to save what it rebinds.
            tokens = structlog.contextvars.bind_contextvars(
                message_id=message_key(inbound),
                practice=inbound.practice,
                appointment_id=inbound.appointment_id,
                correlation_id=message.correlation_id or getattr(inbound, "correlation_id", None),
            )
            try:
                return kind, await self._process(message, inbound)
            finally:
                structlog.contextvars.reset_contextvars(**tokens)
        except InvalidMessage as exc:
            return kind, await self._dead_letter(message, str(exc), "invalid", deliveries_of(message))

    async def _process(self, message: AbstractIncomingMessage, inbound: Any) -> str:
        if not routing_key_names(message.routing_key or "", inbound.practice, inbound.appointment_id):
            return await self._misrouted(message, inbound)
        key = message_key(inbound)
        if isinstance(inbound, ObservedEvent) and inbound.practice not in self._practices:
            raise InvalidMessage(f"unknown practice {inbound.practice!r}")  # only a stranger publishes these
        parked = _parked_seq(message)
        try:
            replay = await self._replay_of(message, inbound)
            key = replay_key(key, replay)
            seen = await self._store.seen(key, inbound.practice, inbound.appointment_id)
            if inbound.practice in self._practices and (
                held := await self._hold(message, inbound, key, parked, seen.parked_head)
            ):
                return held
            entry = seen.inbox
            if entry is None:
                try:
                    decided = await self._decide_and_commit(key, inbound, replay, seen.record)
                except AlreadyProcessed as done:  # the same id, delivered twice at once
                    entry = done.entry
            if entry is not None:
                await self._republish(message, inbound, entry)
                await self._done(message, parked)
                return "duplicate"
            decision, logs = decided.decision, decided.logs
            await self._publish(message, decision.republish + logs, decision.result, decided.result_body)
            await self._done(message, parked)
        except WAIT_ERRORS as exc:  # the practice can't be served now: wait, in order
            return await self._wait(message, inbound, key, parked, exc)
        except TRANSIENT as exc:
            return await self._retry_later(message, message_key(inbound), exc, inbound)
        except Exception as exc:  # a bug must not stop the worker nor lose the message
            self._last_unforeseen = time.monotonic()
            log.exception("unexpected error", message_id=message_key(inbound))
            return await self._retry_later(message, message_key(inbound), exc, inbound)
        return decision.result.outcome if decision.result else ("applied" if logs else "unchanged")

    async def _hold(
        self,
        message: AbstractIncomingMessage,
        inbound: Any,
        key: str,
        parked: int | None,
        head: tuple[int, str] | None,
    ) -> str | None:
        """Park (or keep parked) a message that must wait; None when it may be processed now.

        A command waits while its practice does, or while an older message of its
        appointment is parked (it must not overtake it). A handed-back message goes
        only when it is its appointment's oldest. Observed events need no PMS call to
        be applied, so they never wait on the practice. ``head`` is the appointment's
        oldest parked message, read with the inbox entry (``Store.seen``).
        """
        if parked is None and isinstance(inbound, ObservedEvent):
            return None
        practice = self._practices.get(inbound.practice)
        if parked is not None:
            if head is None or head[0] > parked:  # handed back twice: it was processed already
                await _settle(ack(message))
                return "duplicate"
            if head == (parked, key) and practice.served:
                return None  # its turn (and the header names this very message: it may unpark it)
            await self._store.keep_parked(parked)
        elif head is None and practice.served:
            return None
        else:
            await self._park(message, inbound, key, practice.reason or "behind an older parked message")
        await _settle(ack(message))
        return "parked"

    async def _wait(
        self, message: AbstractIncomingMessage, inbound: Any, key: str, parked: int | None, error: BaseException
    ) -> str:
        """The PMS can't serve this practice now: park the message (acked), and the practice waits."""
        reason = f"{type(error).__name__}: {error}"
        status, retry_at = waiting_status(error, probe_interval=self._probe_interval)
        if inbound.practice in self._practices:
            practice = self._practices.get(inbound.practice)
            if practice.wait(status, retry_at, reason):
                log.error(
                    "practice waiting: its commands are parked until it can be served",
                    practice=practice.name,
                    status=status,
                    retry_at=retry_at,
                    error=reason,
                )
        try:
            if parked is None:
                await self._park(message, inbound, key, reason)
            else:
                await self._store.keep_parked(parked)
        except StoreUnavailable as exc:
            return await self._retry_later(message, key, exc, inbound)
        await _settle(ack(message))
        return "parked"

    async def _park(self, message: AbstractIncomingMessage, inbound: Any, key: str, reason: str) -> None:
        """``key`` is the inbox key (a replay's own), so a replay parks and comes back as a replay."""
        await self._store.park(
            ParkedMessage(
                practice=inbound.practice,
                appointment_id=inbound.appointment_id,
                message_id=key,
                body=message.body,
                reason=reason[:500],
                reply_to=message.reply_to,
                correlation_id=message.correlation_id,
                replay=replay_number(message),
            )
        )

    async def _done(self, message: AbstractIncomingMessage, parked: int | None) -> None:
        """Processed: a parked message is forgotten (only now: a crash before redelivers it), then acked."""
        if parked is not None:
            await self._store.unpark(parked)
        await _settle(ack(message))

    async def _replay_of(self, message: AbstractIncomingMessage, inbound: Any) -> int:
        """The replay number `appt dead replay` gave this message, if what it replays was
        dead-lettered: the header alone can't make a publisher's command run twice."""
        replay = replay_number(message)
        if not replay:
            return 0
        kind, ident = (
            ("event", inbound.event_id) if isinstance(inbound, ObservedEvent) else ("command", inbound.command_id)
        )
        replayed = DeadLetterQuery(key=dead_letter_key(kind, ident, replay - 1), status=None)
        if await self._store.dead_letters(replayed):
            return replay
        log.warning("replay header on a message that was never dead-lettered: processed as sent", replay=replay)
        return 0

    async def _decide_and_commit(
        self, key: str, inbound: Any, replay: int, stored: AppointmentRecord | None
    ) -> Decided:
        """Decide and commit; a transient failure is tried again (``_retrying``), from a fresh read."""

        async def attempt(number: int) -> Decided:
            if number > 1:
                await self._raise_if_processed(key, inbound.practice)  # the conflict may have been this very message
            decision = await self._decide(inbound, stored if number == 1 else UNREAD)
            if replay and decision.result:
                decision.result = decision.result.model_copy(update={"replay": replay})
            # Serialised once: the inbox keeps the very text the result's publish sends.
            body = decision.result.model_dump_json() if decision.result else None
            logs = await self._store.commit(
                Commit(
                    appointment=decision.record,
                    workflow=decision.workflow,
                    logs=decision.logs,
                    inbox=InboxEntry(key, practice=inbound.practice, result_json=body),
                    latest=InboxEntry(message_key(inbound), practice=inbound.practice, result_json=body)
                    if replay
                    else None,
                )
            )
            return Decided(decision, logs, body)

        return await first_then_retried(attempt, self._retrying)

    def _retrying(self) -> AsyncRetrying:
        """The worker's in-process retry policy (built only once a first attempt has failed)."""
        return AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type(TRANSIENT),
            before_sleep=lambda state: metrics.RETRIES.labels("worker").inc(),
            reraise=True,
        )

    async def _misrouted(self, message: AbstractIncomingMessage, inbound: Any) -> str:
        """A routing key naming another appointment: ordering is per key, so it is never applied.

        A command gets a ``rejected`` result (no inbox entry: the same command
        id on the right key is still applied); an event is dead-lettered.
        """
        reason = f"the routing key does not name appointment {inbound.appointment_id}"
        if isinstance(inbound, ObservedEvent):
            return await self._dead_letter(message, reason, "invalid", deliveries_of(message))
        try:
            await self._publish(message, [], result_for(inbound, "rejected", reasons={"routing_key": [reason]}))
        except PublishFailed as exc:
            return await self._retry_later(message, message_key(inbound), exc, None)  # nothing of a saga ran
        await _settle(ack(message))
        return "rejected"

    async def _raise_if_processed(self, key: str, practice: str) -> None:
        entry = await self._store.inbox_get(key, practice)
        if entry is not None:
            raise AlreadyProcessed(entry)

    async def _decide(self, inbound: Any, stored: AppointmentRecord | None | Unread) -> Decision:
        """``stored``: the record as read with the inbox entry, or ``UNREAD`` (read it afresh)."""
        if inbound.practice not in self._practices:
            return Decision(result=result_for(inbound, "rejected", reasons=UNKNOWN_PRACTICE))
        pms = self._practices.get(inbound.practice).pms
        if isinstance(inbound, ObservedEvent):
            return await observe(inbound, pms, self._store, stored)
        if isinstance(inbound, Reassign):
            return await self._reassign(inbound)
        origin = Origin(
            "command", practice=inbound.practice, command_id=inbound.command_id, correlation_id=inbound.correlation_id
        )
        return await execute(inbound, pms, self._store, origin, self._read_before_write, stored=stored)

    async def _publish(
        self,
        message: AbstractIncomingMessage,
        logs: list[StateLogRecord],
        result: CommandResult | None,
        result_body: str | None = None,
    ) -> None:
        """``result_body``: the result as already serialised for the inbox, if it was."""
        publishes: list[Coroutine[Any, Any, None]] = [
            self._broker.publish_event(
                record.routing_key(), record.model_dump_json().encode(), message_id=f"log-{record.seq}"
            )
            for record in logs
        ]
        if result is not None:
            publishes += result_publishes(
                self._broker,
                result,
                reply_to=message.reply_to,
                correlation_id=message.correlation_id,
                body=result_body,
            )
        await publish_in_turn(publishes)
        for record in logs:
            log.info("state", **record.model_dump(mode="json", exclude={"detail"}))
        if result is not None and not _said_by_its_states(result, logs):
            log.info(
                "command result",
                command_id=result.command_id,
                type=result.type,
                practice=result.practice,
                appointment_id=result.appointment_id,
                outcome=result.outcome,
                reasons=result.reasons,
            )

    async def _republish(self, message: AbstractIncomingMessage, inbound: Any, entry: InboxEntry) -> None:
        """A redelivered message: publish again what the first delivery may not have published."""
        logs = await records_of(self._store, inbound.appointment_id, sender_id(inbound), inbound.practice)
        result = CommandResult.model_validate(entry.result) if entry.result else None
        await self._publish(message, logs, result)

    async def _retry_later(self, message: AbstractIncomingMessage, key: str, exc: BaseException, inbound: Any) -> str:
        deliveries = deliveries_of(message)
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, StoreUnavailable):
            return await self._requeue_when_store_answers(message, key, reason)
        if deliveries >= self._max_deliveries:
            if await self._left_to_its_workflow(inbound):
                log.warning(
                    "reassign left to its workflow's deadline, not dead-lettered",
                    message_id=key,
                    delivery=deliveries,
                    error=reason,
                )
                await _settle(ack(message))
                return "deferred"
            return await self._dead_letter(
                message, f"gave up after {deliveries} deliveries: {reason}", "exhausted", deliveries
            )
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

    async def _left_to_its_workflow(self, inbound: Any) -> bool:
        """A reassign whose saga has started is never given up for a transient failure.

        Its state and deadline are in the store, and the workflow watcher hands it back to the
        pipeline once overdue, so the running service drives it to its end and answers it then.
        Dead-lettering it instead would answer it ``failed`` while its saga goes on.
        """
        if not isinstance(inbound, Reassign):
            return False
        try:
            workflow = await self._store.active_workflow(inbound.appointment_id)
        except StoreUnavailable:
            return False  # can't tell: the dead letter keeps it, and answers it
        return (
            workflow is not None
            and workflow.command_id == inbound.command_id
            and workflow.state != "compensation_failed"
        )

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
        if (parked := _parked_seq(message)) is not None:
            try:
                await self._store.unpark(parked)
            except StoreUnavailable:  # handed back again later: the dead letter may then repeat
                log.warning("dead-lettered message still parked", seq=parked)
        await _settle(ack(message))
        return "dead_lettered"


def _said_by_its_states(result: CommandResult, logs: list[StateLogRecord]) -> bool:
    """A command that succeeded by moving its appointment: its ``state`` lines (``source``
    ``command``, its ``command_id``) already say so, and a ``command result`` line would
    repeat them (a log line is ~3 % of a command's CPU). Any other result is logged."""
    return result.outcome == "succeeded" and any(
        record.command_id == result.command_id and record.source == "command" for record in logs
    )


def _parked_seq(message: AbstractIncomingMessage) -> int | None:
    """The store's seq of a handed-back parked message (a live message has none)."""
    value = (message.headers or {}).get(PARKED_SEQ_HEADER)
    return value if isinstance(value, int) else None


async def _settle(action: Awaitable[None]) -> None:
    """Ack/nack; after a reconnect the delivery is gone and the broker redelivers it."""
    try:
        await action
    except (ChannelInvalidStateError, AMQPError):  # AMQPError: the connection died under the ack
        log.warning("could not settle a message from a closed channel; it will be redelivered")

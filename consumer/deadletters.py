"""Dead letters: every one kept in the store, every command among them answered.

``appointments.dead`` is the intake. The collector takes each message off it,
keeps it in the store's dead-letter table (where ``appt dead`` lists, replays
and purges it: a queue can't be listed without taking messages off it) and
answers the command it names with a ``failed`` result, on
``result.<type>.failed`` and to its ``reply_to``. Store first, then publish,
then ack: a crash anywhere redelivers the dead letter, and the store keeps it
once (by its key) and answers it with the same result again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import date, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

from consumer import metrics
from consumer.broker import (
    DELIVERIES_HEADER,
    REASON_CLASS_HEADER,
    REASON_HEADER,
    REPLAY_HEADER,
    ROUTING_KEY_HEADER,
    Broker,
    PublishFailed,
)
from consumer.failpoints import failpoint
from consumer.logs import get_logger
from consumer.messages import (
    COMMAND_TYPES,
    DEFAULT_PRACTICE,
    MAX_ID,
    MAX_ID_BYTES,
    MAX_SHORTSTR_BYTES,
    CommandResult,
    fits_bytes,
)
from consumer.periodic import every
from consumer.store.base import (
    DeadLetter,
    InboxEntry,
    StaleVersion,
    Store,
    StoreUnavailable,
)
from consumer.worker import command_key, dead_letter_key, publish_in_turn, replay_key, result_publishes

log = get_logger(__name__)

MAX_READ_BYTES = 1024 * 1024  # past this a body is not parsed for the ids it may name
EVENT_TYPES = ("appointment.created", "appointment.updated", "appointment.state_changed", "appointment.deleted")


def letter_from(message: AbstractIncomingMessage) -> DeadLetter:
    """The dead letter a delivery from ``appointments.dead`` carries, with what its body names."""
    headers = message.headers or {}
    named = _named_in(message.body)
    replay = headers.get(REPLAY_HEADER)
    replay = replay if type(replay) is int and replay > 0 else 0
    kind, ident = named.get("key") or (
        ("message", message.message_id) if message.message_id else ("sha256", hashlib.sha256(message.body).hexdigest())
    )
    reason, reason_class = _reason(headers)
    return DeadLetter(
        key=dead_letter_key(kind, ident, replay),
        reason=reason,
        reason_class=reason_class,
        deliveries=_deliveries(headers),
        body=message.body,
        routing_key=str(headers.get(ROUTING_KEY_HEADER) or message.routing_key or ""),
        replay=replay,
        command_id=named.get("command_id"),
        type=named.get("type"),
        appointment_id=named.get("appointment_id"),
        practice=named.get("practice"),
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        headers=_plain(dict(headers)),
    )


def failed_result(letter: DeadLetter) -> CommandResult | None:
    """The terminal result of a dead-lettered command, None if the letter names none."""
    if letter.command_id is None or letter.type not in COMMAND_TYPES or letter.appointment_id is None:
        return None
    return CommandResult(
        command_id=letter.command_id,
        type=letter.type,
        appointment_id=letter.appointment_id,
        practice=letter.practice or DEFAULT_PRACTICE,
        outcome="failed",
        reasons={"dead_letter": [letter.reason]},
        deliveries=letter.deliveries,
        replay=letter.replay,
        correlation_id=_named_in(letter.body).get("correlation_id"),
    )


class DeadLetterCollector:
    """Drains ``appointments.dead`` into the store and answers each dead command once."""

    def __init__(self, *, broker: Broker, store: Store, retry_delay: float = 1.0) -> None:
        self._broker = broker
        self._store = store
        self._retry_delay = retry_delay
        self._order = asyncio.Lock()  # kept in delivery order: dead_id is the listing order

    async def start(self) -> None:
        await self._broker.consume_dead(self._on_message)

    async def watch(self, stop: asyncio.Event, interval: float = 5.0) -> None:
        """Keep the ``appt_dead_letters`` gauge at what the store holds (`appt dead` changes it)."""
        await every(interval, stop, self.refresh_metrics, "dead-letter watch")

    async def refresh_metrics(self) -> None:
        counts = await self._store.count_dead_letters()
        metrics.DEAD_LETTERS.clear()
        for reason_class, count in counts.items():
            metrics.DEAD_LETTERS.labels(reason_class).set(count)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        async with self._order:
            attempt = 0
            # Kept until it is stored and answered: a dead letter has nowhere further to go.
            # A stop meanwhile leaves it unacked, so the broker hands it to the next collector.
            while True:
                try:
                    await self._collect(message)
                    break
                except (StoreUnavailable, StaleVersion, PublishFailed) as exc:
                    attempt += 1
                    log.warning("dead letter not collected yet, retrying", error=str(exc), attempt=attempt)
                    await asyncio.sleep(min(30.0, self._retry_delay * attempt))
                except Exception:  # a bug: never lose the letter, never stop the collector
                    log.exception(
                        "dead letter could not be collected; left unacked until the next start",
                        message_id=message.message_id,
                    )
                    return
            try:
                await message.ack()
            except ChannelInvalidStateError:  # reconnected meanwhile: redelivered, and kept once
                log.warning("could not ack a dead letter from a closed channel; it will be redelivered")

    async def _collect(self, message: AbstractIncomingMessage) -> None:
        letter = letter_from(message)
        result = failed_result(letter)
        answer = latest = None
        if result is not None:
            # Under the key the worker gives this delivery, so a duplicate gets this result;
            # a replay's death is also the newest answer for the command id itself.
            dumped = result.model_dump(mode="json")
            key = command_key(result.command_id)
            answer = InboxEntry(replay_key(key, result.replay), dumped, result.practice)
            latest = InboxEntry(key, dumped, result.practice) if result.replay else None
        collected = await self._store.add_dead_letter(letter, answer, latest)
        failpoint("after_dead_letter_stored")
        if collected.new:
            log.info(
                "dead letter kept", dead_id=collected.letter.dead_id, key=letter.key, reason_class=letter.reason_class
            )
            if result is None and letter.type not in EVENT_TYPES:
                metrics.DEAD_UNREADABLE.inc()
        if collected.answer is not None and collected.answer.result is not None:
            answered = CommandResult.model_validate(collected.answer.result)
            await publish_in_turn(
                result_publishes(
                    self._broker, answered, reply_to=message.reply_to, correlation_id=message.correlation_id
                )
            )


def _named_in(body: bytes) -> dict[str, Any]:
    """What a body names even when the rest of it is invalid: a command's id, type and
    appointment, or an event's id; its key; its practice and correlation id if given."""
    if len(body) > MAX_READ_BYTES:
        return {}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    named: dict[str, Any] = {}
    for field in ("practice", "correlation_id"):
        # Both end up in AMQP properties of the failed result: 255 bytes at most.
        if isinstance(data.get(field), str) and fits_bytes(data[field], MAX_SHORTSTR_BYTES):
            named[field] = data[field]
    kind = data.get("type")
    command_id = data.get("command_id")
    if kind in COMMAND_TYPES and isinstance(command_id, str) and command_id and fits_bytes(command_id, MAX_ID_BYTES):
        named.update(
            key=("command", command_id),
            command_id=command_id,
            type=kind,
            appointment_id=_id(data.get("appointment_id")),
        )
    elif kind in EVENT_TYPES and isinstance(data.get("event_id"), str):
        appointment = data.get("appointment")
        named.update(
            key=("event", data["event_id"]),
            type=kind,
            appointment_id=_id(appointment.get("id") if isinstance(appointment, dict) else None),
        )
    if "key" in named and named.get("practice", DEFAULT_PRACTICE) != DEFAULT_PRACTICE:
        named["key"] = f"{named['practice']}/{named['key']}"  # ids are unique per practice only
    return named


def _id(value: Any) -> int | None:
    return value if type(value) is int and 0 < value <= MAX_ID else None


def _reason(headers: dict[str, Any]) -> tuple[str, str]:
    """Ours (the worker's), else RabbitMQ's own (``x-death``: the delivery-limit backstop)."""
    if headers.get(REASON_HEADER):
        return str(headers[REASON_HEADER]), str(headers.get(REASON_CLASS_HEADER) or "unknown")
    deaths = headers.get("x-death")
    why = deaths[0].get("reason") if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else None
    why = why.decode() if isinstance(why, bytes) else why
    return f"dead-lettered by RabbitMQ: {why or 'no reason given'}", "broker"


def _deliveries(headers: dict[str, Any]) -> int:
    for name in (DELIVERIES_HEADER, "x-delivery-count"):
        value = headers.get(name)
        if type(value) is int and value > 0:
            return value
    return 1


def _plain(value: Any) -> Any:
    """AMQP header values (bytes, datetimes, nested tables) as JSON the store can keep."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)

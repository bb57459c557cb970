"""Hostile input at the AMQP door, each defect of issue 12 as the attack that found it.

A partner with publish rights on appointments.inbound tries to stop a
partition, forge what the PMS said, misroute, squat another message's id, or
aim replies at the service's own queues. Real RabbitMQ, store and sandbox.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from consumer.broker import INBOUND_EXCHANGE, OBSERVED_EXCHANGE, REASON_HEADER, Broker
from consumer.messages import Reassign
from consumer.records import Decision
from consumer.store.base import AppointmentRecord, Commit
from consumer.worker import Worker
from tests.chaos.common import seed_slots
from tests.helpers import eventually
from tests.stack import Stack, running_stack

APPOINTMENT = 1001


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    seed_slots(sandbox, 2)
    async with running_stack(amqp_url, sqlite_url, sandbox.url, retry_delay=0.05) as running:
        yield running


async def publish(
    amqp_url: str,
    bodies: list[bytes],
    *,
    routing_key: str = str(APPOINTMENT),
    exchange: str = INBOUND_EXCHANGE,
    **properties: Any,
) -> list[str]:
    """Publish raw bodies as an outside client would; return their message ids."""
    ids = [f"raw-{uuid.uuid4()}" for _ in bodies]
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        for message_id, body in zip(ids, bodies, strict=True):
            await target.publish(aio_pika.Message(body, message_id=message_id, **properties), routing_key)
    return ids


def reasons(stack: Stack, ids: list[str]) -> list[str]:
    by_id = {m.message_id: str((m.headers or {}).get(REASON_HEADER, "")) for m in stack.observer.dead}
    return [by_id[i] for i in ids if i in by_id]


def event(appointment_id: int = APPOINTMENT, *, event_id: str = "evt-1", **fields: Any) -> bytes:
    appointment = {
        "id": appointment_id,
        "state": "Confirmed",
        "patient_id": 1001,
        "updated_at": datetime.now(UTC).isoformat(),
        **fields,
    }
    return json.dumps(
        {"type": "appointment.updated", "event_id": event_id, "source": "webhook", "appointment": appointment}
    ).encode()


async def still_serves(stack: Stack, appointment_id: int = APPOINTMENT) -> None:
    command_id = await stack.send({"type": "edit_notes", "appointment_id": appointment_id, "notes": "after"})
    assert (await stack.result(command_id, timeout=30))["outcome"] == "succeeded"


async def test_a_prefetch_of_huge_numbers_does_not_stop_the_partition(stack: Stack, amqp_url: str) -> None:
    # 5,000 digits: json.loads raises a plain ValueError, which once left the message unsettled.
    huge = ('{"type": "confirm", "command_id": "h", "appointment_id": ' + "9" * 5000 + "}").encode()
    ids = await publish(amqp_url, [huge] * 70)  # more than one prefetch (64) on one key
    await still_serves(stack)
    await eventually(lambda: len(reasons(stack, ids)) == len(ids), timeout=30)
    assert all(r.startswith("not JSON") for r in reasons(stack, ids))


async def test_an_observed_event_published_by_a_partner_is_refused(stack: Stack, amqp_url: str) -> None:
    forged = await publish(amqp_url, [event(state="Cancelled")])
    await eventually(lambda: reasons(stack, forged), timeout=15)
    assert "appointments.observed" in reasons(stack, forged)[0]
    assert await stack.store.get_appointment(APPOINTMENT) is None

    await stack.broker.publish_observed(event(event_id="evt-2"), appointment_id=APPOINTMENT, message_id="evt-2")
    record = await eventually(lambda: stack.store.get_appointment(APPOINTMENT), timeout=15)
    assert record.state == "Confirmed"


@pytest.mark.parametrize("updated_at", ["2099-01-01T00:00:00Z", "2026-01-01T00:00:00"])
async def test_an_event_time_in_the_future_or_without_zone_is_invalid(
    stack: Stack, amqp_url: str, updated_at: str
) -> None:
    ids = await publish(amqp_url, [event(updated_at=updated_at)], exchange=OBSERVED_EXCHANGE)
    await eventually(lambda: reasons(stack, ids), timeout=15)
    assert "updated_at" in reasons(stack, ids)[0]
    # A genuine later event is applied (nothing stale-skips it).
    await stack.broker.publish_observed(event(event_id="evt-3"), appointment_id=APPOINTMENT, message_id="evt-3")
    assert (await eventually(lambda: stack.store.get_appointment(APPOINTMENT), timeout=15)).state == "Confirmed"


@pytest.mark.parametrize("poisoned", ["2099-01-01T00:00:00Z", "2026-01-01T00:00:00"])
async def test_a_record_poisoned_before_the_checks_does_not_block_genuine_events(stack: Stack, poisoned: str) -> None:
    await stack.store.commit(
        Commit(
            appointment=AppointmentRecord(
                APPOINTMENT, "Pending", 1001, upstream_updated_at=poisoned, data={"id": APPOINTMENT}
            )
        )
    )
    await stack.broker.publish_observed(event(event_id="evt-4"), appointment_id=APPOINTMENT, message_id="evt-4")

    async def confirmed() -> bool:
        record = await stack.store.get_appointment(APPOINTMENT)
        return record is not None and record.state == "Confirmed"

    await eventually(confirmed, timeout=15)
    assert stack.observer.dead == []


async def test_a_routing_key_naming_another_appointment_is_rejected(stack: Stack, amqp_url: str, sandbox: Any) -> None:
    command = {"type": "edit_notes", "appointment_id": APPOINTMENT, "notes": "misrouted", "command_id": "mis-1"}
    await publish(amqp_url, [json.dumps(command).encode()], routing_key=str(APPOINTMENT + 1))
    result = await stack.result("mis-1")
    assert result["outcome"] == "rejected" and "routing_key" in result["reasons"]
    assert sandbox.state.get(APPOINTMENT)["notes"] != "misrouted"
    # The same command id on the right key is still applied: the rejection squats nothing.
    await publish(amqp_url, [json.dumps({**command, "notes": "routed"}).encode()])
    await eventually(lambda: stack.observer.result_counts.get("mis-1") == 2, timeout=15)
    assert stack.observer.results["mis-1"]["outcome"] == "succeeded"


async def test_a_command_cannot_squat_a_future_webhook_id(stack: Stack) -> None:
    squat = await stack.send(
        {"type": "edit_notes", "appointment_id": APPOINTMENT, "notes": "x", "command_id": "msg_future"}
    )
    await stack.result(squat)
    await stack.broker.publish_observed(
        event(event_id="msg_future"), appointment_id=APPOINTMENT, message_id="msg_future"
    )
    await eventually(lambda: any(r.get("webhook_id") == "msg_future" for r in stack.observer.logs), timeout=15)
    assert await stack.store.inbox_get("webhook:msg_future") is not None


async def test_a_correlation_id_over_255_bytes_is_invalid_at_once(stack: Stack, amqp_url: str) -> None:
    reply = f"caller-{uuid.uuid4()}"
    command = {"type": "confirm", "appointment_id": APPOINTMENT, "command_id": "long-corr", "correlation_id": "c" * 300}
    ids = await publish(amqp_url, [json.dumps(command).encode()], reply_to=reply)
    await eventually(lambda: reasons(stack, ids), timeout=15)
    assert "correlation_id" in reasons(stack, ids)[0]
    # Dead-lettered at once and answered "failed" once (by the dead-letter collector), never applied.
    assert (await stack.result("long-corr"))["outcome"] == "failed"
    await asyncio.sleep(0.5)
    assert stack.observer.result_counts["long-corr"] == 1


async def test_reply_to_a_queue_of_the_service_is_ignored(stack: Stack, amqp_url: str) -> None:
    command = {"type": "edit_notes", "appointment_id": APPOINTMENT, "notes": "r", "command_id": "reply-1"}
    await publish(amqp_url, [json.dumps(command).encode()], reply_to="appointments.dead")
    assert (await stack.result("reply-1"))["outcome"] == "succeeded"
    await asyncio.sleep(0.5)
    assert stack.observer.dead == []  # no "reply" landed in the dead-letter queue


async def test_an_id_given_as_a_string_float_or_bool_is_invalid(stack: Stack, amqp_url: str) -> None:
    bodies = [
        json.dumps({"type": "confirm", "command_id": f"loose-{i}", "appointment_id": value}).encode()
        for i, value in enumerate(["1001", 1001.0, True])
    ]
    ids = await publish(amqp_url, bodies)
    await eventually(lambda: len(reasons(stack, ids)) == 3, timeout=15)
    assert all("appointment_id" in r for r in reasons(stack, ids))
    assert stack.observer.results == {}


async def a_bug(command: Reassign) -> Decision:
    raise RuntimeError("a bug no branch foresaw")


async def test_a_handler_bug_settles_the_message_and_shows_the_worker_failing(
    stack: Stack, amqp_url: str, sandbox: Any
) -> None:
    """A second worker whose reassign handler has a bug: it must say so, and still settle everything."""
    await stack.worker.stop(timeout=5)  # the buggy worker below takes the partitions
    broker = Broker(amqp_url)
    await broker.connect()
    worker = Worker(
        broker=broker,
        store=stack.store,
        practices=stack.practices,
        reassign=a_bug,
        partitions=list(range(4)),
        max_deliveries=2,
        retry_delay=0.05,
    )
    await worker.start()
    try:
        assert not worker.failing
        ids = await publish(
            amqp_url,
            [
                json.dumps(
                    {"type": "reassign", "appointment_id": APPOINTMENT, "patient_id": 2000, "command_id": "bug-1"}
                ).encode()
            ],
        )
        await eventually(lambda: reasons(stack, ids), timeout=15)
        assert "RuntimeError" in reasons(stack, ids)[0]
        assert worker.failing
    finally:
        await worker.stop(timeout=5)
        await broker.close()

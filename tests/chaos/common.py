"""What the chaos tests share: the short/long scale, load shapes, and the end-state checks.

The checks read the sandbox (the PMS's truth) and the store (the service's
belief) after the chaos, so each test states its invariants in a few lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import ChannelInvalidStateError

from consumer.broker import (
    DEAD_EXCHANGE,
    EVENTS_EXCHANGE,
    REASON_HEADER,
    Broker,
    PublishFailed,
    broker_addresses,
    connect_failover,
)
from consumer.messages import DEFAULT_PRACTICE
from consumer.store.base import Store

LONG = os.environ.get("APPT_CHAOS_LONG") == "1"
# Tomorrow from 08:00 UTC: inside the reconciler's polled windows (its near window, every cycle),
# so catch-up polling sees every seeded appointment, as it would see a real practice's next days.
BASE_START = datetime.now(UTC).replace(hour=8, minute=0, second=0, microsecond=0) + timedelta(days=1)

# Long runs take minutes; the short ones stay under pytest's default 120 s.
chaos_marks = [pytest.mark.chaos, pytest.mark.timeout(1800 if LONG else 120)]


def scaled(short: int, long: int) -> int:
    """The short figure in the default run, the long one under APPT_CHAOS_LONG=1."""
    return long if LONG else short


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def seed_slots(sandbox: Any, count: int, *, first_id: int = 1001) -> list[int]:
    """``count`` Pending appointments, each in a slot of its own; every third has no patient yet."""
    appointments = []
    for index in range(count):
        start = BASE_START + timedelta(minutes=30 * index)
        appointments.append(
            {
                "id": first_id + index,
                "practitioner_id": 1 + index % 3,
                "patient_id": None if index % 3 == 0 else 1000 + index,
                "start_time": _iso(start),
                "finish_time": _iso(start + timedelta(minutes=30)),
                "reason": "Exam",
                "state": "Pending",
            }
        )
    return [a["id"] for a in sandbox.state.seed(appointments)]


def random_command(rng: random.Random, appointment_ids: list[int], *, reassign: bool = True) -> dict[str, Any]:
    """A command of the mixed load; many are legitimately rejected (that is part of the mix)."""
    kinds = ["edit_notes"] * 8 + ["confirm"] * 4 + ["set_patient"] * 3 + ["cancel"]
    if reassign:
        kinds += ["reassign"] * 2
    kind = rng.choice(kinds)
    command: dict[str, Any] = {
        "type": kind,
        "appointment_id": rng.choice(appointment_ids),
        "command_id": f"{kind}-{uuid.uuid4().hex[:12]}",
    }
    if kind == "edit_notes":
        command["notes"] = f"note {rng.randrange(10**6)}"
    elif kind == "cancel":
        command["reason"] = "Patient cancelled"
    elif kind in ("set_patient", "reassign"):
        command["patient_id"] = rng.randrange(2000, 3000)
    return command


def pms_side_change(rng: random.Random, sandbox: Any, appointment_ids: list[int]) -> None:
    """What the PMS does by itself (SMS auto-confirm, a receptionist's note): only legal moves."""
    appointment_id = rng.choice(appointment_ids)
    current = sandbox.state.get(appointment_id)
    if current is None or current["state"] not in ("Pending", "Confirmed"):
        return
    if current["state"] == "Pending" and rng.random() < 0.4:
        sandbox.state.change_now(appointment_id, {"state": "Confirmed"})
    else:
        sandbox.state.change_now(appointment_id, {"notes": f"front desk {rng.randrange(10**6)}"})


async def publish_until_confirmed(broker: Broker, command: dict[str, Any], *, give_up: float = 120.0) -> None:
    """Publish with a confirm, retrying through an outage (a client that resends: same command id)."""
    body = json.dumps(command).encode()
    deadline = asyncio.get_running_loop().time() + give_up
    while True:
        try:
            await broker.publish_inbound(
                body,
                practice=command.get("practice", DEFAULT_PRACTICE),
                appointment_id=command["appointment_id"],
                message_id=command["command_id"],
            )
            return
        # ChannelInvalidStateError escapes Broker._publish during an outage (a RuntimeError,
        # not an AMQPError): reported as a bug; tolerated here so the load goes on.
        except (PublishFailed, ChannelInvalidStateError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


@dataclass
class Collector:
    """Every result (all repeats kept) and every dead letter, from a durable queue of our own."""

    results: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    dead: dict[str, str] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)

    async def on_event(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        if (message.routing_key or "").startswith("result."):
            self.results[body["command_id"]].append(body)
        else:
            self.logs.append(body)
        await message.ack()

    async def on_dead(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.dead[str(message.message_id)] = str((message.headers or {}).get(REASON_HEADER) or "")
        await message.ack()

    def lost(self, sent: list[str]) -> list[str]:
        return [c for c in sent if c not in self.results and c not in self.dead]

    def duplicated(self) -> int:
        """Repeats of a result: allowed only as redelivery repeats (identical to the first)."""
        return sum(len(found) - 1 for found in self.results.values())

    def diverging(self) -> list[str]:
        """Commands with two *different* results: never allowed."""
        return [c for c, found in self.results.items() if len({json.dumps(r, sort_keys=True) for r in found}) > 1]

    def anomalies(self) -> int:
        return sum(1 for record in self.logs if (record.get("detail") or {}).get("anomaly"))


@contextlib.asynccontextmanager
async def collecting(amqp_url: str, *, replicated: bool = False) -> AsyncIterator[Collector]:
    """Bind durable queues to appointments.events and appointments.dead, for the block's life.

    Durable and robust, so it outlives a killed service and a broker restart. On a cluster
    (``amqp_url`` an address list), ``replicated`` makes them quorum queues, so the results
    outlive the loss of any one node too (the connection fails over like the service's).
    """
    declaring = Broker(amqp_url)
    await declaring.connect()  # the topology must exist before we bind to it
    await declaring.close()
    collector = Collector()
    connection = await connect_failover(broker_addresses(amqp_url), timeout=10)
    arguments = {"x-queue-type": "quorum"} if replicated else None
    try:
        channel = await connection.channel()
        events = await channel.declare_queue("chaos.events", durable=True, arguments=arguments)
        await events.bind(EVENTS_EXCHANGE, routing_key="#")
        await events.consume(collector.on_event)
        # A copy of each dead letter: appointments.dead itself is the service's collector's intake.
        dead = await channel.declare_queue("chaos.dead", durable=True, arguments=arguments)
        await dead.bind(DEAD_EXCHANGE)
        await dead.consume(collector.on_dead)
        yield collector
    finally:
        await connection.close()


async def applied_twice(store: Store, appointment_ids: list[int]) -> list[str]:
    """Command ids applied more than once (state log records with source "command").

    A "reconcile" record under the command is drift adopted from the PMS's
    answer to the write (say a note changed meanwhile), not a second application.
    """
    seen: Counter[str] = Counter()
    for appointment_id in appointment_ids:
        after = 0
        while page := await store.history(appointment_id, after_seq=after, limit=500):
            for record in page:
                if (
                    record.source == "command"
                    and record.trigger != "reconcile"
                    and record.command_id
                    and record.appointment_id == appointment_id
                ):
                    seen[record.command_id] += 1
            after = page[-1].seq or after
    return [command_id for command_id, count in seen.items() if count > 1]


def double_bookings(sandbox: Any) -> list[list[int]]:
    """Slots (practitioner, start) holding more than one live appointment."""
    slots: dict[tuple[Any, Any], list[int]] = defaultdict(list)
    for appointment in sandbox.state.all_appointments():
        if appointment["state"] != "Cancelled":
            slots[(appointment["practitioner_id"], appointment["start_time"])].append(appointment["id"])
    return [ids for ids in slots.values() if len(ids) > 1]


async def orphan_replacements(sandbox: Any, store: Store) -> list[int]:
    """Live replacements not backed by a completed workflow whose original is cancelled."""
    orphans = []
    for appointment in sandbox.state.all_appointments():
        workflow_id = (appointment.get("metadata") or {}).get("reassignment_workflow")
        if workflow_id is None or appointment["state"] == "Cancelled":
            continue
        workflow = await store.get_workflow(workflow_id)
        original = sandbox.state.get(workflow.appointment_id) if workflow else None
        if (
            workflow is None
            or workflow.state != "completed"
            or workflow.replacement_id != appointment["id"]
            or original is None
            or original["state"] != "Cancelled"
        ):
            orphans.append(appointment["id"])
    return orphans


async def state_mismatches(
    sandbox: Any, store: Store, deleted_ids: set[int], practice: str = DEFAULT_PRACTICE
) -> list[str]:
    """Appointments whose stored state or patient (in ``practice``) differs from the sandbox's."""
    found = []
    for appointment in sandbox.state.all_appointments():
        record = await store.get_appointment(appointment["id"], practice)
        mine = (record.state, record.patient_id) if record else None
        if mine != (appointment["state"], appointment["patient_id"]):
            found.append(f"{appointment['id']}: store {mine} pms {(appointment['state'], appointment['patient_id'])}")
    for appointment_id in deleted_ids:
        record = await store.get_appointment(appointment_id, practice)
        if record is not None and record.state != "Deleted":
            found.append(f"{appointment_id}: store {record.state} pms deleted")
    return found

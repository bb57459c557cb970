"""What the chaos tests share: the short/long scale, load shapes, the service under chaos, and
the end-state checks.

The checks read the sandbox (the PMS's truth) and the store (the service's
belief) after the chaos, so each test states its invariants in a few lines.
The two-practice harness (seed both PMSs, start one `appt serve` for both, run the mixed load,
settle, compute the figures) is the kill -9 test's; the store-outage and cluster tests reuse it
so their figures mean the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
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
from consumer.sandbox import RunningSandbox
from consumer.store.base import Store
from tests.e2e.processes import SECRET, AppProcess, ServiceProcess, service_env
from tests.helpers import eventually

LONG = os.environ.get("APPT_CHAOS_LONG") == "1"
# Tomorrow from 08:00 UTC: inside the reconciler's polled windows (its near window, every cycle),
# so catch-up polling sees every seeded appointment, as it would see a real practice's next days.
BASE_START = datetime.now(UTC).replace(hour=8, minute=0, second=0, microsecond=0) + timedelta(days=1)

# Long runs take minutes; the short ones stay under pytest's default 120 s.
chaos_marks = [pytest.mark.chaos, pytest.mark.timeout(1800 if LONG else 120)]
BURST_CHANCE = 0.05  # per tick of the mixed load: 10-40 commands back to back
# A store outage: longer than a message's whole transient-retry budget in service_env (5
# deliveries, 0.2 s x delivery number between them, plus the worker's in-place retries), so a
# store failure counted as an ordinary transient one would dead-letter messages.
STORE_DOWN_FOR = 8.0


def scaled(short: int, long: int) -> int:
    """The short figure in the default run, the long one under APPT_CHAOS_LONG=1."""
    return long if LONG else short


def chaos_seed() -> int:
    """APPT_CHAOS_SEED to replay a run's random choices, else a fresh seed (each test prints it)."""
    return int(os.environ.get("APPT_CHAOS_SEED") or random.randrange(10**6))


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


def seed_both(pms: RunningSandbox, north: RunningSandbox, count: int) -> list[int]:
    """``count`` slots seeded alike in both practices' PMSs (so the same appointment ids): the ids."""
    ids = seed_slots(pms, count)
    assert seed_slots(north, count) == ids
    return ids


def practices_file(path: Path, pms: RunningSandbox, north: RunningSandbox) -> Path:
    """The two practices, ``default`` and ``north``, each on its own PMS with its own token."""
    path.write_text(
        f'[practices.default]\npms_url = "{pms.url}"\ntoken = "sandbox-token"\nwebhook_secrets = ["{SECRET}"]\n\n'
        f'[practices.north]\npms_url = "{north.url}"\ntoken = "north-token"\nwebhook_secrets = ["{SECRET}"]\n'
    )
    return path


def two_practice_service(
    store_url: str, amqp_url: str, tmp_path: Path, pms: RunningSandbox, north: RunningSandbox, **extra: str
) -> ServiceProcess:
    """An `appt serve` (not started) for both practices on ``store_url``, each PMS's webhooks
    subscribed to it; catch-up polling every 2 s, part of the chaos and what heals a webhook lost
    in a kill. ``extra`` adds APPT_* variables."""
    env = service_env(
        pms_url=pms.url,
        store=store_url,
        amqp_url=amqp_url,
        APPT_RECONCILE_INTERVAL="2",
        APPT_LOG_LEVEL="WARNING",
        APPT_PMS_TIMEOUT="5",
        APPT_PRACTICES_FILE=str(practices_file(tmp_path / "practices.toml", pms, north)),
    )
    service = ServiceProcess({**env, **extra}, tmp_path)
    pms.state.subscribe(f"{service.url}/webhooks/pms", SECRET)
    north.state.subscribe(f"{service.url}/webhooks/pms/north", SECRET)
    return service


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


async def mixed_load(
    broker: Broker,
    sandboxes: dict[str, RunningSandbox],
    ids: list[int],
    rng: random.Random,
    sent: list[str],
    stop: asyncio.Event,
    last_notes: dict[int, str] | None = None,
) -> None:
    """Commands on the queue and PMS-side changes (which the PMS announces by webhook), one in
    four to the second practice (same appointment ids, its own PMS). If given ``last_notes``, every
    tick also edits the notes of one of its appointments (nothing else touches them), remembering the
    last notes sent to each.

    A trickle with a burst now and then: the service drains a trickle as fast
    as it comes, and a kill must also land while a backlog is being worked.
    """
    tick = 0
    while not stop.is_set():
        for _ in range(rng.randint(10, 40) if rng.random() < BURST_CHANCE else 1):
            practice = "north" if rng.random() < 0.25 else "default"
            command = {**random_command(rng, ids), "practice": practice}
            await publish_until_confirmed(broker, command)
            sent.append(command["command_id"])
        if last_notes:
            ordered = rng.choice(list(last_notes))
            notes, command_id = f"edit {tick}", f"ordered-{uuid.uuid4().hex[:12]}"
            edit = {"type": "edit_notes", "appointment_id": ordered, "notes": notes, "command_id": command_id}
            await publish_until_confirmed(broker, edit)
            sent.append(command_id)
            last_notes[ordered] = notes
        if tick % 3 == 0:
            pms_side_change(rng, sandboxes["north" if tick % 12 == 0 else "default"], ids)
        tick += 1
        await asyncio.sleep(rng.uniform(0.005, 0.04))


async def wait_for(check: Callable[[], Any], timeout: float) -> bool:
    """eventually(), but answering False instead of raising, so the figures still print."""
    try:
        await eventually(check, timeout=timeout, interval=0.2)
    except AssertionError:
        return False
    return True


async def readyz_is(service: ServiceProcess, status: int) -> bool:
    """Whether the service's ``/readyz`` answers ``status`` now (no answer at all never matches)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            async with http.get(f"{service.url}/readyz") as response:
                return response.status == status
    except (aiohttp.ClientError, TimeoutError):
        return False


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


def deleted_ids(sandbox: RunningSandbox) -> set[int]:
    """The appointments the PMS deleted (it announced each by an ``appointment.deleted`` webhook)."""
    return {d.appointment_id for d in sandbox.state.deliveries if d.type == "appointment.deleted"}


async def settle(
    collector: Collector,
    sent: list[str],
    pms: RunningSandbox,
    north: RunningSandbox,
    store: Store,
    service: ServiceProcess,
    *,
    timeout: float,
) -> bool:
    """Wait for every result, every webhook delivered, one `appt reconcile` (with the service's
    environment), then the store to agree with both PMSs. False if any wait ran out, so the figures
    still print."""
    answered = await wait_for(lambda: not collector.lost(sent), timeout)
    delivered = await wait_for(lambda: pms.state.webhooks.pending() == north.state.webhooks.pending() == 0, 30)
    reconcile = AppProcess(["reconcile"], service.env, service.log_dir, "reconcile", "")
    assert await reconcile.start().wait_exit(60) == 0, reconcile.tail()

    async def agreed() -> bool:
        return not (
            await state_mismatches(pms, store, deleted_ids(pms))
            or await state_mismatches(north, store, deleted_ids(north), "north")
        )

    return answered and delivered and await wait_for(agreed, 30)


async def final_figures(
    collector: Collector, sent: list[str], pms: RunningSandbox, north: RunningSandbox, store: Store, ids: list[int]
) -> dict[str, Any]:
    """The end-state figures (counts), and in ``details`` every invariant broken in either practice."""
    touched = sorted({*ids, *(a["id"] for a in pms.state.all_appointments()), *deleted_ids(pms)})
    details = {
        "lost": collector.lost(sent),
        "dead": collector.dead,
        "diverging": collector.diverging(),
        "applied_twice": await applied_twice(store, touched),
        "mismatches": await state_mismatches(pms, store, deleted_ids(pms)),
        "double_bookings": double_bookings(pms),
        "orphans": await orphan_replacements(pms, store),
    }
    north_details = {
        "north_mismatches": await state_mismatches(north, store, deleted_ids(north), "north"),
        "north_double_bookings": double_bookings(north),
        "north_orphans": await orphan_replacements(north, store),
    }
    figures: dict[str, Any] = {name: len(found) for name, found in details.items()}
    figures["details"] = {name: found for name, found in {**details, **north_details}.items() if found}
    figures["events"] = len(collector.logs) + sum(len(r) for r in collector.results.values())
    figures["duplicated"] = collector.duplicated()
    figures["anomalies"] = collector.anomalies()
    figures["sagas"] = dict(Counter(w.state for w in await store.list_workflows()))
    return figures

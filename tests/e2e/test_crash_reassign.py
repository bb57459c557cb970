"""kill -9 of the real `appt serve` in the middle of reassignments: nothing lost, nothing doubled.

The service is killed at every step boundary of the saga (a failpoint
SIGKILLs it at that exact line) and at random instants, then restarted; the
sandbox runs as its own process, so it outlives every crash. Per trial a fresh
appointment in a slot of its own; at the end, in the sandbox: no slot with two
live appointments, no live replacement beside a live original or of a
compensated workflow, and every command answered with its workflow finished.

Reproduce a run with ``APPT_E2E_SEED=<seed>`` (printed with the figures).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from consumer.broker import EVENTS_EXCHANGE, Broker
from consumer.failpoints import SAGA_FAILPOINTS
from consumer.messages import Reassign
from consumer.reconciler import parse_time
from consumer.store.base import open_store
from consumer.workflows import workflow_id_for
from tests.e2e.processes import SandboxProcess, ServiceProcess, service_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

COMPENSATION_FAILPOINTS = frozenset({"before_remove_replacement", "after_remove_replacement"})
RANDOM_TRIALS = 16
MAX_KILL_DELAY = 0.3
SANDBOX_LATENCY = 0.02
RESULT_TIMEOUT = 20.0
FIRST_SLOT = datetime(2031, 1, 6, 8, 0, tzinfo=timezone.utc)
PRACTITIONER, ORIGINAL_PATIENT, NEW_PATIENT = 3, 1013, 2001


@dataclass
class Trial:
    number: int
    how: str  # the failpoint, or "random kill after N ms"
    refuse_cancel: bool  # the original can't be cancelled: the saga must compensate

    @property
    def original_id(self) -> int:
        return 50_000 + self.number

    @property
    def command_id(self) -> str:
        return f"crash-{self.number}"

    @property
    def start_time(self) -> str:
        return _iso(FIRST_SLOT + timedelta(minutes=30 * self.number))

    @property
    def expected(self) -> str:
        return "compensated" if self.refuse_cancel else "completed"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Results:
    """Every result published on appointments.events, from a durable queue bound before any start."""

    received: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        self.received[body["command_id"]] = body
        await message.ack()

    async def wait(self, command_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = asyncio.get_running_loop().time() + timeout
        while command_id not in self.received and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        return self.received.get(command_id)


@pytest.fixture
async def results(amqp_url: str) -> AsyncIterator[Results]:
    collected = Results()
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("e2e.results", durable=True)
        await queue.bind(exchange, routing_key="result.#")
        await queue.consume(collected.on_message)
        yield collected


@pytest.fixture
async def sandbox_process(tmp_path: Path) -> AsyncIterator[SandboxProcess]:
    process = SandboxProcess(tmp_path).start()
    try:
        await process.wait_ready()
        await process.knob("rate_limit", budget=1_000_000)
        yield process
    finally:
        await process.terminate()


async def begin(trial: Trial, sandbox: SandboxProcess, broker: Broker) -> None:
    """Seed the trial's original in its own slot and publish its reassign command."""
    start = datetime.strptime(trial.start_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    await sandbox.knob("seed", appointments=[{
        "id": trial.original_id, "patient_id": ORIGINAL_PATIENT, "practitioner_id": PRACTITIONER,
        "start_time": trial.start_time, "finish_time": _iso(start + timedelta(minutes=30)),
        "reason": "Exam", "state": "Pending",
    }])
    if trial.refuse_cancel:
        await sandbox.knob("refuse_cancel", appointment_id=trial.original_id)
    command = Reassign(command_id=trial.command_id, appointment_id=trial.original_id, patient_id=NEW_PATIENT)
    await broker.publish_inbound(command.model_dump_json().encode(), appointment_id=trial.original_id,
                                 message_id=trial.command_id)


async def test_killed_at_any_instant_a_reassignment_completes_or_compensates_exactly_once(
    amqp_url: str, tmp_path: Path, sandbox_process: SandboxProcess, results: Results
) -> None:
    sandbox = sandbox_process
    seed = int(os.environ.get("APPT_E2E_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    store_url = f"sqlite:///{tmp_path / 'appt.sqlite3'}"
    service = ServiceProcess(service_env(pms_url=sandbox.url, store=store_url, amqp_url=amqp_url), tmp_path)
    broker = Broker(amqp_url)
    await broker.connect()  # declares the topology, so commands can be published before the service runs
    trials: list[Trial] = []
    try:
        for name in sorted(SAGA_FAILPOINTS):
            trial = Trial(len(trials), name, refuse_cancel=name in COMPENSATION_FAILPOINTS)
            trials.append(trial)
            await service.start(APPT_FAILPOINTS=name).wait_ready()
            await begin(trial, sandbox, broker)
            assert await service.wait_exit(RESULT_TIMEOUT) == -9, f"{name} was not reached{service.tail()}"
            await service.start().wait_ready()
            await results.wait(trial.command_id, RESULT_TIMEOUT)
            service.kill()

        await sandbox.knob("latency", seconds=SANDBOX_LATENCY)  # so a random kill lands mid-saga
        await service.start().wait_ready()
        for _ in range(RANDOM_TRIALS):
            delay = rng.uniform(0, MAX_KILL_DELAY)
            trial = Trial(len(trials), f"random kill after {delay * 1000:.0f} ms", refuse_cancel=rng.random() < 0.3)
            trials.append(trial)
            await begin(trial, sandbox, broker)
            await asyncio.sleep(delay)
            service.kill()
            await service.start().wait_ready()
            await results.wait(trial.command_id, RESULT_TIMEOUT)
        await service.terminate()
    finally:
        service.kill()
        await broker.close()

    figures = await tally(trials, sandbox, results, store_url)
    print(f"\ncrash seed={seed} logs={tmp_path}")
    print("crash " + " ".join(f"{k}={v}" for k, v in figures.items()))
    assert figures["trials"] >= 20
    assert figures["double_bookings"] == 0
    assert figures["orphans"] == 0
    assert figures["empty_slots"] == 0
    assert figures["lost"] == 0
    assert figures["unexpected"] == 0


async def tally(trials: list[Trial], sandbox: SandboxProcess, results: Results, store_url: str) -> dict[str, int]:
    """What the sandbox, the results and the store say of each trial, as the printed figures."""
    appointments = await sandbox.appointments()
    live = [a for a in appointments if a["state"] != "Cancelled"]
    store = open_store(store_url)
    await store.open()
    try:
        workflows = {t.command_id: await store.get_workflow(workflow_id_for(t.command_id)) for t in trials}
    finally:
        await store.close()
    figures = dict.fromkeys(
        ("trials", "completed", "compensated", "double_bookings", "orphans", "empty_slots", "lost", "unexpected"), 0)
    figures["trials"] = len(trials)
    for trial in trials:
        workflow = workflows[trial.command_id]
        state = workflow.state if workflow else None
        result = results.received.get(trial.command_id)
        in_slot = [a for a in live if parse_time(a["start_time"]) == parse_time(trial.start_time)
                   and a["practitioner_id"] == PRACTITIONER]
        original_live = any(a["id"] == trial.original_id for a in live)
        replacements = [a for a in live if (a.get("metadata") or {}).get("reassigned_from") == trial.original_id]
        problems = []
        if result is None or state not in ("completed", "compensated"):
            figures["lost"] += 1
            problems.append(f"lost: result={result and result['outcome']} workflow={state}")
        else:
            figures[state] += 1
        if len(in_slot) > 1:
            figures["double_bookings"] += 1
            problems.append(f"double booking: {[a['id'] for a in in_slot]}")
        if not in_slot:
            figures["empty_slots"] += 1
            problems.append("no live appointment left in the slot")
        if replacements and (original_live or state == "compensated"):
            figures["orphans"] += 1
            problems.append(f"orphan replacement(s) {[a['id'] for a in replacements]}")
        if state is not None and state != trial.expected:
            figures["unexpected"] += 1
            problems.append(f"ended {state}, expected {trial.expected}")
        if result is not None and result["outcome"] != ("succeeded" if trial.expected == "completed" else "failed"):
            figures["unexpected"] += 1
            problems.append(f"result {result['outcome']}: {result['reasons']}")
        if problems:
            print(f"trial {trial.number} ({trial.how}): " + "; ".join(problems))
    return figures

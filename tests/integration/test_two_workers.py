"""Scale-out: two `appt serve` processes share the partitions and one PostgreSQL store.

Each run publishes 400 commands over 40 appointments and then checks what an
operator relies on: every command got a result, each appointment's commands
were applied in the order they were sent, and none was applied twice, whether
the partitions are split between the workers or one worker is SIGKILLed while
it is the active consumer of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.broker import EVENTS_EXCHANGE, Broker
from consumer.messages import StateLogRecord
from consumer.sandbox import RunningSandbox, running_sandbox
from consumer.store.opening import open_store
from tests.e2e.processes import ServiceProcess, service_env
from tests.helpers import eventually, seed_pending

APPOINTMENTS = list(range(7001, 7041))
ROUNDS = 10
START_TIMEOUT = 30.0


async def handled(service: ServiceProcess, kind: str, outcome: str) -> int:
    """appt_messages_total{kind, outcome} as this process's /metrics reports it."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.get(f"{service.url}/metrics") as response:
            text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "appt_messages_total" and sample.labels == {"kind": kind, "outcome": outcome}:
                return int(sample.value)
    return 0


@dataclass
class Results:
    """Every result published to appointments.events, counted per command."""

    outcomes: dict[str, list[str]] = field(default_factory=dict)

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        self.outcomes.setdefault(body["command_id"], []).append(body["outcome"])
        await message.ack()


@pytest.fixture
async def pg_store_url(pg_url: str) -> AsyncIterator[str]:
    """The shared store in a schema of this test's own, dropped after."""
    schema = f"appt_{uuid.uuid4().hex[:12]}"
    yield f"{pg_url}?schema={schema}"
    connection = await asyncpg.connect(pg_url)
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await connection.close()


@pytest.fixture
async def pms() -> AsyncIterator[RunningSandbox]:
    """A sandbox with budget to spare, so the client's hourly pacing never slows the run."""
    async with running_sandbox(port=0, rate_limit=100_000) as sandbox:
        for appointment_id in APPOINTMENTS:
            seed_pending(sandbox, appointment_id)
        yield sandbox


@pytest.fixture
async def results(amqp_url: str) -> AsyncIterator[Results]:
    """Bound before any worker runs, so no result can slip past."""
    collected = Results()
    broker = Broker(amqp_url)
    await broker.connect()  # declares the topology, so the test can bind to it first
    await broker.close()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(EVENTS_EXCHANGE, routing_key="result.#")
        await queue.consume(collected.on_message)
        yield collected


@contextlib.asynccontextmanager
async def workers(
    tmp_path: Path, amqp_url: str, store_url: str, pms_url: str, partitions: list[str]
) -> AsyncIterator[list[ServiceProcess]]:
    """One `appt serve` per partition spec, started in order (the first is the active consumer
    of every single-active-consumer queue it shares)."""
    processes = [
        ServiceProcess(
            service_env(
                pms_url=pms_url,
                store=store_url,
                amqp_url=amqp_url,
                APPT_PARTITIONS="4",
                APPT_WORKER_PARTITIONS=spec,
                APPT_RETRY_DELAY="0.1",
                APPT_LOG_LEVEL="WARNING",
            ),
            tmp_path,
            name=f"worker-{i}",
        )
        for i, spec in enumerate(partitions)
    ]
    try:
        for process in processes:
            await process.start().wait_ready(START_TIMEOUT)
        yield processes
    finally:
        await asyncio.gather(*(p.terminate() for p in processes))


def command_id(appointment_id: int, n: int) -> str:
    return f"scale-{appointment_id}-{n}"


async def publish_all(amqp_url: str) -> list[str]:
    """ROUNDS edit_notes per appointment, interleaved across appointments."""
    broker = Broker(amqp_url)
    await broker.connect()
    sent = []
    try:
        for n in range(ROUNDS):
            for appointment_id in APPOINTMENTS:
                body = {
                    "type": "edit_notes",
                    "appointment_id": appointment_id,
                    "notes": f"note {n}",
                    "command_id": command_id(appointment_id, n),
                }
                await broker.publish_inbound(
                    json.dumps(body).encode(), appointment_id=appointment_id, message_id=body["command_id"]
                )
                sent.append(body["command_id"])
    finally:
        await broker.close()
    return sent


async def histories(store_url: str) -> dict[int, list[StateLogRecord]]:
    store = open_store(store_url)
    await store.open()
    try:
        return {a: await store.history(a, limit=1000) for a in APPOINTMENTS}
    finally:
        await store.close()


def notes_trail(history: list[StateLogRecord]) -> list[tuple[str | None, str]]:
    """Each change of the notes, with the command that made it.

    A worker killed after its PUT but before its commit leaves the change made
    and unrecorded; the redelivered command's fresh GET then adopts it as a
    ``reconcile`` record carrying that command's id, and writes nothing again.
    """
    trail = []
    for record in history:
        if record.source == "command" and "notes" in record.detail.get("fields", {}):
            trail.append((record.command_id, record.detail["fields"]["notes"]))
        elif record.source == "reconcile" and "notes" in record.detail.get("drift", {}):
            trail.append((record.command_id, record.detail["drift"]["notes"][1]))
    return trail


def assert_applied_once_in_order(logs: dict[int, list[StateLogRecord]], sandbox: RunningSandbox) -> None:
    for appointment_id, history in logs.items():
        expected = [(command_id(appointment_id, n), f"note {n}") for n in range(ROUNDS)]
        assert notes_trail(history) == expected, appointment_id
        assert sandbox.state.get(appointment_id)["notes"] == f"note {ROUNDS - 1}"  # type: ignore[index]


async def test_two_workers_splitting_the_partitions_apply_every_command_once_in_order(
    tmp_path: Path, amqp_url: str, pg_store_url: str, pms: RunningSandbox, results: Results
) -> None:
    async with workers(tmp_path, amqp_url, pg_store_url, pms.url, ["0,1", "2,3"]) as (first, second):
        sent = await publish_all(amqp_url)
        await eventually(lambda: set(results.outcomes) >= set(sent), timeout=90)
        shares = [await handled(w, "edit_notes", "succeeded") for w in (first, second)]

    assert set(results.outcomes) == set(sent)
    assert Counter(tuple(o) for o in results.outcomes.values()) == {("succeeded",): len(sent)}
    assert sum(shares) == len(sent) and min(shares) > 0, f"work was not shared: {shares}"
    assert pms.state.call_count("PUT /v1/appointments/{id}") == len(sent), "a command was applied twice"
    logs = await histories(pg_store_url)
    assert_applied_once_in_order(logs, pms)
    assert sum(r.source == "command" for h in logs.values() for r in h) == len(sent)


async def test_when_the_active_worker_is_killed_the_standby_takes_over(
    tmp_path: Path, amqp_url: str, pg_store_url: str, pms: RunningSandbox, results: Results
) -> None:
    pms.state.set_latency(0.005)  # keep messages in flight when the kill lands
    async with workers(tmp_path, amqp_url, pg_store_url, pms.url, ["all", "all"]) as (active, standby):
        sent = await publish_all(amqp_url)
        await eventually(lambda: len(results.outcomes) >= len(sent) // 4, timeout=60)
        idle_standby = await handled(standby, "edit_notes", "succeeded")
        active.kill()
        finished_by_active = len(results.outcomes)
        await eventually(lambda: set(results.outcomes) >= set(sent), timeout=90)
        taken_over = await handled(standby, "edit_notes", "succeeded")

    assert idle_standby == 0, "single-active-consumer let the standby consume beside the active worker"
    assert finished_by_active < len(sent), "the kill came too late to test a take-over"
    assert taken_over > 0
    # A message whose result was published before the kill but not yet acked is
    # redelivered and answered again from the inbox: the same outcome, never a new one.
    assert set(results.outcomes) == set(sent)
    assert {o for outcomes in results.outcomes.values() for o in outcomes} == {"succeeded"}
    assert_applied_once_in_order(await histories(pg_store_url), pms)

"""What an operator sees after a reassignment: the CLI, the HTTP API, the events exchange
and /metrics all tell the same story as the store.

The service runs in-process exactly as `appt serve` wires it (``service_resources``
behind ``create_app``), on a test vhost, with the sandbox as its PMS. The CLI runs
as a real subprocess reading the same SQLite file. Metrics are process-global, so
the metrics test compares deltas around what it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from consumer.broker import EVENTS_EXCHANGE, Broker
from consumer.service import service_resources
from consumer.settings import Settings, load_settings
from consumer.store.base import Store
from consumer.webhooks import BROKER_KEY, STORE_KEY, create_app
from tests.helpers import eventually, seed_pending, served

TOKEN = "observability-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT = 30.0
ORIGINAL, CONFIRMED_A, CONFIRMED_B, CANCELLED = 101, 102, 103, 104


@dataclass
class EventLog:
    """Everything published to appointments.events, as received (duplicates kept)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        if (message.routing_key or "").startswith("result."):
            self.results[body["command_id"]] = body
        else:
            self.records.append(body)
        await message.ack()


@dataclass
class Service:
    url: str
    store: Store
    broker: Broker
    events: EventLog

    async def send(self, command: dict[str, Any]) -> str:
        command_id = str(uuid.uuid4())
        body = json.dumps({**command, "command_id": command_id}).encode()
        await self.broker.publish_inbound(body, appointment_id=command["appointment_id"], message_id=command_id)
        return command_id

    async def result(self, command_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await eventually(lambda: self.events.results.get(command_id), timeout=20)
        return result


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[str, web.Application]]:
    """The real service app on a free loopback port."""
    app = create_app(settings, service_resources(settings))
    async with served(app, access_log=None) as url:
        yield url, app


def service_settings(amqp_url: str, store_url: str, pms_url: str, api_token: str | None) -> Settings:
    return load_settings(
        amqp_url=amqp_url,
        store=store_url,
        pms_url=pms_url,
        api_token=api_token,
        reconcile_interval=0,
        retry_delay=0.1,
        http_port=0,
    )


@pytest.fixture
async def service(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Service]:
    settings = service_settings(amqp_url, sqlite_url, sandbox.url, TOKEN)
    async with serving(settings) as (url, app):
        events = EventLog()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(EVENTS_EXCHANGE, routing_key="#")
            await queue.consume(events.on_message)
            yield Service(url, app[STORE_KEY], app[BROKER_KEY], events)


@dataclass
class Run:
    """What the scenario did, for the assertions to compare against."""

    replacement_id: int
    touched: list[int]
    outcomes: Counter[tuple[str, str]]


@pytest.fixture
async def run(service: Service, sandbox: Any) -> Run:
    return await reassign_and_confirm(service, sandbox)


async def reassign_and_confirm(service: Service, sandbox: Any) -> Run:
    """A reassignment, two confirms that succeed and one the PMS refuses."""
    seed_pending(sandbox, ORIGINAL)
    seed_pending(sandbox, CONFIRMED_A)
    seed_pending(sandbox, CONFIRMED_B)
    seed_pending(sandbox, CANCELLED, state="Cancelled", appointment_cancellation_reason_id=2)

    reassigned = await service.result(
        await service.send({"type": "reassign", "appointment_id": ORIGINAL, "patient_id": 2002})
    )
    confirms = [
        await service.result(await service.send({"type": "confirm", "appointment_id": appointment_id}))
        for appointment_id in (CONFIRMED_A, CONFIRMED_B, CANCELLED)
    ]

    assert reassigned["outcome"] == "succeeded", reassigned
    assert [c["outcome"] for c in confirms] == ["succeeded", "succeeded", "rejected"]
    replacement_id = int(reassigned["appointment"]["id"])
    assert sandbox.state.get(ORIGINAL)["state"] == "Cancelled"
    assert sandbox.state.get(replacement_id)["patient_id"] == 2002
    outcomes = Counter({("reassign", "succeeded"): 1, ("confirm", "succeeded"): 2, ("confirm", "rejected"): 1})
    return Run(replacement_id, [ORIGINAL, replacement_id, CONFIRMED_A, CONFIRMED_B, CANCELLED], outcomes)


async def cli(store_url: str, *args: str) -> str:
    """`appt ARGS` as a subprocess on the given store; its stdout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer.cli",
        *args,
        cwd=REPO,
        env=cli_env(store_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def cli_env(store_url: str, amqp_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPT_")}
    env["APPT_STORE"] = store_url
    if amqp_url:
        env["APPT_AMQP_URL"] = amqp_url
    return env


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def table_seqs(text: str) -> list[int]:
    """The SEQ column of `appt history`'s table (the header row has no number)."""
    return [int(line.split()[0]) for line in text.splitlines() if line.split() and line.split()[0].isdigit()]


async def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(url, headers=headers) as response:
            return response.status, await response.json(content_type=None)


async def stored(store: Store, appointment_id: int) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in await store.history(appointment_id, limit=1000)]


async def test_cli_table_cli_json_and_http_show_the_same_history_for_both_appointments(
    service: Service, run: Run, sqlite_url: str
) -> None:
    for appointment_id in (ORIGINAL, run.replacement_id):
        expected = await stored(service.store, appointment_id)
        as_json = json_lines(await cli(sqlite_url, "history", str(appointment_id), "--json"))
        as_table = table_seqs(await cli(sqlite_url, "history", str(appointment_id)))
        status, page = await get_json(f"{service.url}/appointments/{appointment_id}/history?limit=1000", AUTH)

        assert status == 200
        assert expected, f"no history for {appointment_id}"
        assert as_json == expected
        assert page["records"] == expected and page["next_after_seq"] is None
        assert as_table == [r["seq"] for r in expected]
        assert [r["seq"] for r in expected] == sorted(r["seq"] for r in expected)

    original = await stored(service.store, ORIGINAL)
    workflow_states = [r["to_state"] for r in original if r["machine"] == "reassignment"]
    assert workflow_states[0] == "requested" and workflow_states[-1] == "completed"
    assert ("appointment", ORIGINAL, "Cancelled") in {
        (r["machine"], r["appointment_id"], r["to_state"]) for r in original
    }
    replacement = await stored(service.store, run.replacement_id)
    assert all(run.replacement_id in (r["appointment_id"], r["detail"].get("replacement_id")) for r in replacement)
    assert "completed" in [r["to_state"] for r in replacement]
    first_seen = next(r for r in replacement if r["machine"] == "appointment")
    assert (first_seen["appointment_id"], first_seen["to_state"], first_seen["source"]) == (
        run.replacement_id,
        "Pending",
        "workflow",
    )  # recorded when booked, not only once its webhook comes


async def test_every_state_record_reaches_the_events_exchange_exactly_once(service: Service, run: Run) -> None:
    expected: dict[int, dict[str, Any]] = {}
    for appointment_id in run.touched:
        expected.update({r["seq"]: r for r in await stored(service.store, appointment_id)})

    def received() -> dict[int, dict[str, Any]]:
        return {r["seq"]: r for r in service.events.records}

    await eventually(lambda: received().keys() >= expected.keys())
    await asyncio.sleep(0.2)  # room for a late duplicate to show up

    copies = Counter(r["seq"] for r in service.events.records)
    assert set(copies) == set(expected), "a record was published that the store does not hold"
    assert [seq for seq, n in copies.items() if n > 1] == [], "a record was published twice"
    for seq, record in received().items():
        assert same_record(record, expected[seq])


def same_record(published: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Equal but for how the time was serialised (the store may round-trip it)."""
    return {**published, "time": None} == {**stored, "time": None}


async def message_counts(url: str) -> Counter[tuple[str, str]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"{url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "appt_messages_total":
                counts[(sample.labels["kind"], sample.labels["outcome"])] = int(sample.value)
    return counts


async def test_metrics_count_the_messages_the_run_handled(service: Service, sandbox: Any) -> None:
    before = await message_counts(service.url)
    outcomes = (await reassign_and_confirm(service, sandbox)).outcomes

    async def delta() -> Counter[tuple[str, str]]:
        now = await message_counts(service.url)
        return Counter({key: now[key] - before[key] for key in now if now[key] != before[key]})

    async def settled() -> bool:
        return await delta() == outcomes

    # The counter moves just after the result is published: give it a moment.
    with contextlib.suppress(AssertionError):
        await eventually(settled, timeout=5)
    assert await delta() == outcomes


async def test_appointment_endpoints_refuse_a_missing_or_wrong_token(service: Service, run: Run) -> None:
    for path in (f"/appointments/{ORIGINAL}", f"/appointments/{ORIGINAL}/history"):
        missing, _ = await get_json(service.url + path)
        wrong, _ = await get_json(service.url + path, {"Authorization": "Bearer not-the-token"})
        bare, _ = await get_json(service.url + path, {"Authorization": TOKEN})
        right, body = await get_json(service.url + path, AUTH)
        assert (missing, wrong, bare, right) == (401, 401, 401, 200), path
    assert body["records"]
    health, _ = await get_json(service.url + "/healthz")
    assert health == 200


async def test_appointment_endpoints_stay_shut_when_no_token_is_configured(
    amqp_url: str, sqlite_url: str, sandbox: Any
) -> None:
    async with serving(service_settings(amqp_url, sqlite_url, sandbox.url, None)) as (url, _):
        for path in (f"/appointments/{ORIGINAL}", f"/appointments/{ORIGINAL}/history"):
            assert (await get_json(url + path))[0] == 503
            assert (await get_json(url + path, {"Authorization": "Bearer "}))[0] == 503
            assert (await get_json(url + path, AUTH))[0] == 503


async def test_history_follow_prints_a_record_made_after_it_started(
    service: Service, sandbox: Any, sqlite_url: str, amqp_url: str
) -> None:
    seed_pending(sandbox, 301)
    await service.result(await service.send({"type": "edit_notes", "appointment_id": 301, "notes": "before"}))
    existing = await stored(service.store, 301)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer.cli",
        "history",
        "301",
        "--follow",
        "--json",
        cwd=REPO,
        env=cli_env(sqlite_url, amqp_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        printed = [await next_record(process) for _ in existing]
        assert printed == existing
        # The tail starts once its queue is bound, which the CLI does not announce:
        # keep making records until one comes through.
        live = await live_record(service, process)
    finally:
        process.terminate()
        await process.wait()

    assert live["seq"] > existing[-1]["seq"]
    assert same_record(live, {r["seq"]: r for r in await stored(service.store, 301)}[live["seq"]])


async def next_record(process: asyncio.subprocess.Process, timeout: float = CLI_TIMEOUT) -> dict[str, Any]:
    assert process.stdout is not None
    while True:
        line = await asyncio.wait_for(process.stdout.readline(), timeout)
        assert line, "appt history --follow exited"
        if line.startswith(b"{"):
            return json.loads(line)  # type: ignore[no-any-return]


async def live_record(service: Service, process: asyncio.subprocess.Process) -> dict[str, Any]:
    sent: set[str] = set()
    for attempt in range(20):
        command_id = await service.send({"type": "edit_notes", "appointment_id": 301, "notes": f"live {attempt}"})
        sent.add(command_id)
        await service.result(command_id)
        with contextlib.suppress(TimeoutError):
            record = await next_record(process, timeout=1.0)
            assert record["command_id"] in sent
            return record
    raise AssertionError("appt history --follow printed nothing new")

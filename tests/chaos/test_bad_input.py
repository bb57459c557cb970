"""Bad input at both doors: the webhook endpoint (HTTP) and the inbound exchange (AMQP).

Every bad item gets a clear answer (a 4xx with an error body; a dead letter
with a reason), none a 5xx or a silent drop, and the service keeps working:
a valid item after the corpus still goes through.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.broker import INBOUND_EXCHANGE
from consumer.messages import COMMAND_TYPES
from consumer.service import service_resources
from consumer.settings import load_settings
from consumer.signing import sign
from consumer.webhooks import create_app
from consumer.worker import InvalidMessage, message_key, parse
from tests.chaos.common import Collector, chaos_marks, collecting, scaled, seed_slots
from tests.helpers import eventually, free_port
from tests.stack import Stack, running_stack

pytestmark = chaos_marks

SECRET = "whsec_" + base64.b64encode(b"chaos-secret-of-24-bytes").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"not-the-configured-secret").decode()
APPOINTMENT = {
    "id": 1001,
    "patient_id": 1000,
    "practitioner_id": 1,
    "state": "Pending",
    "start_time": "2031-03-03T08:00:00Z",
    "finish_time": "2031-03-03T08:30:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
}


@dataclass
class Service:
    url: str
    collector: Collector
    amqp_url: str


@pytest.fixture
async def service(amqp_url: str, tmp_path: Path, sandbox: Any) -> AsyncIterator[Service]:
    """What `appt serve` runs (HTTP + worker), in-process, on a free port."""
    config = load_settings(
        amqp_url=amqp_url,
        store=f"sqlite:///{tmp_path / 'appt.sqlite3'}",
        pms_url=sandbox.url,
        webhook_secrets=[SECRET],
        http_port=free_port(),
        retry_delay=0.1,
        reconcile_interval=0,
    )
    async with collecting(amqp_url) as collector:
        runner = web.AppRunner(create_app(config, service_resources(config)), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, config.http_host, config.http_port).start()
        try:
            yield Service(f"http://{config.http_host}:{config.http_port}", collector, amqp_url)
        finally:
            await runner.cleanup()


# ---- the webhook endpoint ---------------------------------------------------------


def webhook(event_type: str = "appointment.updated", **fields: Any) -> bytes:
    return json.dumps(
        {"type": event_type, "timestamp": "2031-01-01T00:00:00Z", "data": {"appointment": {**APPOINTMENT, **fields}}}
    ).encode()


def signed(body: bytes, *, secret: str = SECRET, age: int = 0, msg_id: str | None = None) -> dict[str, str]:
    msg_id = msg_id or f"msg_{os.urandom(8).hex()}"
    timestamp = int(time.time()) - age
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def webhook_corpus() -> list[tuple[str, bytes, dict[str, str], int]]:
    """(name, body, headers, expected status): every one a mistake a sender or attacker makes."""
    valid = webhook()
    deep = b'{"type":"appointment.updated","data":{"appointment":{"id":1,"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}}}"
    cases: list[tuple[str, bytes, int]] = [
        ("malformed JSON", b'{"type": "appointment.updated", "data": {', 400),
        ("truncated JSON", valid[: len(valid) // 2], 400),
        ("not UTF-8", b"\xff\xfe\xfa{}", 400),
        ("empty body", b"", 400),
        ("JSON null", b"null", 400),
        ("JSON list", b"[1, 2, 3]", 400),
        ("id is a string", webhook(id="abc"), 400),
        ("id is a float", webhook(id=1.5), 400),
        ("data is a list", json.dumps({"type": "appointment.updated", "data": []}).encode(), 400),
        ("type is a number", json.dumps({"type": 5, "data": {"appointment": APPOINTMENT}}).encode(), 400),
        ("unknown event type", webhook("appointment.teleported"), 400),
        ("no appointment", json.dumps({"type": "appointment.updated", "data": {}}).encode(), 400),
        ("nesting 50 000 deep", deep, 400),
        ("huge body", b'{"pad": "' + b"x" * 400_000 + b'"}', 413),
    ]
    corpus = [(name, body, signed(body), status) for name, body, status in cases]
    other = webhook(notes="tampered")
    corpus += [
        ("signed with another secret", valid, signed(valid, secret=OTHER_SECRET), 401),
        ("signature of another body", other, signed(valid), 401),
        ("replayed an hour later", valid, signed(valid, age=3600), 401),
        ("signed an hour ahead", valid, signed(valid, age=-3600), 401),
        ("no signature headers", valid, {"content-type": "application/json"}, 401),
        ("garbage signature", valid, {**signed(valid), "webhook-signature": "v1,!!!not-base64"}, 401),
        ("unknown signature version", valid, {**signed(valid), "webhook-signature": "v9,AAAA"}, 401),
        ("timestamp not a number", valid, {**signed(valid), "webhook-timestamp": "yesterday"}, 401),
    ]
    return corpus


async def test_webhook_corpus_gets_clear_4xx_never_5xx_and_the_receiver_goes_on(service: Service, sandbox: Any) -> None:
    corpus = webhook_corpus()
    answers: list[tuple[str, int, int, str]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for name, body, headers, expected in corpus:
            async with session.post(f"{service.url}/webhooks/pms", data=body, headers=headers) as response:
                text = await response.text()
                error = json.loads(text).get("error", "") if response.content_type == "application/json" else ""
                answers.append((name, expected, response.status, str(error)))
        # A genuine webhook sent twice (the PMS retrying): accepted both times, applied once.
        valid = webhook(id=1002)
        replay = signed(valid)
        statuses = []
        for _ in range(2):
            async with session.post(f"{service.url}/webhooks/pms", data=valid, headers=replay) as response:
                statuses.append(response.status)

    wrong = [a for a in answers if a[1] != a[2] or not a[3]]
    server_errors = [a for a in answers if a[2] >= 500]
    await eventually(lambda: any(r.get("webhook_id") == replay["webhook-id"] for r in service.collector.logs))
    await asyncio.sleep(0.5)  # let the replay be processed too
    # A redelivery republishes the same records (same seq): observers dedupe by seq.
    applied = {r["seq"] for r in service.collector.logs if r.get("webhook_id") == replay["webhook-id"]}
    print(
        f"\nchaos webhook_corpus items={len(corpus)} clear_4xx={len(corpus) - len(wrong)} "
        f"5xx={len(server_errors)} wrong={len(wrong)} replay={statuses} replay_applied={len(applied)}"
    )
    assert wrong == [], wrong
    assert statuses == [202, 202] and len(applied) == 1


async def test_a_202_webhook_near_the_size_limit_is_applied_not_dead_lettered(service: Service) -> None:
    """Once, a 64-256 KiB webhook got its 202 and then a dead letter: the PMS never resends."""
    body = webhook(id=1003, notes="n" * 150_000)
    headers = signed(body)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.post(f"{service.url}/webhooks/pms", data=body, headers=headers) as response:
            assert response.status == 202
    await eventually(
        lambda: any(r.get("webhook_id") == headers["webhook-id"] for r in service.collector.logs), timeout=20
    )
    assert service.collector.dead == {}


def close_vhost_connections(amqp_url: str) -> int:
    """Drop this test's broker connections only (other tests share the broker)."""
    vhost = amqp_url.rsplit("/", 1)[1]
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "vhost", "-q", "--no-table-headers"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    pids = [line.split()[0] for line in listed.splitlines() if line.split()[1:] == [vhost]]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "chaos: broker connection lost"], capture_output=True, timeout=60
        )
    return len(pids)


async def test_webhooks_during_a_lost_broker_connection_get_503_never_500(service: Service) -> None:
    closed = await asyncio.to_thread(close_vhost_connections, service.amqp_url)
    statuses: list[int] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for index in range(40):  # ~4 s: the robust connection comes back after its 5 s interval
            body = webhook(id=2000 + index)
            async with session.post(f"{service.url}/webhooks/pms", data=body, headers=signed(body)) as response:
                statuses.append(response.status)
            await asyncio.sleep(0.1)
    print(
        f"\nchaos webhook_broker_lost closed_connections={closed} answers={sorted(set(statuses))} "
        f"5xx_not_503={sum(s >= 500 and s != 503 for s in statuses)}"
    )
    assert set(statuses) <= {202, 503}, statuses


# ---- the inbound exchange ------------------------------------------------------------

EVENT = {"type": "appointment.updated", "event_id": "ev-1", "source": "webhook"}


def inbound_corpus() -> list[tuple[str, bytes]]:
    command = {"type": "confirm", "appointment_id": 1001, "command_id": "c-1"}
    valid = json.dumps(command).encode()
    return [
        ("not JSON", b"definitely not json"),
        ("truncated JSON", valid[: len(valid) // 2]),
        ("not UTF-8", b"\xff\xfe\xfa"),
        ("empty body", b""),
        ("JSON null", b"null"),
        ("JSON list", b"[1, 2]"),
        ("appointment_id a string", json.dumps({**command, "appointment_id": "abc"}).encode()),
        ("appointment_id negative", json.dumps({**command, "appointment_id": -4}).encode()),
        ("command_id a number", json.dumps({**command, "command_id": 7}).encode()),
        ("unknown command type", json.dumps({**command, "type": "teleport"}).encode()),
        ("cancel without reason", json.dumps({**command, "type": "cancel"}).encode()),
        ("unknown field", json.dumps({**command, "extra": 1}).encode()),
        ("over 256 KiB", json.dumps({**command, "notes": "x" * 300_000}).encode()),
        ("nesting 30 000 deep", b"[" * 30_000 + b"]" * 30_000),
        ("event without appointment id", json.dumps({**EVENT, "appointment": {}}).encode()),
        ("event with appointment id 'abc'", json.dumps({**EVENT, "appointment": {"id": "abc"}}).encode()),
        (
            "event of unknown type",
            json.dumps({**EVENT, "type": "appointment.exploded", "appointment": APPOINTMENT}).encode(),
        ),
    ]


async def publish_raw(amqp_url: str, items: list[tuple[str, bytes]], routing_key: Callable[[int], str]) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(INBOUND_EXCHANGE)
        for index, (_, body) in enumerate(items):
            await exchange.publish(aio_pika.Message(body, message_id=f"bad-{index}"), routing_key(index))


async def test_inbound_corpus_is_dead_lettered_at_once_with_a_reason(service: Service, sandbox: Any) -> None:
    seed_slots(sandbox, 1)
    corpus = inbound_corpus()
    await publish_raw(service.amqp_url, corpus, lambda index: "1001")
    good = {"type": "confirm", "appointment_id": 1001, "command_id": "good-after-corpus"}
    await publish_raw(service.amqp_url, [("good", json.dumps(good).encode())], lambda index: "1001")

    dead = service.collector.dead
    await eventually(lambda: "good-after-corpus" in service.collector.results, timeout=30)
    await eventually(lambda: len(dead) >= len(corpus), timeout=30)
    unclear = {
        name: dead.get(f"bad-{i}")
        for i, (name, _) in enumerate(corpus)
        if not dead.get(f"bad-{i}") or dead[f"bad-{i}"].startswith("gave up")
    }
    print(
        f"\nchaos inbound_corpus items={len(corpus)} dead={len(dead)} unclear={len(unclear)} "
        f"good_after={service.collector.results['good-after-corpus'][0]['outcome']}"
    )
    assert unclear == {}, f"invalid input must be dead-lettered at once with its reason: {unclear}"
    assert service.collector.results["good-after-corpus"][0]["outcome"] == "succeeded"


# ---- property-based: arbitrary JSON-ish bodies on the inbound exchange -----------------

FIELDS = (
    "type",
    "command_id",
    "appointment_id",
    "patient_id",
    "reason",
    "notes",
    "correlation_id",
    "event_id",
    "source",
    "appointment",
    "received_at",
    "extra",
)
TYPES = (
    *COMMAND_TYPES,
    "appointment.created",
    "appointment.updated",
    "appointment.state_changed",
    "appointment.deleted",
    "teleport",
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(TYPES)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# Up to the store's 64-bit limit; beyond it see test_ids_beyond_64_bits_are_invalid_not_transient.
ids = st.integers(-3, 3000) | st.integers(2**62, 2**63 - 1)
appointments = st.fixed_dictionaries(
    {"id": ids | scalars},
    optional={
        "state": st.sampled_from(("Pending", "Confirmed", "Cancelled", "Gone")) | scalars,
        "patient_id": ids | scalars,
        "notes": scalars,
        "updated_at": st.sampled_from(("2026-01-01T00:00:00Z", "yesterday")) | scalars,
    },
)
EXTRA = {
    "cancel": ("reason", st.sampled_from(("Patient cancelled", "Bored", "")) | scalars),
    "edit_notes": ("notes", st.text(max_size=12) | scalars),
    "set_patient": ("patient_id", ids | scalars),
    "reassign": ("patient_id", ids | scalars),
}


def command_of(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    fields = {"type": st.just(kind), "appointment_id": ids, "command_id": st.text(min_size=1, max_size=8)}
    if kind in EXTRA:
        name, values = EXTRA[kind]
        fields[name] = values
    return st.fixed_dictionaries(fields)


events = st.fixed_dictionaries(
    {
        "type": st.sampled_from(TYPES[len(COMMAND_TYPES) :]),
        "event_id": st.text(min_size=1, max_size=8),
        "source": st.sampled_from(("webhook", "reconcile")),
        "appointment": appointments,
    }
)


def mutate(drawn: tuple[dict[str, Any], str, Any, str]) -> dict[str, Any]:
    """Valid messages with at most one field dropped, added or replaced: the interesting edge."""
    message, name, value, how = drawn
    if how == "drop":
        message.pop(name, None)
    elif how == "set":
        message[name] = value
    return message


messages = st.tuples(
    st.sampled_from(COMMAND_TYPES).flatmap(command_of) | events,
    st.sampled_from(FIELDS),
    json_values,
    st.sampled_from(("keep", "keep", "drop", "set")),
).map(mutate)
bodies = st.one_of(
    messages.map(lambda m: json.dumps(m).encode()),
    messages.map(lambda m: json.dumps(m).encode()),
    messages.map(lambda m: json.dumps(m).encode()),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(lambda m: json.dumps(m).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)


def generated_bodies(count: int) -> list[bytes]:
    """Draw ``count`` bodies from hypothesis up front, so one stack runs them all as a batch."""
    drawn: list[bytes] = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def draw(body: bytes) -> None:
        drawn.append(body)

    draw()
    return drawn


def processed_key(body: bytes) -> str | None:
    """The inbox key of a body the worker accepts, None for one it must dead-letter."""
    try:
        return str(message_key(parse(body)))
    except InvalidMessage:
        return None


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    async with running_stack(amqp_url, sqlite_url, sandbox.url, retry_delay=0.05) as running:
        yield running


async def test_arbitrary_bodies_each_get_a_result_or_a_reason_and_the_worker_goes_on(
    stack: Stack, sandbox: Any, amqp_url: str
) -> None:
    seed_slots(sandbox, 3)
    corpus = [(f"generated {i}", body) for i, body in enumerate(generated_bodies(scaled(50, 500)))]
    rng = random.Random()
    await publish_raw(amqp_url, corpus, lambda index: str(rng.randrange(1, 5000)))
    good = await stack.send({"type": "edit_notes", "appointment_id": 1001, "notes": "still alive"})

    assert (await stack.result(good, timeout=60))["outcome"] == "succeeded"
    dead = stack.observer.dead
    reasons = {str(m.message_id): str((m.headers or {}).get("x-appt-reason") or "") for m in dead}

    async def outcome(index: int, body: bytes) -> str:
        if f"bad-{index}" in reasons:
            return "dead" if reasons[f"bad-{index}"] else "dead without reason"
        key = processed_key(body)
        if key is not None and await stack.store.inbox_get(key) is not None:
            return "processed"
        if key is not None and key.removeprefix("command:") in stack.observer.results:
            return "processed"  # a command on a key naming another appointment: rejected, no inbox entry
        return "silent"

    deadline = asyncio.get_running_loop().time() + 60
    while True:
        outcomes = [await outcome(i, body) for i, (_, body) in enumerate(corpus)]
        if "silent" not in outcomes or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    print(
        f"\nchaos property_inbound examples={len(corpus)} dead={outcomes.count('dead')} "
        f"processed={outcomes.count('processed')} silent={outcomes.count('silent')} "
        f"dead_without_reason={outcomes.count('dead without reason')} "
        f"gave_up={sum(r.startswith('gave up') for r in reasons.values())}"
    )
    unclear = [
        (body, outcome)
        for (_, body), outcome in zip(corpus, outcomes, strict=True)
        if outcome not in ("dead", "processed")
    ]
    assert unclear == []
    gave_up = {
        body: reasons[f"bad-{i}"]
        for i, (_, body) in enumerate(corpus)
        if reasons.get(f"bad-{i}", "").startswith("gave up")
    }
    assert gave_up == {}, f"invalid bodies retried as if transient: {gave_up}"


async def test_ids_beyond_64_bits_are_invalid_not_transient(stack: Stack, sandbox: Any, amqp_url: str) -> None:
    seed_slots(sandbox, 1)
    huge = [
        (
            "appointment id 2**70",
            json.dumps({"type": "confirm", "appointment_id": 2**70, "command_id": "huge-1"}).encode(),
        )
    ]
    await publish_raw(amqp_url, huge, lambda index: "1")

    await eventually(lambda: stack.observer.dead, timeout=30)
    reason = str((stack.observer.dead[0].headers or {}).get("x-appt-reason"))
    print(f"\nchaos huge_ids dead={len(stack.observer.dead)} reason={reason[:80]!r}")
    assert not reason.startswith("gave up"), reason

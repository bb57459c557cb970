"""Property-based: whole AMQP deliveries (body, routing key, properties), every message kind.

The bad-input suite fuzzes bodies that parse; this one fuzzes what a partner
with publish rights can put on the wire: numbers of 5,000 digits, NULs,
strings of 256 bytes where AMQP allows 255, routing keys naming another
appointment or none, arbitrary properties and headers, observed events on
the partners' exchange. The invariants (issue 12): every delivery is settled
(the partition queues drain to empty, nothing stays unacked), no handler
fails in an unforeseen way, and a valid command sent afterwards on each
routing key still succeeds.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.broker import INBOUND_EXCHANGE, OBSERVED_EXCHANGE, partition_queue
from consumer.messages import COMMAND_TYPES
from tests.chaos.common import chaos_marks, scaled, seed_slots
from tests.helpers import eventually
from tests.stack import Stack, running_stack

pytestmark = chaos_marks

PARTITIONS = 4
CHECKED = [1001, 1002, 1003, 1004]  # the fuzz never names these in a body: the final commands own them
FUZZED = [1005, 1006]
HUGE = "__huge_number__"  # replaced, after json.dumps, by a bare number of 5,000 digits
EVENT_TYPES = ("appointment.created", "appointment.updated", "appointment.state_changed", "appointment.deleted")


def utf8_at_most(size: int) -> st.SearchStrategy[str]:
    return st.text(max_size=size).filter(lambda s: len(s.encode()) <= size)


hostile_strings = st.one_of(
    st.text(max_size=8),
    st.just("\x00"),
    st.just("a\x00b"),
    st.just("x" * 256),
    st.just("é" * 128),
    st.just("2099-01-01T00:00:00Z"),
    st.just("2026-01-01T00:00:00"),
    st.just("2026-01-01T00:00:00Z"),
)
hostile_numbers = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([*FUZZED, 2**63 - 1, 2**63, 2**70, -(2**63)]),
    st.just(HUGE),
    st.floats(allow_nan=False),
    st.just(1006.0),
    st.booleans(),
)
values = st.recursive(
    st.none() | hostile_strings | hostile_numbers,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_strings, inner, max_size=3),
    max_leaves=6,
)
# Weighted towards the well-formed, so the applied, rejected and reply paths run too.
ids = st.one_of(st.sampled_from(FUZZED), st.sampled_from(FUZZED), hostile_numbers)
message_ids = st.one_of(st.uuids().map(str), st.uuids().map(str), hostile_strings)

REQUIRED = {
    "cancel": {"reason": st.sampled_from(["Patient cancelled"]) | hostile_strings},
    "set_patient": {"patient_id": ids},
    "reassign": {"patient_id": ids},
    "edit_notes": {"notes": hostile_strings},
}


def command(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly well-formed (so the applied, rejected and reply paths run too), sometimes one field more."""
    return st.fixed_dictionaries(
        {"type": st.just(kind), "command_id": message_ids, "appointment_id": ids, **REQUIRED.get(kind, {})},
        optional={"correlation_id": hostile_strings},
    )


appointments = st.fixed_dictionaries(
    {"id": ids},
    optional={
        "state": st.sampled_from(["Pending", "Confirmed", "Cancelled"]) | hostile_strings,
        "patient_id": ids,
        "updated_at": hostile_strings | hostile_numbers,
        "notes": values,
    },
)
events = st.fixed_dictionaries(
    {
        "type": st.sampled_from(EVENT_TYPES),
        "event_id": message_ids,
        "source": st.sampled_from(["webhook", "reconcile", "command"]),
        "appointment": appointments,
    },
    optional={"received_at": hostile_strings | hostile_numbers, "extra": values},
)


def encode(message: Any) -> bytes:
    return json.dumps(message).replace(json.dumps(HUGE), "9" * 5000).encode()


messages = st.one_of(
    st.sampled_from(COMMAND_TYPES).flatmap(command),
    events,
    values,
    st.sampled_from(COMMAND_TYPES).flatmap(command).map(lambda m: {**m, "extra": 1}),
)
raw_bodies = st.binary(max_size=64) | st.just(b"{" * 10_000)
routing_keys = st.one_of(
    st.sampled_from([str(i) for i in CHECKED + FUZZED]),
    st.sampled_from(CHECKED).map(lambda i: f"practice.{i}"),
    st.just(""),
    utf8_at_most(255),
)
shortstrs = st.none() | utf8_at_most(255) | st.just("s" * 255) | st.just("appointments.dead")
headers = st.dictionaries(
    utf8_at_most(20),
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | utf8_at_most(300)
    | st.lists(st.integers(0, 9), max_size=3),
    max_size=4,
)


@st.composite
def deliveries(draw: st.DrawFn) -> dict[str, Any]:
    message = draw(messages)
    named = message.get("appointment_id", message.get("appointment")) if isinstance(message, dict) else None
    named = named.get("id") if isinstance(named, dict) else named
    return {
        "exchange": draw(st.sampled_from([INBOUND_EXCHANGE] * 3 + [OBSERVED_EXCHANGE])),
        # Often the key the body names (so it is applied), else any other.
        "routing_key": draw(st.just(str(named)) | routing_keys if named is not None else routing_keys),
        "body": draw(
            st.one_of(st.just(encode(message)), st.just(encode(message)), st.just(encode(message)), raw_bodies)
        ),
        "properties": {
            "message_id": draw(shortstrs),
            "correlation_id": draw(shortstrs),
            "reply_to": draw(shortstrs),
            "type": draw(shortstrs),
            "app_id": draw(shortstrs),
            "content_type": draw(shortstrs),
            "content_encoding": draw(shortstrs),
            "headers": draw(headers),
            "priority": draw(st.none() | st.integers(0, 255)),
        },
    }


def generated(count: int) -> list[dict[str, Any]]:
    """Draw the deliveries up front, so one running stack takes them all as a batch."""
    drawn: list[dict[str, Any]] = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(deliveries())
    def draw(delivery: dict[str, Any]) -> None:
        drawn.append(delivery)

    draw()
    return drawn


def unsettled(amqp_url: str) -> dict[str, int]:
    """Messages still ready or unacked on each partition queue (rabbitmqctl: counts both)."""
    vhost = amqp_url.rsplit("/", 1)[1]
    listed = subprocess.run(
        [
            "rabbitmqctl",
            "list_queues",
            "-p",
            vhost,
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "-q",
            "--no-table-headers",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    partitions = {partition_queue(i) for i in range(PARTITIONS)}
    counts = {}
    for line in listed.splitlines():
        name, ready, unacked = line.split()
        if name in partitions:
            counts[name] = int(ready) + int(unacked)
    return counts


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    seed_slots(sandbox, len(CHECKED) + len(FUZZED))
    async with running_stack(
        amqp_url, sqlite_url, sandbox.url, partitions=PARTITIONS, retry_delay=0.05, max_deliveries=2
    ) as running:
        yield running


async def test_every_fuzzed_delivery_is_settled_and_each_key_still_serves(stack: Stack, amqp_url: str) -> None:
    batch = generated(scaled(150, 2000))
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchanges = {name: await channel.get_exchange(name) for name in (INBOUND_EXCHANGE, OBSERVED_EXCHANGE)}
        for delivery in batch:
            message = aio_pika.Message(delivery["body"], **delivery["properties"])
            await exchanges[delivery["exchange"]].publish(message, delivery["routing_key"], mandatory=False)
    after = {
        i: await stack.send({"type": "edit_notes", "appointment_id": i, "notes": "after the fuzz"}) for i in CHECKED
    }

    outcomes = {i: (await stack.result(command_id, timeout=90))["outcome"] for i, command_id in after.items()}
    counts = await eventually(
        lambda: (lambda c: c if not any(c.values()) else None)(unsettled(amqp_url)), timeout=60, interval=1.0
    )
    await asyncio.sleep(0)
    fuzz_results = [r for r in stack.observer.results.values() if r["command_id"] not in after.values()]
    print(
        f"\nchaos hostile_deliveries deliveries={len(batch)} dead={len(stack.observer.dead)} "
        f"results={len(fuzz_results)} ({sorted(r['outcome'] for r in fuzz_results)}) "
        f"unsettled={sum(counts.values())} "
        f"failing={stack.worker.failing} after={sorted(set(outcomes.values()))}"
    )
    assert outcomes == {i: "succeeded" for i in CHECKED}
    assert not stack.worker.failing, "a handler failed in a way no branch foresaw: see the log"

"""Commands over RabbitMQ: ordered, idempotent, at-least-once (real broker, sandbox over HTTP)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
import structlog

from consumer import metrics
from consumer.broker import INBOUND_EXCHANGE, REASON_HEADER
from tests.helpers import eventually, fail_transactions_writing, seed_pending, stop_failing_transactions
from tests.stack import Stack, running_stack

STATUS = "The appointment can not be updated as the current status is:"


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as running:
        yield running


async def test_every_command_type_succeeds_on_a_legal_appointment(stack: Stack, sandbox: Any) -> None:
    seed_pending(sandbox, 101)
    seed_pending(sandbox, 102, patient_id=None)
    seed_pending(sandbox, 103)

    confirmed = await stack.result(await stack.send({"type": "confirm", "appointment_id": 101}))
    patient_set = await stack.result(
        await stack.send({"type": "set_patient", "appointment_id": 102, "patient_id": 2001})
    )
    noted = await stack.result(await stack.send({"type": "edit_notes", "appointment_id": 101, "notes": "bring x-rays"}))
    cancelled = await stack.result(
        await stack.send({"type": "cancel", "appointment_id": 103, "reason": "Patient cancelled"})
    )

    assert [r["outcome"] for r in (confirmed, patient_set, noted, cancelled)] == ["succeeded"] * 4
    assert sandbox.state.get(101)["state"] == "Confirmed"
    assert sandbox.state.get(101)["notes"] == "bring x-rays"
    assert sandbox.state.get(102)["patient_id"] == 2001
    assert sandbox.state.get(103)["state"] == "Cancelled"
    record = await stack.store.get_appointment(101)
    assert record is not None and record.state == "Confirmed"


async def test_illegal_commands_are_rejected_with_the_pms_reasons(stack: Stack, sandbox: Any) -> None:
    seed_pending(sandbox, 201, state="Cancelled", appointment_cancellation_reason_id=2)
    seed_pending(sandbox, 202)

    confirm = await stack.result(await stack.send({"type": "confirm", "appointment_id": 201}))
    set_patient = await stack.result(
        await stack.send({"type": "set_patient", "appointment_id": 202, "patient_id": 1014})
    )
    unknown_reason = await stack.result(await stack.send({"type": "cancel", "appointment_id": 202, "reason": "Bored"}))
    archived_reason = await stack.result(await stack.send({"type": "cancel", "appointment_id": 202, "reason": "Snow"}))
    missing = await stack.result(await stack.send({"type": "confirm", "appointment_id": 999}))

    assert confirm["outcome"] == "rejected"
    assert confirm["reasons"] == {"state": [f"{STATUS} Cancelled"]}
    assert set_patient["outcome"] == "rejected"
    assert set_patient["reasons"]["patient_id"] == ["can not change patients"]
    assert "reassign" in set_patient["reasons"]["hint"][0]
    assert unknown_reason["outcome"] == "rejected" and "Patient cancelled" in unknown_reason["reasons"]["reason"][0]
    assert archived_reason["outcome"] == "rejected"
    [archived] = archived_reason["reasons"]["reason"]
    assert archived.startswith("is archived (live reasons: 'Booked in error',") and "Snow" not in archived.split("(")[1]
    assert missing["reasons"] == {"appointment_id": ["not found in the PMS"]}
    assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 0


async def test_a_command_logs_one_line_unless_its_result_says_more_than_its_states(stack: Stack, sandbox: Any) -> None:
    seed_pending(sandbox, 211)
    seed_pending(sandbox, 212, state="Cancelled", appointment_cancellation_reason_id=2)

    with structlog.testing.capture_logs() as lines:
        moved = await stack.send({"type": "confirm", "appointment_id": 211})
        refused = await stack.send({"type": "confirm", "appointment_id": 212})
        await stack.result(moved)
        await stack.result(refused)
        again = await stack.send({"type": "confirm", "appointment_id": 211})  # already confirmed: no move
        await stack.result(again)

    def said(command_id: str) -> list[tuple[str, str | None]]:
        return [
            (line["event"], line.get("outcome") or line.get("source"))
            for line in lines
            if line.get("command_id") == command_id
        ]

    # First contact reconciles, then the confirm moves it: its state line says it succeeded.
    assert said(moved) == [("state", "reconcile"), ("state", "command")]
    assert said(refused) == [("state", "reconcile"), ("command result", "rejected")]
    assert said(again) == [("command result", "succeeded")]


async def test_behind_the_back_confirmation_is_reconciled(stack: Stack, sandbox: Any) -> None:
    """The seed: auto-confirmed by SMS between our GET and our PUT."""
    seed_pending(sandbox, 301, patient_id=None)
    sandbox.state.change_behind_back(301, {"state": "Confirmed"}, before_next="PUT")

    result = await stack.result(await stack.send({"type": "set_patient", "appointment_id": 301, "patient_id": 2002}))

    assert result["outcome"] == "rejected"
    assert result["reasons"] == {"patient_id": [f"{STATUS} Confirmed"]}
    history = await stack.store.history(301)
    assert [(r.trigger, r.source, r.to_state) for r in history][-1] == ("reconcile", "reconcile", "Confirmed")
    assert sandbox.state.get(301)["patient_id"] is None


async def test_seed_confirm_raced_by_sms_ends_confirmed_and_succeeded(stack: Stack, sandbox: Any) -> None:
    sandbox.state.seed_fixture("seed")

    result = await stack.result(await stack.send({"type": "confirm", "appointment_id": 757579675}))

    assert result["outcome"] == "succeeded"
    assert result["appointment"]["state"] == "Confirmed"
    drift = [r for r in await stack.store.history(757579675) if r.trigger == "reconcile"]
    assert drift[-1].from_state == "Pending" and drift[-1].to_state == "Confirmed"


async def test_the_same_command_three_times_is_applied_once(stack: Stack, sandbox: Any) -> None:
    seed_pending(sandbox, 401)
    command = {"type": "edit_notes", "appointment_id": 401, "notes": "once", "command_id": "dup-1"}
    for _ in range(3):
        await stack.send(dict(command))

    await eventually(lambda: stack.observer.result_counts.get("dup-1") == 3)
    assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 1
    applied = [r for r in await stack.store.history(401) if r.command_id == "dup-1" and r.source == "command"]
    assert len(applied) == 1


async def test_a_thousand_interleaved_commands_keep_per_appointment_order(stack: Stack, sandbox: Any) -> None:
    ids = list(range(5001, 5051))
    for appointment_id in ids:
        seed_pending(sandbox, appointment_id)
    rounds = 20
    for n in range(rounds):
        for appointment_id in ids:
            await stack.send(
                {
                    "type": "edit_notes",
                    "appointment_id": appointment_id,
                    "notes": f"note {n}",
                    "command_id": f"order-{appointment_id}-{n}",
                }
            )

    await eventually(lambda: len(stack.observer.results) == rounds * len(ids), timeout=120)
    assert {r["outcome"] for r in stack.observer.results.values()} == {"succeeded"}
    for appointment_id in ids:
        applied = [r.command_id for r in await stack.store.history(appointment_id, limit=1000) if r.source == "command"]
        assert applied == [f"order-{appointment_id}-{n}" for n in range(rounds)]
        assert sandbox.state.get(appointment_id)["notes"] == f"note {rounds - 1}"


async def test_bad_input_is_dead_lettered_with_a_reason_and_the_worker_goes_on(
    stack: Stack, sandbox: Any, amqp_url: str
) -> None:
    seed_pending(sandbox, 601)
    bad_bodies = [
        b"not json",
        b'{"type": "confirm", "appointment_id": "abc", "command_id": "x1"}',
        b'{"type": "teleport", "appointment_id": 601, "command_id": "x2"}',
        b'{"type": "cancel", "appointment_id": 601, "command_id": "x3"}',
        b'{"type": "confirm", "appointment_id": 601, "command_id": "x4", "extra": 1}',
        b"{" + b" " * 300_000 + b"}",  # over the default APPT_MAX_MESSAGE_BYTES (256 KiB)
    ]
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(INBOUND_EXCHANGE)
        for index, body in enumerate(bad_bodies):
            await exchange.publish(aio_pika.Message(body, message_id=f"bad-{index}"), routing_key="601")
    good = await stack.send({"type": "confirm", "appointment_id": 601})

    assert (await stack.result(good))["outcome"] == "succeeded"
    await eventually(lambda: len(stack.observer.dead) == len(bad_bodies))
    reasons = {m.message_id: str((m.headers or {})[REASON_HEADER]) for m in stack.observer.dead}
    assert "not JSON" in reasons["bad-0"]
    assert "appointment_id" in reasons["bad-1"]
    assert "teleport" in reasons["bad-2"] or "type" in reasons["bad-2"]
    assert "reason" in reasons["bad-3"]
    assert "extra" in reasons["bad-4"]
    assert "exceeds the limit" in reasons["bad-5"]


async def test_transient_pms_failures_are_retried_and_past_the_retries_the_command_waits_for_the_pms(
    stack: Stack, sandbox: Any
) -> None:
    seed_pending(sandbox, 701)
    seed_pending(sandbox, 702)
    sandbox.state.fail_next("GET /v1/appointments/{id}", 2, 503)
    recovered = await stack.result(await stack.send({"type": "confirm", "appointment_id": 701}))
    assert recovered["outcome"] == "succeeded"

    # Past a try's retries (3 client x 3 worker attempts) several times over: the practice waits
    # (the message parked), is probed again, and the command succeeds once the PMS answers.
    sandbox.state.fail_next("GET /v1/appointments/{id}", 40, 500)
    waited = await stack.send({"type": "confirm", "appointment_id": 702})
    await eventually(lambda: stack.practices.get("default").status == "unreachable")
    assert (await stack.result(waited, timeout=60))["outcome"] == "succeeded"
    assert sandbox.state.get(702)["state"] == "Confirmed"
    assert not stack.observer.dead
    sandbox.state.reset()


async def test_a_killed_broker_connection_loses_nothing_and_applies_nothing_twice(
    stack: Stack, sandbox: Any, amqp_url: str
) -> None:
    ids = list(range(8001, 8011))
    for appointment_id in ids:
        seed_pending(sandbox, appointment_id)
    sandbox.state.set_latency(0.01)
    commands = [f"kill-{appointment_id}-{n}" for n in range(10) for appointment_id in ids]
    for command_id in commands:
        _, target, n = command_id.split("-")
        await stack.send(
            {
                "type": "edit_notes",
                "appointment_id": int(target),
                "notes": f"note {n}",
                "command_id": command_id,
            }
        )
    await eventually(lambda: len(stack.observer.results) >= 10)

    vhost = amqp_url.rsplit("/", 1)[1]  # only this test's connections: other runs share the broker
    subprocess.run(
        ["rabbitmqctl", "close_all_connections", "--vhost", vhost, "test kill"],
        check=True,
        capture_output=True,
        timeout=60,
    )

    await eventually(lambda: set(stack.observer.results) >= set(commands), timeout=90)
    for appointment_id in ids:
        applied = [r.command_id for r in await stack.store.history(appointment_id, limit=1000) if r.source == "command"]
        assert len(applied) == len(set(applied)), "a command was applied twice"
        assert sandbox.state.get(appointment_id)["notes"] == "note 9"


async def test_appt_send_waits_for_the_result_and_exits_by_outcome(stack: Stack, sandbox: Any, amqp_url: str) -> None:
    seed_pending(sandbox, 901)
    seed_pending(sandbox, 902, state="Cancelled", appointment_cancellation_reason_id=2)
    env = {**os.environ, "APPT_AMQP_URL": amqp_url}
    appt = str(Path(sys.executable).with_name("appt"))

    def send(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [appt, "send", *args, "--wait", "20"], env=env, capture_output=True, text=True, timeout=60
        )

    confirmed = await asyncio.to_thread(send, "confirm", "--appointment", "901")
    refused = await asyncio.to_thread(send, "confirm", "--appointment", "902")
    unusable = await asyncio.to_thread(send, "set_patient", "--appointment", "901")

    assert confirmed.returncode == 0, confirmed.stderr
    assert '"outcome": "succeeded"' in confirmed.stdout
    assert refused.returncode == 1
    assert "The appointment can not be updated as the current status is: Cancelled" in refused.stdout
    assert unusable.returncode == 2
    assert "set_patient needs --patient" in unusable.stderr


async def test_a_command_on_an_appointment_deleted_upstream_records_the_deletion(stack: Stack, sandbox: Any) -> None:
    seed_pending(sandbox, 951)
    assert (await stack.result(await stack.send({"type": "confirm", "appointment_id": 951})))["outcome"] == "succeeded"
    sandbox.state.set_delete_mode("remove")  # a PMS whose DELETE removes (the default cancels)
    sandbox.state.delete(951)  # the deleted webhook is lost: nobody subscribed

    result = await stack.result(await stack.send({"type": "edit_notes", "appointment_id": 951, "notes": "too late"}))

    assert result["reasons"] == {"appointment_id": ["not found in the PMS"]}
    record = await stack.store.get_appointment(951)
    assert record is not None and record.state == "Deleted"
    last = (await stack.store.history(951))[-1]
    assert (last.from_state, last.to_state, last.source) == ("Confirmed", "Deleted", "reconcile")


@pytest.fixture
async def pg_stack(amqp_url: str, pg_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    """The pipeline on PostgreSQL, in a schema of this test's own (dropped after)."""
    schema = f"appt_{uuid.uuid4().hex[:12]}"
    try:
        async with running_stack(amqp_url, f"{pg_url}?schema={schema}", sandbox.url) as running:
            yield running
    finally:
        connection = await asyncpg.connect(pg_url)
        try:
            await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await connection.close()


async def test_a_failed_commit_fails_its_whole_batch_and_nothing_of_it_is_acked(pg_stack: Stack, sandbox: Any) -> None:
    """Group commit: while every transaction holding the poisoned command fails at its COMMIT,
    that command stays unacked and unanswered, and the commands that shared its batches are
    retried and applied once; once COMMIT works again, the poisoned one is applied once too."""
    for appointment_id in range(801, 831):
        seed_pending(sandbox, appointment_id)
    await fail_transactions_writing(pg_stack.store, "command:poison")
    retries_before = worker_retries()
    poison = await pg_stack.send({"type": "edit_notes", "appointment_id": 801, "notes": "late", "command_id": "poison"})
    others = [
        await pg_stack.send({"type": "edit_notes", "appointment_id": i, "notes": f"note {i}"}) for i in range(802, 831)
    ]

    await eventually(lambda: all(o in pg_stack.observer.results for o in others), timeout=30)
    await asyncio.sleep(1.0)  # the poisoned command goes on failing meanwhile
    assert poison not in pg_stack.observer.results
    assert await pg_stack.store.inbox_get("command:poison") is None
    # Neither acked nor parked nor dead-lettered: the broker still holds it, so it comes back.
    assert await pg_stack.store.parked_head("default", 801) is None and not pg_stack.observer.dead
    assert worker_retries() > retries_before  # batches did fail

    await stop_failing_transactions(pg_stack.store)
    assert (await pg_stack.result(poison, timeout=30))["outcome"] == "succeeded"  # not sent again
    assert {pg_stack.observer.results[o]["outcome"] for o in others} == {"succeeded"}
    assert all(pg_stack.observer.result_counts[o] == 1 for o in [poison, *others])
    # Applied once each: a retry after a failed batch finds its write done (a fresh GET), and answers.
    assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 30
    assert [sandbox.state.get(i)["notes"] for i in range(802, 831)] == [f"note {i}" for i in range(802, 831)]
    assert sandbox.state.get(801)["notes"] == "late"


def worker_retries() -> float:
    return metrics.REGISTRY.get_sample_value("appt_retries_total", {"where": "worker"}) or 0.0

"""Nothing ends silently: every dead-lettered command is answered, and `appt dead` lists,
shows, replays and purges dead letters (real RabbitMQ, the sandbox over HTTP, the real CLI)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from consumer import metrics
from consumer.broker import DEAD_EXCHANGE, INBOUND_EXCHANGE
from consumer.deadletters import DeadLetterCollector
from consumer.store.base import DeadLetterQuery
from tests.helpers import eventually, run_appt, seed_pending
from tests.stack import Stack, running_stack

GET = "GET /v1/appointments/{id}"
PUT = "PUT /v1/appointments/{id}"


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    """Gives up on a transient failure at the second delivery, without PMS-client retries."""
    async with running_stack(amqp_url, sqlite_url, sandbox.url, max_deliveries=2, pms_retry_attempts=1) as running:
        yield running


@pytest.fixture
def appt_env(amqp_url: str, sqlite_url: str) -> dict[str, str]:
    return {"APPT_AMQP_URL": amqp_url, "APPT_STORE": sqlite_url, "APPT_FAILPOINTS": ""}


def heal(sandbox: Any, *appointment_ids: int) -> None:
    """Faults and call counts gone, the appointments as seeded (nothing was applied to them)."""
    sandbox.state.reset()
    for appointment_id in appointment_ids:
        seed_pending(sandbox, appointment_id)


async def listed(env: dict[str, str], *filters: str) -> dict[str, Any]:
    ran = await run_appt(env, "dead", "list", "--json", *filters)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)  # type: ignore[no-any-return]


async def dead_count(stack: Stack) -> int:
    return len(await stack.store.dead_letters(DeadLetterQuery()))


async def has_dead(stack: Stack, count: int) -> bool:
    return await dead_count(stack) == count


async def publish_raw(amqp_url: str, body: bytes, message_id: str, **properties: Any) -> None:
    async with await aio_pika.connect(amqp_url) as connection:
        exchange = await (await connection.channel()).get_exchange(INBOUND_EXCHANGE)
        await exchange.publish(aio_pika.Message(body, message_id=message_id, **properties), routing_key="601")


async def test_an_invalid_command_with_a_readable_id_gets_a_failed_result_on_its_reply_to(
    stack: Stack, sandbox: Any, amqp_url: str
) -> None:
    seed_pending(sandbox, 601)
    unreadable_before = metrics.REGISTRY.get_sample_value("appt_dead_letters_unreadable_total") or 0
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        exchange = await channel.get_exchange(INBOUND_EXCHANGE)
        invalid = {"command_id": "no-reason", "type": "cancel", "appointment_id": 601}
        await exchange.publish(
            aio_pika.Message(
                json.dumps(invalid).encode(), message_id="no-reason", reply_to=replies.name, correlation_id="corr-1"
            ),
            routing_key="601",
        )
        await publish_raw(amqp_url, b"\xff not json at all", "garbage")
        reply = await eventually(lambda: replies.get(fail=False), timeout=15)
        await reply.ack()

        answer = json.loads(reply.body)
        assert reply.correlation_id == "corr-1"
        assert (answer["outcome"], answer["type"], answer["command_id"]) == ("failed", "cancel", "no-reason")
        assert (
            "reason" in answer["reasons"]["dead_letter"][0] and "Field required" in answer["reasons"]["dead_letter"][0]
        )
        assert (answer["deliveries"], answer["replay"]) == (1, 0)
        assert stack.observer.results["no-reason"] == answer  # also on result.cancel.failed

        # The same command id again (now valid): a duplicate, answered with the same result.
        await stack.send(
            {"command_id": "no-reason", "type": "cancel", "appointment_id": 601, "reason": "Patient cancelled"}
        )
        await eventually(lambda: stack.observer.result_counts.get("no-reason") == 2)
        assert stack.observer.results["no-reason"] == answer
        assert sandbox.state.get(601)["state"] == "Pending"

    await eventually(lambda: has_dead(stack, 2), timeout=15)
    await eventually(
        lambda: metrics.REGISTRY.get_sample_value("appt_dead_letters_unreadable_total") == unreadable_before + 1
    )
    kept = await stack.store.dead_letters(DeadLetterQuery())
    assert [(d.command_id, d.type, d.message_id) for d in kept] == [
        ("no-reason", "cancel", "no-reason"),
        (None, None, "garbage"),
    ]
    assert set(stack.observer.results) == {"no-reason"}  # the unreadable one has no result


async def test_an_exhausted_command_fails_once_and_a_replay_after_the_fix_succeeds(
    stack: Stack, sandbox: Any, appt_env: dict[str, str]
) -> None:
    seed_pending(sandbox, 701)
    # An answer the service can't act on (400) never succeeds as it is: dead-lettered after the
    # deliveries. (A PMS that is down makes the practice wait instead: tests/integration/test_waiting.py.)
    sandbox.state.fail_next(PUT, 10_000, 400)

    sent = await run_appt(
        appt_env,
        "send",
        "edit_notes",
        "--appointment",
        "701",
        "--notes",
        "x-rays",
        "--command-id",
        "doomed",
        "--wait",
        "30",
    )

    assert sent.returncode == 1, sent.stderr
    answer = json.loads(sent.stdout[sent.stdout.index("\n{") + 1 :])  # after the "published" line
    assert answer["outcome"] == "failed" and answer["deliveries"] == 2
    assert answer["reasons"]["dead_letter"][0].startswith("gave up after 2 deliveries: PmsError")
    await eventually(lambda: stack.observer.result_counts.get("doomed"))
    assert stack.observer.results["doomed"] == answer
    before = await listed(appt_env)
    [letter] = before["dead_letters"]
    assert (
        letter["command_id"],
        letter["type"],
        letter["appointment_id"],
        letter["reason_class"],
        letter["deliveries"],
    ) == ("doomed", "edit_notes", 701, "exhausted", 2)
    assert before["by_reason_class"] == {"exhausted": 1} and before["waiting_in_queue"] == 0
    assert before["by_reason"] == {
        "gave up after N deliveries: PmsError: PUT /vN/appointments/{id}: N injected failure (N)": 1
    }
    gauge = DeadLetterCollector(broker=stack.broker, store=stack.store)
    await gauge.refresh_metrics()
    assert metrics.REGISTRY.get_sample_value("appt_dead_letters", {"reason_class": "exhausted"}) == 1

    heal(sandbox, 701)
    replayed = await run_appt(appt_env, "dead", "replay", str(letter["id"]), "--json")

    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["replay"] == 1
    result = await eventually(lambda: (r := stack.observer.results["doomed"])["outcome"] != "failed" and r)
    assert (result["outcome"], result["replay"], result["deliveries"]) == ("succeeded", 1, None)
    assert sandbox.state.get(701)["notes"] == "x-rays"
    assert (await listed(appt_env))["dead_letters"] == []
    assert stack.observer.result_counts["doomed"] == 2  # the failure, then the replay's success
    await gauge.refresh_metrics()
    assert metrics.REGISTRY.get_sample_value("appt_dead_letters", {"reason_class": "exhausted"}) is None
    # A later duplicate of the original id gets the newest result.
    await stack.send({"command_id": "doomed", "type": "edit_notes", "appointment_id": 701, "notes": "x-rays"})
    await eventually(lambda: stack.observer.result_counts.get("doomed") == 3)
    assert stack.observer.results["doomed"] == result


async def test_a_replay_header_on_a_command_never_dead_lettered_does_not_run_it_twice(
    stack: Stack, sandbox: Any, amqp_url: str
) -> None:
    seed_pending(sandbox, 801)
    done = await stack.result(
        await stack.send({"command_id": "once", "type": "edit_notes", "appointment_id": 801, "notes": "first"})
    )
    reads = sandbox.state.call_count(GET)
    forged = {"command_id": "once", "type": "edit_notes", "appointment_id": 801, "notes": "forged"}
    async with await aio_pika.connect(amqp_url) as connection:
        exchange = await (await connection.channel()).get_exchange(INBOUND_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(json.dumps(forged).encode(), message_id="once", headers={"x-appt-replay": 1}),
            routing_key="801",
        )

    await eventually(lambda: stack.observer.result_counts.get("once") == 2)
    assert stack.observer.results["once"] == done  # answered as the duplicate it is
    assert (sandbox.state.call_count(GET), sandbox.state.get(801)["notes"]) == (reads, "first")


async def test_a_message_rabbitmq_dead_lettered_itself_is_kept_and_answered(stack: Stack, amqp_url: str) -> None:
    """The partitions' delivery limit is a backstop (a worker dying on a message each time):
    such a dead letter carries RabbitMQ's ``x-death``, not our reason."""
    body = json.dumps({"command_id": "crash-loop", "type": "confirm", "appointment_id": 5}).encode()
    death = [
        {
            "reason": "delivery_limit",
            "queue": "appointments.inbound.p1",
            "count": 1,
            "time": datetime(2026, 12, 1, tzinfo=UTC),
            "routing-keys": ["5"],
        }
    ]
    async with await aio_pika.connect(amqp_url) as connection:
        exchange = await (await connection.channel()).get_exchange(DEAD_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(body, message_id="crash-loop", headers={"x-death": death, "x-delivery-count": 50}),
            routing_key="5",
        )

    result = await stack.result("crash-loop")
    assert (result["outcome"], result["deliveries"]) == ("failed", 50)
    assert result["reasons"] == {"dead_letter": ["dead-lettered by RabbitMQ: delivery_limit"]}
    [kept] = await stack.store.dead_letters(DeadLetterQuery())
    assert (kept.reason_class, kept.routing_key, kept.headers["x-death"][0]["time"]) == (
        "broker",
        "5",
        "2026-12-01T00:00:00+00:00",
    )


async def test_purge_removes_exactly_what_it_named_and_listing_changes_nothing(
    stack: Stack, amqp_url: str, appt_env: dict[str, str]
) -> None:
    bodies = {"first": b"first: not json", "second": b"second: not json", "third": b'["third: no object"]'}
    for name, body in bodies.items():
        await publish_raw(amqp_url, body, name, headers={"x-partner": name})
    await eventually(lambda: has_dead(stack, 3), timeout=15)

    once, twice = await listed(appt_env), await listed(appt_env)
    assert once == twice
    assert [d["message_id"] for d in once["dead_letters"]] == ["first", "second", "third"]
    first, second, third = (d["id"] for d in once["dead_letters"])
    shown = await run_appt(appt_env, "dead", "show", str(second), "--json")
    assert json.loads(shown.stdout)["body"] == "second: not json"
    assert json.loads(shown.stdout)["headers"]["x-partner"] == "second"

    declined = await run_appt(appt_env, "dead", "purge", str(second), stdin="n\n")
    assert declined.returncode == 1 and "purge 1 dead letter(s)" in declined.stderr
    assert await listed(appt_env) == once
    purged = await run_appt(appt_env, "dead", "purge", str(second), "--yes")
    assert purged.returncode == 0, purged.stderr

    assert [d["id"] for d in (await listed(appt_env))["dead_letters"]] == [first, third]
    again = await run_appt(appt_env, "dead", "purge", str(second), "--yes")
    assert again.returncode == 2 and f"not a dead letter now: {second}" in again.stderr
    confirmed = await run_appt(appt_env, "dead", "purge", "--all", "--reason", "INVALID MESSAGE", stdin="y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert [d["id"] for d in (await listed(appt_env))["dead_letters"]] == [first]


async def test_a_replay_killed_halfway_through_50_loses_none_and_applies_none_twice(
    stack: Stack, sandbox: Any, appt_env: dict[str, str]
) -> None:
    appointments = list(range(1001, 1011))
    for appointment_id in appointments:
        seed_pending(sandbox, appointment_id)
    sandbox.state.fail_next(GET, 100_000, 400)  # can't succeed as it is: dead-lettered (see above)
    sent = [
        await stack.send({"command_id": f"n-{a}-{n}", "type": "edit_notes", "appointment_id": a, "notes": f"note {n}"})
        for n in range(5)
        for a in appointments
    ]
    await eventually(lambda: len(stack.observer.results) == 50 or None, timeout=60)
    await eventually(lambda: has_dead(stack, 50), timeout=30)
    assert {r["outcome"] for r in stack.observer.results.values()} == {"failed"}
    heal(sandbox, *appointments)

    killed = await run_appt(
        {**appt_env, "APPT_FAILPOINTS": "after_replay_publish@25"}, "dead", "replay", "--all", "--json"
    )
    assert killed.returncode == -9, killed.stderr
    assert len(killed.stdout.splitlines()) == 24  # the 25th was published, not yet marked
    assert await dead_count(stack) == 26
    finished = await run_appt(appt_env, "dead", "replay", "--all")
    assert finished.returncode == 0, finished.stderr

    def replayed() -> bool:
        return all(r["replay"] == 1 and r["outcome"] == "succeeded" for r in stack.observer.results.values())

    await eventually(replayed, timeout=60)
    # 50 failures, 50 replay results, and the twice-published 25th answered again from the inbox.
    await eventually(lambda: sum(stack.observer.result_counts.values()) == 101, timeout=15)
    assert set(stack.observer.results) == set(sent)
    assert (sandbox.state.call_count(GET), sandbox.state.call_count(PUT)) == (50, 50)
    assert {sandbox.state.get(a)["notes"] for a in appointments} == {"note 4"}  # in order, too
    assert (await listed(appt_env))["dead_letters"] == []

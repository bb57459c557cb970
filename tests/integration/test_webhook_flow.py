"""Sandbox -> signed webhook -> queue -> worker -> state: the whole inbound path for real."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from consumer.reconciler import reconcile_once
from consumer.settings import Settings
from consumer.signing import sign
from consumer.webhooks import BROKER_KEY, STORE_KEY, create_app
from tests.helpers import eventually, seed_pending, served, starts_in
from tests.stack import Stack, running_stack

SECRET = "whsec_" + base64.b64encode(b"webhook-flow-test-secret").decode()


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as running:
        yield running


@pytest.fixture
async def receiver(stack: Stack, sandbox: Any) -> AsyncIterator[str]:
    """The service's HTTP app on a free port, subscribed to the sandbox's webhooks."""

    async def resources(app: web.Application) -> AsyncIterator[None]:
        app[BROKER_KEY] = stack.broker
        app[STORE_KEY] = stack.store
        yield

    settings = Settings(webhook_secrets=[SECRET], api_token="t")
    async with served(create_app(settings, resources)) as base:
        url = f"{base}/webhooks/pms"
        sandbox.state.set_webhook_retry_delay(0.1)
        sandbox.state.subscribe(url, SECRET)
        yield url
        sandbox.state.unsubscribe(url)


async def stored_state(stack: Stack, appointment_id: int) -> str | None:
    record = await stack.store.get_appointment(appointment_id)
    return record.state if record else None


async def test_a_confirmation_behind_our_back_arrives_by_webhook_within_a_second(
    stack: Stack, sandbox: Any, receiver: str
) -> None:
    seed_pending(sandbox, 1201)
    await eventually(lambda: stored_state(stack, 1201))

    started = time.monotonic()
    sandbox.state.change_now(1201, {"state": "Confirmed"})
    await eventually(lambda: _is(stored_state(stack, 1201), "Confirmed"), timeout=1.0)

    assert time.monotonic() - started < 1.0
    last = (await stack.store.history(1201))[-1]
    assert (last.from_state, last.to_state, last.source) == ("Pending", "Confirmed", "webhook")
    assert last.webhook_id and last.webhook_id.startswith("msg_")


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_broker_outage_answers_503_and_the_pms_retry_delivers_later(
    stack: Stack, sandbox: Any, receiver: str, amqp_url: str
) -> None:
    seed_pending(sandbox, 1301)
    await eventually(lambda: stored_state(stack, 1301))
    publisher = stack.broker
    await publisher.close()  # the receiver's broker is gone: webhooks must not be acknowledged

    sandbox.state.change_now(1301, {"state": "Confirmed"})
    await eventually(lambda: any(d.status == 503 for d in sandbox.state.deliveries), timeout=5)
    assert await stored_state(stack, 1301) == "Pending"

    await publisher.connect()
    await stack.worker.start()
    await eventually(lambda: _is(stored_state(stack, 1301), "Confirmed"), timeout=15)


async def test_shuffled_duplicated_webhooks_end_in_the_pms_state(stack: Stack, sandbox: Any, receiver: str) -> None:
    """200 webhooks for 20 appointments, delivered shuffled and each twice."""
    sandbox.state.unsubscribe(receiver)  # we deliver by hand, in a hostile order
    ids = list(range(1401, 1421))
    for appointment_id in ids:
        seed_pending(sandbox, appointment_id, patient_id=None)
    bodies: list[tuple[str, bytes]] = []
    moves = [
        {"notes": "a"},
        {"patient_id": 7},
        {"notes": "b"},
        {"state": "Confirmed"},
        {"notes": "c"},
        {"notes": "d"},
        {"state": "Arrived"},
        {"notes": "e"},
        {"state": "In surgery"},
    ]
    for appointment_id in ids:
        for index, fields in enumerate(moves + [{"state": "Completed"}]):
            if appointment_id % 2 and index == 9:
                break
            changed = sandbox.state.change_now(appointment_id, fields)
            body = json.dumps(
                {"type": "appointment.updated", "timestamp": changed["updated_at"], "data": {"appointment": changed}}
            ).encode()
            bodies.append((f"msg_flow_{appointment_id}_{index}", body))
    deliveries = bodies * 2
    random.Random(7).shuffle(deliveries)

    async with aiohttp.ClientSession() as http:
        for webhook_id, body in deliveries:
            now = int(time.time())
            headers = {
                "webhook-id": webhook_id,
                "webhook-timestamp": str(now),
                "webhook-signature": sign(SECRET, webhook_id, now, body),
                "content-type": "application/json",
            }
            async with http.post(receiver, data=body, headers=headers) as response:
                assert response.status == 202

    async def converged() -> bool:
        for appointment_id in ids:
            record = await stack.store.get_appointment(appointment_id)
            upstream = sandbox.state.get(appointment_id)
            if record is None or (record.state, record.patient_id) != (upstream["state"], upstream["patient_id"]):
                return False
        return True

    await eventually(converged, timeout=30)
    assert len(deliveries) >= 190


async def test_the_reconciler_alone_catches_up_dropped_webhooks(stack: Stack, sandbox: Any, receiver: str) -> None:
    ids = list(range(1501, 1511))
    for appointment_id in ids:
        seed_pending(sandbox, appointment_id, **starts_in(1))  # polling reads the coming days
    await eventually(lambda: _all_stored(stack, ids))
    await reconcile_once(stack.pms, stack.broker, stack.store)  # nothing new: webhooks brought it all
    sandbox.state.drop_webhooks(True)

    for appointment_id in ids:
        sandbox.state.change_now(appointment_id, {"state": "Confirmed"})
    await asyncio.sleep(0.5)
    assert {await stored_state(stack, i) for i in ids} == {"Pending"}

    published = await reconcile_once(stack.pms, stack.broker, stack.store)
    assert published == len(ids)
    for appointment_id in ids:
        await eventually(lambda i=appointment_id: _is(stored_state(stack, i), "Confirmed"), timeout=10)
    sources = {r.source for i in ids for r in await stack.store.history(i) if r.to_state == "Confirmed"}
    assert sources == {"reconcile"}


async def _all_stored(stack: Stack, ids: list[int]) -> bool:
    return all([await stack.store.get_appointment(i) is not None for i in ids])

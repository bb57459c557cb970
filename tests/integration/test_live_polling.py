"""Polling alone keeps the service right when the live PMS's webhooks fail, and says so.

The whole inbound path for real (sandbox -> signed webhook -> queue -> worker ->
store), then webhooks lost or switched off, and only the reconciler left.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from consumer import metrics
from consumer.reconciler import Reconciler
from consumer.sandbox import RunningSandbox, running_sandbox
from consumer.sandbox.webhooks_out import MAX_CONSECUTIVE_FAILURES
from consumer.settings import Settings
from consumer.signing import sign
from consumer.silence import WebhookSilence, WebhookSilences
from consumer.webhooks import BROKER_KEY, SILENCE_KEY, STORE_KEY, create_app
from tests.helpers import eventually, served, starts_in
from tests.stack import Stack, running_stack

SECRET = "whsec_" + base64.b64encode(b"live-polling-test-secret").decode()
GRACE = timedelta(seconds=0.3)


@pytest.fixture(params=[True, False], ids=["updated_after-honoured", "updated_after-ignored"])
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[RunningSandbox]:
    async with running_sandbox(port=0, updated_after_honoured=request.param) as running:
        yield running


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: RunningSandbox) -> AsyncIterator[Stack]:
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as running:
        yield running


@pytest.fixture
async def silences() -> WebhookSilences:
    return WebhookSilences()


@pytest.fixture
async def silence(silences: WebhookSilences) -> WebhookSilence:
    """The default practice's: the one the stack serves and the sandbox's webhooks reach."""
    return silences.of("default")


@pytest.fixture
async def service_url(
    stack: Stack, sandbox: RunningSandbox, silences: WebhookSilences, tmp_path: Path
) -> AsyncIterator[str]:
    """The service's HTTP app on a free port (webhooks in, /readyz, /practices), serving the
    default practice and a second one, ``quiet``, whose webhooks nobody broke."""

    async def resources(app: web.Application) -> AsyncIterator[None]:
        app[BROKER_KEY], app[STORE_KEY], app[SILENCE_KEY] = stack.broker, stack.store, silences
        yield

    practices_file = tmp_path / "practices.toml"
    practices_file.write_text(
        f'[practices.default]\npms_url = "{sandbox.url}"\ntoken = "sandbox-token"\nwebhook_secrets = ["{SECRET}"]\n'
        f'[practices.quiet]\npms_url = "{sandbox.url}"\ntoken = "quiet-token"\n'
    )
    async with served(create_app(Settings(practices_file=str(practices_file)), resources)) as url:
        yield url


def reconciler_for(stack: Stack, silence: WebhookSilence) -> Reconciler:
    """Sends updated_after, so the honoured mode really narrows the reads."""
    return Reconciler(
        stack.pms, stack.broker, stack.store, use_updated_after=True, silence=silence, silence_grace=GRACE
    )


async def stored_state(stack: Stack, appointment_id: int) -> str | None:
    record = await stack.store.get_appointment(appointment_id)
    return record.state if record is not None else None


def seed_tomorrow(sandbox: RunningSandbox) -> int:
    [seeded] = sandbox.state.seed([{"patient_id": 1013, "practitioner_id": 1, **starts_in(1)}])
    return int(seeded["id"])


async def get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def readyz(service_url: str) -> dict[str, Any]:
    return await get_json(service_url + "/readyz")


async def test_polling_alone_brings_a_cancellation_behind_our_back_to_the_record(
    stack: Stack, sandbox: RunningSandbox, service_url: str, silence: WebhookSilence
) -> None:
    sandbox.state.set_webhook_retry_delay(0.05)
    sandbox.state.subscribe(service_url + "/webhooks/pms", SECRET)
    reconciler = reconciler_for(stack, silence)
    appointment_id = seed_tomorrow(sandbox)
    await eventually(lambda: stored_state(stack, appointment_id), timeout=15)
    await reconciler.poll()  # nothing new: the webhook brought it

    sandbox.state.drop_webhooks(True)
    sandbox.state.change_now(appointment_id, {"state": "Cancelled", "appointment_cancellation_reason_id": 2})
    await asyncio.sleep(0.5)
    assert await stored_state(stack, appointment_id) == "Pending"

    assert await reconciler.poll() == 1  # the list hides it unless cancelled=true: the reconciler asks
    await eventually(lambda: _is(stored_state(stack, appointment_id), "Cancelled"), timeout=15)
    [cancelled] = [r for r in await stack.store.history(appointment_id) if r.to_state == "Cancelled"]
    assert cancelled.source == "reconcile"


async def test_webhooks_switched_off_by_the_pms_are_reported_within_one_polling_cycle(
    stack: Stack, sandbox: RunningSandbox, service_url: str, silence: WebhookSilence
) -> None:
    reconciler = reconciler_for(stack, silence)
    appointment_id = seed_tomorrow(sandbox)
    await reconciler.poll()
    assert (await readyz(service_url))["webhooks"]["status"] == "ok"

    # A secret the service no longer accepts: every delivery fails until the PMS gives up.
    wrong = "whsec_" + base64.b64encode(b"a-rotated-away-secret").decode()
    sandbox.state.set_webhook_retry_delay(0.001)
    sandbox.state.subscribe(service_url + "/webhooks/pms", wrong)
    sandbox.state.change_now(appointment_id, {"state": "Confirmed"})
    subscriber = sandbox.state.webhooks.subscribers[service_url + "/webhooks/pms"]
    await eventually(lambda: not subscriber.enabled, timeout=20)
    assert subscriber.consecutive_failures == MAX_CONSECUTIVE_FAILURES
    missed_before = metrics.WEBHOOK_MISSED.labels("default")._value.get()

    await asyncio.sleep(GRACE.total_seconds())
    await reconciler.poll()  # one cycle

    body = await readyz(service_url)
    assert body["status"] == "ready"  # informative: an unready service would get no webhooks at all
    assert body["webhooks"]["status"] == "silent" and body["webhooks"]["missed_changes"] == 1
    assert body["webhooks"]["silent_practices"] == ["default"]
    assert metrics.WEBHOOK_MISSED.labels("default")._value.get() == missed_before + 1
    # `appt practices` (GET /practices) says which practice's subscription went quiet, and only it.
    rows = {row["practice"]: row["webhooks"] for row in (await get_json(service_url + "/practices"))["practices"]}
    assert (rows["default"]["status"], rows["default"]["missed_changes"]) == ("silent", 1)
    assert (rows["quiet"]["status"], rows["quiet"]["missed_changes"]) == ("ok", 0)
    await eventually(lambda: _is(stored_state(stack, appointment_id), "Confirmed"), timeout=15)


@pytest.mark.parametrize("sandbox", [False], indirect=True, ids=["-"])
async def test_the_plain_event_envelope_is_accepted(stack: Stack, service_url: str) -> None:
    appointment = {"id": 4242, "state": "Confirmed", "patient_id": 7, "updated_at": "2026-01-01T09:00:00.000+00:00"}
    body = json.dumps({"event": "appointment.updated", "object": "appointment", "data": appointment}).encode()
    now = int(time.time())
    headers = {
        "webhook-id": "msg_plain",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(SECRET, "msg_plain", now, body),
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(service_url + "/webhooks/pms", data=body, headers=headers) as resp:
            assert resp.status == 202
    await eventually(lambda: _is(stored_state(stack, 4242), "Confirmed"), timeout=15)


async def _is(value: Any, expected: str) -> bool:
    return bool(await value == expected)

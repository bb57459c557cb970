"""The HTTP receiver against real RabbitMQ (own vhost), a SQLite store, over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook

from consumer.broker import Broker, partition_queue
from consumer.messages import ObservedEvent, StateLogRecord
from consumer.settings import Settings
from consumer.store.base import AppointmentRecord, Commit, Store
from consumer.store.opening import open_store
from consumer.webhooks import BROKER_KEY, STORE_KEY, create_app
from tests.conftest import RABBIT_HOST, RABBIT_PORT, drop_vhost, make_vhost, require_service
from tests.helpers import served

OLD_SECRET = "whsec_" + base64.b64encode(b"old-secret-for-integration-test!").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"new-secret-for-integration-test!").decode()
DENTALLY_SECRET = "dentally-shared-secret"
API_TOKEN = "reader-token-123"
PARTITIONS = 4
MAX_BODY = 2048
TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass
class Service:
    url: str
    broker: Broker
    store: Store
    amqp_url: str
    http: aiohttp.ClientSession

    async def post_webhook(self, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        async with self.http.post(f"{self.url}/webhooks/pms", data=body, headers=headers) as resp:
            await resp.read()
            return resp

    async def get(self, path: str, token: str | None = API_TOKEN) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.http.get(self.url + path, headers=headers) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if resp.content_type == "application/json" else text


def payload(appointment_id: int = 42, state: str = "Confirmed", **extra: Any) -> bytes:
    return json.dumps(
        {
            "type": "appointment.state_changed",
            "timestamp": datetime.now(UTC).isoformat(),
            "data": {"appointment": {"id": appointment_id, "state": state, "patient_id": 7, **extra}},
        }
    ).encode()


def signed(body: bytes, secret: str = OLD_SECRET, msg_id: str = "msg_1", at: float | None = None) -> dict[str, str]:
    """Headers signed by the reference Standard Webhooks library, as a real sender would."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, moment, body.decode()),
    }


async def serve(settings: Settings, broker: Broker, store: Store) -> AsyncIterator[str]:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        app[BROKER_KEY] = broker
        app[STORE_KEY] = store
        yield

    async with served(create_app(settings, resources)) as url:
        yield url


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_secrets": [OLD_SECRET, NEW_SECRET],
        "webhook_max_body": MAX_BODY,
        "api_token": API_TOKEN,
        "dentally_signing_secret": DENTALLY_SECRET,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    """One vhost for the module (creating one costs seconds); each test starts drained."""
    require_service("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    vhost = make_vhost()
    yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    drop_vhost(vhost)


@pytest.fixture
async def parts(amqp_url: str, sqlite_url: str) -> AsyncIterator[tuple[Broker, Store]]:
    broker = Broker(amqp_url, partitions=PARTITIONS)
    await broker.connect()
    await queued(amqp_url)  # what an earlier test left behind
    store = open_store(sqlite_url)
    await store.open()
    yield broker, store
    await broker.close()
    await store.close()


async def running(amqp_url: str, parts: tuple[Broker, Store], **overrides: Any) -> AsyncIterator[Service]:
    broker, store = parts
    async for url in serve(make_settings(**overrides), broker, store):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            yield Service(url, broker, store, amqp_url, http)


@pytest.fixture
async def service(amqp_url: str, parts: tuple[Broker, Store]) -> AsyncIterator[Service]:
    async for svc in running(amqp_url, parts):
        yield svc


async def queued(amqp_url: str) -> list[tuple[str, AbstractIncomingMessage]]:
    """Everything waiting in the inbound partitions, consumed with a plain channel.

    Single-active-consumer quorum queues refuse basic.get, so each queue is
    consumed until its message count (from a passive declare) is reached.
    """
    found: list[tuple[str, AbstractIncomingMessage]] = []
    async with await aio_pika.connect(amqp_url) as connection, asyncio.timeout(10):
        channel = await connection.channel()
        for index in range(PARTITIONS):
            queue = await channel.declare_queue(partition_queue(index), passive=True)
            waiting = queue.declaration_result.message_count or 0
            if not waiting:
                continue
            async with queue.iterator(no_ack=True) as messages:
                async for message in messages:
                    found.append((queue.name, message))
                    waiting -= 1
                    if not waiting:
                        break
    return found


def webhook_count(metrics_text: str, result: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "appt_webhook_verifications_total" and sample.labels == {"result": result}:
                return sample.value
    return 0.0


# ---- webhooks in -----------------------------------------------------------


async def test_a_signed_webhook_is_queued_before_the_202(service: Service) -> None:
    body = payload(appointment_id=42)
    resp = await service.post_webhook(body, signed(body, msg_id="msg_accept"))
    assert resp.status == 202
    [(queue_name, message)] = await queued(service.amqp_url)
    assert queue_name.startswith("appointments.inbound.p")
    assert message.message_id == "msg_accept"
    assert message.routing_key == "42"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    event = ObservedEvent.model_validate_json(message.body)
    assert (event.type, event.event_id, event.source) == ("appointment.state_changed", "msg_accept", "webhook")
    assert event.appointment_id == 42
    assert event.appointment["state"] == "Confirmed"


async def test_the_same_appointment_always_lands_in_the_same_partition(service: Service) -> None:
    for n in range(3):
        body = payload(appointment_id=9001, state=f"S{n}")
        assert (await service.post_webhook(body, signed(body, msg_id=f"msg_{n}"))).status == 202
    found = await queued(service.amqp_url)
    assert len({name for name, _ in found}) == 1
    assert [m.message_id for _, m in found] == ["msg_0", "msg_1", "msg_2"]


async def test_both_rotated_secrets_are_accepted_and_a_retired_one_is_not(service: Service) -> None:
    body = payload()
    assert (await service.post_webhook(body, signed(body, OLD_SECRET, "msg_old"))).status == 202
    assert (await service.post_webhook(body, signed(body, NEW_SECRET, "msg_new"))).status == 202
    retired = "whsec_" + base64.b64encode(b"retired-secret-long-enough-here!").decode()
    resp = await service.post_webhook(body, signed(body, retired, "msg_retired"))
    assert resp.status == 401
    assert sorted(m.message_id for _, m in await queued(service.amqp_url)) == ["msg_new", "msg_old"]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h: h.pop("webhook-signature"),
        lambda h: h.pop("webhook-id"),
        lambda h: h.update({"webhook-signature": "v1,AAAA"}),
        lambda h: h.update({"webhook-id": "msg_other"}),
    ],
    ids=["no-signature", "no-id", "garbled", "changed-id"],
)
async def test_a_bad_or_missing_signature_is_a_401_and_nothing_is_queued(service: Service, tamper: Any) -> None:
    body = payload()
    headers = signed(body)
    tamper(headers)
    resp = await service.post_webhook(body, headers)
    assert resp.status == 401
    assert await queued(service.amqp_url) == []


async def test_a_401_says_invalid_signature(service: Service) -> None:
    body = payload()
    async with service.http.post(f"{service.url}/webhooks/pms", data=body + b" ", headers=signed(body)) as resp:
        assert resp.status == 401
        assert await resp.json() == {"error": "invalid signature"}


@pytest.mark.parametrize("offset", [-301, 301])
async def test_a_timestamp_outside_tolerance_is_refused_as_such(service: Service, offset: int) -> None:
    body = payload()
    async with service.http.post(
        f"{service.url}/webhooks/pms", data=body, headers=signed(body, at=time.time() + offset)
    ) as resp:
        assert resp.status == 401
        assert await resp.json() == {"error": "timestamp outside tolerance"}
    assert await queued(service.amqp_url) == []


async def test_an_oversized_body_is_a_413(service: Service) -> None:
    body = payload(notes="x" * MAX_BODY)
    resp = await service.post_webhook(body, signed(body))
    assert resp.status == 413
    assert await queued(service.amqp_url) == []


async def test_an_oversized_chunked_body_is_a_413(service: Service) -> None:
    """No Content-Length to trust: the limit holds while reading."""
    body = payload(notes="x" * MAX_BODY)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    async with service.http.post(f"{service.url}/webhooks/pms", data=chunks(), headers=signed(body)) as resp:
        assert resp.status == 413


async def test_a_body_whose_message_would_exceed_the_limit_is_a_413_not_a_later_dead_letter(service: Service) -> None:
    """The message adds the webhook id and a receive time to the body: both must fit, or no 202."""
    body = payload(notes="")
    body = payload(notes="x" * (MAX_BODY - 5 - len(body)))
    assert len(body) == MAX_BODY - 5
    resp = await service.post_webhook(body, signed(body, msg_id="m" * 190))
    assert resp.status == 413
    assert await queued(service.amqp_url) == []


@pytest.mark.parametrize("msg_id", ["m" * 201, "é" * 101])
async def test_a_webhook_id_over_200_bytes_is_a_400(service: Service, msg_id: str) -> None:
    body = payload()
    resp = await service.post_webhook(body, signed(body, msg_id=msg_id))
    assert resp.status == 400
    assert "event_id" in (await resp.json())["error"]
    assert await queued(service.amqp_url) == []


async def test_an_id_as_a_string_or_bool_or_in_the_future_is_a_400(service: Service) -> None:
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    for body in (
        payload(appointment_id="5"),
        payload(appointment_id=True),  # type: ignore[arg-type]
        payload(updated_at=future),
        payload(updated_at="2026-01-01T00:00:00"),
    ):
        resp = await service.post_webhook(body, signed(body))
        assert resp.status == 400, body
    assert await queued(service.amqp_url) == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b'{"type": "appointment.updated"}',
        b'{"type": "appointment.exploded", "data": {"appointment": {"id": 1}}}',
        b'{"type": "appointment.updated", "data": {"appointment": {"id": "seven"}}}',
    ],
    ids=["not-json", "no-data", "unknown-type", "id-not-int"],
)
async def test_a_signed_but_invalid_payload_is_a_400_with_the_reason(service: Service, body: bytes) -> None:
    async with service.http.post(f"{service.url}/webhooks/pms", data=body, headers=signed(body)) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error and "seven" not in error  # the reason, without echoing the body
    assert await queued(service.amqp_url) == []


async def test_the_dentally_scheme_is_verified_with_its_own_secret(service: Service) -> None:
    body = payload(appointment_id=5)
    good = hmac.new(DENTALLY_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json", "X-Dentally-Signature": good, "X-Dentally-Delivery": "dly_77"}
    assert (await service.post_webhook(body, headers)).status == 202
    no_id = {"content-type": "application/json", "X-Dentally-Signature": good}
    assert (await service.post_webhook(body, no_id)).status == 202
    wrong = {**headers, "X-Dentally-Signature": hmac.new(b"nope", body, hashlib.sha256).hexdigest()}
    assert (await service.post_webhook(body, wrong)).status == 401
    ids = sorted(m.message_id for _, m in await queued(service.amqp_url))
    # The delivery header is unsigned: a captured body replayed under a fresh one keeps its id.
    assert ids == ["sha256:" + hashlib.sha256(body).hexdigest()] * 2


async def test_with_no_secret_configured_every_webhook_is_refused(amqp_url: str, parts: tuple[Broker, Store]) -> None:
    async for svc in running(amqp_url, parts, webhook_secrets=[], dentally_signing_secret=None):
        body = payload()
        assert (await svc.post_webhook(body, signed(body))).status == 401
    assert await queued(amqp_url) == []


async def test_with_the_broker_down_the_answer_is_503_so_the_sender_retries(service: Service) -> None:
    await service.broker.close()
    body = payload()
    async with service.http.post(f"{service.url}/webhooks/pms", data=body, headers=signed(body)) as resp:
        assert resp.status == 503
        assert await resp.json() == {"error": "queue unavailable, retry"}


async def test_metrics_count_accepted_and_bad_signature(service: Service) -> None:
    before = (await service.get("/metrics", token=None))[1]
    body = payload()
    await service.post_webhook(body, signed(body, msg_id="msg_m1"))
    await service.post_webhook(body, signed(body, msg_id="msg_m2"))
    await service.post_webhook(body, {**signed(body), "webhook-signature": "v1,AAAA"})
    async with service.http.get(f"{service.url}/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        after = await resp.text()
    assert webhook_count(after, "accepted") - webhook_count(before, "accepted") == 2
    assert webhook_count(after, "bad_signature") - webhook_count(before, "bad_signature") == 1


# ---- health ----------------------------------------------------------------


async def test_healthz_and_readyz_when_all_is_up(service: Service) -> None:
    assert await service.get("/healthz", token=None) == (200, {"status": "ok"})
    status, body = await service.get("/readyz", token=None)
    assert status == 200
    assert body == {"status": "ready", "broker": "ok", "store": "ok", "worker": "ok", "waiting_practices": []}


async def test_readyz_is_503_naming_the_broker_when_it_is_gone(service: Service) -> None:
    await service.broker.close()
    status, body = await service.get("/readyz", token=None)
    assert status == 503
    assert body["broker"] == "down" and body["store"] == "ok"
    assert (await service.get("/healthz", token=None))[0] == 200


async def test_readyz_is_503_naming_the_store_when_it_is_closed(service: Service) -> None:
    await service.store.close()
    status, body = await service.get("/readyz", token=None)
    assert status == 503
    assert body["store"] == "down" and body["broker"] == "ok"


# ---- appointment read endpoints ----------------------------------------------


def log_record(appointment_id: int, to_state: str, from_state: str | None) -> StateLogRecord:
    return StateLogRecord(
        appointment_id=appointment_id,
        machine="appointment",
        from_state=from_state,
        to_state=to_state,
        trigger="reconcile",
        source="webhook",
        webhook_id=f"msg_{to_state}",
    )


async def committed_history(store: Store, appointment_id: int) -> list[StateLogRecord]:
    states = ["Pending", "Confirmed", "Arrived", "In surgery", "Completed"]
    written: list[StateLogRecord] = []
    previous = None
    for version, state in enumerate(states):
        record = AppointmentRecord(
            appointment_id, state, 7, version=version, upstream_updated_at=f"2030-01-01T09:0{version}:00Z"
        )
        written += await store.commit(Commit(appointment=record, logs=[log_record(appointment_id, state, previous)]))
        previous = state
    return written


async def test_read_endpoints_refuse_a_missing_or_wrong_token(service: Service) -> None:
    await committed_history(service.store, 11)
    for path in ("/appointments/11", "/appointments/11/history"):
        assert (await service.get(path, token=None))[0] == 401
        assert (await service.get(path, token="wrong"))[0] == 401
        assert (await service.get(path))[0] == 200


async def test_read_endpoints_are_shut_when_no_token_is_configured(amqp_url: str, parts: tuple[Broker, Store]) -> None:
    async for svc in running(amqp_url, parts, api_token=None):
        status, body = await svc.get("/appointments/11/history", token="anything")
        assert (status, body) == (503, {"error": "APPT_API_TOKEN not configured"})
        assert (await svc.get("/appointments/11", token=None))[0] == 503


async def test_the_current_record_is_served(service: Service) -> None:
    await committed_history(service.store, 11)
    status, body = await service.get("/appointments/11")
    assert status == 200
    assert body == {
        "practice": "default",
        "appointment_id": 11,
        "state": "Completed",
        "patient_id": 7,
        "version": 5,
        "upstream_updated_at": "2030-01-01T09:04:00Z",
    }


async def test_history_pages_through_records_in_seq_order(service: Service) -> None:
    written = await committed_history(service.store, 11)
    await committed_history(service.store, 12)  # another appointment's records stay out
    seen: list[dict[str, Any]] = []
    after = 0
    pages = 0
    while after is not None:
        status, body = await service.get(f"/appointments/11/history?after_seq={after}&limit=2")
        assert status == 200
        seen += body["records"]
        after = body["next_after_seq"]
        pages += 1
    assert pages == 3
    assert [r["seq"] for r in seen] == [r.seq for r in written]
    assert [r["to_state"] for r in seen] == ["Pending", "Confirmed", "Arrived", "In surgery", "Completed"]
    assert {r["appointment_id"] for r in seen} == {11}
    assert [StateLogRecord.model_validate(r) for r in seen] == written


async def test_unknown_appointments_are_404(service: Service) -> None:
    assert (await service.get("/appointments/999"))[0] == 404
    assert (await service.get("/appointments/999/history"))[0] == 404


@pytest.mark.parametrize("path_id", [str(2**63), "9" * 5000, "०११", "011", "0"])
async def test_ids_outside_ascii_digits_or_the_id_range_are_404_never_500(service: Service, path_id: str) -> None:
    await committed_history(service.store, 11)
    for suffix in ("", "/history"):
        assert (await service.get(f"/appointments/{path_id}{suffix}"))[0] == 404


async def test_bad_paging_parameters_are_a_400(service: Service) -> None:
    await committed_history(service.store, 11)
    assert (await service.get("/appointments/11/history?limit=0"))[0] == 400
    assert (await service.get("/appointments/11/history?after_seq=x"))[0] == 400
    for loose in ("١", "+1", "01", " 1", str(2**63)):
        assert (await service.get(f"/appointments/11/history?limit=2&after_seq={loose}"))[0] == 400
    assert (await service.get("/appointments/11/history?limit=١"))[0] == 400

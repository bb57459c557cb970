"""Catch-up polling against the sandbox PMS, publishing to real RabbitMQ (own vhost)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest

from consumer.broker import Broker, PublishFailed
from consumer.messages import DEFAULT_PRACTICE, ObservedEvent
from consumer.pms import PmsClient
from consumer.practices import PracticeConfig, Practices
from consumer.reconciler import WATERMARK, reconcile_once, run_reconciler
from consumer.sandbox import RunningSandbox
from consumer.store.base import Store, open_store
from tests.conftest import RABBIT_HOST, RABBIT_PORT, drop_vhost, make_vhost, require_service
from tests.helpers import eventually
from tests.integration.test_webhooks import PARTITIONS, queued

NO_OVERLAP = timedelta(0)
LIST_ROUTE = "GET /v1/appointments"


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    """One vhost for the module (creating one costs seconds); each test starts drained."""
    require_service("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    vhost = make_vhost()
    yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    drop_vhost(vhost)


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    broker = Broker(amqp_url, partitions=PARTITIONS)
    await broker.connect()
    await queued(amqp_url)  # what an earlier test left behind
    yield broker
    await broker.close()


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    store = open_store(sqlite_url)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def pms(sandbox: RunningSandbox) -> AsyncIterator[PmsClient]:
    async with PmsClient(sandbox.url, "sandbox-token", timeout=5, retry_attempts=1) as client:
        yield client


def seed(sandbox: RunningSandbox, count: int) -> list[int]:
    seeded = sandbox.state.seed([
        {"patient_id": 100 + n, "practitioner_id": 1, "reason": "Exam",
         "start_time": f"2030-01-0{n + 1}T09:00:00Z", "finish_time": f"2030-01-0{n + 1}T09:30:00Z"}
        for n in range(count)
    ])
    return [a["id"] for a in seeded]


def updated_at(sandbox: RunningSandbox, appointment_id: int) -> str:
    appointment = sandbox.state.get(appointment_id)
    assert appointment is not None
    return str(appointment["updated_at"])


def expected_id(sandbox: RunningSandbox, appointment_id: int) -> str:
    return f"reconcile:{appointment_id}:{updated_at(sandbox, appointment_id)}"


async def published_ids(amqp_url: str) -> list[str]:
    return sorted(str(m.message_id) for _, m in await queued(amqp_url))


async def test_each_changed_appointment_is_published_once_and_the_watermark_follows(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    ids = seed(sandbox, 3)
    assert await reconcile_once(pms, broker, store) == 3
    found = await queued(amqp_url)
    assert sorted(str(m.message_id) for _, m in found) == sorted(
        expected_id(sandbox, i) for i in ids
    )
    for _, message in found:
        event = ObservedEvent.model_validate_json(message.body)
        assert (event.type, event.source) == ("appointment.updated", "reconcile")
        assert message.routing_key == str(event.appointment_id)
        assert event.appointment == sandbox.state.get(event.appointment_id)
    latest = max(a["updated_at"] for a in sandbox.state.all_appointments())
    assert await store.get_watermark(WATERMARK) == latest


async def test_a_second_run_publishes_nothing_new(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    seed(sandbox, 3)
    await reconcile_once(pms, broker, store)
    first = await published_ids(amqp_url)
    watermark = await store.get_watermark(WATERMARK)

    # The default overlap may find the same changes again: same ids, so the inbox drops them.
    await reconcile_once(pms, broker, store)
    assert set(await published_ids(amqp_url)) <= set(first)
    assert await reconcile_once(pms, broker, store, overlap=NO_OVERLAP) == 0
    assert await published_ids(amqp_url) == []
    assert await store.get_watermark(WATERMARK) == watermark


async def test_a_change_missed_by_webhooks_is_caught_up(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    first, _ = seed(sandbox, 2)
    await reconcile_once(pms, broker, store, overlap=NO_OVERLAP)
    await queued(amqp_url)
    sandbox.state.drop_webhooks(True)
    sandbox.state.change_now(first, {"state": "Confirmed"})

    assert await reconcile_once(pms, broker, store, overlap=NO_OVERLAP) == 1
    [(_, message)] = await queued(amqp_url)
    assert message.message_id == expected_id(sandbox, first)
    assert ObservedEvent.model_validate_json(message.body).appointment["state"] == "Confirmed"
    assert await store.get_watermark(WATERMARK) == updated_at(sandbox, first)


async def test_since_overrides_the_watermark_for_an_operator_rescan(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store
) -> None:
    seed(sandbox, 2)
    assert await reconcile_once(pms, broker, store, overlap=NO_OVERLAP) == 2
    assert await reconcile_once(pms, broker, store, overlap=NO_OVERLAP) == 0  # from the watermark
    assert await reconcile_once(pms, broker, store, since="2999-01-01T00:00:00Z") == 0
    assert await reconcile_once(pms, broker, store, since="1970-01-01T00:00:00Z") == 2  # a rescan


async def test_a_backlog_is_walked_page_by_page_to_the_end(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    sandbox.state.seed([
        {"patient_id": 100 + n, "practitioner_id": 1, "start_time": "2030-02-01T09:00:00Z",
         "finish_time": "2030-02-01T09:30:00Z"} for n in range(25)
    ])
    published = await reconcile_once(pms, broker, store, overlap=NO_OVERLAP, page_size=10)

    assert published == 25
    assert len({message.message_id for _, message in await queued(amqp_url)}) == 25
    newest = max(a["updated_at"] for a in sandbox.state.all_appointments())
    assert await store.get_watermark(WATERMARK) == newest


async def test_with_the_broker_down_the_watermark_does_not_move(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    ids = seed(sandbox, 2)
    await reconcile_once(pms, broker, store, overlap=NO_OVERLAP)
    await queued(amqp_url)
    watermark = await store.get_watermark(WATERMARK)
    sandbox.state.change_now(ids[1], {"notes": "moved while the broker was down"})

    await broker.close()
    with pytest.raises(PublishFailed):
        await reconcile_once(pms, broker, store, overlap=NO_OVERLAP)
    assert await store.get_watermark(WATERMARK) == watermark

    await broker.connect()
    assert await reconcile_once(pms, broker, store, overlap=NO_OVERLAP) == 1
    assert await published_ids(amqp_url) == [expected_id(sandbox, ids[1])]
    assert await store.get_watermark(WATERMARK) == updated_at(sandbox, ids[1])


async def test_the_loop_outlives_pms_and_broker_failures_and_stops_on_request(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    seed(sandbox, 1)
    sandbox.state.fail_next(LIST_ROUTE, 2, 500)
    await broker.close()
    stop = asyncio.Event()
    practices = Practices({DEFAULT_PRACTICE: PracticeConfig(pms_url=sandbox.url, token="sandbox-token")},
                          lambda config, token: pms)
    loop = asyncio.create_task(run_reconciler(practices, broker, store, 0.05, stop))

    await eventually(lambda: sandbox.state.call_count(LIST_ROUTE) >= 4, timeout=5)
    assert not loop.done()
    assert await store.get_watermark(WATERMARK) is None

    await broker.connect()
    await eventually(lambda: store.get_watermark(WATERMARK), timeout=15)
    stop.set()
    await asyncio.wait_for(loop, timeout=2)
    assert await published_ids(amqp_url)


async def test_polling_leaves_the_budget_reserve_to_commands(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store
) -> None:
    seed(sandbox, 2)
    sandbox.state.set_rate_limit(10)
    await pms.get_appointment(900000000)  # the client learns the budget: 9 of 10 left
    calls = sandbox.state.call_count(LIST_ROUTE)

    assert await reconcile_once(pms, broker, store, overlap=NO_OVERLAP, reserve=0.9) == 0
    assert sandbox.state.call_count(LIST_ROUTE) == calls  # not one request spent
    assert await store.get_watermark(WATERMARK) is None

    assert await reconcile_once(pms, broker, store, overlap=NO_OVERLAP, reserve=0.5) == 2

"""Catch-up polling against the sandbox PMS, publishing to real RabbitMQ (own vhost)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from consumer.broker import Broker
from consumer.messages import DEFAULT_PRACTICE, ObservedEvent
from consumer.pms import PmsClient
from consumer.practices import PracticeConfig, Practices
from consumer.reconciler import Reconciler, reconcile_once, run_reconciler, windows_for
from consumer.sandbox import RunningSandbox, running_sandbox
from consumer.silence import WebhookSilence
from consumer.store.base import Store
from consumer.store.opening import open_store
from tests.conftest import RABBIT_HOST, RABBIT_PORT, drop_vhost, make_vhost, require_service
from tests.helpers import eventually, starts_in
from tests.integration.test_webhooks import PARTITIONS, queued

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


@pytest.fixture(params=[True, False], ids=["updated_after-honoured", "updated_after-ignored"])
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[RunningSandbox]:
    async with running_sandbox(port=0, updated_after_honoured=request.param) as running:
        yield running


@pytest.fixture
async def pms(sandbox: RunningSandbox) -> AsyncIterator[PmsClient]:
    async with PmsClient(sandbox.url, "sandbox-token", timeout=5, retry_attempts=1) as client:
        yield client


def seed(sandbox: RunningSandbox, days: list[float]) -> list[int]:
    seeded = sandbox.state.seed(
        [
            {"patient_id": 100 + n, "practitioner_id": 1, "reason": "Exam", **starts_in(day)}
            for n, day in enumerate(days)
        ]
    )
    return [a["id"] for a in seeded]


async def published(amqp_url: str) -> list[ObservedEvent]:
    return [ObservedEvent.model_validate_json(m.body) for _, m in await queued(amqp_url)]


async def test_every_appointment_in_the_windows_is_published_once_cancelled_ones_too(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    ids = seed(sandbox, [0, 1, 5, 20])
    beyond = seed(sandbox, [45])
    sandbox.state.change_now(ids[1], {"state": "Cancelled", "appointment_cancellation_reason_id": 2})
    # updated_after is sent, honoured or not: correct either way, cheaper where honoured.
    reconciler = Reconciler(pms, broker, store, use_updated_after=True)

    assert await reconciler.poll() == 4
    events = await published(amqp_url)
    assert sorted(e.appointment_id for e in events) == sorted(ids)
    assert beyond[0] not in {e.appointment_id for e in events}
    assert {e.appointment_id: e.appointment["state"] for e in events}[ids[1]] == "Cancelled"
    assert all((e.type, e.source) == ("appointment.updated", "reconcile") for e in events)
    assert all(e.event_id == f"reconcile:{e.appointment_id}:{e.appointment['updated_at']}" for e in events)

    assert await reconciler.poll() == 0  # nothing changed: nothing goes downstream
    sandbox.state.change_now(ids[0], {"notes": "rang"})
    assert await reconciler.poll() == 1
    [event] = await published(amqp_url)
    assert (event.appointment_id, event.appointment["notes"]) == (ids[0], "rang")


async def test_a_row_gone_from_a_window_is_not_a_deletion(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    [moved] = seed(sandbox, [1])
    reconciler = Reconciler(pms, broker, store)
    await reconciler.poll()
    await queued(amqp_url)
    sandbox.state.change_now(moved, starts_in(90))  # out of every window now

    assert await reconciler.poll() == 0
    assert await published(amqp_url) == []


async def test_the_near_days_are_read_every_cycle_further_out_less_often(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store
) -> None:
    reconciler = Reconciler(pms, broker, store)
    for _ in range(15):
        await reconciler.poll()
    assert [(w.name, w.every) for w in reconciler.windows] == [("near", 1), ("week", 5), ("far", 15)]
    assert sandbox.state.call_count(LIST_ROUTE) == 15 + 3 + 1  # one request each: the windows are empty


@pytest.mark.parametrize("sandbox", [False], ids=["updated_after-ignored"], indirect=True)  # the costlier
async def test_polling_stays_within_its_share_of_the_hourly_budget(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store
) -> None:
    """2,000 appointments over the next 30 days, polled every 10 s for an hour: at most 10% of
    3,600 requests, nearest window first."""
    sandbox.state.seed(
        [{"practitioner_id": 1 + n % 5, "patient_id": 1000 + n, **starts_in(n * 30 / 2000)} for n in range(2000)]
    )
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    clock = [hour]
    reconciler = Reconciler(pms, broker, store, clock=lambda: clock[0])
    spent_by_half_hour = 0
    for cycle in range(360):
        clock[0] = hour + timedelta(seconds=10 * cycle)
        await reconciler.poll()
        if cycle == 179:
            spent_by_half_hour = reconciler.spent

    assert reconciler.allowance() == 360
    assert spent_by_half_hour <= 360 * (1800 + 600) / 3600  # spread over the hour, not burnt at once
    assert 300 <= sandbox.state.call_count(LIST_ROUTE) <= 360
    assert reconciler.spent == sandbox.state.call_count(LIST_ROUTE)

    clock[0] = hour + timedelta(hours=1)  # the next clock hour: a fresh share
    await reconciler.poll()
    assert reconciler.spent > 0


async def test_the_horizon_bounds_the_windows() -> None:
    assert [(w.first_day, w.last_day) for w in windows_for(30)] == [(-1, 2), (2, 8), (8, 31)]
    assert [(w.name, w.last_day) for w in windows_for(3)] == [("near", 2), ("week", 4)]


async def test_since_republishes_what_changed_after_it(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    seed(sandbox, [1, 2])
    assert await reconcile_once(pms, broker, store, since="2999-01-01T00:00:00Z") == 0
    assert await reconcile_once(pms, broker, store, since="1970-01-01T00:00:00Z") == 2
    assert len(await published(amqp_url)) == 2


async def test_a_change_made_while_watching_that_no_webhook_brought_is_silence(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    [before] = seed(sandbox, [1])
    silence = WebhookSilence()
    reconciler = Reconciler(pms, broker, store, silence=silence, silence_grace=timedelta(seconds=0.2))
    await reconciler.poll()  # what existed before watching is not silence, just unknown
    assert silence.report(datetime.now(UTC))["status"] == "ok"

    sandbox.state.change_now(before, {"notes": "no webhook for this"})
    await asyncio.sleep(0.3)
    await reconciler.poll()
    report = silence.report(datetime.now(UTC))
    assert (report["status"], report["missed_changes"]) == ("silent", 1)
    assert silence.report(datetime.now(UTC) + timedelta(hours=2))["status"] == "ok"


async def test_the_loop_outlives_pms_and_broker_failures_and_stops_on_request(
    sandbox: RunningSandbox, pms: PmsClient, broker: Broker, store: Store, amqp_url: str
) -> None:
    seed(sandbox, [1])
    sandbox.state.fail_next(LIST_ROUTE, 2, 500)
    await broker.close()
    stop = asyncio.Event()
    practices = Practices(
        {DEFAULT_PRACTICE: PracticeConfig(pms_url=sandbox.url, token="sandbox-token")}, lambda config, token: pms
    )
    loop = asyncio.create_task(
        run_reconciler(practices, lambda practice: Reconciler(practice.pms, broker, store), 0.05, stop)
    )

    await eventually(lambda: sandbox.state.call_count(LIST_ROUTE) >= 4, timeout=5)
    assert not loop.done()

    await broker.connect()
    await eventually(lambda: queued(amqp_url), timeout=15)
    stop.set()
    await asyncio.wait_for(loop, timeout=2)

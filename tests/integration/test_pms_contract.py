"""The PMS client against the sandbox over real HTTP: typed answers, typed
failures, retries where safe and only there, and respect for the rate limit."""

# ruff: noqa: F811  (fixtures imported from pms_fixtures are, by design, redefined as parameters)
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from consumer.pms import (
    Misconfigured,
    NotFound,
    PmsClient,
    PmsError,
    RateLimited,
    Rejected,
    Unauthorised,
    Unavailable,
)
from consumer.pms.client import Pacer
from consumer.reconciler import parse_time
from consumer.sandbox import RunningSandbox, running_sandbox
from tests.helpers import served
from tests.integration.pms_fixtures import (  # noqa: F401  (client, sandbox: fixtures)
    FINISH,
    START,
    client,
    fast_client,
    sandbox,
    slot,
)

STATUS_CONFIRMED = "The appointment can not be updated as the current status is: Confirmed"


# ---- every route -----------------------------------------------------------


async def test_create_then_get_returns_the_typed_appointment(client: PmsClient) -> None:
    created = await client.create_appointment(slot(patient_id=1013))
    fetched = await client.get_appointment(created.id)
    assert created.id >= 900_000_000
    assert fetched.state == "Pending"
    assert fetched.patient_id == 1013
    assert fetched.start_time is not None and fetched.finish_time is not None
    assert (parse_time(fetched.start_time), parse_time(fetched.finish_time)) == (parse_time(START), parse_time(FINISH))
    assert fetched.duration == 30
    assert fetched.pending_at is not None and fetched.confirmed_at is None


async def test_update_confirms_and_stamps_confirmed_at(client: PmsClient) -> None:
    created = await client.create_appointment(slot())
    confirmed = await client.update_appointment(created.id, {"state": "Confirmed"})
    assert confirmed.state == "Confirmed"
    assert confirmed.confirmed_at is not None
    assert confirmed.version == created.version + 1  # type: ignore[operator]


async def test_cancel_with_a_reason_looked_up_by_text(client: PmsClient, sandbox: RunningSandbox) -> None:
    created = await client.create_appointment(slot())
    reason_id = await client.cancellation_reason_id("Booked in error")
    cancelled = await client.update_appointment(
        created.id, {"state": "Cancelled", "appointment_cancellation_reason_id": reason_id}
    )
    assert reason_id == 1
    assert cancelled.state == "Cancelled" and cancelled.cancelled_at is not None


async def test_cancellation_reasons_are_fetched_once(client: PmsClient, sandbox: RunningSandbox) -> None:
    first = await client.cancellation_reasons()
    second = await client.cancellation_reasons()
    assert [(r.id, r.reason, r.archived) for r in first] == [
        (1, "Booked in error", False),
        (2, "Patient cancelled", False),
        (3, "Practice cancelled", False),
        (4, "Other", False),
        (5, "Snow", True),
    ]
    assert second == first
    assert [r.reason for r in await client.live_cancellation_reasons()] == [
        "Booked in error",
        "Patient cancelled",
        "Practice cancelled",
        "Other",
    ]
    with pytest.raises(LookupError):
        await client.cancellation_reason_id("Snow")  # archived: not for new cancellations
    assert sandbox.state.call_count("GET /v1/appointment_cancellation_reasons") == 1


async def test_cancellation_reasons_are_fetched_again_once_expired(sandbox: RunningSandbox) -> None:
    """A reason archived in the PMS is seen after the expiry, without a restart."""
    async with PmsClient(sandbox.url, "sandbox-token", reasons_ttl=0.2) as pms:
        await pms.cancellation_reason_id("Booked in error")
        await pms.cancellation_reason_id("Booked in error")
        assert sandbox.state.call_count("GET /v1/appointment_cancellation_reasons") == 1
        await asyncio.sleep(0.3)
        await pms.cancellation_reason_id("Booked in error")
    assert sandbox.state.call_count("GET /v1/appointment_cancellation_reasons") == 2


# ---- the unconfirmed live behaviours, both ways ---------------------------------

MODES = [
    pytest.param(
        (honoured, delete_mode), id=f"updated_after-{'honoured' if honoured else 'ignored'}-delete-{delete_mode}"
    )
    for honoured in (True, False)
    for delete_mode in ("cancel", "remove")
]
WINDOW = {"after": "2030-01-01T00:00:00Z", "before": "2030-02-01T00:00:00Z"}


@pytest.fixture(params=MODES)
async def moded(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RunningSandbox, PmsClient]]:
    """A sandbox in one combination of the unconfirmed behaviours, with a client."""
    honoured, delete_mode = request.param
    async with running_sandbox(port=0, updated_after_honoured=honoured, delete_mode=delete_mode) as running:
        async with fast_client(running) as pms:
            yield running, pms


async def test_delete_leaves_no_live_appointment_either_way(moded: tuple[RunningSandbox, PmsClient]) -> None:
    sandbox, client = moded
    created = await client.create_appointment(slot())
    await client.delete_appointment(created.id)
    if sandbox.state.delete_mode == "remove":
        with pytest.raises(NotFound) as caught:
            await client.get_appointment(created.id)
        assert caught.value.status == 404
    else:
        assert (await client.get_appointment(created.id)).state == "Cancelled"
    assert await client.list_appointments(**WINDOW) == []


async def test_list_reads_every_page_until_a_short_one(moded: tuple[RunningSandbox, PmsClient]) -> None:
    sandbox, client = moded
    sandbox.state.seed([slot(id=100 + i, patient_id=1) for i in range(6)])
    found = await client.list_appointments(**WINDOW, per_page=3)
    assert sorted(a.id for a in found) == list(range(100, 106))
    assert sandbox.state.call_count("GET /v1/appointments") == 3  # 3, 3, then an empty page
    with pytest.raises(ValueError):
        await client.list_appointments(**WINDOW, per_page=500)  # the PMS would answer 25 rows


async def test_list_shows_cancelled_rows_only_when_asked(moded: tuple[RunningSandbox, PmsClient]) -> None:
    sandbox, client = moded
    sandbox.state.seed([slot(id=1), slot(id=2, state="Cancelled"), slot(id=3, state="Did not attend")])
    assert [a.id for a in await client.list_appointments(**WINDOW)] == [1]
    assert [a.id for a in await client.list_appointments(**WINDOW, cancelled=True)] == [1, 2, 3]


async def test_updated_after_narrows_the_list_only_where_honoured(moded: tuple[RunningSandbox, PmsClient]) -> None:
    sandbox, client = moded
    sandbox.state.seed([slot(id=1), slot(id=2), slot(id=3)])
    watermark = sandbox.state.get(3)["updated_at"]  # type: ignore[index]
    sandbox.state.change_now(1, {"notes": "rang the patient"})
    changed = await client.list_appointments(**WINDOW, updated_after=watermark)
    later = [a.id for a in changed if a.updated_at and parse_time(a.updated_at) > parse_time(watermark)]
    assert later == [1]
    assert len(changed) == (1 if sandbox.state.updated_after_honoured else 3)


async def test_list_filters_by_window_patient_and_practitioner(client: PmsClient, sandbox: RunningSandbox) -> None:
    sandbox.state.seed(
        [
            slot(id=1, patient_id=10, practitioner_id=1),
            slot(id=2, patient_id=11, practitioner_id=1),
            slot(id=3, patient_id=10, practitioner_id=2),
            slot(id=4, patient_id=10, start_time="2031-01-01T09:00:00Z", finish_time="2031-01-01T09:30:00Z"),
        ]
    )
    by_patient = await client.list_appointments(**WINDOW, patient_id=10)
    by_both = await client.list_appointments(**WINDOW, patient_id=10, practitioner_id=2)
    assert sorted(a.id for a in by_patient) == [1, 3]
    assert [a.id for a in by_both] == [3]


async def test_offset_times_and_unknown_fields_are_carried(client: PmsClient, sandbox: RunningSandbox) -> None:
    # The PMS grows fields over time; one the client doesn't know must not break it.
    sandbox.state.seed(
        [
            slot(
                id=7,
                start_time="2030-07-01T08:00:00Z",
                finish_time="2030-07-01T08:30:00Z",
                new_live_field={"nested": True},
            )
        ]
    )
    fetched = await client.get_appointment(7)
    assert fetched.start_time == "2030-07-01T09:00:00.000+01:00"
    assert fetched.model_dump()["new_live_field"] == {"nested": True}


# ---- typed failures -----------------------------------------------------------


async def test_a_rejected_write_carries_every_reason_and_is_not_retried(
    client: PmsClient, sandbox: RunningSandbox
) -> None:
    created = await client.create_appointment(slot())
    with pytest.raises(Rejected) as caught:
        await client.update_appointment(created.id, {"state": "Cancelled", "colour": "red"})
    assert caught.value.params == {
        "colour": ["is not a permitted attribute"],
        "appointment_cancellation_reason_id": ["can't be blank"],
    }
    assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 1


async def test_create_without_required_fields_is_rejected(client: PmsClient) -> None:
    with pytest.raises(Rejected) as caught:
        await client.create_appointment({"patient_id": 5})
    assert caught.value.params == {
        "start_time": ["can't be blank"],
        "finish_time": ["can't be blank"],
        "practitioner_id": ["can't be blank"],
    }


async def test_a_wrong_token_is_unauthorised_and_not_retried(sandbox: RunningSandbox) -> None:
    async with PmsClient(sandbox.url, "wrong", backoff_base=0.01) as pms:
        with pytest.raises(Unauthorised) as caught:
            await pms.get_appointment(1)
    assert caught.value.status == 401
    assert sandbox.state.call_count("GET /v1/appointments/{id}") == 1


async def test_an_expired_or_revoked_token_is_unauthorised(client: PmsClient, sandbox: RunningSandbox) -> None:
    await client.cancellation_reasons()
    sandbox.state.set_token("reissued")
    with pytest.raises(Unauthorised) as caught:
        await client.get_appointment(1)
    assert caught.value.status == 401


async def test_a_refused_user_agent_is_a_configuration_error(sandbox: RunningSandbox) -> None:
    async with fast_client(sandbox, user_agent="") as pms:
        with pytest.raises(Misconfigured) as caught:
            await pms.get_appointment(1)
    assert caught.value.status == 403 and "User-Agent" in str(caught.value)
    assert sandbox.state.call_count("GET /v1/appointments/{id}") == 1


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html>maintenance</html>", "text/html"),
        (b'{"appointments": []}', "application/json"),
        (b'{"appointment": {"id": 7}}', "application/json"),  # no state
        (b'{"appointment": {"id": "seven", "state": "Pending"}}', "application/json"),
        (b"", "application/json"),
    ],
)
async def test_a_2xx_answer_that_is_not_an_appointment_is_a_pms_error(body: bytes, content_type: str) -> None:
    # A proxy's page or a changed API must fail loudly, not become a half-read appointment.
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_route("*", "/v1/appointments/{id}", answer)
    app.router.add_post("/v1/appointments", answer)
    async with served(app) as url, PmsClient(url, "token", backoff_base=0.01) as pms:
        for call in (
            pms.get_appointment(7),
            pms.update_appointment(7, {"notes": "x"}),
            pms.create_appointment(slot()),
        ):
            with pytest.raises(PmsError, match="unexpected PmsAppointment from the PMS") as caught:
                await call
            assert type(caught.value) is PmsError  # not retried as Unavailable, not a Rejected


async def test_rejected_names_the_current_status() -> None:
    rejected = Rejected("x", {"patient_id": ["can not change patients"], "state": [STATUS_CONFIRMED]})
    assert rejected.current_status() == "Confirmed"
    assert Rejected("x", {"patient_id": ["can not change patients"]}).current_status() is None


# ---- retries ------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503])
async def test_get_is_retried_through_server_errors(client: PmsClient, sandbox: RunningSandbox, status: int) -> None:
    created = await client.create_appointment(slot())
    sandbox.state.fail_next("GET /v1/appointments/{id}", 2, status)
    fetched = await client.get_appointment(created.id)
    assert fetched.id == created.id
    assert sandbox.state.call_count("GET /v1/appointments/{id}") == 3
    assert client.retries == 2


async def test_put_and_delete_are_retried(client: PmsClient, sandbox: RunningSandbox) -> None:
    created = await client.create_appointment(slot())
    sandbox.state.fail_next("*", 1, 503)
    await client.update_appointment(created.id, {"notes": "hello"})
    sandbox.state.fail_next("DELETE /v1/appointments/{id}", 1, 500)
    await client.delete_appointment(created.id)
    assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 2
    assert sandbox.state.call_count("DELETE /v1/appointments/{id}") == 2
    assert sandbox.state.get(created.id)["state"] == "Cancelled"  # type: ignore[index]


async def test_retries_give_up_after_the_configured_attempts(client: PmsClient, sandbox: RunningSandbox) -> None:
    sandbox.state.fail_next("GET /v1/appointments/{id}", 10, 503)
    with pytest.raises(Unavailable) as caught:
        await client.get_appointment(1)
    assert caught.value.status == 503
    assert sandbox.state.call_count("GET /v1/appointments/{id}") == 4


async def test_a_hung_request_times_out_and_is_retried(sandbox: RunningSandbox) -> None:
    sandbox.state.seed([slot(id=42)])
    sandbox.state.timeout_next("GET /v1/appointments/{id}", 1)
    async with fast_client(sandbox, timeout=0.3) as pms:
        started = time.monotonic()
        fetched = await pms.get_appointment(42)
        elapsed = time.monotonic() - started
    assert fetched.id == 42
    assert 0.3 <= elapsed < 2.0
    assert sandbox.state.call_count("GET /v1/appointments/{id}") == 2


async def test_post_is_never_retried(client: PmsClient, sandbox: RunningSandbox) -> None:
    sandbox.state.fail_next("POST /v1/appointments", 1, 503)
    with pytest.raises(Unavailable):
        await client.create_appointment(slot())
    assert sandbox.state.call_count("POST /v1/appointments") == 1
    assert sandbox.state.all_appointments() == []


async def test_a_timed_out_post_is_not_retried(sandbox: RunningSandbox) -> None:
    sandbox.state.timeout_next("POST /v1/appointments", 1)
    async with fast_client(sandbox, timeout=0.2) as pms:
        with pytest.raises(Unavailable) as caught:
            await pms.create_appointment(slot())
    assert caught.value.status == 0
    assert sandbox.state.call_count("POST /v1/appointments") == 1


async def test_429_retry_after_is_honoured(client: PmsClient, sandbox: RunningSandbox) -> None:
    sandbox.state.seed([slot(id=42)])
    sandbox.state.fail_next("GET /v1/appointments/{id}", 1, 429, retry_after=0.3)
    started = time.monotonic()
    await client.get_appointment(42)
    assert time.monotonic() - started >= 0.3
    assert sandbox.state.call_count("GET /v1/appointments/{id}") == 2


async def test_403_rate_limit_block_waits_for_the_reset(client: PmsClient, sandbox: RunningSandbox) -> None:
    sandbox.state.seed([slot(id=42)])
    sandbox.state.fail_next("PUT /v1/appointments/{id}", 1, 403, retry_after=0.3)
    started = time.monotonic()
    updated = await client.update_appointment(42, {"notes": "after the block"})
    assert time.monotonic() - started >= 0.29  # the reset header has millisecond precision
    assert updated.notes == "after the block"


async def test_a_block_until_the_next_hour_is_raised_not_slept(sandbox: RunningSandbox) -> None:
    # max_retry_after well under the time to the next clock hour, whatever minute the test runs in
    # (a budget that resets in under that is slept through, by design).
    seconds_to_hour = 3600 - time.time() % 3600
    if seconds_to_hour < 2:
        await asyncio.sleep(seconds_to_hour + 0.1)
    wait_limit = {"max_retry_after": 0.5}
    sandbox.state.set_rate_limit(2)
    sandbox.state.seed([slot(id=42)])
    async with fast_client(sandbox, concurrency=1, **wait_limit) as first:
        await first.get_appointment(42)
        await first.get_appointment(42)
        with pytest.raises(RateLimited) as paced:
            await first.get_appointment(42)  # the client knows the budget is gone: not sent
    assert sandbox.state.call_count("GET /v1/appointments/{id}") == 2
    async with fast_client(sandbox, **wait_limit) as unaware:
        with pytest.raises(RateLimited) as blocked:
            await unaware.get_appointment(42)  # sent once, blocked, not retried
    assert sandbox.state.call_count("GET /v1/appointments/{id}") == 3
    assert blocked.value.status == 403
    for error in (paced.value, blocked.value):
        assert 0 < error.retry_after <= 3600


async def test_hooks_see_every_response_and_retry(sandbox: RunningSandbox) -> None:
    responses: list[tuple[str, str, int]] = []
    retries: list[tuple[str, str, str]] = []
    sandbox.state.seed([slot(id=42)])
    sandbox.state.fail_next("GET /v1/appointments/{id}", 1, 500)
    async with fast_client(
        sandbox,
        on_response=lambda m, r, s: responses.append((m, r, s)),
        on_retry=lambda m, r, e: retries.append((m, r, type(e).__name__)),
    ) as pms:
        await pms.get_appointment(42)
    assert responses == [("GET", "GET /v1/appointments/{id}", 500), ("GET", "GET /v1/appointments/{id}", 200)]
    assert retries == [("GET", "GET /v1/appointments/{id}", "Unavailable")]


# ---- pacing (pure: a fake clock) ------------------------------------------------


def _pacer_at(now: list[float], remaining: int, reset: float) -> Pacer:
    pacer = Pacer(low_water=8, clock=lambda: now[0])
    headers = {"x-ratelimit-remaining": str(remaining), "x-ratelimit-reset": str(reset)}
    pacer.observe(CIMultiDictProxy(CIMultiDict(headers)))
    return pacer


def test_pacer_does_not_slow_a_healthy_budget() -> None:
    pacer = _pacer_at([1000.0], remaining=3000, reset=4600.0)
    assert [pacer.reserve(60) for _ in range(5)] == [0.0] * 5


def test_pacer_spreads_the_last_requests_over_the_time_to_reset() -> None:
    now = [1000.0]
    pacer = _pacer_at(now, remaining=4, reset=1040.0)
    waits = [pacer.reserve(60) for _ in range(4)]
    assert waits == pytest.approx([0.0, 10.0, 20.0, 30.0])
    assert pacer.reserve(60) == 40.0  # budget spent: wait for the reset


def test_pacer_waits_for_the_reset_or_refuses_a_long_wait() -> None:
    now = [1000.0]
    pacer = _pacer_at(now, remaining=0, reset=1005.0)
    assert pacer.reserve(60) == 5.0
    far = _pacer_at(now, remaining=0, reset=4600.0)
    with pytest.raises(RateLimited) as caught:
        far.reserve(60)
    assert caught.value.retry_after == 3600.0


# ---- the support ticket ---------------------------------------------------------


async def test_seed_conversation_confirmed_behind_our_back(client: PmsClient, sandbox: RunningSandbox) -> None:
    sandbox.state.seed_fixture("seed")
    before = await client.get_appointment(757579675)
    assert (before.state, before.patient_id, before.practitioner_id) == ("Pending", 1013, 1)
    with pytest.raises(Rejected) as caught:
        await client.update_appointment(757579675, {"state": "Confirmed", "patient_id": 1014})
    assert caught.value.params == {
        "state": [STATUS_CONFIRMED, "can not be updated in the same request as patient_id"],
        "patient_id": ["can not change patients"],
    }
    assert caught.value.current_status() == "Confirmed"
    after = await client.get_appointment(757579675)
    assert (after.state, after.patient_id) == ("Confirmed", 1013)
    assert after.version == before.version + 1  # type: ignore[operator]

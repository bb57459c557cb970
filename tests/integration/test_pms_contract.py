"""The PMS client against the sandbox over real HTTP: typed answers, typed
failures, retries where safe and only there, and respect for the rate limit."""

# ruff: noqa: F811  (fixtures imported from pms_fixtures are, by design, redefined as parameters)
from __future__ import annotations

import asyncio
import time

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from consumer.pms import (
    NotFound,
    PmsClient,
    RateLimited,
    Rejected,
    Unauthorised,
    Unavailable,
)
from consumer.pms.client import Pacer
from consumer.sandbox import RunningSandbox
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
    assert fetched.start_time == START and fetched.finish_time == FINISH
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
    assert [(r.id, r.reason) for r in first] == [
        (1, "Booked in error"), (2, "Patient cancelled"), (3, "Practice cancelled"), (4, "Other"),
    ]
    assert second == first
    assert sandbox.state.call_count("GET /v1/appointment_cancellation_reasons") == 1


async def test_delete_removes_the_appointment(client: PmsClient) -> None:
    created = await client.create_appointment(slot())
    await client.delete_appointment(created.id)
    with pytest.raises(NotFound) as caught:
        await client.get_appointment(created.id)
    assert caught.value.status == 404


async def test_list_follows_every_page(client: PmsClient, sandbox: RunningSandbox) -> None:
    sandbox.state.seed([slot(id=100 + i, patient_id=1) for i in range(7)])
    found = await client.list_appointments(after="2030-01-01T00:00:00Z", before="2030-02-01T00:00:00Z", per_page=3)
    assert sorted(a.id for a in found) == list(range(100, 107))
    assert sandbox.state.call_count("GET /v1/appointments") == 3


async def test_list_filters_by_window_patient_and_practitioner(client: PmsClient, sandbox: RunningSandbox) -> None:
    sandbox.state.seed([
        slot(id=1, patient_id=10, practitioner_id=1),
        slot(id=2, patient_id=11, practitioner_id=1),
        slot(id=3, patient_id=10, practitioner_id=2),
        slot(id=4, patient_id=10, start_time="2031-01-01T09:00:00Z", finish_time="2031-01-01T09:30:00Z"),
    ])
    after, before = "2030-01-01T00:00:00Z", "2030-02-01T00:00:00Z"
    by_patient = await client.list_appointments(after=after, before=before, patient_id=10)
    by_both = await client.list_appointments(after=after, before=before, patient_id=10, practitioner_id=2)
    assert sorted(a.id for a in by_patient) == [1, 3]
    assert [a.id for a in by_both] == [3]


async def test_updated_after_returns_only_later_changes(client: PmsClient, sandbox: RunningSandbox) -> None:
    sandbox.state.seed([slot(id=1), slot(id=2), slot(id=3)])
    watermark = sandbox.state.get(3)["updated_at"]  # type: ignore[index]
    sandbox.state.change_now(1, {"notes": "rang the patient"})
    changed = await client.list_appointments(updated_after=watermark)
    assert [(a.id, a.notes) for a in changed] == [(1, "rang the patient")]


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
    assert sandbox.state.get(created.id) is None


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


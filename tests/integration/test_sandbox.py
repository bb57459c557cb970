"""The sandbox speaks the PMS's contract: its rules with their exact 422
bodies, its auth and rate limit, its webhooks out, and its knobs over HTTP."""

# ruff: noqa: F811  (fixtures imported from pms_fixtures are, by design, redefined as parameters)
from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook

from consumer.sandbox import RunningSandbox
from consumer.sandbox.rules import parse_time
from consumer.sandbox.webhooks_out import MAX_CONSECUTIVE_FAILURES, make_message
from tests.integration.pms_fixtures import (  # noqa: F401  (http, receiver, sandbox: fixtures)
    AUTH,
    SECRET,
    Receiver,
    call,
    http,
    receiver,
    sandbox,
    slot,
    wait_until,
)

ID = 500


def status_is(state: str) -> str:
    return f"The appointment can not be updated as the current status is: {state}"


def rejection(params: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "error": {
            "type": "invalid_request_error",
            "message": "The appointment could not be processed",
            "params": params,
        }
    }


async def put(http: aiohttp.ClientSession, sandbox: RunningSandbox, fields: dict[str, Any]) -> tuple[int, Any]:
    status, body, _ = await call(http, sandbox, "PUT", f"/v1/appointments/{ID}", {"appointment": fields})
    return status, body


def seed(sandbox: RunningSandbox, **fields: Any) -> None:
    sandbox.state.seed([slot(id=ID, **fields)])


# ---- PUT rules, each with its exact body --------------------------------------------

REFUSED_WRITES = [
    pytest.param(
        {"patient_id": 1013, "state": "Pending"},
        {"patient_id": 1014},
        {"patient_id": ["can not change patients"]},
        id="change-patient",
    ),
    pytest.param(
        {"patient_id": 1013}, {"patient_id": None}, {"patient_id": ["can not change patients"]}, id="remove-patient"
    ),
    pytest.param(
        {"state": "Confirmed"},
        {"start_time": "2030-01-07T10:00:00Z", "reason": "Scale"},
        {"start_time": [status_is("Confirmed")], "reason": [status_is("Confirmed")]},
        id="confirmed-locks-fields",
    ),
    pytest.param(
        {"state": "Confirmed"},
        {"patient_id": 7},
        {"patient_id": [status_is("Confirmed")]},
        id="confirmed-locks-patient-too",
    ),
    pytest.param(
        {"state": "Confirmed"}, {"state": "Confirmed"}, {"state": [status_is("Confirmed")]}, id="confirmed-to-confirmed"
    ),
    pytest.param(
        {"state": "Pending"}, {"state": "In surgery"}, {"state": [status_is("Pending")]}, id="pending-to-in-surgery"
    ),
    pytest.param(
        {"state": "Arrived"}, {"state": "Confirmed"}, {"state": [status_is("Arrived")]}, id="arrived-backwards"
    ),
    pytest.param(
        {"state": "Cancelled", "appointment_cancellation_reason_id": 1},
        {"state": "Pending"},
        {"state": [status_is("Cancelled")]},
        id="from-cancelled",
    ),
    pytest.param(
        {"state": "Completed"},
        {"notes": "late note", "practitioner_id": 1},
        {"notes": [status_is("Completed")], "practitioner_id": [status_is("Completed")]},
        id="completed-refuses-every-field",
    ),
    pytest.param(
        {"state": "Did not attend"}, {"notes": "x"}, {"notes": [status_is("Did not attend")]}, id="dna-refuses"
    ),
    pytest.param(
        {},
        {"state": "Confirmed", "patient_id": 1014},
        {"state": ["can not be updated in the same request as patient_id"]},
        id="state-with-patient",
    ),
    pytest.param(
        {"patient_id": 1013, "state": "Confirmed"},
        {"state": "Confirmed", "patient_id": 1014},
        {
            "state": [status_is("Confirmed"), "can not be updated in the same request as patient_id"],
            "patient_id": ["can not change patients"],
        },
        id="seed-ticket",
    ),
    pytest.param(
        {},
        {"state": "Cancelled"},
        {"appointment_cancellation_reason_id": ["can't be blank"]},
        id="cancel-without-reason",
    ),
    pytest.param(
        {},
        {"state": "Cancelled", "appointment_cancellation_reason_id": 99},
        {"appointment_cancellation_reason_id": ["is invalid"]},
        id="cancel-unknown-reason",
    ),
    pytest.param(
        {},
        {"colour": "red", "duration": "long", "state": "Booked"},
        {
            "colour": ["is not a permitted attribute"],
            "duration": ["is invalid"],
            "state": ["is not included in the list"],
        },
        id="shape",
    ),
    pytest.param(
        {},
        {"finish_time": "2030-01-07T08:00:00Z"},
        {"finish_time": ["must be after start_time"]},
        id="finish-before-start",
    ),
]


@pytest.mark.parametrize(("stored", "write", "params"), REFUSED_WRITES)
async def test_refused_writes_answer_422_with_every_reason_and_change_nothing(
    http: aiohttp.ClientSession,
    sandbox: RunningSandbox,
    stored: dict[str, Any],
    write: dict[str, Any],
    params: dict[str, list[str]],
) -> None:
    seed(sandbox, **stored)
    before = sandbox.state.get(ID)
    status, body = await put(http, sandbox, write)
    assert (status, body) == (422, rejection(params))
    assert sandbox.state.get(ID) == before


ACCEPTED_WRITES = [
    pytest.param({}, {"patient_id": 1013}, id="set-patient-when-none"),
    pytest.param({"patient_id": 1013}, {"patient_id": 1013, "notes": "same patient again"}, id="same-patient"),
    pytest.param({"state": "Confirmed"}, {"notes": "running late"}, id="confirmed-notes"),
    pytest.param(
        {"state": "Confirmed", "patient_id": 3},
        {"state": "Arrived", "patient_id": 3},
        id="confirmed-to-arrived-same-patient",
    ),
    pytest.param(
        {"state": "Confirmed"}, {"state": "Cancelled", "appointment_cancellation_reason_id": 2}, id="cancel-confirmed"
    ),
    pytest.param({"state": "Confirmed"}, {"start_time": slot()["start_time"]}, id="confirmed-unchanged-field"),
    pytest.param({}, {"duration": 45}, id="duration-moves-finish"),
]


@pytest.mark.parametrize(("stored", "write"), ACCEPTED_WRITES)
async def test_allowed_writes_are_applied(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, stored: dict[str, Any], write: dict[str, Any]
) -> None:
    seed(sandbox, **stored)
    status, body = await put(http, sandbox, write)
    assert status == 200
    for key, value in write.items():
        answered = body["appointment"][key]
        if key.endswith("_time"):
            assert parse_time(answered) == parse_time(value)  # the same instant, in local time
        else:
            assert answered == value


async def test_duration_follows_the_times(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
    seed(sandbox)
    _, body = await put(http, sandbox, {"duration": 45})
    assert body["appointment"]["finish_time"] == "2030-01-07T09:45:00.000+00:00"  # London, winter
    _, body = await put(http, sandbox, {"finish_time": "2030-01-07T11:00:00+01:00"})
    assert (body["appointment"]["finish_time"], body["appointment"]["duration"]) == (
        "2030-01-07T10:00:00.000+00:00",
        60,
    )


@pytest.mark.parametrize(
    ("path", "stamp"),
    [
        (["Confirmed"], "confirmed_at"),
        (["Arrived", "In surgery"], "in_surgery_at"),
        (["Arrived", "Completed"], "completed_at"),
        (["Did not attend"], "did_not_attend_at"),
    ],
)
async def test_each_state_change_stamps_its_time_and_the_version(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, path: list[str], stamp: str
) -> None:
    seed(sandbox)
    versions = []
    for state in path:
        status, body = await put(http, sandbox, {"state": state})
        assert status == 200
        versions.append(body["appointment"]["version"])
    appointment = body["appointment"]
    assert appointment[stamp] is not None
    assert appointment["updated_at"] == appointment[stamp]
    assert versions == list(range(2, 2 + len(path)))


async def test_a_write_that_changes_nothing_is_not_a_new_version(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    seed(sandbox, notes="n")
    _, body = await put(http, sandbox, {"notes": "n"})
    assert body["appointment"]["version"] == 1


async def test_create_requires_the_slot_and_defaults_to_pending(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    status, body, _ = await call(http, sandbox, "POST", "/v1/appointments", {"appointment": {}})
    assert (status, body) == (
        422,
        rejection(
            {
                "start_time": ["can't be blank"],
                "finish_time": ["can't be blank"],
                "practitioner_id": ["can't be blank"],
            }
        ),
    )
    status, body, _ = await call(http, sandbox, "POST", "/v1/appointments", {"appointment": slot()})
    assert status == 201
    created = body["appointment"]
    assert (created["state"], created["patient_id"], created["duration"]) == ("Pending", None, 30)
    assert created["id"] >= 900_000_000 and len(created["uuid"]) == 36


async def test_a_created_appointment_never_takes_a_seeded_id(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    seeded = sandbox.state.seed([slot(id=900_000_000, notes="seeded"), slot(id=900_000_001, notes="seeded")])
    status, body, _ = await call(http, sandbox, "POST", "/v1/appointments", {"appointment": slot()})
    assert status == 201
    assert body["appointment"]["id"] not in {a["id"] for a in seeded}
    assert [sandbox.state.get(a["id"])["notes"] for a in seeded] == ["seeded", "seeded"]


async def test_a_body_without_the_appointment_wrapper_is_refused(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    status, body, _ = await call(http, sandbox, "POST", "/v1/appointments", slot())
    assert (status, body) == (422, rejection({"appointment": ["can't be blank"]}))


@pytest.mark.parametrize("state", ["Arrived", "In surgery", "Completed"])
async def test_delete_is_refused_once_the_patient_is_in(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, state: str
) -> None:
    seed(sandbox, state=state)
    status, body, _ = await call(http, sandbox, "DELETE", f"/v1/appointments/{ID}")
    assert (status, body) == (422, rejection({"base": [f"can not delete an appointment in state {state}"]}))


async def test_delete_answers_204_unless_deletes_are_refused(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    sandbox.state.set_delete_mode("remove")
    sandbox.state.seed([slot(id=1), slot(id=2)])
    sandbox.state.refuse_deletes(True)
    status, body, _ = await call(http, sandbox, "DELETE", "/v1/appointments/1")
    assert (status, body) == (422, rejection({"base": ["can not delete an appointment in state Pending"]}))
    sandbox.state.refuse_deletes(False)
    status, _, _ = await call(http, sandbox, "DELETE", "/v1/appointments/2")
    assert status == 204 and sandbox.state.get(2) is None


async def test_by_default_delete_cancels_as_reported_of_the_live_pms(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    seed(sandbox, state="Confirmed")
    status, _, _ = await call(http, sandbox, "DELETE", f"/v1/appointments/{ID}")
    cancelled = sandbox.state.get(ID)
    assert status == 204
    assert cancelled is not None and cancelled["state"] == "Cancelled" and cancelled["cancelled_at"]
    status, _, _ = await call(http, sandbox, "DELETE", f"/v1/appointments/{ID}")
    assert status == 204  # cancelling a cancelled one again changes nothing


async def test_refuse_cancel_makes_a_cancel_fail_for_good(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
    seed(sandbox)
    sandbox.state.refuse_cancel(ID)
    status, body = await put(http, sandbox, {"state": "Cancelled", "appointment_cancellation_reason_id": 1})
    assert (status, body) == (422, rejection({"state": [status_is("Pending")]}))


# ---- auth, 404, listing, rate limit -------------------------------------------------


async def test_auth_and_user_agent_are_required(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
    status, body, _ = await call(http, sandbox, "GET", "/v1/appointments/1", headers={"User-Agent": "t"})
    assert status == 401 and body["error"]["type"] == "unauthorized"
    async with http.get(
        sandbox.url + "/v1/appointments/1",
        headers={"Authorization": AUTH["Authorization"]},
        skip_auto_headers=["User-Agent"],
    ) as resp:
        assert resp.status == 403
        assert "make sure your request has an acceptable User-Agent header" in await resp.text()


async def test_a_changed_token_turns_the_old_one_away_with_401(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    status, body, _ = await call(http, sandbox, "POST", "/_sandbox/token", {"token": "rotated"})
    assert (status, body["ok"]) == (200, True)
    status, _, _ = await call(http, sandbox, "GET", "/v1/appointment_cancellation_reasons")
    assert status == 401
    status, _, _ = await call(
        http,
        sandbox,
        "GET",
        "/v1/appointment_cancellation_reasons",
        headers={"Authorization": "Bearer rotated", "User-Agent": "t"},
    )
    assert status == 200


async def test_unknown_appointment_is_404(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
    for method in ("GET", "PUT", "DELETE"):
        status, body, _ = await call(http, sandbox, method, "/v1/appointments/12345", {"appointment": {}})
        assert status == 404 and body["error"]["type"] == "not_found"


async def test_listing_needs_a_window_even_with_updated_after(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    for query in ("", "?updated_after=2020-01-01T00:00:00Z"):
        status, body, _ = await call(http, sandbox, "GET", f"/v1/appointments{query}")
        assert status == 422
        assert body["error"]["params"] == {"after": ["can't be blank"], "before": ["can't be blank"]}
    sandbox.state.seed([slot(id=1), slot(id=2, start_time="2030-01-08T09:00:00Z", finish_time="2030-01-08T09:30:00Z")])
    _, body, _ = await call(http, sandbox, "GET", "/v1/appointments?on=2030-01-08")
    assert [a["id"] for a in body["appointments"]] == [2]


WINDOW = "after=2030-01-01T00:00:00Z&before=2030-02-01T00:00:00Z"


async def test_cancelled_and_did_not_attend_rows_are_hidden_unless_asked_for(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    sandbox.state.seed(
        [slot(id=1), slot(id=2, state="Cancelled"), slot(id=3, state="Did not attend"), slot(id=4, state="Confirmed")]
    )
    _, body, _ = await call(http, sandbox, "GET", f"/v1/appointments?{WINDOW}")
    assert [a["id"] for a in body["appointments"]] == [1, 4]
    _, body, _ = await call(http, sandbox, "GET", f"/v1/appointments?{WINDOW}&cancelled=true")
    assert [a["id"] for a in body["appointments"]] == [1, 2, 3, 4]


async def test_unknown_query_parameters_filter_nothing(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
    sandbox.state.seed([slot(id=1, state="Confirmed"), slot(id=2)])
    _, body, _ = await call(http, sandbox, "GET", f"/v1/appointments?{WINDOW}&state=Confirmed&sort=-id")
    assert [a["id"] for a in body["appointments"]] == [1, 2]


@pytest.mark.parametrize("honoured", [True, False], ids=["updated_after-honoured", "updated_after-ignored"])
async def test_updated_after_is_honoured_or_ignored_as_set(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, honoured: bool
) -> None:
    status, _, _ = await call(http, sandbox, "POST", "/_sandbox/updated_after", {"honoured": honoured})
    assert status == 200
    sandbox.state.seed([slot(id=1), slot(id=2)])
    watermark = sandbox.state.get(2)["updated_at"]  # type: ignore[index]
    sandbox.state.change_now(1, {"notes": "later"})
    _, body, _ = await call(
        http,
        sandbox,
        "GET",
        "/v1/appointments",
        params={"after": "2030-01-01T00:00:00Z", "before": "2030-02-01T00:00:00Z", "updated_after": watermark},
    )
    assert [a["id"] for a in body["appointments"]] == ([1] if honoured else [1, 2])


async def test_the_live_fields_and_time_format_are_answered(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    _, body, _ = await call(
        http,
        sandbox,
        "POST",
        "/v1/appointments",
        {
            "appointment": slot(
                start_time="2030-07-01T09:00:00Z", finish_time="2030-07-01T09:30:00Z", booked_via_api=True
            )
        },
    )
    appointment = body["appointment"]
    assert appointment["start_time"] == "2030-07-01T10:00:00.000+01:00"  # London, summer
    assert appointment["updated_at"][-6:] in ("+00:00", "+01:00") and appointment["updated_at"][-10] == "."
    assert appointment["booked_via_api"] is True
    assert len(appointment["practitioner_site_id"]) == 36
    for name in ("user_id", "room_id", "patient_name", "treatment_description"):
        assert name in appointment


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"a": 1, "b": 2, "c": 3, "d": 4}, "can have at most 3 key/value pairs"),
        ({"k" * 41: 1}, "keys can be at most 40 characters"),
        ({"k": "v" * 501}, "values can be at most 500 characters"),
    ],
)
async def test_metadata_over_the_limits_is_refused(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, metadata: dict[str, Any], reason: str
) -> None:
    status, body, _ = await call(http, sandbox, "POST", "/v1/appointments", {"appointment": slot(metadata=metadata)})
    assert (status, body["error"]["params"]) == (422, {"metadata": [reason]})
    status, _, _ = await call(
        http, sandbox, "POST", "/v1/appointments", {"appointment": slot(metadata={"a": 1, "b": "x" * 500, "k" * 40: 3})}
    )
    assert status == 201


async def test_cancellation_reasons_carry_type_and_archived_and_archived_ones_are_refused(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    _, body, _ = await call(http, sandbox, "GET", "/v1/appointment_cancellation_reasons")
    reasons = body["appointment_cancellation_reasons"]
    assert all(set(r) == {"id", "reason", "reason_type", "archived"} for r in reasons)
    archived = next(r["id"] for r in reasons if r["archived"])
    seed(sandbox)
    status, body = await put(http, sandbox, {"state": "Cancelled", "appointment_cancellation_reason_id": archived})
    assert (status, body) == (422, rejection({"appointment_cancellation_reason_id": ["is archived"]}))


async def test_listing_pages_default_to_25_and_cap_at_100(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
    sandbox.state.seed([slot(id=i) for i in range(1, 131)])
    _, body, _ = await call(http, sandbox, "GET", f"/v1/appointments?{WINDOW}")
    assert len(body["appointments"]) == 25
    assert body["meta"] == {"total": 130, "current_page": 1, "total_pages": 6, "per_page": 25}
    _, body, _ = await call(http, sandbox, "GET", f"/v1/appointments?{WINDOW}&per_page=100&page=2")
    assert [a["id"] for a in body["appointments"]] == list(range(101, 131))
    assert body["meta"] == {"total": 130, "current_page": 2, "total_pages": 2, "per_page": 100}
    _, body, _ = await call(http, sandbox, "GET", f"/v1/appointments?{WINDOW}&per_page=500")
    assert len(body["appointments"]) == 25  # over 100: silently the default


async def test_rate_limit_headers_and_the_hourly_block(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
    sandbox.state.set_rate_limit(2)
    next_hour = (int(time.time()) // 3600 + 1) * 3600
    remaining = []
    for _ in range(2):
        status, _, headers = await call(http, sandbox, "GET", "/v1/appointment_cancellation_reasons")
        assert status == 200
        assert headers["x-ratelimit-limit"] == "2"
        assert int(headers["x-ratelimit-reset"]) == next_hour
        remaining.append(headers["x-ratelimit-remaining"])
    status, body, headers = await call(http, sandbox, "GET", "/v1/appointment_cancellation_reasons")
    assert remaining == ["1", "0"]
    assert (status, body) == (403, {"error": {"type": "invalid_access_error", "message": "Rate limit exceeded"}})
    assert headers["x-ratelimit-remaining"] == "0"
    assert int(headers["x-ratelimit-reset"]) == next_hour


async def test_the_budget_is_shared_with_the_practices_other_integrations(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    sandbox.state.set_rate_limit(10)
    status, _, _ = await call(http, sandbox, "POST", "/_sandbox/spend_elsewhere", {"count": 9})
    assert status == 200
    _, _, headers = await call(http, sandbox, "GET", "/v1/appointment_cancellation_reasons")
    assert headers["x-ratelimit-remaining"] == "0"


# ---- behind-the-back changes --------------------------------------------------------


async def test_a_change_after_n_reads_is_seen_by_the_next_read(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    seed(sandbox)
    sandbox.state.change_behind_back(ID, {"state": "Confirmed"}, after_reads=2)
    states = []
    for _ in range(3):
        _, body, _ = await call(http, sandbox, "GET", f"/v1/appointments/{ID}")
        states.append(body["appointment"]["state"])
    assert states == ["Pending", "Pending", "Confirmed"]


# ---- webhooks out ----------------------------------------------------------------------


def verified(attempt: tuple[dict[str, str], bytes]) -> Any:
    headers, body = attempt
    return Webhook(SECRET).verify(body, headers)


async def test_every_change_is_sent_signed_and_in_order(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, receiver: Receiver
) -> None:
    sandbox.state.set_delete_mode("remove")
    sandbox.state.subscribe(receiver.url, SECRET)
    _, body, _ = await call(http, sandbox, "POST", "/v1/appointments", {"appointment": slot()})
    new_id = body["appointment"]["id"]
    await call(http, sandbox, "PUT", f"/v1/appointments/{new_id}", {"appointment": {"state": "Confirmed"}})
    sandbox.state.change_now(new_id, {"notes": "SMS reply: yes"})
    await call(http, sandbox, "DELETE", f"/v1/appointments/{new_id}")
    await wait_until(lambda: len(receiver.attempts) == 4)
    events = [verified(attempt) for attempt in receiver.attempts]
    assert [e["type"] for e in events] == [
        "appointment.created",
        "appointment.updated",
        "appointment.updated",
        "appointment.deleted",
    ]
    assert [e["data"]["appointment"]["version"] for e in events] == [1, 2, 3, 3]
    assert events[1]["data"]["appointment"]["state"] == "Confirmed"
    assert events[2]["data"]["appointment"]["notes"] == "SMS reply: yes"
    assert len({headers["webhook-id"] for headers, _ in receiver.attempts}) == 4


async def test_a_failed_delivery_is_retried_with_the_same_id(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    sandbox.state.set_webhook_retry_delay(0.01)
    sandbox.state.subscribe(receiver.url, SECRET)
    seed(sandbox)
    sandbox.state.change_now(ID, {"notes": "second event"})
    await wait_until(lambda: len(receiver.attempts) == 4)
    ids = [headers["webhook-id"] for headers, _ in receiver.attempts]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert [verified(a)["type"] for a in receiver.attempts[2:]] == ["appointment.created", "appointment.updated"]
    assert [d.status for d in sandbox.state.deliveries] == [500, 500, 204, 204]
    assert [d.attempt for d in sandbox.state.deliveries] == [1, 2, 3, 1]


async def test_a_subscriber_is_switched_off_after_50_consecutive_failures(
    sandbox: RunningSandbox, receiver: Receiver
) -> None:
    receiver.always_fail = True
    sandbox.state.set_webhook_retry_delay(0.0005)
    sandbox.state.subscribe(receiver.url, SECRET)
    seed(sandbox)
    subscriber = sandbox.state.webhooks.subscribers[receiver.url]
    await wait_until(lambda: not subscriber.enabled, timeout=10)
    sandbox.state.change_now(ID, {"notes": "never sent"})
    assert len(receiver.attempts) == MAX_CONSECUTIVE_FAILURES == 50
    assert sandbox.state.webhooks.pending() == 0


async def test_a_slow_subscriber_does_not_slow_the_api(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, receiver: Receiver
) -> None:
    receiver.delay = 0.6
    sandbox.state.subscribe(receiver.url, SECRET)
    started = time.monotonic()
    for _ in range(3):
        status, _, _ = await call(http, sandbox, "POST", "/v1/appointments", {"appointment": slot()})
        assert status == 201
    assert time.monotonic() - started < 0.3


async def test_dropped_webhooks_are_never_delivered(sandbox: RunningSandbox, receiver: Receiver) -> None:
    sandbox.state.subscribe(receiver.url, SECRET)
    sandbox.state.drop_webhooks(True)
    seed(sandbox)
    sandbox.state.drop_webhooks(False)
    sandbox.state.change_now(ID, {"notes": "this one arrives"})
    await wait_until(lambda: len(receiver.attempts) == 1)
    assert verified(receiver.attempts[0])["type"] == "appointment.updated"
    assert [m.type for m in sandbox.state.webhooks.dropped] == ["appointment.created"]


# ---- knobs over HTTP -------------------------------------------------------------------


async def knob(http: aiohttp.ClientSession, sandbox: RunningSandbox, name: str, body: dict[str, Any]) -> Any:
    async with http.post(f"{sandbox.url}/_sandbox/{name}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["result"]


async def test_knobs_over_http(http: aiohttp.ClientSession, sandbox: RunningSandbox, receiver: Receiver) -> None:
    await knob(http, sandbox, "subscribe", {"url": receiver.url, "secret": SECRET})
    await knob(http, sandbox, "webhook_retry_delay", {"seconds": 0.01})
    await knob(http, sandbox, "seed", {"fixture": "seed"})
    await knob(http, sandbox, "change", {"appointment_id": 757579675, "fields": {"notes": "by phone"}})
    await knob(http, sandbox, "fail", {"route": "GET /v1/appointments/{id}", "count": 1, "status": 503})
    status, _, _ = await call(http, sandbox, "GET", "/v1/appointments/757579675")
    assert status == 503
    await knob(http, sandbox, "rate_limit", {"budget": 1})
    status, _, _ = await call(http, sandbox, "GET", "/v1/appointments/757579675")
    assert status == 403
    async with http.get(f"{sandbox.url}/_sandbox/appointments") as resp:
        listed = (await resp.json())["appointments"]
    assert [(a["id"], a["notes"]) for a in listed] == [(757579675, "by phone")]
    async with http.get(f"{sandbox.url}/_sandbox/calls") as resp:
        assert (await resp.json())["calls"] == ["GET /v1/appointments/{id}"] * 2
    await wait_until(lambda: len(receiver.attempts) == 2)
    await knob(http, sandbox, "reset", {})
    assert sandbox.state.all_appointments() == [] and sandbox.state.calls == []
    assert sandbox.state.webhooks.subscribers == {} and sandbox.state.rate_limit == 3600


async def test_clear_faults_switches_every_injected_fault_off_and_keeps_the_data(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    seed(sandbox, notes="kept")
    await knob(http, sandbox, "fail", {"route": "*", "count": 5, "status": 503})
    await knob(http, sandbox, "refuse_cancel", {"appointment_id": ID})
    await knob(http, sandbox, "refuse_deletes", {"enabled": True})
    await knob(http, sandbox, "latency", {"seconds": 0.2})
    await knob(http, sandbox, "drop_webhooks", {"enabled": True})
    status, _, _ = await call(http, sandbox, "GET", f"/v1/appointments/{ID}")
    assert status == 503

    await knob(http, sandbox, "clear_faults", {})

    status, body = await put(http, sandbox, {"state": "Cancelled", "appointment_cancellation_reason_id": 1})
    assert status == 200 and body["appointment"]["notes"] == "kept"
    assert sandbox.state.latency == 0 and not sandbox.state.refusing_deletes and not sandbox.state.webhooks.drop


async def test_a_bad_knob_body_is_a_400(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
    async with http.post(f"{sandbox.url}/_sandbox/change", json={"appointment_id": 1}) as resp:
        assert resp.status == 400
        assert (await resp.json())["ok"] is False


def test_the_webhook_body_is_the_documented_envelope() -> None:
    message = make_message("appointment.updated", {"id": 3, "state": "Confirmed"})
    payload = json.loads(message.body)
    assert payload["type"] == "appointment.updated"
    assert payload["data"] == {"appointment": {"id": 3, "state": "Confirmed"}}
    assert message.webhook_id.startswith("msg_")

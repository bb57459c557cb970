"""The reassignment saga over the real pipeline: RabbitMQ, a store, the sandbox over HTTP.

Each test ends by checking what matters to the practice: the sandbox holds
exactly one live appointment for the slot, and the state log tells the story.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consumer.messages import Reassign
from consumer.reconciler import parse_time
from consumer.sandbox import RunningSandbox, running_sandbox
from consumer.sandbox.state import FIRST_ID
from consumer.store.base import AppointmentRecord, Commit
from statemachines.reassignment import CANCEL_REASON, link_marker, slot_of
from tests.helpers import eventually
from tests.stack import Stack, running_stack

STATUS = "The appointment can not be updated as the current status is:"
BOOKED_IN_ERROR_ID = 1
ORIGINAL_PATIENT, NEW_PATIENT = 1013, 2001
SLOT = {"practitioner_id": 7, "start_time": "2030-03-04T10:00:00Z", "finish_time": "2030-03-04T10:30:00Z"}


@pytest.fixture
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[RunningSandbox]:
    """DELETE cancels (as reported of the live PMS) unless a test asks for "remove"."""
    async with running_sandbox(port=0, delete_mode=getattr(request, "param", "cancel")) as running:
        yield running


BOTH_DELETES = pytest.mark.parametrize(
    "sandbox", ["cancel", "remove"], indirect=True, ids=["delete-cancels", "delete-removes"]
)


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as running:
        yield running


def seed(sandbox: Any, appointment_id: int, **fields: Any) -> dict[str, Any]:
    defaults = {"id": appointment_id, "patient_id": ORIGINAL_PATIENT, "reason": "Exam", "state": "Pending", **SLOT}
    return sandbox.state.seed([{**defaults, **fields}])[0]  # type: ignore[no-any-return]


async def reassign(stack: Stack, appointment_id: int, patient_id: int = NEW_PATIENT, **extra: Any) -> dict[str, Any]:
    command_id = await stack.send(
        {"type": "reassign", "appointment_id": appointment_id, "patient_id": patient_id, **extra}
    )
    return await stack.result(command_id)


def live_in_slot(sandbox: Any) -> list[dict[str, Any]]:
    """Appointments holding the slot: a second one is a double booking, none is a lost slot."""
    return [
        a
        for a in sandbox.state.all_appointments()
        if a["state"] != "Cancelled"
        and parse_time(a["start_time"]) == parse_time(SLOT["start_time"])
        and a["practitioner_id"] == SLOT["practitioner_id"]
    ]


def no_live_replacement(sandbox: Any, replacement_id: int) -> bool:
    """Removed, or cancelled, as the PMS's DELETE does it."""
    replacement = sandbox.state.get(replacement_id)
    if sandbox.state.delete_mode == "remove":
        return replacement is None
    return replacement is not None and replacement["state"] == "Cancelled"


async def workflow_states(stack: Stack, appointment_id: int) -> list[str]:
    history = await stack.store.history(appointment_id)
    return [r.to_state for r in history if r.machine == "reassignment"]


async def assert_compensated(stack: Stack, sandbox: Any, result: dict[str, Any], reason: str) -> None:
    """The original is left as it was, the replacement is gone, and the result says why."""
    assert result["outcome"] == "failed"
    assert reason in result["reasons"]["original"][0]
    assert "removed; original left as it was" in result["reasons"]["compensation"][0]
    workflow = await stack.store.get_workflow(result["workflow_id"])
    assert workflow is not None and workflow.state == "compensated"
    assert workflow.replacement_id is not None
    assert no_live_replacement(sandbox, workflow.replacement_id)
    [live] = live_in_slot(sandbox)
    assert live["id"] == result["appointment_id"] and live["patient_id"] == ORIGINAL_PATIENT
    assert await workflow_states(stack, result["appointment_id"]) == [
        "requested",
        "replacement_created",
        "compensating",
        "compensated",
    ]


async def test_reassign_books_a_replacement_and_cancels_the_original(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 101)

    result = await reassign(stack, 101)

    assert result["outcome"] == "succeeded" and result["reasons"] == {}
    replacement = result["appointment"]
    assert replacement["patient_id"] == NEW_PATIENT
    assert replacement["practitioner_id"] == SLOT["practitioner_id"] and replacement["reason"] == "Exam"
    assert all(parse_time(replacement[k]) == parse_time(SLOT[k]) for k in ("start_time", "finish_time"))
    assert replacement["metadata"] == link_marker(result["workflow_id"], 101)
    assert replacement["booked_via_api"] is True
    original = sandbox.state.get(101)
    assert original["state"] == "Cancelled" and original["patient_id"] == ORIGINAL_PATIENT
    assert original["appointment_cancellation_reason_id"] == BOOKED_IN_ERROR_ID
    assert f"{CANCEL_REASON}: moved to appointment {replacement['id']}" in original["notes"]
    assert [a["id"] for a in live_in_slot(sandbox)] == [replacement["id"]]

    original_log = await stack.store.history(101)
    assert [r.to_state for r in original_log if r.machine == "reassignment"] == [
        "requested",
        "replacement_created",
        "original_cancelled",
        "completed",
    ]
    cancelled = [r for r in original_log if r.machine == "appointment" and r.to_state == "Cancelled"]
    assert len(cancelled) == 1 and cancelled[0].source == "workflow"
    assert cancelled[0].workflow_id == result["workflow_id"]
    replacement_log = await stack.store.history(replacement["id"])
    assert [r.to_state for r in replacement_log if r.machine == "reassignment"] == [
        "replacement_created",
        "original_cancelled",
        "completed",
    ]
    workflow = await stack.store.get_workflow(result["workflow_id"])
    assert workflow is not None and workflow.state == "completed"


@BOTH_DELETES
async def test_original_confirmed_then_arrived_behind_our_back_is_compensated(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 201)
    sandbox.state.change_behind_back(201, {"state": "Confirmed"}, after_reads=1)  # SMS auto-confirm
    sandbox.state.change_behind_back(201, {"state": "Arrived"}, before_next="PUT")  # checked in at the desk

    result = await reassign(stack, 201)

    await assert_compensated(stack, sandbox, result, "original can not be cancelled")
    assert "Arrived" in result["reasons"]["original"][0]
    assert sandbox.state.get(201)["state"] == "Arrived"
    drift = [r for r in await stack.store.history(201) if r.machine == "appointment"]
    assert [r.to_state for r in drift][-1] == "Arrived"


@BOTH_DELETES
async def test_original_the_pms_will_not_cancel_is_compensated(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 301)
    sandbox.state.refuse_cancel(301)

    result = await reassign(stack, 301)

    await assert_compensated(stack, sandbox, result, "PMS refused to cancel the original")
    assert f"{STATUS} Pending" in result["reasons"]["original"][0]
    assert sandbox.state.get(301)["state"] == "Pending"


async def test_cancel_failing_with_5xx_past_the_retries_is_compensated(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 401)
    sandbox.state.fail_next("PUT /v1/appointments/{id}", 3, 503)  # the stack's client tries 3 times

    result = await reassign(stack, 401)

    await assert_compensated(stack, sandbox, result, "PMS kept failing to cancel the original")
    assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 3
    assert sandbox.state.get(401)["state"] == "Pending"


async def test_a_cancel_whose_answer_was_lost_is_not_compensated(stack: Stack, sandbox: Any) -> None:
    """The PUTs fail, but the original is Cancelled after all (as if the PUT applied before its
    answer was lost): deleting the replacement now would leave the slot with nobody in it."""
    seed(sandbox, 451)
    # A first attempt reads the original once: its cancel is planned on that read.
    sandbox.state.change_behind_back(
        451, {"state": "Cancelled", "appointment_cancellation_reason_id": 1}, after_reads=1
    )
    sandbox.state.fail_next("PUT /v1/appointments/{id}", 3, 503)

    result = await reassign(stack, 451)

    assert result["outcome"] == "succeeded"
    assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 3
    assert [a["id"] for a in live_in_slot(sandbox)] == [result["appointment"]["id"]]
    assert await workflow_states(stack, 451) == ["requested", "replacement_created", "original_cancelled", "completed"]


async def park(stack: Stack, sandbox: Any, appointment_id: int) -> dict[str, Any]:
    """Original can't be cancelled, and the replacement can be neither deleted nor cancelled."""
    seed(sandbox, appointment_id)
    sandbox.state.refuse_cancel(appointment_id)
    sandbox.state.refuse_cancel(FIRST_ID)  # the replacement: the first id this fresh sandbox hands out
    sandbox.state.refuse_deletes(True)
    result = await reassign(stack, appointment_id)
    assert result["outcome"] == "failed"
    assert "PMS refused to cancel the original" in result["reasons"]["original"][0]
    [compensation] = result["reasons"]["compensation"]
    assert f"could not remove replacement {FIRST_ID}" in compensation
    assert compensation.endswith("parked in compensation_failed: see appt sagas --stuck")
    workflow = await stack.store.get_workflow(result["workflow_id"])
    assert workflow is not None and workflow.state == "compensation_failed"
    assert workflow.replacement_id == FIRST_ID
    assert f"could not remove replacement {FIRST_ID}" in (workflow.last_error or "")
    assert len(live_in_slot(sandbox)) == 2  # visible and parked, never silently lost
    return result


@BOTH_DELETES
async def test_failed_compensation_parks_then_sagas_retry_compensates(stack: Stack, sandbox: Any) -> None:
    parked = await park(stack, sandbox, 501)

    second = await reassign(stack, 501, patient_id=2002)
    assert second["outcome"] == "rejected"
    assert second["reasons"] == {"appointment_id": [f"a reassignment is already running ({parked['workflow_id']})"]}
    assert sandbox.state.call_count("POST /v1/appointments") == 1

    sandbox.state.refuse_deletes(False)
    workflow = await stack.workflows.retry(parked["workflow_id"])

    assert workflow.state == "compensated" and workflow.attempts == 1
    assert no_live_replacement(sandbox, FIRST_ID)
    assert [a["id"] for a in live_in_slot(sandbox)] == [501]
    assert await workflow_states(stack, 501) == [
        "requested",
        "replacement_created",
        "compensating",
        "compensation_failed",
        "compensating",
        "compensated",
    ]
    assert await stack.store.active_workflow(501) is None


async def test_cli_sagas_retry_compensates_a_parked_workflow(
    stack: Stack, sandbox: Any, amqp_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    parked = await park(stack, sandbox, 601)
    sandbox.state.refuse_deletes(False)

    env = {**os.environ, "APPT_STORE": sqlite_url, "APPT_AMQP_URL": amqp_url, "APPT_PMS_URL": sandbox.url}
    appt = Path(sys.executable).parent / "appt"
    # Async, because the sandbox answering the CLI runs on this test's event loop.
    process = await asyncio.create_subprocess_exec(
        str(appt),
        "sagas",
        "retry",
        parked["workflow_id"],
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)

    assert process.returncode == 0, stderr.decode()
    assert '"state": "compensated"' in stdout.decode()
    workflow = await stack.store.get_workflow(parked["workflow_id"])
    assert workflow is not None and workflow.state == "compensated"
    assert [a["id"] for a in live_in_slot(sandbox)] == [601]


async def test_appointment_without_a_patient_gets_a_plain_set_patient(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 701, patient_id=None)

    result = await reassign(stack, 701)

    assert result["outcome"] == "succeeded" and result["type"] == "reassign"
    assert result["workflow_id"] is None
    assert sandbox.state.get(701)["patient_id"] == NEW_PATIENT
    assert sandbox.state.call_count("POST /v1/appointments") == 0
    assert await stack.store.list_workflows() == []
    assert [a["id"] for a in live_in_slot(sandbox)] == [701]


async def test_reassign_to_the_same_patient_changes_nothing(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 801)

    result = await reassign(stack, 801, patient_id=ORIGINAL_PATIENT)

    assert result["outcome"] == "succeeded" and result["reasons"] == {}
    assert result["appointment"]["id"] == 801
    assert sandbox.state.call_count("POST /v1/appointments") == 0
    assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 0
    assert await stack.store.list_workflows() == []


async def test_reassign_of_a_cancelled_appointment_is_rejected(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 901, state="Cancelled", appointment_cancellation_reason_id=2)

    result = await reassign(stack, 901)

    assert result["outcome"] == "rejected"
    assert result["reasons"] == {"state": [f"{STATUS} Cancelled"]}
    assert sandbox.state.call_count("POST /v1/appointments") == 0
    assert await stack.store.list_workflows() == []


async def test_a_redelivered_reassign_books_nothing_twice(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 1001)
    command = {"type": "reassign", "appointment_id": 1001, "patient_id": NEW_PATIENT, "command_id": "re-1"}
    for _ in range(3):
        await stack.send(dict(command))
    first = await stack.result("re-1")
    await eventually(lambda: stack.observer.result_counts.get("re-1") == 3)

    assert first["outcome"] == "succeeded"
    # Past the inbox too (a crash before the inbox write): the workflow is found by the command id.
    again = await stack.workflows.reassign(Reassign.model_validate(command))
    assert again.result is not None and again.result.outcome == "succeeded"
    assert again.result.workflow_id == first["workflow_id"]
    assert sandbox.state.call_count("POST /v1/appointments") == 1
    assert [a["id"] for a in live_in_slot(sandbox)] == [first["appointment"]["id"]]
    assert len(await stack.store.list_workflows()) == 1
    # ...and what the first run may not have published (killed between commit and publish) goes out again.
    committed = [r.seq for r in await stack.store.history(1001) if r.command_id == "re-1"]
    assert [r.seq for r in again.republish] == committed
    assert {"requested", "replacement_created", "original_cancelled", "completed"} <= {
        r.to_state for r in again.republish
    }


async def test_a_step_whose_publish_fails_is_published_again_with_the_result(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 1101)
    await stack.broker.close()  # every live publish of the saga's steps fails from here on
    command = Reassign(command_id="pub-1", appointment_id=1101, patient_id=NEW_PATIENT)

    decision = await stack.workflows.reassign(command)

    assert decision.result is not None and decision.result.outcome == "succeeded"
    committed = [r.seq for r in await stack.store.history(1101) if r.command_id == "pub-1"]
    assert committed and [r.seq for r in decision.republish] == committed
    await stack.broker.connect()  # leave the stack whole for its teardown
    await stack.worker.start()


async def test_workflows_left_mid_way_are_resumed_through_the_pipeline_once(stack: Stack, sandbox: Any) -> None:
    """Two processes starting at once both hand the saga back: it is still driven once."""
    seed(sandbox, 1201)
    command = Reassign(command_id="left-1", appointment_id=1201, patient_id=NEW_PATIENT)
    started = await stack.workflows._start(command)  # persisted as a crash would leave it
    assert isinstance(started, tuple) and started[0].state == "requested"

    assert await stack.watcher.resume_unfinished() == 1
    assert await stack.watcher.resume_unfinished() == 1

    result = await stack.result("left-1")
    assert result["outcome"] == "succeeded"
    await eventually(lambda: stack.observer.result_counts.get("left-1") == 2)
    assert sandbox.state.call_count("POST /v1/appointments") == 1
    assert [a["patient_id"] for a in live_in_slot(sandbox)] == [NEW_PATIENT]


# ---- issue 15: the saga while others change the two appointments --------------------------

MOVED = {"start_time": "2030-03-04T12:00:00Z", "finish_time": "2030-03-04T12:30:00Z"}


def replacements_of(sandbox: Any, original_id: int) -> list[dict[str, Any]]:
    return [
        a for a in sandbox.state.all_appointments() if (a.get("metadata") or {}).get("reassigned_from") == original_id
    ]


async def test_original_moved_after_the_first_read_ends_with_the_replacement_at_its_new_time(
    stack: Stack, sandbox: Any
) -> None:
    """Booked where it was read (a first attempt reads once); the cancel's answer shows the move."""
    seed(sandbox, 1301)
    sandbox.state.change_behind_back(1301, MOVED, after_reads=1)  # a receptionist moves it to 12:00

    result = await reassign(stack, 1301)

    assert result["outcome"] == "succeeded"
    [replacement] = replacements_of(sandbox, 1301)
    assert slot_of(replacement) == slot_of({**SLOT, **MOVED}) and replacement["patient_id"] == NEW_PATIENT
    assert result["appointment"]["id"] == replacement["id"]
    assert sandbox.state.get(1301)["state"] == "Cancelled"


async def test_original_moved_while_the_booking_backs_off_is_rebooked_at_its_new_time(
    stack: Stack, sandbox: Any
) -> None:
    seed(sandbox, 1351)
    sandbox.state.fail_next("POST /v1/appointments", 1, 503)  # the worker backs off, then tries again
    sandbox.state.before_call(5, lambda: sandbox.state.change_now(1351, MOVED))  # during that backoff

    result = await reassign(stack, 1351)

    assert result["outcome"] == "succeeded"
    assert sandbox.state.call_count("POST /v1/appointments") == 2
    [replacement] = [a for a in replacements_of(sandbox, 1351) if a["state"] != "Cancelled"]
    assert slot_of(replacement) == slot_of({**SLOT, **MOVED})


async def test_original_moved_after_the_booking_takes_the_replacement_with_it(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 1361)
    sandbox.state.change_behind_back(1361, MOVED, before_next="PUT")  # just before the cancel

    result = await reassign(stack, 1361)

    assert result["outcome"] == "succeeded"
    [replacement] = replacements_of(sandbox, 1361)
    assert slot_of(replacement) == slot_of({**SLOT, **MOVED}) and replacement["state"] == "Pending"
    assert slot_of(result["appointment"]) == slot_of({**SLOT, **MOVED})
    assert "the replacement was moved with it" in result["reasons"]["original"][0]
    assert sandbox.state.get(1361)["state"] == "Cancelled"


@pytest.mark.parametrize("change", ["cancelled", "deleted"])
async def test_replacement_gone_during_the_cancel_s_backoff_keeps_the_original(
    stack: Stack, sandbox: Any, change: str
) -> None:
    """A first attempt's cancel rests on the POST's answer; a retried cancel looks at the replacement again."""
    seed(sandbox, 1401)
    sandbox.state.set_delete_mode("remove")  # a DELETE that cancels is the "cancelled" case

    def someone_else() -> None:
        [replacement] = replacements_of(sandbox, 1401)
        if change == "cancelled":
            sandbox.state.change_now(replacement["id"], {"state": "Cancelled", "appointment_cancellation_reason_id": 2})
        else:
            sandbox.state.delete(replacement["id"])

    sandbox.state.fail_next("PUT /v1/appointments/{id}", 1, 503)
    # Calls: GET original, POST, the reasons list, the failed PUT; then the look before its retry.
    sandbox.state.before_call(5, someone_else)

    result = await reassign(stack, 1401)

    assert result["outcome"] == "failed"
    assert (
        f"was {'made Cancelled' if change == 'cancelled' else 'deleted'} by someone else"
        in result["reasons"]["replacement"][0]
    )
    assert result["reasons"]["original"] == ["left as it was: not cancelled"]
    assert sandbox.state.get(1401)["state"] == "Pending"  # the slot is still held
    assert not [a for a in replacements_of(sandbox, 1401) if a["state"] != "Cancelled"]
    assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 1
    assert stack.observer.dead == []
    assert await workflow_states(stack, 1401) == ["requested", "replacement_created", "compensated"]


async def test_original_deleted_after_the_booking_counts_as_done(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 1501)
    sandbox.state.set_delete_mode("remove")
    sandbox.state.before_call(3, lambda: sandbox.state.delete(1501))  # after the POST (call 2)

    result = await reassign(stack, 1501)

    assert result["outcome"] == "succeeded"
    assert result["reasons"] == {"original": ["deleted by someone else before this saga cancelled it"]}
    [replacement] = replacements_of(sandbox, 1501)
    assert replacement["state"] == "Pending" and result["appointment"]["id"] == replacement["id"]
    assert sandbox.state.get(1501) is None
    assert (await stack.store.get_appointment(1501)).state == "Deleted"  # type: ignore[union-attr]


async def test_a_budget_block_mid_saga_is_driven_to_its_end_without_a_restart(
    amqp_url: str, sqlite_url: str, sandbox: Any
) -> None:
    async with running_stack(
        amqp_url,
        sqlite_url,
        sandbox.url,
        max_deliveries=2,
        pms_max_retry_after=0.2,
        workflow_deadline=2.5,
        watch_interval=0.2,
    ) as stack:
        seed(sandbox, 1601)
        # The cancel is answered with the 403 block, the budget back in 4 s: past what the client
        # waits for in-process, so every delivery fails at once, until the deliveries are spent
        # (then the command is acked, left to its workflow's deadline: not dead-lettered).
        sandbox.state.fail_next("PUT /v1/appointments/{id}", 1, 403, retry_after=4.0)

        command_id = await stack.send({"type": "reassign", "appointment_id": 1601, "patient_id": NEW_PATIENT})
        result = await stack.result(command_id, timeout=20)  # the running service's watcher hands it back

        assert result["outcome"] == "succeeded"
        assert [a["patient_id"] for a in live_in_slot(sandbox)] == [NEW_PATIENT]
        assert sandbox.state.call_count("POST /v1/appointments") == 1
        await asyncio.sleep(0.5)
        assert stack.observer.dead == [] and stack.observer.result_counts[command_id] == 1


async def test_a_post_answer_older_than_the_stored_state_is_not_adopted(stack: Stack, sandbox: Any) -> None:
    """A webhook about the replacement (confirmed at once by SMS) was applied before the saga recorded
    the booking: the POST's older answer must not take the record back to Pending."""
    seed(sandbox, 1701)
    soon = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()  # newer, within the trusted skew
    newer: dict[str, Any] = {"id": FIRST_ID, "state": "Confirmed", "patient_id": NEW_PATIENT, "updated_at": soon}
    await stack.store.commit(
        Commit(
            appointment=AppointmentRecord(
                FIRST_ID, "Confirmed", NEW_PATIENT, upstream_updated_at=newer["updated_at"], data=newer
            )
        )
    )

    result = await reassign(stack, 1701)

    assert result["outcome"] == "succeeded" and result["appointment"]["id"] == FIRST_ID
    stored = await stack.store.get_appointment(FIRST_ID)
    assert stored is not None and stored.state == "Confirmed"
    assert stored.upstream_updated_at == newer["updated_at"]


async def test_a_read_failing_in_the_cancel_step_is_retried_not_compensated(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 1801)
    # The cancel step's read of the original fails past the client's 3 attempts.
    sandbox.state.before_call(6, lambda: sandbox.state.fail_next("GET /v1/appointments/{id}", 3, 503))

    result = await reassign(stack, 1801)

    assert result["outcome"] == "succeeded"
    assert await workflow_states(stack, 1801) == ["requested", "replacement_created", "original_cancelled", "completed"]
    assert [a["patient_id"] for a in live_in_slot(sandbox)] == [NEW_PATIENT]

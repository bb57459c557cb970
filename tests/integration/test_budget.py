"""PMS requests per command, pinned from the sandbox's call log (every request is budget).

A regression that adds a request to a command's protocol fails here. The cancellation
reasons are fetched once per practice and expiry, so each count is taken after a first
command has warmed that cache.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consumer.commands import ReadBeforeWrite, SimpleCommand, execute
from consumer.messages import Cancel, Confirm, EditNotes, SetPatient
from consumer.pms.client import PmsClient
from consumer.reconciler import Reconciler
from consumer.records import Origin, new_record
from consumer.store.base import Commit, Store
from consumer.store.opening import open_store
from tests.stack import Stack, running_stack

PRACTITIONER, PATIENT, NEW_PATIENT = 9, 1013, 2001


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as running:
        yield running


def seed(sandbox: Any, appointment_id: int, hour: int) -> None:
    sandbox.state.seed(
        [
            {
                "id": appointment_id,
                "patient_id": PATIENT,
                "practitioner_id": PRACTITIONER,
                "start_time": f"2032-06-01T{hour:02d}:00:00Z",
                "finish_time": f"2032-06-01T{hour:02d}:30:00Z",
                "reason": "Exam",
                "state": "Pending",
            }
        ]
    )


async def requests_for(stack: Stack, sandbox: Any, command: dict[str, Any]) -> list[str]:
    before = len(sandbox.state.calls)
    command_id = await stack.send(command)
    result = await stack.result(command_id, timeout=30)
    assert result["outcome"] == "succeeded", result
    return list(sandbox.state.calls[before:])


async def test_requests_per_command_on_a_first_attempt(stack: Stack, sandbox: Any) -> None:
    for appointment_id, hour in ((301, 8), (302, 9), (303, 10), (304, 11), (305, 12)):
        seed(sandbox, appointment_id, hour)
    await requests_for(stack, sandbox, {"type": "cancel", "appointment_id": 305, "reason": "Patient cancelled"})

    confirm = await requests_for(stack, sandbox, {"type": "confirm", "appointment_id": 301})
    notes = await requests_for(stack, sandbox, {"type": "edit_notes", "appointment_id": 302, "notes": "x"})
    cancel = await requests_for(
        stack, sandbox, {"type": "cancel", "appointment_id": 303, "reason": "Patient cancelled"}
    )
    reassign = await requests_for(
        stack, sandbox, {"type": "reassign", "appointment_id": 304, "patient_id": NEW_PATIENT}
    )

    read, write = "GET /v1/appointments/{id}", "PUT /v1/appointments/{id}"
    assert confirm == [read, write]
    assert notes == [read, write]
    assert cancel == [read, write]
    # No link-marker list (nothing booked yet), no second read of either appointment.
    assert reassign == [read, "POST /v1/appointments", write]


async def test_spend_by_purpose_is_counted_per_practice(stack: Stack, sandbox: Any) -> None:
    seed(sandbox, 311, 8)
    seed(sandbox, 312, 9)
    await requests_for(stack, sandbox, {"type": "confirm", "appointment_id": 311})
    await requests_for(stack, sandbox, {"type": "reassign", "appointment_id": 312, "patient_id": NEW_PATIENT})
    before = len(sandbox.state.calls)
    await Reconciler(stack.pms, stack.broker, stack.store).poll()
    polled = len(sandbox.state.calls) - before

    # The reassign's 3 and its first look-up of the cancellation reasons are the workflow's.
    assert polled > 0
    assert stack.pms.spent() == {"commands": 2, "workflows": 4, "polling": polled}


# ---- APPT_READ_BEFORE_WRITE: on_conflict against always ----------------------------------

STATES = ("Pending", "Confirmed", "Arrived", "In surgery", "Completed", "Cancelled", "Did not attend")
COMPARED = ("state", "patient_id", "notes", "appointment_cancellation_reason_id", "start_time", "finish_time")


def random_command(rnd: random.Random, appointment_id: int) -> SimpleCommand:
    kind = rnd.choice(("confirm", "cancel", "edit_notes", "set_patient"))
    if kind == "confirm":
        return Confirm(command_id=f"c-{appointment_id}", appointment_id=appointment_id)
    if kind == "cancel":
        return Cancel(
            command_id=f"c-{appointment_id}",
            appointment_id=appointment_id,
            reason=rnd.choice(("Patient cancelled", "Snow")),
        )
    if kind == "edit_notes":
        return EditNotes(
            command_id=f"c-{appointment_id}", appointment_id=appointment_id, notes=rnd.choice(("same", "new notes"))
        )
    return SetPatient(
        command_id=f"c-{appointment_id}", appointment_id=appointment_id, patient_id=rnd.choice((PATIENT, NEW_PATIENT))
    )


async def run_with(
    policy: ReadBeforeWrite,
    appointment_id: int,
    actual: dict[str, Any],
    stored: dict[str, Any],
    command: SimpleCommand,
    pms: PmsClient,
    store: Store,
    sandbox: Any,
) -> tuple[str, dict[str, Any]]:
    """Seed the PMS with ``actual`` and the store with a stale record of ``stored``, run the command."""
    [seeded] = sandbox.state.seed([{**actual, "id": appointment_id}])
    record = new_record(None, stored["state"], stored["patient_id"], {**seeded, **stored}, practice="default")
    await store.commit(Commit(appointment=record))
    decision = await execute(
        command.model_copy(update={"appointment_id": appointment_id}),
        pms,
        store,
        Origin("command", command_id=command.command_id),
        policy,
    )
    assert decision.result is not None
    return decision.result.outcome, {k: sandbox.state.get(appointment_id).get(k) for k in COMPARED}


async def test_on_conflict_ends_every_command_as_always_does(sandbox: Any, sqlite_url: str) -> None:
    """Random stored-vs-actual states: the same outcome and PMS state under both policies,
    and on_conflict never spends more than one request over always."""
    rnd = random.Random(17)
    store = open_store(sqlite_url)
    await store.open()
    async with PmsClient(sandbox.url, "sandbox-token", backoff_base=0.01) as pms:
        await pms.cancellation_reasons()  # warm: both policies share it
        for trial in range(60):
            base = {
                "practitioner_id": PRACTITIONER,
                "reason": "Exam",
                "notes": "same",
                "start_time": f"2033-01-01T{trial % 20:02d}:00:00Z",
                "finish_time": f"2033-01-01T{trial % 20:02d}:30:00Z",
            }
            actual = {**base, "state": rnd.choice(STATES), "patient_id": rnd.choice((None, PATIENT))}
            stored = {
                "state": rnd.choice(STATES),
                "patient_id": rnd.choice((None, PATIENT)),
                "notes": rnd.choice(("same", "older notes")),
            }
            command = random_command(rnd, 1)
            case = f"trial {trial}: actual {actual['state']}/{actual['patient_id']} stored {stored} {command}"
            always = await run_with("always", 10_000 + trial, actual, stored, command, pms, store, sandbox)
            on_conflict = await run_with("on_conflict", 20_000 + trial, actual, stored, command, pms, store, sandbox)
            assert on_conflict == always, case
    await store.close()


async def test_on_conflict_writes_straight_from_a_fresh_record(sandbox: Any, sqlite_url: str) -> None:
    """A record as fresh as a webhook leaves it: 1 request per simple command."""
    store = open_store(sqlite_url)
    await store.open()
    async with PmsClient(sandbox.url, "sandbox-token") as pms:
        await pms.cancellation_reasons()
        actual = {
            "patient_id": None,
            "practitioner_id": PRACTITIONER,
            "reason": "Exam",
            "state": "Pending",
            "start_time": "2033-02-01T09:00:00Z",
            "finish_time": "2033-02-01T09:30:00Z",
        }
        commands: list[SimpleCommand] = [
            Confirm(command_id="a", appointment_id=1),
            EditNotes(command_id="b", appointment_id=1, notes="n"),
            Cancel(command_id="c", appointment_id=1, reason="Patient cancelled"),
            SetPatient(command_id="d", appointment_id=1, patient_id=NEW_PATIENT),
        ]
        for appointment_id, command in enumerate(commands, start=30_000):
            before = len(sandbox.state.calls)
            outcome, _ = await run_with(
                "on_conflict",
                appointment_id,
                actual,
                {"state": "Pending", "patient_id": None},
                command,
                pms,
                store,
                sandbox,
            )
            assert outcome == "succeeded"
            assert sandbox.state.calls[before:] == ["PUT /v1/appointments/{id}"], command
    await store.close()

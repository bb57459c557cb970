"""PMS requests per command, pinned from the sandbox's call log (every request is budget).

A regression that adds a request to a command's protocol fails here. The cancellation
reasons are fetched once per practice and expiry, so each count is taken after a first
command has warmed that cache.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.stack import Stack, running_stack

PRACTITIONER, PATIENT, NEW_PATIENT = 9, 1013, 2001


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as running:
        yield running


def seed(sandbox: Any, appointment_id: int, hour: int) -> None:
    sandbox.state.seed([{
        "id": appointment_id, "patient_id": PATIENT, "practitioner_id": PRACTITIONER,
        "start_time": f"2032-06-01T{hour:02d}:00:00Z", "finish_time": f"2032-06-01T{hour:02d}:30:00Z",
        "reason": "Exam", "state": "Pending",
    }])


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
    cancel = await requests_for(stack, sandbox, {"type": "cancel", "appointment_id": 303,
                                                 "reason": "Patient cancelled"})
    reassign = await requests_for(stack, sandbox, {"type": "reassign", "appointment_id": 304,
                                                   "patient_id": NEW_PATIENT})

    read, write = "GET /v1/appointments/{id}", "PUT /v1/appointments/{id}"
    assert confirm == [read, write]
    assert notes == [read, write]
    assert cancel == [read, write]
    # No link-marker list (nothing booked yet), no second read of either appointment.
    assert reassign == [read, "POST /v1/appointments", write]

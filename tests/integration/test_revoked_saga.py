"""A token revoked mid-reassignment: the saga waits as its practice does, and ends once it is back.

The in-process pipeline (real RabbitMQ, SQLite, the sandbox over HTTP), whose sandbox can
revoke the token at an exact request: just before that request is authorised. The
regressions: a compensation that met a refused token (or a spent budget) spent its attempts
on it and parked in ``compensation_failed``; a refused token waited for a reload only (no probe), and a
probe meeting the same refusal wrote the wait's error line again; and a saga waiting past
its deadline was handed back again, its copy re-sending the result once the first had ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from consumer.sandbox import RunningSandbox, running_sandbox
from consumer.sandbox.state import SandboxState
from consumer.workflows import workflow_id_for
from tests.helpers import eventually
from tests.stack import Stack, running_stack

TOKEN = "sandbox-token"
ORIGINAL, OLD_PATIENT, NEW_PATIENT = 5150, 1013, 2001
SLOT = {"practitioner_id": 7, "start_time": "2030-03-04T10:00:00Z", "finish_time": "2030-03-04T10:30:00Z"}


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    async with running_sandbox(port=0) as running:
        running.state.seed([{"id": ORIGINAL, "patient_id": OLD_PATIENT, "reason": "Exam", "state": "Pending", **SLOT}])
        yield running


def revoke_at(state: SandboxState, route: str) -> None:
    """Revoke the token just before the next request to ``route`` is authorised (once)."""
    revoked = False

    def maybe_revoke() -> None:
        nonlocal revoked
        if not revoked and state.calls[-1] == route:
            revoked = True
            state.set_token("revoked")

    for number in range(1, 20):  # a hook per upcoming request: whichever is the first to ``route``
        state.before_call(number, maybe_revoke)


async def waits(stack: Stack, command_id: str, state: str) -> None:
    """The practice waits on its token, the reassign is parked, its workflow is at ``state``."""
    await eventually(lambda: stack.practices.get("default").status == "token_refused")
    await eventually(lambda: _parked(stack, 1))
    assert await workflow_state(stack, command_id) == state
    assert command_id not in stack.observer.results
    assert stack.observer.dead == []


async def _parked(stack: Stack, count: int) -> bool:
    return await stack.store.parked_counts() == ({"default": count} if count else {})


async def test_a_compensation_meeting_a_revoked_token_waits_instead_of_parking_as_failed(
    amqp_url: str, sqlite_url: str, sandbox: RunningSandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    sandbox.state.refuse_cancel(ORIGINAL)
    revoke_at(sandbox.state, "DELETE /v1/appointments/{id}")
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as stack:
        command_id = await stack.send({"type": "reassign", "appointment_id": ORIGINAL, "patient_id": NEW_PATIENT})
        await waits(stack, command_id, "compensating")
        await asyncio.sleep(0.5)  # several probes (every 0.2 s here) meet the revoked token
        assert await _parked(stack, 1)
        assert capsys.readouterr().out.count("practice waiting") == 1  # one error line, not one per probe

        sandbox.state.set_token(TOKEN)  # accepted again on the PMS's side: no reload

        result = await stack.result(command_id)
        assert result["outcome"] == "failed"
        assert "removed; original left as it was" in result["reasons"]["compensation"][0]
        await eventually(lambda: _parked(stack, 0))
        assert stack.observer.result_counts[command_id] == 1
    kept = [(a["id"] == ORIGINAL, a["state"]) for a in sandbox.state.all_appointments()]  # by id
    assert kept == [(True, "Pending"), (False, "Cancelled")]  # the original kept, the one replacement undone


async def test_a_compensation_meeting_a_spent_budget_waits_for_the_reset(
    amqp_url: str, sqlite_url: str, sandbox: RunningSandbox
) -> None:
    """The other refusal that is no answer about the appointment: the 403 block of a spent budget."""
    sandbox.state.refuse_cancel(ORIGINAL)
    sandbox.state.fail_next("DELETE /v1/appointments/{id}", 1, 403, retry_after=1.0)  # the reset in 1 s
    async with running_stack(amqp_url, sqlite_url, sandbox.url, pms_max_retry_after=0.1) as stack:
        command_id = await stack.send({"type": "reassign", "appointment_id": ORIGINAL, "patient_id": NEW_PATIENT})
        await eventually(lambda: stack.practices.get("default").status == "budget_spent")
        assert await workflow_state(stack, command_id) == "compensating"

        assert (await stack.result(command_id))["outcome"] == "failed"
        assert await workflow_state(stack, command_id) == "compensated"
        assert stack.observer.dead == []


async def workflow_state(stack: Stack, command_id: str) -> str | None:
    workflow = await stack.store.get_workflow(workflow_id_for(command_id))
    return None if workflow is None else workflow.state


@pytest.mark.parametrize(
    ("route", "step"),
    [("POST /v1/appointments", "requested"), ("PUT /v1/appointments/{id}", "replacement_created")],
    ids=["the replacement's booking", "the cancel that links the two"],
)
async def test_a_saga_waiting_past_its_deadline_is_not_handed_back_twice(
    route: str, step: str, amqp_url: str, sqlite_url: str, sandbox: RunningSandbox
) -> None:
    """Its command is parked, and the practice's resume hands it back: the overdue sweep must not
    publish a second copy (once the first has ended, it would re-send the result)."""
    revoke_at(sandbox.state, route)
    async with running_stack(amqp_url, sqlite_url, sandbox.url, workflow_deadline=0.2, watch_interval=0.1) as stack:
        command_id = await stack.send({"type": "reassign", "appointment_id": ORIGINAL, "patient_id": NEW_PATIENT})
        await waits(stack, command_id, step)
        await asyncio.sleep(1.0)  # five deadlines
        assert await _parked(stack, 1)

        sandbox.state.set_token(TOKEN)

        assert (await stack.result(command_id))["outcome"] == "succeeded"
        await eventually(lambda: _parked(stack, 0))
        await asyncio.sleep(0.5)  # room for a second result, if one were coming
        assert stack.observer.result_counts[command_id] == 1
        assert stack.observer.dead == []
    live = [a for a in sandbox.state.all_appointments() if a["state"] != "Cancelled"]
    assert [a["patient_id"] for a in live] == [NEW_PATIENT]

"""Every outside change at every step boundary of the reassignment saga, through the sandbox.

A clean run tells the saga's requests. Then, for each outside change (the original
moved, confirmed, cancelled or deleted; the replacement cancelled, deleted or moved)
and each boundary (before each request, i.e. after the previous answer; after the
last one; and during the retry backoff of each request, a 503 making it retry), a
fresh original in a slot of its own is reassigned through the real pipeline with
the change injected there. After every run the invariants are checked on the
sandbox, and the case -> outcome table is printed (the README quotes it):

- the new patient is never booked twice, and a slot never holds two live appointments;
- a live replacement the saga leaves is in the original's slot (where the original is
  now), unless someone else moved it;
- the slot is never emptied by the saga: if the saga cancelled the original, the
  replacement holds its slot, unless someone changed the replacement after the
  saga's last look at it (just before the cancel, or after the saga ended);
- one result per reassign, never a dead letter, its outcome true to the sandbox.

Deletes run both ways the live PMS may do them (remove, or cancel). The CI form
runs every cell once (63 runs on the 3-request first attempt, ~15 s); the cells are deterministic.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from consumer.sandbox.state import SandboxState
from statemachines.reassignment import slot_of
from tests.stack import Stack, running_stack

PRACTITIONER, ORIGINAL_PATIENT, NEW_PATIENT = 9, 1013, 2001
FIRST_SLOT = datetime(2032, 5, 3, 8, 0, tzinfo=timezone.utc)
LIVE = ("Pending", "Confirmed")
Change = Callable[[SandboxState, int], bool]


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _shift(appointment: dict[str, Any], hours: int) -> dict[str, str]:
    """The appointment's times moved by ``hours`` (each run owns a 4-hour block, so no collisions)."""
    return {k: _iso(datetime.fromisoformat(appointment[k].replace("Z", "+00:00")) + timedelta(hours=hours))
            for k in ("start_time", "finish_time")}


def _replacement(state: SandboxState, original_id: int) -> dict[str, Any] | None:
    for appointment in state.all_appointments():
        if (appointment.get("metadata") or {}).get("reassigned_from") == original_id \
                and appointment["state"] in LIVE:
            return appointment
    return None


def _move(state: SandboxState, appointment: dict[str, Any] | None, hours: int) -> bool:
    if appointment is None or appointment["state"] != "Pending":  # the PMS moves only Pending ones
        return False
    state.change_now(appointment["id"], _shift(appointment, hours))
    return True


def _cancel(state: SandboxState, appointment: dict[str, Any] | None) -> bool:
    if appointment is None or appointment["state"] not in LIVE:
        return False
    state.change_now(appointment["id"], {"state": "Cancelled", "appointment_cancellation_reason_id": 2})
    return True


def _delete(state: SandboxState, appointment: dict[str, Any] | None) -> bool:
    if appointment is None or appointment["state"] not in (*LIVE, "Cancelled"):
        return False
    state.delete(appointment["id"])
    return True


def _confirm(state: SandboxState, appointment: dict[str, Any] | None) -> bool:
    if appointment is None or appointment["state"] != "Pending":
        return False
    state.change_now(appointment["id"], {"state": "Confirmed"})
    return True


CHANGES: dict[str, Change] = {
    "original moved": lambda sb, o: _move(sb, sb.get(o), 2),
    "original confirmed": lambda sb, o: _confirm(sb, sb.get(o)),
    "original cancelled": lambda sb, o: _cancel(sb, sb.get(o)),
    "original deleted": lambda sb, o: _delete(sb, sb.get(o)),
    "original deleted (DELETE cancels)": lambda sb, o: _delete(sb, sb.get(o)),
    "replacement cancelled": lambda sb, o: _cancel(sb, _replacement(sb, o)),
    "replacement deleted": lambda sb, o: _delete(sb, _replacement(sb, o)),
    "replacement deleted (DELETE cancels)": lambda sb, o: _delete(sb, _replacement(sb, o)),
    "replacement moved": lambda sb, o: _move(sb, _replacement(sb, o), 1),
}


@dataclass(frozen=True)
class Boundary:
    request: int  # the change lands just before this request (1-based) of the saga; N+1: after the saga
    backoff: bool  # request ``request`` fails with 503 first; the change lands before its retry

    def label(self, routes: list[str]) -> str:
        if self.request > len(routes):
            return "after the last request"
        name = f"{self.request}:{_short(routes[self.request - 1])}"
        return f"backoff {name}" if self.backoff else f"before {name}"


def _short(route: str) -> str:
    return {"GET /v1/appointments/{id}": "GET", "GET /v1/appointments": "LIST",
            "POST /v1/appointments": "POST", "PUT /v1/appointments/{id}": "PUT"}.get(route, route)


@dataclass
class Run:
    change: str
    boundary: str
    applied: bool
    outcome: str
    story: str


class Interleavings:
    def __init__(self, stack: Stack, sandbox: Any) -> None:
        self.stack = stack
        self.state: SandboxState = sandbox.state
        self.runs = 0

    def seed(self) -> dict[str, Any]:
        self.runs += 1
        start = FIRST_SLOT + timedelta(hours=4 * self.runs)
        return self.state.seed([{
            "id": 80_000 + self.runs, "patient_id": ORIGINAL_PATIENT, "practitioner_id": PRACTITIONER,
            "start_time": _iso(start), "finish_time": _iso(start + timedelta(minutes=30)),
            "reason": "Exam", "state": "Pending",
        }])[0]

    async def reassign(self, original_id: int) -> dict[str, Any]:
        command_id = await self.stack.send({"type": "reassign", "appointment_id": original_id,
                                            "patient_id": NEW_PATIENT})
        return await self.stack.result(command_id, timeout=30)

    async def calibrate(self) -> list[str]:
        """The saga's requests in a run where nobody else changes anything."""
        assert (await self.reassign(self.seed()["id"]))["outcome"] == "succeeded"
        # The cancellation reasons are fetched once per client: a second clean run shows the steady protocol.
        original = self.seed()
        before = len(self.state.calls)
        assert (await self.reassign(original["id"]))["outcome"] == "succeeded"
        return self.state.calls[before:]

    async def run(self, change: str, boundary: Boundary, routes: list[str]) -> Run:
        original = self.seed()
        original_id = original["id"]
        applied: list[bool] = []
        # Whether the live PMS's DELETE removes or cancels is unconfirmed: the saga must be right either way.
        self.state.set_delete_mode("cancel" if "DELETE cancels" in change else "remove")
        if boundary.backoff:
            route = routes[boundary.request - 1]
            self.state.before_call(boundary.request, lambda: self.state.fail_next(route, 1, 503))
            self.state.before_call(boundary.request + 1,
                                   lambda: applied.append(CHANGES[change](self.state, original_id)))
        elif boundary.request <= len(routes):
            self.state.before_call(boundary.request,
                                   lambda: applied.append(CHANGES[change](self.state, original_id)))
        result = await self.reassign(original_id)
        if boundary.request > len(routes):
            applied.append(CHANGES[change](self.state, original_id))
        self.state.clear_call_hooks()  # a hook the run never reached must not fire in the next one
        after_last_look = boundary.request >= len(routes) and not boundary.backoff
        story = check_invariants(self.state, original, result, change, after_last_look and any(applied))
        return Run(change, boundary.label(routes), any(applied), result["outcome"], story)


def check_invariants(
    state: SandboxState, seeded: dict[str, Any], result: dict[str, Any], change: str, changed_after_look: bool
) -> str:
    """Assert the saga's promises on the sandbox; return what happened, as the table's story."""
    original_id = seeded["id"]
    original = state.get(original_id)
    replacements = [a for a in state.all_appointments()
                    if (a.get("metadata") or {}).get("reassigned_from") == original_id]
    live = [a for a in replacements if a["state"] in LIVE]
    original_live = original is not None and original["state"] in LIVE
    # Where the original is now (or was last, if deleted): a move is the only change of its times.
    where = slot_of(original) if original is not None else slot_of(seeded)
    if original is None and change == "original moved":
        where = slot_of({**seeded, **_shift(seeded, 2)})
    cancelled_by_saga = original is not None and original["state"] == "Cancelled" \
        and (result.get("workflow_id") or "-") in (original.get("notes") or "")
    context = f"{change}: result {json.dumps(result['reasons'])} original {original and original['state']} " \
              f"replacements {[(a['id'], a['state'], a['start_time']) for a in replacements]}"

    assert len(live) <= 1, f"the new patient is booked twice: {context}"
    if original_live and live:
        assert slot_of(live[0]) != where, f"two live appointments in one slot: {context}"
    if live and change != "replacement moved":
        assert slot_of(live[0]) == where, f"the replacement is not where the original is: {context}"
    if cancelled_by_saga and not (changed_after_look and change.startswith("replacement")):
        assert live and slot_of(live[0]) == where, f"the saga emptied the slot: {context}"
    if result["outcome"] == "succeeded":
        assert not original_live, f"succeeded, but the original still holds the slot: {context}"
        assert (live and slot_of(live[0]) == where) or changed_after_look, \
            f"succeeded, but the new patient does not hold the slot: {context}"
        assert result["appointment"] and result["appointment"]["patient_id"] == NEW_PATIENT
    else:
        assert not cancelled_by_saga, f"{result['outcome']}, but the saga cancelled the original: {context}"
        assert not (live and slot_of(live[0]) == where), f"{result['outcome']}, but the new patient is in: {context}"
        assert result["reasons"], f"{result['outcome']} without reasons: {context}"
    return story_of(result, original, live, cancelled_by_saga)


def story_of(result: dict[str, Any], original: dict[str, Any] | None, live: list[dict[str, Any]],
             cancelled_by_saga: bool) -> str:
    if original is None:
        fate = "original deleted"
    elif original["state"] == "Cancelled":
        fate = "original cancelled" + ("" if cancelled_by_saga else " (by someone else)")
    else:
        fate = f"original kept ({original['state']})"
    booked = "new patient booked" if live else "no live replacement"
    reasons = result["reasons"]
    note = ""
    if result["outcome"] == "succeeded" and "original" in reasons:
        note = "; " + reasons["original"][0].split(";")[0].split(" to ")[0]
    return f"{result['outcome']}: {fate}, {booked}{note}"


@pytest.fixture
async def stack(amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as running:
        yield running


@pytest.mark.timeout(170)
async def test_every_outside_change_at_every_step_boundary_keeps_the_saga_s_promise(
    stack: Stack, sandbox: Any
) -> None:
    cases = Interleavings(stack, sandbox)
    routes = await cases.calibrate()
    boundaries = [Boundary(k, False) for k in range(1, len(routes) + 2)]
    boundaries += [Boundary(k, True) for k in range(1, len(routes) + 1)]
    runs = [await cases.run(change, boundary, routes) for change in CHANGES for boundary in boundaries]

    assert stack.observer.dead == []
    print(f"\ninterleavings runs={len(runs)} protocol={' '.join(_short(r) for r in routes)}")
    print(table(runs))
    assert sum(run.applied for run in runs) >= len(CHANGES) * 4  # the changes really landed mid-saga


def table(runs: list[Run]) -> str:
    """One line per (case, outcome): the boundaries where it happened; n/a where the change can't apply."""
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for run in runs:
        grouped[(run.change, run.story if run.applied else "n/a (nothing to change there)")].append(run.boundary)
    width = max(len(change) for change, _ in grouped)
    return "\n".join(f"{change:<{width}}  {story}  <- {', '.join(where)}"
                     for (change, story), where in grouped.items())

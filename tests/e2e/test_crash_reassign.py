"""kill -9 of the real `appt serve` in the middle of reassignments: nothing lost, nothing doubled.

The service is killed at every step boundary of the saga (a failpoint
SIGKILLs it at that exact line) and at random instants, then restarted; the
sandbox runs as its own process, so it outlives every crash. Per trial a fresh
appointment in a slot of its own; at the end, in the sandbox: no slot with two
live appointments, no live replacement beside a live original or of a
compensated workflow, and every command answered with its workflow finished.

Outside changes are mixed in: about half the random trials also get a change made
through the PMS API by "someone else" at a random instant of their own (the
original moved, confirmed, cancelled or deleted; the replacement cancelled, deleted
or moved), racing the saga and the kill. Such a trial may end either way; its
result must match its workflow, and the slot holds no two live appointments and is
emptied by nobody but that someone else.

Reproduce a run with ``APPT_E2E_SEED=<seed>`` (printed with the figures).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consumer.broker import Broker
from consumer.failpoints import SAGA_FAILPOINTS
from consumer.messages import Reassign
from consumer.reconciler import parse_time
from consumer.store.opening import open_store
from consumer.workflows import workflow_id_for
from tests.e2e.conftest import Results
from tests.e2e.processes import SandboxProcess, ServiceProcess, service_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

COMPENSATION_FAILPOINTS = frozenset({"before_remove_replacement", "after_remove_replacement"})
MOVED_ORIGINAL_FAILPOINTS = frozenset({"after_move_replacement"})  # reached when the original moves mid-saga
RANDOM_TRIALS = 16
MAX_KILL_DELAY = 0.3
OUTSIDE_CHANGES = (
    "original moved",
    "original confirmed",
    "original cancelled",
    "original deleted",
    "replacement cancelled",
    "replacement deleted",
    "replacement moved",
)
SANDBOX_LATENCY = 0.02
RESULT_TIMEOUT = 20.0
FIRST_SLOT = datetime(2031, 1, 6, 8, 0, tzinfo=UTC)
PRACTITIONER, ORIGINAL_PATIENT, NEW_PATIENT = 3, 1013, 2001


@dataclass
class Trial:
    number: int
    how: str  # the failpoint, or "random kill after N ms"
    refuse_cancel: bool  # the original can't be cancelled: the saga must compensate
    moved_mid_saga: bool = False  # the original is moved just after the cancel step's read of it
    change: str | None = None  # an outside change made at a random instant
    changed: bool = False  # ... and whether it was possible when made (the PMS may refuse it)

    @property
    def original_id(self) -> int:
        return 50_000 + self.number

    @property
    def command_id(self) -> str:
        return f"crash-{self.number}"

    @property
    def start_time(self) -> str:
        return _iso(FIRST_SLOT + timedelta(hours=4 * self.number))  # room for a move of up to 2 h

    @property
    def finish_time(self) -> str:
        return _iso(FIRST_SLOT + timedelta(hours=4 * self.number, minutes=30))

    @property
    def expected(self) -> str:
        return "compensated" if self.refuse_cancel else "completed"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
async def sandbox_process(tmp_path: Path) -> AsyncIterator[SandboxProcess]:
    process = SandboxProcess(tmp_path).start()
    try:
        await process.wait_ready()
        await process.knob("rate_limit", budget=1_000_000)
        yield process
    finally:
        await process.terminate()


async def begin(trial: Trial, sandbox: SandboxProcess, broker: Broker) -> None:
    """Seed the trial's original in its own slot and publish its reassign command."""
    slot = {"start_time": trial.start_time, "finish_time": trial.finish_time}
    await sandbox.knob(
        "seed",
        appointments=[
            {
                "id": trial.original_id,
                "patient_id": ORIGINAL_PATIENT,
                "practitioner_id": PRACTITIONER,
                "reason": "Exam",
                "state": "Pending",
                **slot,
            }
        ],
    )
    if trial.refuse_cancel:
        await sandbox.knob("refuse_cancel", appointment_id=trial.original_id)
    if trial.moved_mid_saga:  # the cancel's answer shows the move, and the replacement is moved after it
        await sandbox.knob("change", appointment_id=trial.original_id, after_reads=1, fields=_shifted(slot, hours=2))
    command = Reassign(command_id=trial.command_id, appointment_id=trial.original_id, patient_id=NEW_PATIENT)
    await broker.publish_inbound(
        command.model_dump_json().encode(), appointment_id=trial.original_id, message_id=trial.command_id
    )


async def test_killed_at_any_instant_a_reassignment_completes_or_compensates_exactly_once(
    amqp_url: str, tmp_path: Path, sandbox_process: SandboxProcess, results: Results
) -> None:
    sandbox = sandbox_process
    seed = int(os.environ.get("APPT_E2E_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    store_url = f"sqlite:///{tmp_path / 'appt.sqlite3'}"
    service = ServiceProcess(service_env(pms_url=sandbox.url, store=store_url, amqp_url=amqp_url), tmp_path)
    broker = Broker(amqp_url)
    await broker.connect()  # declares the topology, so commands can be published before the service runs
    trials: list[Trial] = []
    try:
        for name in sorted(SAGA_FAILPOINTS):
            trial = Trial(
                len(trials),
                name,
                refuse_cancel=name in COMPENSATION_FAILPOINTS,
                moved_mid_saga=name in MOVED_ORIGINAL_FAILPOINTS,
            )
            trials.append(trial)
            await service.start(APPT_FAILPOINTS=name).wait_ready()
            await begin(trial, sandbox, broker)
            assert await service.wait_exit(RESULT_TIMEOUT) == -9, f"{name} was not reached{service.tail()}"
            await service.start().wait_ready()
            await results.wait(trial.command_id, RESULT_TIMEOUT)
            service.kill()

        await sandbox.knob("latency", seconds=SANDBOX_LATENCY)  # so a random kill lands mid-saga
        await service.start().wait_ready()
        for _ in range(RANDOM_TRIALS):
            delay = rng.uniform(0, MAX_KILL_DELAY)
            trial = Trial(len(trials), f"random kill after {delay * 1000:.0f} ms", refuse_cancel=rng.random() < 0.3)
            trials.append(trial)
            if rng.random() < 0.5:
                trial.change = rng.choice(OUTSIDE_CHANGES)
            await begin(trial, sandbox, broker)
            change = asyncio.create_task(outside_change(sandbox, trial, rng.uniform(0, 1.5 * MAX_KILL_DELAY)))
            await asyncio.sleep(delay)
            service.kill()
            await service.start().wait_ready()
            await change
            await results.wait(trial.command_id, RESULT_TIMEOUT)
        await service.terminate()
    finally:
        service.kill()
        await broker.close()

    figures = await tally(trials, sandbox, results, store_url)
    changes = sorted(f"{t.change}{'' if t.changed else ' (not possible then)'}" for t in trials if t.change)
    print(f"\ncrash seed={seed} logs={tmp_path} outside_changes={len(changes)}: {', '.join(changes)}")
    print("crash " + " ".join(f"{k}={v}" for k, v in figures.items()))
    assert figures["trials"] >= 20
    assert figures["double_bookings"] == 0
    assert figures["orphans"] == 0
    assert figures["empty_slots"] == 0
    assert figures["lost"] == 0
    assert figures["unexpected"] == 0


async def outside_change(sandbox: SandboxProcess, trial: Trial, delay: float) -> None:
    """Someone else changes one of the two appointments through the PMS API (refused if the PMS won't)."""
    if trial.change is None:
        return
    await asyncio.sleep(delay)
    whose, what = trial.change.split()
    appointments = await sandbox.appointments()
    if whose == "original":
        targets = [a for a in appointments if a["id"] == trial.original_id]
    else:
        targets = [
            a
            for a in appointments
            if (a.get("metadata") or {}).get("reassigned_from") == trial.original_id and a["state"] != "Cancelled"
        ]
    if not targets:
        return
    target = targets[0]
    path = f"/v1/appointments/{target['id']}"
    if what == "deleted":
        status = await sandbox.api("DELETE", path)
    else:
        fields = {
            "moved": _shifted(target, hours=2 if whose == "original" else 1),
            "confirmed": {"state": "Confirmed"},
            "cancelled": {"state": "Cancelled", "appointment_cancellation_reason_id": 2},
        }[what]
        status = await sandbox.api("PUT", path, {"appointment": fields})
    trial.changed = status < 300


def _shifted(appointment: dict[str, Any], hours: int) -> dict[str, str]:
    return {
        k: _iso(datetime.fromisoformat(appointment[k].replace("Z", "+00:00")) + timedelta(hours=hours))
        for k in ("start_time", "finish_time")
    }


async def tally(trials: list[Trial], sandbox: SandboxProcess, results: Results, store_url: str) -> dict[str, int]:
    """What the sandbox, the results and the store say of each trial, as the printed figures."""
    appointments = await sandbox.appointments()
    live = [a for a in appointments if a["state"] != "Cancelled"]
    store = open_store(store_url)
    await store.open()
    try:
        workflows = {t.command_id: await store.get_workflow(workflow_id_for(t.command_id)) for t in trials}
    finally:
        await store.close()
    figures = dict.fromkeys(
        ("trials", "completed", "compensated", "double_bookings", "orphans", "empty_slots", "lost", "unexpected"), 0
    )
    figures["trials"] = len(trials)
    for trial in trials:
        workflow = workflows[trial.command_id]
        state = workflow.state if workflow else None
        result = results.received.get(trial.command_id)
        changed = trial.change if trial.changed else None
        original = next((a for a in appointments if a["id"] == trial.original_id), None)
        start = original["start_time"] if original else trial.start_time  # where the original is now
        in_slot = [
            a for a in live if parse_time(a["start_time"]) == parse_time(start) and a["practitioner_id"] == PRACTITIONER
        ]
        original_live = any(a["id"] == trial.original_id for a in live)
        replacements = [
            a
            for a in (in_slot if changed == "replacement moved" else live)  # moved: someone else's
            if (a.get("metadata") or {}).get("reassigned_from") == trial.original_id
        ]
        problems = []
        rejected = result is not None and result["outcome"] == "rejected" and changed is not None
        if result is None or (state not in ("completed", "compensated") and not rejected):
            figures["lost"] += 1
            problems.append(f"lost: result={result and result['outcome']} workflow={state}")
        elif state is not None:
            figures[state] += 1
        if len(in_slot) > 1:
            figures["double_bookings"] += 1
            problems.append(f"double booking: {[a['id'] for a in in_slot]}")
        # Cancelled, deleted, or the replacement moved away (after the saga's last look at it).
        someone_else_emptied = changed is not None and (
            changed.split()[1] in ("cancelled", "deleted") or changed == "replacement moved"
        )
        if not in_slot and not someone_else_emptied:
            figures["empty_slots"] += 1
            problems.append("no live appointment left in the slot")
        if replacements and (original_live or state == "compensated"):
            figures["orphans"] += 1
            problems.append(f"orphan replacement(s) {[a['id'] for a in replacements]}")
        if changed is None and state is not None and state != trial.expected:
            figures["unexpected"] += 1
            problems.append(f"ended {state}, expected {trial.expected}")
        expected_outcome = {"completed": "succeeded", "compensated": "failed", None: "rejected"}.get(
            state if changed else trial.expected
        )
        if result is not None and result["outcome"] != expected_outcome:
            figures["unexpected"] += 1
            problems.append(f"result {result['outcome']}: {result['reasons']}")
        if problems:
            print(f"trial {trial.number} ({trial.how}, {trial.change}): " + "; ".join(problems))
    return figures

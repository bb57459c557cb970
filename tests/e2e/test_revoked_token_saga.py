"""The practice's token revoked in the middle of a reassignment: the saga waits, then ends once.

The real `appt serve` and `appt sandbox` processes, one practice (``north``) from a practices
file. A 401 is timed at one request of the saga with the sandbox's ``fail`` knob (the
sandbox runs as its own process, so that is the one exact trigger it offers), and as soon
as the practice is seen waiting its token is revoked for real (``token`` knob): every later
request with it gets 401 too, as with a revoked token. The kill -9 case revokes the token
while the service is down, after a failpoint killed it between the cancel and its record.

While revoked: the practice is ``token_refused``, the reassign is parked (not failed, not
dead-lettered, no result), the workflow stays at its step, and the log has the error line.
Then the token comes back, by a new token in the file and SIGHUP, or by the PMS accepting
the old one again (no reload: the practice's probe finds it), and the saga completes or
compensates: one live appointment in the slot, no orphaned replacement, the original as
expected, and one result.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consumer.broker import Broker
from consumer.messages import Reassign
from consumer.store.base import DeadLetterQuery, WorkflowRecord
from consumer.store.opening import open_store
from consumer.workflows import workflow_id_for
from tests.e2e.conftest import Results
from tests.e2e.processes import SandboxProcess, ServiceProcess, get_json, service_env, write_practices
from tests.helpers import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

PRACTICE, ORIGINAL, PRACTITIONER = "north", 4242, 1
OLD_PATIENT, NEW_PATIENT = 1013, 2001
SLOT = {"start_time": "2031-02-03T09:00:00Z", "finish_time": "2031-02-03T09:30:00Z"}
TOKEN, ROTATED = "sandbox-token", "rotated-token"
PROBE_INTERVAL = 3
"""Seconds: the test revokes the token for real within this of the injected 401 (a probe before
that would meet the old token still valid); shorter than the default 5 s, for the probe cases."""


@dataclass(frozen=True)
class Case:
    step: str
    waits_in: str  # the workflow's state while the practice waits
    ends: str  # completed or compensated
    restore: str  # "sighup": a new token in the file; "sandbox": the PMS takes the old one again
    refused_route: str | None = None  # the request answered 401 in flight
    failpoint: str | None = None  # or: killed here, and the token revoked while the service is down

    @property
    def refuse_cancel(self) -> bool:
        return self.ends == "compensated"


CASES = [
    Case(
        "after booking the replacement",
        "replacement_created",
        "completed",
        "sighup",
        refused_route="GET /v1/appointment_cancellation_reasons",
    ),  # fmt: skip
    Case(
        "before linking (the cancel's PUT)",
        "replacement_created",
        "completed",
        "sandbox",
        refused_route="PUT /v1/appointments/{id}",
    ),  # fmt: skip
    Case(
        "after cancelling the original, killed",
        "replacement_created",
        "completed",
        "sighup",
        failpoint="after_cancel_original",
    ),  # fmt: skip
    Case(
        "compensating (the replacement's DELETE)",
        "compensating",
        "compensated",
        "sandbox",
        refused_route="DELETE /v1/appointments/{id}",
    ),  # fmt: skip
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.step}, restored by {c.restore}")
async def test_a_token_revoked_mid_reassignment_waits_and_the_saga_ends_once_restored(
    case: Case, amqp_url: str, tmp_path: Path, results: Results
) -> None:
    sandbox = SandboxProcess(tmp_path).start()
    practices_file = tmp_path / "practices.toml"
    store_url = f"sqlite:///{tmp_path / 'appt.sqlite3'}"
    service = ServiceProcess(
        service_env(
            pms_url=sandbox.url,
            store=store_url,
            amqp_url=amqp_url,
            APPT_PRACTICES_FILE=str(practices_file),
            APPT_PRACTICE_PROBE_INTERVAL=str(PROBE_INTERVAL),
        ),
        tmp_path,
    )
    broker = Broker(amqp_url)
    command = Reassign(command_id="revoke-1", appointment_id=ORIGINAL, practice=PRACTICE, patient_id=NEW_PATIENT)
    try:
        await sandbox.wait_ready()
        await seed(sandbox, case)
        write_practices(practices_file, sandbox.url, TOKEN)
        await broker.connect()
        await reassign_until_refused(case, service, sandbox, broker, command)

        await eventually(lambda: north_is(service, status="token_refused"), timeout=20)
        await sandbox.knob("token", token=ROTATED)  # revoked for real (done already when killed)
        await asyncio.sleep(0.5)  # a saga that does not wait goes on (and fails) within this
        workflow = await stored_workflow(store_url, command)
        assert workflow is not None and workflow.state == case.waits_in, workflow
        row = await north_is(service, status="token_refused")
        assert row and row["waiting_messages"] >= 1, row
        assert results.of(command.command_id) == [], "answered while the token is refused"
        assert waiting_lines(service), "no error line for the wait"

        if case.restore == "sighup":
            write_practices(practices_file, sandbox.url, ROTATED)
            assert service.pid is not None
            os.kill(service.pid, signal.SIGHUP)
        else:
            await sandbox.knob("token", token=TOKEN)  # the old token is valid again: no reload
        await eventually(lambda: results.of(command.command_id), timeout=20)
        await eventually(lambda: north_is(service, status="ok", waiting_messages=0), timeout=10)
        await asyncio.sleep(0.5)  # room for a second result, if one were coming
        await service.terminate()

        workflow = await stored_workflow(store_url, command)
        assert workflow is not None and workflow.state == case.ends, workflow
        await check_the_slot(sandbox, case)
        outcomes = Counter(r["outcome"] for r in results.of(command.command_id))
        expected = "succeeded" if case.ends == "completed" else "failed"
        print(
            f"\nrevoke step={case.step!r} restore={case.restore} waited_in={case.waits_in} parked={row['waiting_messages']}"
            f" ended={workflow.state} results={dict(outcomes)} waiting_error_lines={len(waiting_lines(service))}"
        )
        if case.failpoint is None:
            assert outcomes == {expected: 1}
        else:  # a kill between commit and ack re-sends the same result (observers de-duplicate)
            assert set(outcomes) == {expected}
        assert await dead_letters(store_url) == []
    finally:
        service.kill()
        await broker.close()
        await sandbox.terminate()


def waiting_lines(service: ServiceProcess) -> list[dict[str, Any]]:
    """The error lines of every start of this service saying its practice waits."""
    lines = [json.loads(line) for path in sorted(service.log_dir.glob("service.*.log")) for line in _json(path)]
    return [line for line in lines if line["event"].startswith("practice waiting") and line["level"] == "error"]


def _json(path: Path) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if line.startswith("{")]


async def seed(sandbox: SandboxProcess, case: Case) -> None:
    original = {"id": ORIGINAL, "patient_id": OLD_PATIENT, "practitioner_id": PRACTITIONER, "reason": "Exam"}
    await sandbox.knob("seed", appointments=[{**original, **SLOT, "state": "Pending"}])
    if case.refuse_cancel:
        await sandbox.knob("refuse_cancel", appointment_id=ORIGINAL)
    if case.refused_route is not None:
        await sandbox.knob("fail", route=case.refused_route, status=401, count=1)


async def reassign_until_refused(
    case: Case, service: ServiceProcess, sandbox: SandboxProcess, broker: Broker, command: Reassign
) -> None:
    """Send the reassign; with a failpoint, the token is revoked while the killed service is down."""
    overrides = {"APPT_FAILPOINTS": case.failpoint} if case.failpoint else {}
    await service.start(**overrides).wait_ready()
    await broker.publish_inbound(
        command.model_dump_json().encode(),
        practice=PRACTICE,
        appointment_id=ORIGINAL,
        message_id=command.command_id,
    )
    if case.failpoint is not None:
        assert await service.wait_exit(20) == -9, f"{case.failpoint} was not reached{service.tail()}"
        await sandbox.knob("token", token=ROTATED)
        await service.start().wait_ready()


async def north_is(service: ServiceProcess, **expected: Any) -> dict[str, Any] | None:
    """North's row of GET /practices if it shows ``expected``."""
    _, body = await get_json(f"{service.url}/practices")
    row: dict[str, Any] = body["practices"][0]
    return row if all(row[k] == v for k, v in expected.items()) else None


async def stored_workflow(store_url: str, command: Reassign) -> WorkflowRecord | None:
    store = open_store(store_url)
    await store.open()
    try:
        return await store.get_workflow(workflow_id_for(command.command_id, command.practice))
    finally:
        await store.close()


async def dead_letters(store_url: str) -> list[Any]:
    store = open_store(store_url)
    await store.open()
    try:
        return list(await store.dead_letters(DeadLetterQuery(status=None)))
    finally:
        await store.close()


async def check_the_slot(sandbox: SandboxProcess, case: Case) -> None:
    """One live appointment in the slot, no live replacement beside a live original, the original as expected."""
    appointments = await sandbox.appointments()
    live = [a for a in appointments if a["state"] != "Cancelled"]
    in_slot = [a for a in live if a["start_time"].startswith("2031-02-03T09:00")]
    assert len(in_slot) == 1, f"double booking or empty slot: {in_slot}"
    replacements = [a for a in appointments if (a.get("metadata") or {}).get("reassigned_from") == ORIGINAL]
    assert len(replacements) == 1, f"booked {len(replacements)} replacements"
    original = next(a for a in appointments if a["id"] == ORIGINAL)
    if case.ends == "completed":
        assert (original["state"], in_slot[0]["id"]) == ("Cancelled", replacements[0]["id"])
        assert in_slot[0]["patient_id"] == NEW_PATIENT
    else:  # the replacement undone: cancelled, as this sandbox's DELETE does
        assert (original["state"], original["patient_id"], in_slot[0]["id"]) == ("Pending", OLD_PATIENT, ORIGINAL)
        assert replacements[0]["state"] == "Cancelled"

"""Two practices, two PMS sandboxes (distinct tokens, overlapping appointment ids), one service.

Everything is keyed by (practice, appointment id): commands, webhooks, records,
history, results and workflows of one practice never touch the other's.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from consumer.practices import load_configs
from consumer.sandbox import RunningSandbox, running_sandbox
from consumer.settings import Settings
from consumer.signing import sign
from consumer.webhooks import BROKER_KEY, STORE_KEY, create_app
from tests.helpers import eventually, served
from tests.stack import Stack, running_stack

SECRETS = {
    name: "whsec_" + base64.b64encode(f"{name}-secret-for-tests".encode()).decode() for name in ("north", "south")
}
SHARED_ID = 800000000  # not 900000000: the sandbox allocates from there, and seeding does not move it on
API_TOKEN = "t"


@dataclass
class Practices:
    stack: Stack
    sandboxes: dict[str, RunningSandbox]
    url: str  # the service's HTTP base

    def seed(self, practice: str, **fields: Any) -> dict[str, Any]:
        defaults = {
            "id": SHARED_ID,
            "patient_id": 1013,
            "practitioner_id": 1,
            "reason": "Exam",
            "start_time": "2030-01-02T09:00:00Z",
            "finish_time": "2030-01-02T09:30:00Z",
            "state": "Pending",
        }
        return self.sandboxes[practice].state.seed([{**defaults, **fields}])[0]  # type: ignore[no-any-return]

    async def stored(self, practice: str, appointment_id: int = SHARED_ID) -> Any:
        return await self.stack.store.get_appointment(appointment_id, practice)


def practices_file(tmp_path: Path, sandboxes: dict[str, RunningSandbox]) -> Settings:
    path = tmp_path / "practices.toml"
    path.write_text(
        "".join(
            f'[practices.{name}]\npms_url = "{sb.url}"\ntoken = "{name}-token"\n'
            f'webhook_secrets = ["{SECRETS[name]}"]\n\n'
            for name, sb in sandboxes.items()
        )
    )
    return Settings(practices_file=str(path), api_token=API_TOKEN)


@pytest.fixture
async def two(amqp_url: str, sqlite_url: str, tmp_path: Path) -> AsyncIterator[Practices]:
    async with running_sandbox(token="north-token") as north, running_sandbox(token="south-token") as south:
        sandboxes = {"north": north, "south": south}
        settings = practices_file(tmp_path, sandboxes)
        async with running_stack(amqp_url, sqlite_url, north.url, practices=load_configs(settings)) as stack:

            async def resources(app: web.Application) -> AsyncIterator[None]:
                app[BROKER_KEY] = stack.broker
                app[STORE_KEY] = stack.store
                yield

            async with served(create_app(settings, resources)) as url:
                for name, sb in sandboxes.items():
                    sb.state.set_webhook_retry_delay(0.1)
                    sb.state.subscribe(f"{url}/webhooks/pms/{name}", SECRETS[name])
                yield Practices(stack, sandboxes, url)


async def test_the_same_appointment_id_in_two_practices_is_kept_apart(two: Practices) -> None:
    two.seed("north", patient_id=1)
    two.seed("south", patient_id=2)
    await eventually(lambda: two.stored("north"))
    await eventually(lambda: two.stored("south"))
    assert (await two.stored("north")).patient_id == 1
    assert (await two.stored("south")).patient_id == 2
    assert await two.stack.store.get_appointment(SHARED_ID) is None  # no default practice here

    command_id = await two.stack.send({"type": "confirm", "appointment_id": SHARED_ID, "practice": "south"})
    result = await two.stack.result(command_id)

    assert (result["outcome"], result["practice"]) == ("succeeded", "south")
    assert two.sandboxes["south"].state.get(SHARED_ID)["state"] == "Confirmed"
    assert two.sandboxes["north"].state.get(SHARED_ID)["state"] == "Pending"
    assert "PUT /v1/appointments/{id}" not in two.sandboxes["north"].state.calls
    assert (await two.stored("north")).state == "Pending"
    south_history = await two.stack.store.history(SHARED_ID, practice="south")
    assert {r.practice for r in south_history} == {"south"}
    assert [r.to_state for r in south_history][-1] == "Confirmed"
    assert all(r.to_state == "Pending" for r in await two.stack.store.history(SHARED_ID, practice="north"))
    published = [r for r in two.stack.observer.logs if r["command_id"] == command_id]
    assert published and {r["practice"] for r in published} == {"south"}


async def test_the_same_command_id_in_two_practices_is_two_commands(two: Practices) -> None:
    two.seed("north")
    two.seed("south")
    for practice in ("north", "south"):
        await two.stack.send(
            {
                "type": "edit_notes",
                "appointment_id": SHARED_ID,
                "practice": practice,
                "command_id": "partner-1",
                "notes": f"for {practice}",
            }
        )
    await eventually(lambda: two.sandboxes["north"].state.get(SHARED_ID)["notes"] == "for north")
    await eventually(lambda: two.sandboxes["south"].state.get(SHARED_ID)["notes"] == "for south")


async def test_a_reassignment_runs_against_its_own_practice(two: Practices) -> None:
    two.seed("north", patient_id=1013)
    two.seed("south", patient_id=1013)
    command_id = await two.stack.send(
        {"type": "reassign", "appointment_id": SHARED_ID, "practice": "north", "patient_id": 1014}
    )
    result = await two.stack.result(command_id)

    assert (result["outcome"], result["practice"]) == ("succeeded", "north")
    assert result["workflow_id"] == f"reassign-north.{command_id}"
    north = two.sandboxes["north"].state.all_appointments()
    assert sorted((a["patient_id"], a["state"]) for a in north) == [(1013, "Cancelled"), (1014, "Pending")]
    assert [a["state"] for a in two.sandboxes["south"].state.all_appointments()] == ["Pending"]
    workflow = await two.stack.store.get_workflow(result["workflow_id"])
    assert workflow is not None and (workflow.practice, workflow.state) == ("north", "completed")


async def test_a_command_for_an_unknown_practice_is_rejected(two: Practices) -> None:
    command_id = await two.stack.send({"type": "confirm", "appointment_id": SHARED_ID, "practice": "west"})
    result = await two.stack.result(command_id)
    assert (result["outcome"], result["reasons"]) == ("rejected", {"practice": ["unknown practice"]})
    assert not two.stack.observer.dead


async def _post(url: str, body: bytes, secret: str) -> int:
    webhook_id, now = f"msg_{time.time_ns()}", int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, webhook_id, now, body),
    }
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as answer:
        return answer.status


async def test_a_webhook_is_verified_with_its_own_practices_secrets_only(two: Practices) -> None:
    body = json.dumps(
        {
            "type": "appointment.created",
            "data": {
                "appointment": {"id": 5, "state": "Pending", "patient_id": 7, "updated_at": "2026-01-01T00:00:00Z"}
            },
        }
    ).encode()

    assert await _post(f"{two.url}/webhooks/pms/south", body, SECRETS["north"]) == 401
    assert await _post(f"{two.url}/webhooks/pms", body, SECRETS["north"]) == 404  # no default practice
    assert await _post(f"{two.url}/webhooks/pms/west", body, SECRETS["north"]) == 404
    assert await _post(f"{two.url}/webhooks/pms/north", body, SECRETS["north"]) == 202

    await eventually(lambda: two.stored("north", 5))
    assert await two.stored("south", 5) is None


async def test_the_read_routes_name_the_practice(two: Practices) -> None:
    two.seed("south", patient_id=2)
    await eventually(lambda: two.stored("south"))
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.get(f"{two.url}/practices/south/appointments/{SHARED_ID}") as answer:
            assert answer.status == 200
            assert (await answer.json())["practice"] == "south"
        async with http.get(f"{two.url}/practices/north/appointments/{SHARED_ID}/history") as answer:
            assert answer.status == 404
        async with http.get(f"{two.url}/practices/south/appointments/{SHARED_ID}/history") as answer:
            records = (await answer.json())["records"]
            assert records and {r["practice"] for r in records} == {"south"}
        async with http.get(f"{two.url}/practices/west/appointments/{SHARED_ID}") as answer:
            assert (answer.status, await answer.json()) == (404, {"error": "unknown practice"})

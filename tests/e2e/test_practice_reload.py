"""`appt serve` with a practices file: a refused token makes the practice wait (visible in
`appt practices`, /readyz, /practices), and SIGHUP after fixing the file drains its backlog in order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from consumer.broker import Broker
from tests.e2e.processes import APPT, SandboxProcess, ServiceProcess, get_json, service_env, write_practices
from tests.helpers import eventually

pytestmark = pytest.mark.e2e
APPOINTMENT = 4242


async def test_a_refused_token_waits_and_sighup_with_the_fixed_file_drains_it_in_order(
    amqp_url: str, tmp_path: Path
) -> None:
    sandbox = SandboxProcess(tmp_path).start()
    await sandbox.wait_ready()
    await sandbox.knob(
        "seed",
        appointments=[
            {
                "id": APPOINTMENT,
                "patient_id": 1013,
                "practitioner_id": 1,
                "start_time": "2031-02-03T09:00:00Z",
                "finish_time": "2031-02-03T09:30:00Z",
                "state": "Pending",
            }
        ],
    )
    practices_file = tmp_path / "practices.toml"
    write_practices(practices_file, sandbox.url, "revoked")
    env = service_env(
        pms_url=sandbox.url,
        store=f"sqlite:///{tmp_path / 'appt.sqlite3'}",
        amqp_url=amqp_url,
        APPT_PRACTICES_FILE=str(practices_file),
    )
    service = ServiceProcess(env, tmp_path).start()
    broker = Broker(amqp_url)
    try:
        await service.wait_ready()
        await broker.connect()
        for n in range(3):
            body = {
                "type": "edit_notes",
                "command_id": f"reload-{n}",
                "appointment_id": APPOINTMENT,
                "practice": "north",
                "notes": f"note {n}",
            }
            await broker.publish_inbound(
                json.dumps(body).encode(), practice="north", appointment_id=APPOINTMENT, message_id=body["command_id"]
            )

        async def north() -> dict[str, Any]:
            return (await get_json(f"{service.url}/practices"))[1]["practices"][0]  # type: ignore[no-any-return]

        await eventually(lambda: _row_is(north(), status="token_refused", waiting_messages=3), timeout=20)
        status, ready = await get_json(f"{service.url}/readyz")
        assert (status, ready["status"], ready["waiting_practices"]) == (200, "ready", ["north"])
        listed = subprocess.run(
            [str(APPT), "practices", "--json"], capture_output=True, text=True, timeout=30, env={**os.environ, **env}
        )
        assert listed.returncode == 0, listed.stderr
        row = json.loads(listed.stdout)
        assert (row["practice"], row["status"], row["waiting_messages"]) == ("north", "token_refused", 3)
        table = subprocess.run(
            [str(APPT), "practices"], capture_output=True, text=True, timeout=30, env={**os.environ, **env}
        )
        print(table.stdout)
        assert table.stdout.split()[:4] == ["north", "token_refused", "waiting", "3"]
        assert "practice waiting" in service.log_text()

        write_practices(practices_file, sandbox.url, "sandbox-token")
        assert service.pid is not None
        os.kill(service.pid, signal.SIGHUP)

        await eventually(lambda: _row_is(north(), status="ok", waiting_messages=0), timeout=20)
        notes = [a["notes"] for a in await sandbox.appointments() if a["id"] == APPOINTMENT]
        assert notes == ["note 2"]  # the last one sent
        assert "practices reloaded" in service.log_text()
    finally:
        await broker.close()
        await service.terminate()
        await sandbox.terminate()


async def _row_is(row: Any, **expected: Any) -> bool:
    found = await row
    return all(found[key] == value for key, value in expected.items())

"""`appt serve` prunes in the background: a processed message's inbox entry goes once past
its retention, and the metrics say so."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from consumer.broker import Broker
from tests.e2e.processes import ServiceProcess, service_env
from tests.helpers import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


async def test_serve_prunes_the_inbox_past_its_retention_and_reports_it(
    amqp_url: str, sandbox: Any, tmp_path: Path
) -> None:
    sandbox.state.seed(
        [
            {
                "id": 80_001,
                "patient_id": 1013,
                "practitioner_id": 1,
                "state": "Pending",
                "start_time": "2031-02-03T09:00:00Z",
                "finish_time": "2031-02-03T09:30:00Z",
            }
        ]
    )
    service = ServiceProcess(
        service_env(
            pms_url=sandbox.url,
            store=f"sqlite:///{tmp_path / 'appt.sqlite3'}",
            amqp_url=amqp_url,
            APPT_INBOX_RETENTION="1",
            APPT_PRUNE_INTERVAL="0.2",
        ),
        tmp_path,
    )
    service.start()
    try:
        await service.wait_ready()
        broker = Broker(amqp_url)
        await broker.connect()
        try:
            body = {"type": "edit_notes", "command_id": "prune-me", "appointment_id": 80_001, "notes": "n"}
            await broker.publish_inbound(json.dumps(body).encode(), appointment_id=80_001, message_id="prune-me")
        finally:
            await broker.close()

        async def pruned_inbox_rows() -> float:
            async with aiohttp.ClientSession() as http, http.get(f"{service.url}/metrics") as response:
                text = await response.text()
            found = re.search(r'^appt_pruned_rows_total\{table="inbox"\} (\S+)$', text, re.M)
            return float(found.group(1)) if found else 0.0

        assert await eventually(pruned_inbox_rows, timeout=20) == 1.0
        assert sandbox.state.get(80_001)["notes"] == "n"
    finally:
        await service.terminate()
    assert '"pruned"' in service.log_text()

"""`appt sandbox` as operators start it: its token and the unconfirmed live behaviours are flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.pms import NotFound, PmsClient, Unauthorised
from tests.e2e.processes import SandboxProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

WINDOW = {"after": "2030-01-01T00:00:00Z", "before": "2030-02-01T00:00:00Z"}
SLOT = {"practitioner_id": 1, "start_time": "2030-01-07T09:00:00Z", "finish_time": "2030-01-07T09:30:00Z"}


async def test_token_updated_after_and_delete_flags(tmp_path: Path) -> None:
    sandbox = SandboxProcess(
        tmp_path, None, "sandbox", "--token", "practice-7", "--updated-after", "honoured", "--delete", "remove"
    ).start()
    try:
        await sandbox.wait_ready()
        async with PmsClient(sandbox.url, "sandbox-token", retry_attempts=1) as stranger:
            with pytest.raises(Unauthorised):
                await stranger.list_appointments(**WINDOW)
        async with PmsClient(sandbox.url, "practice-7", retry_attempts=1) as pms:
            first = await pms.create_appointment(SLOT)
            second = await pms.create_appointment({**SLOT, "practitioner_id": 2})
            assert first.updated_at is not None
            newer = await pms.list_appointments(**WINDOW, updated_after=first.updated_at)
            assert [a.id for a in newer] == [second.id]  # honoured
            await pms.delete_appointment(first.id)
            with pytest.raises(NotFound):
                await pms.get_appointment(first.id)  # removed, not cancelled
            await sandbox.knob("token", token="reissued")
            with pytest.raises(Unauthorised):
                await pms.get_appointment(second.id)
    finally:
        await sandbox.terminate()

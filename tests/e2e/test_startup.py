"""`appt serve` with a dependency down fails fast, with one line an operator can act on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.e2e
APPT = str(Path(sys.executable).with_name("appt"))


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "APPT_STORE": f"sqlite:///{tmp_path / 'appt.sqlite3'}",
        "APPT_HTTP_PORT": str(free_port()),
        "APPT_RECONCILE_INTERVAL": "0",
        **env,
    }
    return subprocess.run([APPT, "serve"], env=environment, capture_output=True, text=True, timeout=60)


def test_an_unreachable_broker_stops_start_up_with_exit_1(tmp_path: Path) -> None:
    finished = serve(tmp_path, APPT_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    assert finished.returncode == 1
    assert finished.stderr.strip().splitlines()[-1].startswith("appt serve: could not start: AMQPConnectionError")


def test_an_unreachable_store_stops_start_up_with_exit_1(tmp_path: Path) -> None:
    finished = serve(tmp_path, APPT_STORE=f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    assert finished.returncode == 1
    assert "could not start: StoreUnavailable" in finished.stderr


def test_a_bad_setting_names_its_variable_and_exits_3(tmp_path: Path) -> None:
    finished = serve(tmp_path, APPT_PREFETCH="lots")
    assert finished.returncode == 3
    assert "APPT_PREFETCH" in finished.stderr

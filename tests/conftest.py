"""Shared fixtures: real RabbitMQ (an isolated vhost), real PostgreSQL, sandbox over HTTP.

Services are never mocked, and a missing one fails the test instead of
skipping it, so a green run means the integration tests really ran.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
PG_URL = os.environ.get("APPT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_configure(config: pytest.Config) -> None:
    """In-process services log through structlog's defaults here, whose console renderer
    draws each exception as a rich traceback with every frame's locals: tens of
    milliseconds of the event loop per logged failure, enough to time out a confirm on a
    slow machine. A plain traceback says the same for a test's output."""
    default = structlog.get_config()["processors"]
    structlog.configure(
        processors=[*default[:-1], structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]
    )


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """A missing service fails the test, never skips it: a green run means it really ran."""
    if not _answers(host, port):
        pytest.fail(f"{name} does not answer on {host}:{port} (scripts/services.sh postgres starts it)")


MANAGEMENT_PORT = 15672


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def _management(method: str, path: str, body: dict[str, str] | None = None) -> None:
    """RabbitMQ's HTTP API (the management plugin, which `scripts/services.sh postgres` enables)."""
    request = urllib.request.Request(
        f"http://{RABBIT_HOST}:{MANAGEMENT_PORT}/api/{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


def make_vhost() -> str:
    """A fresh vhost, so tests never see each other's queues or bindings.

    Through the HTTP API when the management plugin answers (~30 ms); each
    rabbitmqctl call starts an Erlang VM (~0.7 s and a core), which made
    vhosts a third of the suite's time.
    """
    name = f"appt-test-{uuid.uuid4().hex[:10]}"
    if _answers(RABBIT_HOST, MANAGEMENT_PORT):
        _management("PUT", f"vhosts/{name}", {})
        _management("PUT", f"permissions/{name}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    else:
        _rabbitmqctl("add_vhost", name)
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


def drop_vhost(name: str) -> None:
    if _answers(RABBIT_HOST, MANAGEMENT_PORT):
        with contextlib.suppress(urllib.error.URLError):
            _management("DELETE", f"vhosts/{name}")
    else:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A RabbitMQ URL on a vhost of this test's own (created and deleted around it)."""
    require_service("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to create test vhosts")
    vhost = make_vhost()
    yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    drop_vhost(vhost)


@pytest.fixture
def pg_url() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return PG_URL


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'appt.sqlite3'}"


@pytest.fixture
async def sandbox() -> AsyncIterator[object]:
    """The PMS emulator on a free loopback port; ``sandbox.url``, ``sandbox.state``."""
    from consumer.sandbox import running_sandbox

    async with running_sandbox(port=0) as sb:
        yield sb

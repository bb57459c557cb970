"""Shared fixtures: real RabbitMQ (an isolated vhost), real PostgreSQL, sandbox over HTTP.

Services are never mocked, and a missing one fails the test instead of
skipping it, so a green run means the integration tests really ran.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
PG_URL = os.environ.get("APPT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


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


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def make_vhost() -> str:
    """A fresh vhost, so tests never see each other's queues or bindings."""
    name = f"appt-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


def drop_vhost(name: str) -> None:
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

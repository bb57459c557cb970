"""Small helpers for tests (import from tests.helpers)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

APPT = Path(sys.executable).parent / "appt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    check: Callable[[], Any | Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll an async or sync predicate until it returns a truthy value; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        await asyncio.sleep(interval)


def starts_in(days: float) -> dict[str, str]:
    """A 30-minute slot at 09:00 UTC ``days`` from today: inside the reconciler's windows."""
    start = datetime.now(timezone.utc).replace(hour=9, minute=0, second=0, microsecond=0) + timedelta(days=days)
    return {"start_time": start.isoformat(), "finish_time": (start + timedelta(minutes=30)).isoformat()}


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def run_appt(env: dict[str, str], *args: str, stdin: str = "", timeout: float = 60.0) -> Ran:
    """`appt ARGS` as a child process with ``env`` over this one's (async: the test's event loop
    may be running the sandbox or a stack the command talks to)."""
    process = await asyncio.create_subprocess_exec(
        str(APPT), *args, env={**os.environ, **env}, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin.encode()), timeout)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


class RabbitNode:
    """A throwaway RabbitMQ node of the test's own (``scripts/rabbitmq-node``), never the shared broker.

    Its own node name, ports, data directory and cookie, so a test may stop, restart or kill it.
    """

    SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rabbitmq-node"

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        self._run("start", str(self.directory), str(self.port), str(free_port()), self.name, timeout=180)

    def ctl(self, *args: str) -> None:
        """``rabbitmqctl`` against this node only (``stop_app``, ``start_app`` ...)."""
        self._run("ctl", str(self.directory), *args, timeout=120)

    def stop(self) -> None:
        self._run("stop", str(self.directory), timeout=120)

    def _run(self, *args: str, timeout: float) -> None:
        subprocess.run([str(self.SCRIPT), *args], check=True, capture_output=True, timeout=timeout)

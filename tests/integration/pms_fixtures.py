"""Fixtures for the PMS client and sandbox tests: a real sandbox on loopback,
a client tuned for fast retries, and a tiny webhook receiver.

Imported explicitly by the test modules (``tests/conftest.py`` belongs to the lead).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from consumer.pms import PmsClient
from consumer.sandbox import RunningSandbox, running_sandbox
from tests.helpers import served

TOKEN = "sandbox-token"
SECRET = "whsec_" + base64.b64encode(b"a-test-secret-of-32-bytes-long!!").decode()
START = "2030-01-07T09:00:00Z"
FINISH = "2030-01-07T09:30:00Z"


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    async with running_sandbox(port=0, token=TOKEN) as running:
        yield running


def fast_client(sandbox: RunningSandbox, **overrides: Any) -> PmsClient:
    """A client with millisecond backoff, so retry tests take milliseconds."""
    options: dict[str, Any] = {"timeout": 2.0, "backoff_base": 0.01, "max_backoff": 0.05}
    options.update(overrides)
    return PmsClient(sandbox.url, TOKEN, **options)


@pytest.fixture
async def client(sandbox: RunningSandbox) -> AsyncIterator[PmsClient]:
    async with fast_client(sandbox) as pms:
        yield pms


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain session for speaking to the sandbox without the client's help."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


AUTH = {"Authorization": f"Bearer {TOKEN}", "User-Agent": "tests"}


async def call(
    http: aiohttp.ClientSession,
    sandbox: RunningSandbox,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any, Any]:
    """(status, JSON body or None, headers) of one raw request."""
    async with http.request(
        method, sandbox.url + path, json=body, headers=AUTH if headers is None else headers, **kwargs
    ) as resp:
        data = await resp.json() if resp.status != 204 else None
        return resp.status, data, resp.headers


def slot(**fields: Any) -> dict[str, Any]:
    """Fields of a bookable slot, overridable."""
    return {"start_time": START, "finish_time": FINISH, "practitioner_id": 1, "reason": "Exam", **fields}


@dataclass
class Receiver:
    """Records every webhook attempt; fails the first ``fail_first`` (or all, ``always_fail``)."""

    url: str = ""
    attempts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fail_first: int = 0
    always_fail: bool = False
    delay: float = 0.0

    @property
    def delivered(self) -> list[tuple[dict[str, str], bytes]]:
        return self.attempts[self.fail_first :] if not self.always_fail else []

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append((dict(request.headers), await request.read()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.always_fail or len(self.attempts) <= self.fail_first:
            return web.Response(status=500)
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recorder = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recorder.handle)
    async with served(app, handler_cancellation=True, shutdown_timeout=0.5) as url:
        recorder.url = f"{url}/hook"
        yield recorder


async def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)

"""Slow and hostile HTTP clients against the real `appt serve`: closed in time, nothing kept.

Once, 1,000 idle connections plus trickled headers and stalled bodies were
never closed: RSS went from 59 to 175 MB and file descriptors from 13 to
1,616, and stayed there. Now idle and trickling connections are closed
within APPT_HTTP_IDLE_TIMEOUT, a stalled body within APPT_HTTP_BODY_TIMEOUT,
connections over APPT_HTTP_MAX_CONNECTIONS at once, and the process's RSS
and file descriptors come back to their baseline when the clients go.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.chaos.common import scaled
from tests.e2e.processes import ServiceProcess, service_env
from tests.helpers import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

IDLE_TIMEOUT = 3.0  # long enough that a refusal (at once) and an idle close are told apart under load
BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = scaled(150, 900)
SLACK = 2.0  # timers, a loaded 2-core machine
SECRET_HEADER = "Bearer top-secret-token-" + "s" * 9000  # over aiohttp's 8190-byte field limit


@pytest.fixture
async def service(amqp_url: str, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    env = service_env(
        pms_url=f"http://127.0.0.1:{free_port()}",
        store=f"sqlite:///{tmp_path / 'a.sqlite3'}",
        amqp_url=amqp_url,
        APPT_HTTP_IDLE_TIMEOUT=str(IDLE_TIMEOUT),
        APPT_HTTP_BODY_TIMEOUT=str(BODY_TIMEOUT),
        APPT_HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        APPT_LOG_LEVEL="DEBUG",
    )
    process = ServiceProcess(env, tmp_path).start()
    try:
        await process.wait_ready()
        yield process
    finally:
        await process.terminate()


def usage(pid: int) -> tuple[int, int]:
    """(open file descriptors, RSS in KiB) of a process, from /proc."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return fds, rss


async def closed_after(port: int, behave: Callable[[asyncio.StreamWriter], Coroutine[Any, Any, None]]) -> float:
    """Connect, behave, and return how many seconds the server took to close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    sending = asyncio.create_task(behave(writer))
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    finally:
        sending.cancel()
        writer.close()
    return time.monotonic() - started


async def idle(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


async def trickled_headers(writer: asyncio.StreamWriter) -> None:
    writer.write(b"POST /webhooks/pms HTTP/1.1\r\nHost: x\r\n")
    while True:  # one byte of a header every 0.2 s: never a whole request head
        writer.write(b"X")
        await writer.drain()
        await asyncio.sleep(0.2)


async def stalled_body(writer: asyncio.StreamWriter) -> None:
    writer.write(b'POST /webhooks/pms HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"type":')
    await writer.drain()
    await asyncio.sleep(3600)


async def test_slow_clients_are_closed_in_time_and_leave_nothing_behind(service: ServiceProcess) -> None:
    assert service.pid is not None
    port = int(service.url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as http:  # warm up: the first requests allocate for good
        for _ in range(20):
            async with http.get(f"{service.url}/healthz") as response:
                assert response.status == 200
    await asyncio.sleep(IDLE_TIMEOUT + SLACK)
    baseline = usage(service.pid)

    over_cap = 10
    idling = asyncio.gather(*(closed_after(port, idle) for _ in range(MAX_CONNECTIONS + over_cap)))
    await asyncio.sleep(IDLE_TIMEOUT / 2)
    during = usage(service.pid)
    idle_times = await idling
    refused = [t for t in idle_times if t < IDLE_TIMEOUT / 2]
    assert len(refused) >= over_cap, "connections over the cap are closed at once"
    assert max(idle_times) < IDLE_TIMEOUT + SLACK

    half = MAX_CONNECTIONS // 2
    trickle_times, stall_times = await asyncio.gather(
        asyncio.gather(*(closed_after(port, trickled_headers) for _ in range(half))),
        asyncio.gather(*(closed_after(port, stalled_body) for _ in range(half))),
    )
    assert max(trickle_times) < IDLE_TIMEOUT + SLACK
    assert max(stall_times) < IDLE_TIMEOUT + BODY_TIMEOUT + SLACK

    await asyncio.sleep(1.0)
    after = usage(service.pid)
    print(
        f"\nslow_clients connections={len(idle_times) + 2 * half} refused_over_cap={len(refused)} "
        f"idle_max={max(idle_times):.2f}s trickle_max={max(trickle_times):.2f}s "
        f"stall_max={max(stall_times):.2f}s fds={baseline[0]}->{during[0]}->{after[0]} "
        f"rss_kib={baseline[1]}->{during[1]}->{after[1]}"
    )
    assert after[0] <= baseline[0] + 2
    assert after[1] <= baseline[1] + 8 * 1024  # allocator slack, not a connection's worth each


async def test_an_oversize_header_is_refused_without_echoing_or_logging_it(service: ServiceProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(service.url.rsplit(":", 1)[1]))
    writer.write(f"GET /appointments/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET_HEADER}\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400", answer[:300]
    assert b"top-secret" not in answer
    await asyncio.sleep(0.5)
    assert "top-secret" not in service.log_text()
    assert "http.bad_request" in service.log_text()

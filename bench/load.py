"""Load generator: pre-signed webhooks posted over N keep-alive connections for a fixed time.

Run by bench_ingest.py in its own process, so the server measured never
shares an event loop (or a core's worth of Python) with its client. Every
request is built and signed before the clock starts: signing is the
sender's cost, not the receiver's, and must not throttle the client.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import appointments  # noqa: E402
from consumer.sandbox.state import SandboxState  # noqa: E402
from consumer.signing import sign  # noqa: E402

Request = tuple[bytes, dict[str, str]]


def signed_requests(secret: str, count: int, appointment_count: int) -> list[Request]:
    """``count`` distinct webhooks (unique ids) about realistic, full PMS appointments."""
    state = SandboxState()
    seeded = state.seed(appointments(1, appointment_count))
    now = int(time.time())
    built = []
    for index in range(count):
        webhook_id = f"msg_{uuid.uuid4().hex}"
        body = json.dumps(
            {
                "type": "appointment.updated",
                "timestamp": "2031-01-01T00:00:00+00:00",
                "data": {"appointment": {**seeded[index % appointment_count], "notes": f"edit {index}"}},
            }
        ).encode()
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(now),
            "webhook-signature": sign(secret, webhook_id, now, body),
            "Content-Type": "application/json",
        }
        built.append((body, headers))
    return built


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.answered_total = 0  # warm-up included: what the server's CPU time is divided by
        self.accepted_total = 0  # every 2xx, warm-up included: what the queues must hold
        self.errors = 0

    def summary(self, seconds: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        count = len(ordered)
        return {
            "requests": count,
            "rps": count / seconds,
            "p50_ms": statistics.median(ordered) * 1e3 if ordered else 0.0,
            "p99_ms": ordered[min(count - 1, int(count * 0.99))] * 1e3 if ordered else 0.0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "answered_total": self.answered_total,
            "accepted_total": self.accepted_total,
            "errors": self.errors,
        }


async def connection_loop(
    session: aiohttp.ClientSession,
    url: str,
    pool: itertools.cycle[Request],
    measure_from: float,
    until: float,
    interval: float,
    tally: Tally,
) -> None:
    """One keep-alive connection's requests: back to back, or one per ``interval`` seconds."""
    await asyncio.sleep(random.uniform(0, interval))  # spread the paced connections' phases
    next_start = time.perf_counter()
    while (started := time.perf_counter()) < until:
        if interval:
            next_start += interval
        body, headers = next(pool)
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
        except aiohttp.ClientError:
            tally.errors += 1
            continue
        tally.answered_total += 1
        if 200 <= status < 300:
            tally.accepted_total += 1
        if started >= measure_from:
            tally.latencies.append(time.perf_counter() - started)
            tally.statuses[status] += 1
        if interval and (pause := next_start - time.perf_counter()) > 0:
            await asyncio.sleep(pause)


async def run(
    url: str,
    requests: list[Request],
    connections: int,
    warmup: float,
    duration: float,
    rate: float,
) -> dict[str, Any]:
    """Closed loop (as fast as answers come) unless ``rate``: then an offered load, in requests/s."""
    pool = itertools.cycle(requests)
    interval = connections / rate if rate else 0.0
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        measure_from, until = start + warmup, start + warmup + duration
        await asyncio.gather(
            *(connection_loop(session, url, pool, measure_from, until, interval, tally) for _ in range(connections))
        )
    # The last requests may finish a little after ``until``: count the time they took.
    return tally.summary(max(duration, time.perf_counter() - measure_from))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=0.0, help="offered requests/s (0: closed loop)")
    parser.add_argument("--pool", type=int, default=20_000, help="distinct signed requests, then cycled")
    parser.add_argument("--appointments", type=int, default=1000)
    args = parser.parse_args()
    requests = signed_requests(args.secret, args.pool, args.appointments)
    summary = asyncio.run(run(args.url, requests, args.connections, args.warmup, args.duration, args.rate))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

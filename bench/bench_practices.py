"""One practice's trouble never slows another's commands: practice B's latency, A blocked vs A healthy.

Run: ``python bench/bench_practices.py [--backlog 300 --commands 100 --rate 20]``.
Two PMS sandboxes (two practices, A and B, each its own budget), one worker.
In each round A has ``--backlog`` edit commands queued, and B's commands are
sent at a steady ``--rate`` while A's backlog is being handled; each B
command's latency is publish -> its result event. Round "healthy": A's PMS
answers. Round "blocked": A's hourly budget is spent (every A request gets
the 403 block with the reset an hour away), so A waits: its commands are
parked. The ratio printed is B's p50 and p99 with A blocked over A healthy;
the target is <= 1.5 (issue 14). Every PMS call takes ``--latency`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    appointments,
    edit_commands,
    log_to_file,
    publish_commands,
    result_line,
    running_pipeline,
    sandbox_knob,
    sandbox_process,
    seed_sandbox,
    sqlite_url,
    throwaway_vhost,
)
from consumer.broker import EVENTS_EXCHANGE  # noqa: E402
from consumer.service import tune_gc  # noqa: E402

FIRST_ID = 30_000
TARGET = 1.5
TIMEOUT = 120.0


async def round_latencies(blocked: bool, backlog: int, count: int, rate: float, latency: float) -> list[float]:
    """B's command latencies (seconds) in one round, A blocked or not."""
    ids = list(range(FIRST_ID, FIRST_ID + 50))
    with (
        throwaway_vhost() as amqp_url,
        tempfile.TemporaryDirectory() as workdir,
        sandbox_process() as sandbox_a,
        sandbox_process() as sandbox_b,
    ):
        log_to_file(Path(workdir) / "worker.log")
        for sandbox in (sandbox_a, sandbox_b):
            await seed_sandbox(sandbox.url, appointments(FIRST_ID, len(ids)), latency=latency)
        if blocked:
            await sandbox_knob(sandbox_a.url, "rate_limit", {"budget": 0})
        async with running_pipeline(
            amqp_url,
            sqlite_url(workdir, "practices.sqlite3"),
            sandbox_a.url,
            prefetch=64,
            pms_concurrency=16,
            practice_urls={"a": sandbox_a.url, "b": sandbox_b.url},
        ) as pipeline:
            sent: dict[str, float] = {}
            answered: dict[str, float] = {}
            channel = await pipeline.broker.channel()
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(EVENTS_EXCHANGE, routing_key="result.#")

            async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                command_id = json.loads(message.body)["command_id"]
                if command_id in sent:
                    answered[command_id] = time.perf_counter()

            await queue.consume(on_result, no_ack=True)
            await publish_commands(pipeline.broker, [{**c, "practice": "a"} for c in edit_commands(ids, backlog, "a")])
            await pipeline.worker.start()
            for command in edit_commands(ids, count, "b"):
                command["practice"] = "b"
                sent[command["command_id"]] = time.perf_counter()
                await publish_commands(pipeline.broker, [command])
                await asyncio.sleep(1 / rate)
            async with asyncio.timeout(TIMEOUT):
                while len(answered) < count:
                    await asyncio.sleep(0.05)
    return [answered[c] - sent[c] for c in sent]


def p(latencies: list[float], q: float) -> float:
    return statistics.quantiles(latencies, n=100, method="inclusive")[int(q) - 1]


async def run(backlog: int, count: int, rate: float, latency: float) -> None:
    tune_gc()  # the process's cycle collector as `appt serve` sets it
    healthy = await round_latencies(False, backlog, count, rate, latency)
    blocked = await round_latencies(True, backlog, count, rate, latency)
    figures = {}
    for name, values in (("healthy", healthy), ("blocked", blocked)):
        figures[name] = (p(values, 50) * 1e3, p(values, 99) * 1e3)
        print(
            f"A {name:<8}: B's {count} commands at {rate:g}/s (A backlog {backlog}, PMS {latency * 1e3:.0f} ms/call):"
            f" p50 {figures[name][0]:.1f} ms, p99 {figures[name][1]:.1f} ms"
        )
    ratio50 = figures["blocked"][0] / figures["healthy"][0]
    ratio99 = figures["blocked"][1] / figures["healthy"][1]
    print(f"B with A blocked / B with A healthy: p50 {ratio50:.2f}, p99 {ratio99:.2f} (target <= {TARGET})")
    print(
        result_line(
            "practices",
            backlog=backlog,
            commands=count,
            rate=rate,
            latency_ms=latency * 1e3,
            healthy_p50_ms=figures["healthy"][0],
            healthy_p99_ms=figures["healthy"][1],
            blocked_p50_ms=figures["blocked"][0],
            blocked_p99_ms=figures["blocked"][1],
            ratio_p50=ratio50,
            ratio_p99=ratio99,
            target=TARGET,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=300)
    parser.add_argument("--commands", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--latency", type=float, default=0.01)
    args = parser.parse_args()
    asyncio.run(run(args.backlog, args.commands, args.rate, args.latency))


if __name__ == "__main__":
    main()

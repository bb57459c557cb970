"""Concurrency under PMS latency: does the worker keep enough calls in flight?

Run: ``python bench/bench_latency.py [--commands 1000 --appointments 500]``.
Every PMS call takes ``--latency`` seconds (sandbox knob). Commands are
edit_notes spread over many appointments, so per-appointment ordering is
not what limits. Each command makes two calls (fresh GET, then PUT), one
after the other, so by Little's law the throughput is bounded by

    bound = min(prefetch, pms_concurrency) / (calls_per_command * latency)

with prefetch 32 and pms_concurrency 64 (so that the PMS semaphore is not
the narrower window): 32 / (2 * 0.05) = 320 commands/s; target >= 200.
RabbitMQ applies the prefetch per consumer (aio-pika's ``set_qos`` is not
global), and the worker has one consumer per partition, so the messages in
flight may reach partitions * prefetch: the effective bound is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    appointments,
    edit_commands,
    log_to_file,
    publish_commands,
    result_line,
    running_pipeline,
    sandbox_process,
    seed_sandbox,
    sqlite_url,
    throwaway_vhost,
)
from consumer.service import tune_gc  # noqa: E402

FIRST_ID = 20_000
PREFETCH = 32
PMS_CONCURRENCY = 64
PARTITIONS = 4
CALLS_PER_COMMAND = 2  # GET, PUT
TARGET = 200.0
TIMEOUT = 120.0


async def run(count: int, appointment_count: int, latency: float) -> None:
    tune_gc()  # the process's cycle collector as `appt serve` sets it
    ids = list(range(FIRST_ID, FIRST_ID + appointment_count))
    with throwaway_vhost() as amqp_url, tempfile.TemporaryDirectory() as workdir, sandbox_process() as sandbox:
        log_to_file(Path(workdir) / "worker.log")
        await seed_sandbox(sandbox.url, appointments(FIRST_ID, appointment_count), latency=latency)
        async with running_pipeline(
            amqp_url,
            sqlite_url(workdir, "latency.sqlite3"),
            sandbox.url,
            prefetch=PREFETCH,
            pms_concurrency=PMS_CONCURRENCY,
            partitions=PARTITIONS,
        ) as pipeline:
            await publish_commands(pipeline.broker, edit_commands(ids, count, "lat"))
            await pipeline.worker.start()
            drained = await pipeline.drain(count, TIMEOUT)
            outcomes = await pipeline.results.take(count)
    rate = count / drained
    bound = min(PREFETCH, PMS_CONCURRENCY) / (CALLS_PER_COMMAND * latency)
    effective = min(PARTITIONS * PREFETCH, PMS_CONCURRENCY) / (CALLS_PER_COMMAND * latency)
    print(
        f"{count} commands over {appointment_count} appointments, PMS latency {latency * 1e3:.0f} ms/call, "
        f"prefetch {PREFETCH} x {PARTITIONS} partitions, pms_concurrency {PMS_CONCURRENCY}"
    )
    print(f"throughput {rate:.0f} commands/s in {drained:.2f} s, outcomes {outcomes}")
    print(
        f"Little's-law bound min(prefetch, pms_concurrency) / (calls * latency) = {bound:.0f}/s "
        f"-> {rate / bound:.2f} of it (target >= {TARGET:.0f}/s); "
        f"with prefetch per consumer the window is {min(PARTITIONS * PREFETCH, PMS_CONCURRENCY)}: "
        f"bound {effective:.0f}/s -> {rate / effective:.2f}"
    )
    print(
        result_line(
            "latency",
            commands=count,
            latency_ms=latency * 1e3,
            prefetch=PREFETCH,
            pms_concurrency=PMS_CONCURRENCY,
            commands_per_s=rate,
            bound=bound,
            of_bound=rate / bound,
            effective_bound=effective,
            of_effective_bound=rate / effective,
            succeeded=outcomes.get("succeeded", 0),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--appointments", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per PMS call")
    args = parser.parse_args()
    asyncio.run(run(args.commands, args.appointments, args.latency))


if __name__ == "__main__":
    main()

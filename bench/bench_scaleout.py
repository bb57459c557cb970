"""Scale-out: the same commands drained by one `appt serve` process, then by two.

Run: ``python bench/bench_scaleout.py [--commands 2000 --appointments 200]``.
Each round starts real `appt serve` processes on a shared PostgreSQL schema of
this run's own (dropped afterwards) and the same RabbitMQ vhost, the sandbox
in a process of its own; once they answer /readyz, N edit_notes commands are
published and the clock runs until N results are queued. One process consumes
every partition; two split them (``APPT_WORKER_PARTITIONS=0,1`` and ``2,3``).
The baseline is the one-process round of the same run; the ratio is what a
second process buys on this machine, where both share 2 cores with RabbitMQ,
PostgreSQL and the sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SANDBOX_TOKEN,
    appointments,
    bind_results,
    edit_commands,
    publish_commands,
    result_line,
    sandbox_process,
    seed_sandbox,
    throwaway_schema,
    throwaway_vhost,
)
from consumer.broker import Broker  # noqa: E402
from tests.e2e.processes import ServiceProcess, service_env  # noqa: E402
from tests.helpers import free_port  # noqa: E402

FIRST_ID = 10_000
SPLITS = {1: ["all"], 2: ["0,1", "2,3"]}
READY_TIMEOUT = 30.0
TIMEOUT = 180.0


@contextlib.asynccontextmanager
async def services(count: int, env: dict[str, str], log_dir: Path) -> AsyncIterator[None]:
    """``count`` ready `appt serve` processes splitting the partitions, stopped afterwards."""
    processes = [
        ServiceProcess(
            {**env, "APPT_HTTP_PORT": str(free_port()), "APPT_WORKER_PARTITIONS": partitions},
            log_dir,
            name=f"serve-{count}-{index}",
        )
        for index, partitions in enumerate(SPLITS[count])
    ]
    try:
        for process in processes:
            await process.start().wait_ready(READY_TIMEOUT)
        yield
    finally:
        for process in processes:
            await process.terminate(timeout=30)


async def drain_rate(
    count: int, processes: int, amqp_url: str, env: dict[str, str], log_dir: Path, ids: list[int]
) -> tuple[float, dict[str, int]]:
    """Commands/s from the first publish to the last result, with ``processes`` workers."""
    broker = Broker(amqp_url)
    await broker.connect()
    try:
        results = await bind_results(broker)
        async with services(processes, env, log_dir):
            commands = edit_commands(ids, count, f"scale{processes}")
            started = time.perf_counter()
            await publish_commands(broker, commands)
            await results.wait_for(count, TIMEOUT)
            rate = count / (time.perf_counter() - started)
            return rate, await results.take(count)
    finally:
        await broker.close()


async def run(count: int, appointment_count: int) -> None:
    ids = list(range(FIRST_ID, FIRST_ID + appointment_count))
    with throwaway_vhost() as amqp_url, tempfile.TemporaryDirectory() as workdir, sandbox_process() as sandbox:
        log_dir = Path(workdir)
        await seed_sandbox(sandbox.url, appointments(FIRST_ID, appointment_count))
        async with throwaway_schema() as store_url:
            env = service_env(pms_url=sandbox.url, store=store_url, amqp_url=amqp_url, APPT_PMS_TOKEN=SANDBOX_TOKEN)
            one, one_outcomes = await drain_rate(count, 1, amqp_url, env, log_dir, ids)
            print(f"1 process:   {count} commands at {one:.0f} commands/s, outcomes {one_outcomes}", flush=True)
            two, two_outcomes = await drain_rate(count, 2, amqp_url, env, log_dir, ids)
            print(f"2 processes: {count} commands at {two:.0f} commands/s, outcomes {two_outcomes}", flush=True)
    print(f"ratio 2 processes / 1 process = {two / one:.2f} (PostgreSQL store, {os.cpu_count()} cores)")
    print(
        result_line(
            "scaleout",
            commands=count,
            appointments=appointment_count,
            one_process_per_s=one,
            two_processes_per_s=two,
            ratio=two / one,
            cores=os.cpu_count() or 0,
            succeeded=one_outcomes.get("succeeded", 0) + two_outcomes.get("succeeded", 0),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--appointments", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(run(args.commands, args.appointments))


if __name__ == "__main__":
    main()

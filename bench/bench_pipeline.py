"""Command pipeline: how fast the worker drains commands, against a bare consume+ack loop.

Run: ``python bench/bench_pipeline.py [--commands 2000 --appointments 200]``.
N edit_notes commands over 200 appointments are published before the worker
starts; the worker (store SQLite, PMS client, same settings as ``appt serve``)
drains them against the sandbox at zero latency, the sandbox running in its
own process so its CPU is not charged to the worker. The baseline, in the
same run and on the same queues, is aio-pika consuming and acking N messages
and doing nothing else: the most any consumer could do here.

A second baseline, the protocol floor, does per message only the I/O that the
design makes every command do, with the bare libraries: aiohttp GET and PUT
against the same sandbox, two confirmed publishes (state log, result), ack.
No store, no inbox, no ordering, no domain, no logs: what is left between
the floor and the worker is the price of the safety this service adds.

The domain's share is measured apart on the same N commands: bind a model
to the shared machine, reconcile, plan, record the applied write, unbind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SANDBOX_TOKEN,
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
from consumer.broker import EVENTS_EXCHANGE, partition_queue  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from statemachines.appointment import Snapshot, bound  # noqa: E402

FIRST_ID = 10_000
TARGET_RATIO = 0.3
TIMEOUT = 180.0


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def consume_until(
    channel: aio_pika.abc.AbstractChannel,
    count: int,
    partitions: int,
    handle: Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]],
) -> float:
    """Seconds for ``handle`` to finish ``count`` messages consumed from the partitions."""
    done = asyncio.Event()
    finished = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal finished
        await handle(message)
        finished += 1
        if finished >= count:
            done.set()

    started = time.perf_counter()
    for index in range(partitions):
        queue = await channel.get_queue(partition_queue(index))
        await queue.consume(on_message)
    await asyncio.wait_for(done.wait(), TIMEOUT)
    return time.perf_counter() - started


async def raw_consume(amqp_url: str, count: int, prefetch: int, partitions: int) -> float:
    """Seconds for a bare aio-pika consumer to receive and ack ``count`` messages."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return await consume_until(channel, count, partitions, lambda message: message.ack())


async def floor_consume(amqp_url: str, sandbox_url: str, count: int, prefetch: int, partitions: int) -> float:
    """Seconds for the bare I/O of ``count`` edit commands: GET, PUT, 2 confirmed publishes, ack."""
    connection = await aio_pika.connect_robust(amqp_url)
    headers = {"Authorization": f"Bearer {SANDBOX_TOKEN}", "Accept": "application/json"}
    async with connection, aiohttp.ClientSession(headers=headers) as http:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        publisher = await connection.channel(publisher_confirms=True)
        events = await publisher.get_exchange(EVENTS_EXCHANGE)

        async def edit(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            command = json.loads(message.body)
            url = f"{sandbox_url}/v1/appointments/{command['appointment_id']}"
            async with http.get(url) as response:
                await response.json()
            async with http.put(url, json={"appointment": {"notes": command["notes"]}}) as response:
                answer = await response.read()
            await asyncio.gather(
                events.publish(aio_pika.Message(answer, delivery_mode=2), "floor.state"),
                events.publish(aio_pika.Message(answer, delivery_mode=2), "floor.result"),
            )
            await message.ack()

        return await consume_until(channel, count, partitions, edit)


def domain_seconds(commands: list[dict[str, Any]]) -> float:
    """The statemachines' part of each command, alone: bind, reconcile, plan, applied, unbind."""
    notes: dict[int, str | None] = {}
    started = time.perf_counter()
    for command in commands:
        appointment_id = command["appointment_id"]
        before = Snapshot(appointment_id, "Pending", 1013, notes.get(appointment_id))
        after = Snapshot(appointment_id, "Pending", 1013, command["notes"])
        with bound(before, appointment_id) as appt:
            appt.reconcile(before)
            write = appt.plan_edit({"notes": command["notes"]})
            appt.applied(write, after)
        notes[appointment_id] = command["notes"]
    return time.perf_counter() - started


async def run(count: int, appointment_count: int) -> None:
    settings = Settings()
    ids = list(range(FIRST_ID, FIRST_ID + appointment_count))
    with throwaway_vhost() as amqp_url, tempfile.TemporaryDirectory() as workdir, sandbox_process() as sandbox:
        log_to_file(Path(workdir) / "worker.log")
        await seed_sandbox(sandbox.url, appointments(FIRST_ID, appointment_count))
        async with running_pipeline(
            amqp_url,
            sqlite_url(workdir, "pipeline.sqlite3"),
            sandbox.url,
            prefetch=settings.prefetch,
            pms_concurrency=settings.pms_concurrency,
            partitions=settings.partitions,
        ) as pipeline:
            await publish_commands(pipeline.broker, edit_commands(ids, count, "raw"))
            cpu = cpu_seconds()
            raw = await raw_consume(amqp_url, count, settings.prefetch, settings.partitions)
            raw_cpu = cpu_seconds() - cpu
            print(
                f"raw consume+ack: {count} messages in {raw:.2f} s = {count / raw:.0f} msg/s, "
                f"{raw_cpu / count * 1e6:.0f} us CPU/msg",
                flush=True,
            )

            await publish_commands(pipeline.broker, edit_commands(ids, count, "floor"))
            cpu = cpu_seconds()
            floor = await floor_consume(amqp_url, sandbox.url, count, settings.prefetch, settings.partitions)
            floor_cpu = cpu_seconds() - cpu
            print(
                f"protocol floor (GET, PUT, 2 confirmed publishes, ack; bare libraries): {count} in "
                f"{floor:.2f} s = {count / floor:.0f} commands/s, {floor_cpu / count * 1e6:.0f} us CPU/command",
                flush=True,
            )

            commands = edit_commands(ids, count, "cmd")
            await publish_commands(pipeline.broker, commands)
            cpu = cpu_seconds()
            await pipeline.worker.start()
            drained = await pipeline.drain(count, TIMEOUT)
            worker_cpu = cpu_seconds() - cpu
            outcomes = await pipeline.results.take(count)
    rate, raw_rate, floor_rate = count / drained, count / raw, count / floor
    worker_cpu_us = worker_cpu / count * 1e6
    domain_us = domain_seconds(commands) / count * 1e6
    print(
        f"worker: {count} commands in {drained:.2f} s = {rate:.0f} commands/s, "
        f"{worker_cpu_us:.0f} us CPU/command, outcomes {outcomes}"
    )
    print(
        f"ratio worker / raw consume = {rate / raw_rate:.3f} (target >= {TARGET_RATIO}); "
        f"protocol floor / raw consume = {floor_rate / raw_rate:.3f}; worker / floor = {rate / floor_rate:.2f}"
    )
    print(
        f"domain (bind+reconcile+plan+applied+unbind): {domain_us:.0f} us/command "
        f"= {domain_us / worker_cpu_us:.1%} of the worker's CPU per command"
    )
    print(
        result_line(
            "pipeline",
            commands=count,
            appointments=appointment_count,
            commands_per_s=rate,
            raw_msgs_per_s=raw_rate,
            ratio=rate / raw_rate,
            floor_commands_per_s=floor_rate,
            floor_ratio=floor_rate / raw_rate,
            worker_per_floor=rate / floor_rate,
            worker_cpu_us=worker_cpu_us,
            raw_cpu_us=raw_cpu / count * 1e6,
            floor_cpu_us=floor_cpu / count * 1e6,
            domain_us=domain_us,
            domain_share=domain_us / worker_cpu_us,
            succeeded=outcomes.get("succeeded", 0),
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

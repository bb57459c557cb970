"""Command pipeline: the worker's CPU per command against the protocol floor's, and its rate against raw.

Run: ``python bench/bench_pipeline.py [--commands 2000 --appointments 200 --rounds 3 --store sqlite|postgres]``.
Each round measures, one after the other on the same queues and sandbox:

- raw consume+ack: aio-pika consuming and acking N messages, doing nothing
  else: the most any consumer could do here;
- the protocol floor: per message only the I/O the design makes every
  command do, with the bare libraries: aiohttp GET and PUT against the
  sandbox, two confirmed publishes (state log, result), ack. No store, no
  inbox, no ordering, no domain, no logs. Issue 18's targets are against it
  under both policies;
- the same floor without its GET: the I/O of an ``on_conflict`` command
  written straight from its stored record, reported beside the target's
  ratio so that ``on_conflict``'s is not read as flattered by a request it
  does not make;
- the worker (store, PMS client, settings as ``appt serve``) draining N
  edit_notes commands published beforehand, once under each
  ``APPT_READ_BEFORE_WRITE`` policy (``always``, ``on_conflict``; which goes
  first alternates by round), each policy with its own store kept across rounds;
- both floors again, after the worker's drains: the worker's CPU is set against
  the mean of each floor's two drains, so drift within a round moves both sides.

The sandbox runs in its own process (zero latency) so its CPU is not charged
to what is measured. CPU is the process's user + system time: other load on
a shared machine moves wall time, much less CPU per command. Each ratio is
taken within its round, then the median over rounds is reported.

The domain's share is measured apart on N commands: bind a model to the
shared machine, reconcile, plan, record the applied write, unbind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import aio_pika
import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SANDBOX_TOKEN,
    appointments,
    edit_commands,
    empty_partitions,
    log_to_file,
    publish_commands,
    result_line,
    running_pipeline,
    sandbox_process,
    seed_sandbox,
    sqlite_url,
    throwaway_schema,
    throwaway_vhost,
)
from consumer import metrics  # noqa: E402
from consumer.broker import EVENTS_EXCHANGE, Broker, partition_queue  # noqa: E402
from consumer.commands import ReadBeforeWrite  # noqa: E402
from consumer.service import tune_gc  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from statemachines.appointment import Snapshot, bound  # noqa: E402

FIRST_ID = 10_000
TARGET_RATIO = 0.08  # of raw consume+ack's rate (issue 18)
TARGET_CPU_PER_FLOOR = 1.5  # worker CPU per command over the floor's (issue 18)
TIMEOUT = 180.0
HANDLED_POLL_SECONDS = 0.01


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
    seen: set[str | None] = set()
    twice: list[tuple[str | None, bool]] = []

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal finished
        if message.message_id in seen:
            twice.append((message.message_id, message.redelivered))
        seen.add(message.message_id)
        await handle(message)
        finished += 1
        if finished >= count:
            done.set()

    started = time.perf_counter()
    for index in range(partitions):
        queue = await channel.get_queue(partition_queue(index))
        await queue.consume(on_message)
    await asyncio.wait_for(done.wait(), TIMEOUT)
    if twice:  # then the drain stopped at its count with as many of its own messages left behind
        redelivered = sum(flag for _, flag in twice)
        print(
            f"{len(twice)} messages consumed twice ({redelivered} flagged redelivered), e.g. {twice[:3]}",
            file=sys.stderr,
            flush=True,
        )
    return time.perf_counter() - started


async def raw_consume(amqp_url: str, count: int, prefetch: int, partitions: int) -> float:
    """Seconds for a bare aio-pika consumer to receive and ack ``count`` messages."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return await consume_until(channel, count, partitions, lambda message: message.ack())


async def floor_consume(
    amqp_url: str, sandbox_url: str, count: int, prefetch: int, partitions: int, *, fresh_read: bool = True
) -> float:
    """Seconds for the bare I/O of ``count`` edit commands: GET, PUT, 2 confirmed publishes, ack.

    ``fresh_read=False`` leaves the GET out: the I/O of a command ``on_conflict`` writes
    straight from its stored record (issue 18's floor keeps the GET under both policies).
    """
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
            if fresh_read:
                async with http.get(url) as response:
                    await response.json()
            async with http.put(url, json={"appointment": {"notes": command["notes"]}}) as response:
                answer = await response.read()
            # Not mandatory, as the worker's are: a mandatory publish nobody's queue takes comes
            # back as a basic.return, work the worker's publishes never cause.
            await asyncio.gather(
                events.publish(aio_pika.Message(answer, delivery_mode=2), "floor.state", mandatory=False),
                events.publish(aio_pika.Message(answer, delivery_mode=2), "floor.result", mandatory=False),
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


POLICIES: tuple[ReadBeforeWrite, ...] = ("always", "on_conflict")


@dataclass
class Figures:
    """One measured drain: wall seconds and process CPU seconds for ``count`` messages."""

    seconds: float
    cpu: float

    def rate(self, count: int) -> float:
        return count / self.seconds

    def cpu_us(self, count: int) -> float:
        return self.cpu / count * 1e6


def messages_handled() -> float:
    """Messages the worker has finished (acked after its commit and publishes), from its own counter.

    Read in-process, so waiting for the drain costs the measured process next to
    nothing, as the floor's count does (polling the results queue's depth over
    AMQP cost ~2 % of the worker's CPU). The results are still all read and checked after.
    """
    return sum(
        sample.value
        for family in metrics.MESSAGES.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


async def measured(drain: Awaitable[float]) -> Figures:
    cpu = cpu_seconds()
    seconds = await drain
    return Figures(seconds, cpu_seconds() - cpu)


Measure = Callable[[Awaitable[float]], Awaitable[Figures]]


async def worker_round(
    amqp_url: str,
    store_url: str,
    sandbox_url: str,
    commands: list[dict[str, Any]],
    policy: ReadBeforeWrite,
    measure: Measure = measured,
) -> Figures:
    """The worker, wired as ``appt serve`` wires it, draining ``commands`` published beforehand.

    ``measure`` wraps the drain alone (bench_anatomy.py takes more figures around it)."""
    settings = Settings()
    async with running_pipeline(
        amqp_url,
        store_url,
        sandbox_url,
        prefetch=settings.prefetch,
        pms_concurrency=settings.pms_concurrency,
        partitions=settings.partitions,
        read_before_write=policy,
    ) as pipeline:
        await empty_partitions(amqp_url, before=f"the worker's drain under {policy}", partitions=settings.partitions)
        await publish_commands(pipeline.broker, commands)

        async def drain() -> float:
            handled = messages_handled()
            started = time.perf_counter()
            await pipeline.worker.start()
            async with asyncio.timeout(TIMEOUT):
                while messages_handled() - handled < len(commands):
                    await asyncio.sleep(HANDLED_POLL_SECONDS)
            return time.perf_counter() - started

        figures = await measure(drain())
        outcomes = await pipeline.results.take(len(commands))
    if pipeline.results.repeated:
        print(
            f"({pipeline.results.repeated} results published again: redeliveries; the worker's warnings follow the run)"
        )
    if outcomes != {"succeeded": len(commands)}:
        others = sorted(set(pipeline.results.answered.values()) - {command["command_id"] for command in commands})
        raise RuntimeError(
            f"the worker's round under {policy} did not succeed throughout: {outcomes};"
            f" {len(others)} results for commands not of this drain: {others[:5]}"
        )
    return figures


@dataclass
class Bracket:
    """A floor drained before the round's worker drains and again after them.

    The worker is set against the two together, so a machine that speeds up or
    slows down during the round moves the floor with the worker, whichever way it drifts.
    """

    before: Figures
    after: Figures | None = None  # until the round's worker drains are done

    @property
    def cpu(self) -> float:
        """CPU seconds of one drain: the mean of the two (the first alone until the second is taken)."""
        return (self.before.cpu + (self.after or self.before).cpu) / 2

    def cpu_us(self, count: int) -> float:
        return self.cpu / count * 1e6


@dataclass
class Baselines:
    """One round's baselines: raw consume+ack, the protocol floor, and the floor without its GET."""

    raw: Figures
    floor: Bracket
    floor_without_get: Bracket


async def baseline_drain(
    amqp_url: str,
    ids: list[int],
    count: int,
    tag: str,
    consume: Callable[[int, int], Awaitable[float]],
    measure: Measure = measured,
) -> Figures:
    """``count`` edit commands published, then drained by ``consume(prefetch, partitions)`` under ``measure``."""
    settings = Settings()
    broker = Broker(amqp_url, partitions=settings.partitions, prefetch=settings.prefetch)
    await broker.connect()
    try:
        await empty_partitions(amqp_url, before=tag, partitions=settings.partitions)
        await publish_commands(broker, edit_commands(ids, count, tag))
    finally:
        await broker.close()
    return await measure(consume(settings.prefetch, settings.partitions))


async def floor_drain(
    amqp_url: str, sandbox_url: str, ids: list[int], count: int, tag: str, *, fresh_read: bool = True
) -> Figures:
    """The protocol floor (without its GET if not ``fresh_read``) over ``count`` freshly published commands."""
    return await baseline_drain(
        amqp_url,
        ids,
        count,
        tag,
        lambda prefetch, partitions: floor_consume(
            amqp_url, sandbox_url, count, prefetch, partitions, fresh_read=fresh_read
        ),
    )


async def baseline_round(amqp_url: str, sandbox_url: str, ids: list[int], count: int, tag: str) -> Baselines:
    """Each baseline over ``count`` freshly published messages (the floors' first drains)."""
    return Baselines(
        raw=await baseline_drain(
            amqp_url,
            ids,
            count,
            f"raw-{tag}",
            lambda prefetch, partitions: raw_consume(amqp_url, count, prefetch, partitions),
        ),
        floor=Bracket(await floor_drain(amqp_url, sandbox_url, ids, count, f"floor-{tag}")),
        floor_without_get=Bracket(
            await floor_drain(amqp_url, sandbox_url, ids, count, f"floor-no-get-{tag}", fresh_read=False)
        ),
    )


async def close_brackets(
    amqp_url: str, sandbox_url: str, ids: list[int], count: int, tag: str, base: Baselines
) -> tuple[Figures, Figures]:
    """The floors' second drains, after the round's worker drains (in the reverse order of the first)."""
    without_get = await floor_drain(amqp_url, sandbox_url, ids, count, f"floor-no-get-after-{tag}", fresh_read=False)
    floor = await floor_drain(amqp_url, sandbox_url, ids, count, f"floor-after-{tag}")
    base.floor.after, base.floor_without_get.after = floor, without_get
    return floor, without_get


@contextlib.asynccontextmanager
async def store_urls(kind: str, workdir: str) -> AsyncIterator[dict[ReadBeforeWrite, str]]:
    """One store per read policy, kept across rounds (as a running service keeps its own)."""
    if kind == "sqlite":
        yield {policy: sqlite_url(workdir, f"{policy}.sqlite3") for policy in POLICIES}
        return
    async with throwaway_schema() as always, throwaway_schema() as on_conflict:
        yield {"always": always, "on_conflict": on_conflict}


async def run(count: int, appointment_count: int, rounds: int, store: str) -> None:
    tune_gc()  # the process's cycle collector as `appt serve` sets it
    ids = list(range(FIRST_ID, FIRST_ID + appointment_count))
    baselines: list[Baselines] = []
    workers: dict[ReadBeforeWrite, list[Figures]] = {policy: [] for policy in POLICIES}
    last_commands: list[dict[str, Any]] = []
    with (
        throwaway_vhost() as amqp_url,
        tempfile.TemporaryDirectory() as workdir,
        worker_log_in(Path(workdir) / "worker.log"),
        sandbox_process() as sandbox,
    ):
        await seed_sandbox(sandbox.url, appointments(FIRST_ID, appointment_count))
        async with store_urls(store, workdir) as stores:
            for number in range(1, rounds + 1):
                base = await baseline_round(amqp_url, sandbox.url, ids, count, str(number))
                baselines.append(base)
                raw, floor = base.raw, base.floor.before
                print(
                    f"round {number}: raw consume+ack {raw.rate(count):.0f} msg/s, {raw.cpu_us(count):.0f} us CPU/msg;"
                    f" floor {floor.rate(count):.0f} commands/s, {floor.cpu_us(count):.0f} us CPU/command;"
                    f" floor without its GET {base.floor_without_get.before.cpu_us(count):.0f} us CPU/command",
                    flush=True,
                )
                # Alternate which policy goes first, so neither always runs on a warmer machine.
                for policy in POLICIES if number % 2 else POLICIES[::-1]:
                    last_commands = edit_commands(ids, count, f"{policy}-{number}")
                    worker = await worker_round(amqp_url, stores[policy], sandbox.url, last_commands, policy)
                    workers[policy].append(worker)
                    print(
                        f"round {number}: worker ({policy}) {worker.rate(count):.0f} commands/s,"
                        f" {worker.cpu_us(count):.0f} us CPU/command = {worker.cpu / floor.cpu:.2f}x the floor's CPU"
                        f" before it, {worker.rate(count) / raw.rate(count):.3f} of raw",
                        flush=True,
                    )
                floor_after, without_get_after = await close_brackets(
                    amqp_url, sandbox.url, ids, count, str(number), base
                )
                print(
                    f"round {number}: after the worker, floor {floor_after.cpu_us(count):.0f} us CPU/command,"
                    f" without its GET {without_get_after.cpu_us(count):.0f};"
                    f" the round's floors (the means): {base.floor.cpu_us(count):.0f} and"
                    f" {base.floor_without_get.cpu_us(count):.0f} us; the worker's CPU over the round's floor: "
                    + ", ".join(f"{policy} {workers[policy][-1].cpu / base.floor.cpu:.2f}x" for policy in POLICIES),
                    flush=True,
                )
    domain_us = domain_seconds(last_commands) / count * 1e6
    for policy in POLICIES:
        report(policy, count, appointment_count, store, baselines, workers[policy], domain_us)


@contextlib.contextmanager
def worker_log_in(path: Path, lines: int = 20) -> Iterator[None]:
    """The worker logs to ``path``; its warnings, if any, are printed at the end (the file goes with the run)."""
    log_to_file(path)
    try:
        yield
    finally:
        logged = path.read_text().splitlines()
        warnings = [line for line in logged if json.loads(line).get("level") not in ("debug", "info")]
        if warnings:
            print(f"the worker logged {len(warnings)} warnings and errors, the last of them:", file=sys.stderr)
            print("\n".join(warnings[-lines:]), file=sys.stderr, flush=True)


def report(
    policy: ReadBeforeWrite,
    count: int,
    appointment_count: int,
    store: str,
    baselines: list[Baselines],
    workers: list[Figures],
    domain_us: float,
) -> None:
    """Each ratio is taken within its round (same machine state), then the median over rounds."""
    rounds = list(zip(workers, baselines, strict=True))
    cpu_ratio = median(w.cpu / b.floor.cpu for w, b in rounds)
    without_get_ratio = median(w.cpu / b.floor_without_get.cpu for w, b in rounds)
    rate_ratio = median(b.raw.seconds / w.seconds for w, b in rounds)
    worker_cpu_us = median(w.cpu_us(count) for w in workers)
    print(
        f"{policy}: worker CPU = {cpu_ratio:.2f}x the floor's (target <= {TARGET_CPU_PER_FLOOR}),"
        f" rate = {rate_ratio:.3f} of raw consume+ack (target >= {TARGET_RATIO}), medians over {len(workers)} rounds;"
        f" {without_get_ratio:.2f}x the floor without its GET;"
        f" domain {domain_us:.0f} us/command = {domain_us / worker_cpu_us:.1%} of the worker's CPU"
    )
    print(
        result_line(
            "pipeline",
            store=store,
            read_before_write=policy,
            commands=count,
            appointments=appointment_count,
            rounds=len(workers),
            commands_per_s=median(w.rate(count) for w in workers),
            raw_msgs_per_s=median(b.raw.rate(count) for b in baselines),
            floor_commands_per_s=median(b.floor.before.rate(count) for b in baselines),
            ratio=rate_ratio,
            worker_cpu_us=worker_cpu_us,
            raw_cpu_us=median(b.raw.cpu_us(count) for b in baselines),
            floor_cpu_us=median(b.floor.cpu_us(count) for b in baselines),
            floor_without_get_cpu_us=median(b.floor_without_get.cpu_us(count) for b in baselines),
            cpu_per_floor=cpu_ratio,
            cpu_per_floor_without_get=without_get_ratio,
            domain_us=domain_us,
            met=cpu_ratio <= TARGET_CPU_PER_FLOOR and rate_ratio >= TARGET_RATIO,
        )
    )


def drain_arguments() -> argparse.ArgumentParser:
    """The drains' options, shared with bench_anatomy.py."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--appointments", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    return parser


def main() -> None:
    args = drain_arguments().parse_args()
    asyncio.run(run(args.commands, args.appointments, args.rounds, args.store))


if __name__ == "__main__":
    main()

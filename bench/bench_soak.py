"""Soak: a steady mix of commands and webhooks through the real `appt serve`, watched over time.

Run: ``python bench/bench_soak.py --seconds 600 --store sqlite`` (or ``--store postgres``).
One `appt serve` process (SQLite in a temp dir, or a PostgreSQL schema of
this run's own) with a short retention (``--retention``, default a sixth of
the run), the sandbox in a process of its own and subscribed to the service,
so every change a command makes comes back as a real signed webhook. The load
is ``--rate`` commands/s (edit_notes, some confirms, one reassign in 20) over
a pool of appointments, plus the webhooks they cause. Every ``--sample``
seconds it prints the service's RSS, the store's size on disk, the rows in
every store table, and the p99 of command latency (publish to result event)
in that window (SQLite's size includes its write-ahead log, which swings
by up to ~4 MiB between checkpoints, so its slope is also given without
it). At the end, the slope of each over the second half of the
run (after the first retention period has filled the tables): with a short
retention, each levels off instead of climbing; ``--keep`` runs the baseline
with the pruner off, where the tables climb at the rate messages arrive. Appointment records are not
pruned (one per appointment ever seen); they grow with the reassignments'
replacement bookings, so they are reported but not expected to level off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PG_URL,
    SANDBOX_TOKEN,
    appointments,
    result_line,
    sandbox_knob,
    sandbox_process,
    seed_sandbox,
    throwaway_schema,
    throwaway_vhost,
)
from consumer.broker import EVENTS_EXCHANGE, Broker  # noqa: E402
from tests.e2e.processes import SECRET, ServiceProcess, service_env  # noqa: E402

FIRST_ID = 20_000
POOL = 100
READY_TIMEOUT = 30.0


@dataclass
class Sample:
    elapsed: float
    rss_kib: int
    store_kib: int
    wal_kib: int
    rows: dict[str, int]
    p99_ms: float
    done: int


@dataclass
class Load:
    """Publishes commands at a steady rate and times each one to its result event."""

    broker: Broker
    pool: list[int]
    sent_at: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    sent: int = 0

    async def on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        started = self.sent_at.pop(body["command_id"], None)
        if started is None:
            return  # a re-sent result of a redelivery: counted once
        self.latencies.append(time.perf_counter() - started)
        self.outcomes[body["outcome"]] = self.outcomes.get(body["outcome"], 0) + 1
        if body["type"] == "reassign" and body["outcome"] == "succeeded" and body.get("appointment"):
            # the original is cancelled now: the replacement takes its place in the pool
            self.pool[self.pool.index(body["appointment_id"])] = body["appointment"]["id"]

    def command(self, n: int) -> dict[str, Any]:
        appointment_id = self.pool[n % len(self.pool)]
        command: dict[str, Any] = {"command_id": f"soak-{n}", "appointment_id": appointment_id}
        if n % 20 == 7:
            return {**command, "type": "reassign", "patient_id": 2000 + n}
        if n % 10 == 3:
            return {**command, "type": "confirm"}
        return {**command, "type": "edit_notes", "notes": f"soak note {n}"}

    async def run(self, rate: float, seconds: float) -> None:
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            due = int(elapsed * rate) + 1
            while self.sent < due:
                command = self.command(self.sent)
                self.sent_at[command["command_id"]] = time.perf_counter()
                await self.broker.publish_inbound(
                    json.dumps(command).encode(),
                    appointment_id=command["appointment_id"],
                    message_id=command["command_id"],
                )
                self.sent += 1
            await asyncio.sleep(1 / rate)

    def window_p99(self) -> tuple[float, int]:
        """p99 (ms) of the commands answered since the last call, and how many."""
        window, self.latencies = self.latencies, []
        if len(window) < 2:
            return (window[0] * 1000 if window else 0.0), len(window)
        return statistics.quantiles(window, n=100)[98] * 1000, len(window)


class StoreProbe:
    """Size on disk and rows per table, read beside the service (never through it)."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url

    async def measure(self) -> tuple[int, int, dict[str, int]]:
        """KiB on disk in all, KiB of it in SQLite's write-ahead log, rows per table."""
        if self.store_url.startswith("sqlite"):
            return self._sqlite()
        size, rows = await self._postgres()
        return size, 0, rows

    def _sqlite(self) -> tuple[int, int, dict[str, int]]:
        path = self.store_url.removeprefix("sqlite:///")
        sizes = {p: os.path.getsize(p) for p in (path, f"{path}-wal", f"{path}-shm") if os.path.exists(p)}
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            rows = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in sorted(tables)}
        return sum(sizes.values()) // 1024, sizes.get(f"{path}-wal", 0) // 1024, _interesting(rows)

    async def _postgres(self) -> tuple[int, dict[str, int]]:
        schema = self.store_url.rsplit("schema=", 1)[1]
        connection = await asyncpg.connect(PG_URL)
        try:
            tables = [
                r[0]
                for r in await connection.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
                )
            ]
            size = sum([await connection.fetchval(f"SELECT pg_total_relation_size('{schema}.{t}')") for t in tables])
            rows = {t: await connection.fetchval(f"SELECT count(*) FROM {schema}.{t}") for t in sorted(tables)}
        finally:
            await connection.close()
        return size // 1024, _interesting(rows)


def _interesting(rows: dict[str, int]) -> dict[str, int]:
    return {t: n for t, n in rows.items() if t not in ("schema_version", "sqlite_sequence", "watermarks")}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def slope_per_minute(samples: list[Sample], value: Any) -> float:
    """Least-squares slope of ``value(sample)`` against time, per minute."""
    xs = [s.elapsed / 60 for s in samples]
    ys = [float(value(s)) for s in samples]
    if len(xs) < 2:
        return 0.0
    return statistics.linear_regression(xs, ys).slope


@contextlib.asynccontextmanager
async def store_for(kind: str, workdir: str) -> AsyncIterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir}/soak.sqlite3"
        return
    async with throwaway_schema() as url:
        yield url


async def sample_until(
    load: Load, probe: StoreProbe, pid: int, seconds: float, every: float, started: float
) -> list[Sample]:
    samples = []
    while (elapsed := time.perf_counter() - started) < seconds:
        await asyncio.sleep(min(every, seconds - elapsed))
        size, wal, rows = await probe.measure()
        p99, done = load.window_p99()
        sample = Sample(time.perf_counter() - started, rss_kib(pid), size, wal, rows, p99, done)
        samples.append(sample)
        table = " ".join(f"{t}={n}" for t, n in rows.items())
        print(
            f"t={sample.elapsed:6.0f}s rss={sample.rss_kib / 1024:6.1f}MiB store={size / 1024:7.2f}MiB (wal {wal / 1024:5.2f}) "
            f"p99={p99:7.1f}ms answered={done:5d} {table}",
            flush=True,
        )
    return samples


async def run(args: argparse.Namespace) -> None:
    retention = 0.0 if args.keep else args.retention or max(5.0, args.seconds / 6)
    with throwaway_vhost() as amqp_url, tempfile.TemporaryDirectory() as workdir, sandbox_process() as sandbox:
        await seed_sandbox(sandbox.url, appointments(FIRST_ID, POOL))
        async with store_for(args.store, workdir) as store_url:
            env = service_env(
                pms_url=sandbox.url,
                store=store_url,
                amqp_url=amqp_url,
                APPT_PMS_TOKEN=SANDBOX_TOKEN,
                APPT_INBOX_RETENTION=str(retention),
                APPT_WORKFLOW_RETENTION=str(retention),
                APPT_STATE_LOG_RETENTION=str(retention),
                APPT_PRUNE_INTERVAL=str(retention and max(1.0, retention / 5)),
            )
            service = ServiceProcess(env, Path(workdir), name="soak")
            service.start()
            try:
                await service.wait_ready(READY_TIMEOUT)
                await sandbox_knob(sandbox.url, "subscribe", {"url": f"{service.url}/webhooks/pms", "secret": SECRET})
                samples, load = await soak(amqp_url, store_url, service, args, retention)
            finally:
                await service.terminate(timeout=30)
    report(samples, load, args, retention)


async def soak(
    amqp_url: str, store_url: str, service: ServiceProcess, args: argparse.Namespace, retention: float
) -> tuple[list[Sample], Load]:
    broker = Broker(amqp_url)
    await broker.connect()
    try:
        channel = await broker.channel()
        results = await channel.declare_queue(exclusive=True)
        await results.bind(EVENTS_EXCHANGE, routing_key="result.#")
        load = Load(broker, list(range(FIRST_ID, FIRST_ID + POOL)))
        await results.consume(load.on_result, no_ack=True)
        print(
            f"soak: {args.seconds:.0f} s, {args.store}, {args.rate:g} commands/s (+ the webhooks they cause), "
            f"retention {retention or 'none (keep)'} s, sample every {args.sample:.0f} s",
            flush=True,
        )
        started = time.perf_counter()
        assert service.pid is not None
        sampler = asyncio.create_task(
            sample_until(load, StoreProbe(store_url), service.pid, args.seconds, args.sample, started)
        )
        await load.run(args.rate, args.seconds)
        samples = await sampler
        await asyncio.sleep(2)  # the last results
        return samples, load
    finally:
        await broker.close()


def report(samples: list[Sample], load: Load, args: argparse.Namespace, retention: float) -> None:
    settled = [s for s in samples if s.elapsed >= args.seconds / 2] or samples
    mean = {
        "rss": statistics.fmean(s.rss_kib for s in settled) or 1.0,
        "store": statistics.fmean(s.store_kib for s in settled) or 1.0,
    }
    rss = slope_per_minute(settled, lambda s: s.rss_kib)
    size = slope_per_minute(settled, lambda s: s.store_kib)
    without_wal = slope_per_minute(settled, lambda s: s.store_kib - s.wal_kib)
    p99 = slope_per_minute(settled, lambda s: s.p99_ms)
    rows = {t: slope_per_minute(settled, lambda s, t=t: s.rows.get(t, 0)) for t in settled[-1].rows}
    print(
        f"second half ({len(settled)} samples), slope per minute: RSS {rss:+.0f} KiB "
        f"({100 * rss / mean['rss']:+.2f} %), store {size:+.0f} KiB ({100 * size / mean['store']:+.2f} %; "
        f"without the WAL, which swings between checkpoints: {without_wal:+.0f} KiB), "
        f"p99 {p99:+.2f} ms; rows " + ", ".join(f"{t} {v:+.0f}" for t, v in rows.items())
    )
    print(
        f"commands sent {load.sent}, answered {sum(load.outcomes.values())} {load.outcomes}, "
        f"unanswered {len(load.sent_at)}"
    )
    print(
        result_line(
            "soak",
            store=args.store,
            seconds=args.seconds,
            rate=args.rate,
            retention_s=retention,
            sent=load.sent,
            unanswered=len(load.sent_at),
            rss_mib=settled[-1].rss_kib / 1024,
            rss_kib_per_min=rss,
            store_mib=settled[-1].store_kib / 1024,
            store_kib_per_min=size,
            store_without_wal_kib_per_min=without_wal,
            p99_ms=settled[-1].p99_ms,
            p99_ms_per_min=p99,
            **{f"{t}_rows_per_min": v for t, v in rows.items() if t != "appointments"},
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the run")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--rate", type=float, default=10.0, help="commands per second")
    parser.add_argument(
        "--retention",
        type=float,
        default=0.0,
        help="seconds, for inbox, workflows and state log (default: a sixth of the run)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="the baseline: keep everything (pruner off), to see what retention levels off",
    )
    parser.add_argument("--sample", type=float, default=0.0, help="seconds between samples (default: 1/20 of the run)")
    args = parser.parse_args()
    args.sample = args.sample or max(2.0, args.seconds / 20)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

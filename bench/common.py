"""What the benchmarks share: a throwaway vhost, child processes, the worker pipeline, RESULT lines.

Every run gets a fresh RabbitMQ vhost (deleted afterwards) so no run ever
counts a previous run's leftovers; every server under test runs in its own
process so the load generator and the server never share an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consumer.broker import EVENTS_EXCHANGE, Broker, partition_queue  # noqa: E402
from consumer.commands import ReadBeforeWrite  # noqa: E402
from consumer.logs import configure  # noqa: E402
from consumer.messages import DEFAULT_PRACTICE  # noqa: E402
from consumer.pms.client import PmsClient  # noqa: E402
from consumer.practices import PracticeConfig, Practices  # noqa: E402
from consumer.store.base import Store  # noqa: E402
from consumer.store.opening import open_store  # noqa: E402
from consumer.worker import Worker  # noqa: E402
from consumer.workflows import WorkflowRunner  # noqa: E402

RABBIT = "127.0.0.1:5672"
PG_URL = os.environ.get("APPT_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SANDBOX_TOKEN = "sandbox-token"
SERVERS = Path(__file__).resolve().parent / "servers.py"
READY_TIMEOUT = 30.0
FIRST_SLOT = datetime(2031, 1, 6, 8, tzinfo=UTC)
UNLIMITED_BUDGET = 10**9  # the sandbox's hourly budget must never be what a benchmark measures


def result_line(name: str, **figures: Any) -> str:
    """The stable, greppable last line(s) of every benchmark."""
    parts = [f"{key.replace('_per_', '/')}={_fmt(value)}" for key, value in figures.items()]
    return f"RESULT {name} " + " ".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def throwaway_vhost() -> Iterator[str]:
    """An AMQP URL on a vhost of this run's own, deleted afterwards whatever happens."""
    name = f"appt-bench-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBIT}/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


@dataclass
class Child:
    """A server in its own process; ``port`` is what it printed on its READY line."""

    process: subprocess.Popen[str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU the child has used so far: robust to other load on the machine."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def child_server(kind: str, *args: str, log_path: Path | None = None) -> Iterator[Child]:
    """Start ``servers.py KIND`` and wait for its ``READY <port>`` line; SIGTERM it afterwards."""
    with open(log_path or os.devnull, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(SERVERS), kind, *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
        )
        try:
            yield Child(process, _ready_port(process, kind))
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ready_port(process: subprocess.Popen[str], kind: str) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("READY "):
            return int(line.split()[1])
        if not line and process.poll() is not None:
            break
    raise RuntimeError(f"{kind} server did not start (exit code {process.poll()})")


# ---- the sandbox in its own process ------------------------------------------


@contextlib.contextmanager
def sandbox_process() -> Iterator[Child]:
    """The PMS emulator in a child process, so its CPU is not charged to the worker measured."""
    with child_server("sandbox") as child:
        yield child


async def sandbox_knob(url: str, name: str, body: dict[str, Any]) -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(f"{url}/_sandbox/{name}", json=body) as response:
            answer = await response.json()
    if not answer.get("ok"):
        raise RuntimeError(f"sandbox knob {name} failed: {answer}")
    return answer.get("result")


def appointments(first_id: int, count: int, *, patient_id: int | None = 1013) -> list[dict[str, Any]]:
    """``count`` Pending appointments, each on its own half-hour slot (so list queries stay small)."""
    seeded = []
    for offset in range(count):
        start = FIRST_SLOT + timedelta(minutes=30 * offset)
        seeded.append(
            {
                "id": first_id + offset,
                "patient_id": patient_id,
                "practitioner_id": 1 + offset % 7,
                "start_time": _iso(start),
                "finish_time": _iso(start + timedelta(minutes=25)),
                "reason": "Exam",
                "state": "Pending",
            }
        )
    return seeded


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def seed_sandbox(url: str, seeded: list[dict[str, Any]], *, latency: float = 0.0) -> None:
    await sandbox_knob(url, "rate_limit", {"budget": UNLIMITED_BUDGET})
    await sandbox_knob(url, "seed", {"appointments": seeded})
    await sandbox_knob(url, "latency", {"seconds": latency})


# ---- the worker pipeline in this process ----------------------------------------


RESULTS_POLL_SECONDS = 0.02


@dataclass
class Results:
    """The ``result.*`` events (one per finished command), queued unread while the clock runs.

    Nothing consumes them during a measured run, so the harness costs the
    worker's process no CPU then: the queue's depth is polled (one AMQP call
    every 20 ms), and the outcomes are read afterwards.
    """

    queue: aio_pika.abc.AbstractQueue
    repeated: int = 0
    answered: dict[str | None, str] = field(default_factory=dict)  # message id -> command id, read so far

    async def wait_for(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while await self._depth() < count:
                await asyncio.sleep(RESULTS_POLL_SECONDS)

    async def _depth(self) -> int:
        # Declaring again answers the current depth (aio-pika caches a passive declare's answer).
        declared = await self.queue.declare()
        return declared.message_count or 0

    async def take(self, count: int, timeout: float = 60.0) -> dict[str, int]:
        """Read results until ``count`` commands have answered: how many ended in each outcome.

        Results are at-least-once (a redelivered command publishes its result
        again), so each command counts once, by message id; ``repeated`` counts the rest.
        """
        outcomes: dict[str, int] = {}
        taken = 0
        done = asyncio.Event()

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal taken
            if message.message_id in self.answered:  # by this call or an earlier one
                self.repeated += 1
                return
            self.answered[message.message_id] = json.loads(message.body)["command_id"]
            outcome = (message.routing_key or "").rsplit(".", 1)[-1]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            taken += 1
            if taken >= count:
                done.set()

        tag = await self.queue.consume(on_result, no_ack=True)
        await asyncio.wait_for(done.wait(), timeout)
        await self.queue.cancel(tag)
        return outcomes


async def bind_results(broker: Broker) -> Results:
    """A queue of this run's own that collects every ``result.*`` event from now on."""
    channel = await broker.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(EVENTS_EXCHANGE, routing_key="result.#")
    return Results(queue)


async def publish_commands(broker: Broker, commands: list[dict[str, Any]]) -> None:
    """Publish with confirms, 64 at a time (order per appointment kept: one id is never split)."""
    for start in range(0, len(commands), 64):
        await asyncio.gather(
            *(
                broker.publish_inbound(
                    json.dumps(c).encode(),
                    practice=c.get("practice", DEFAULT_PRACTICE),
                    appointment_id=c["appointment_id"],
                    message_id=c["command_id"],
                )
                for c in commands[start : start + 64]
            )
        )


@dataclass
class Pipeline:
    broker: Broker
    store: Store
    pms: PmsClient
    worker: Worker
    results: Results

    async def drain(self, count: int, timeout: float) -> float:
        """Seconds until ``count`` results were published (the worker must already be started)."""
        started = time.perf_counter()
        await self.results.wait_for(count, timeout)
        return time.perf_counter() - started


@contextlib.asynccontextmanager
async def running_pipeline(
    amqp_url: str,
    store_url: str,
    pms_url: str,
    *,
    prefetch: int,
    pms_concurrency: int,
    partitions: int = 4,
    practice_urls: dict[str, str] | None = None,
    read_before_write: ReadBeforeWrite = "always",
) -> AsyncIterator[Pipeline]:
    """The objects ``appt serve`` wires (minus HTTP), with the worker not yet started.

    ``practice_urls`` (name -> PMS URL) serves those practices instead of one default on ``pms_url``.
    """
    store = open_store(store_url)
    await store.open()
    broker = Broker(amqp_url, partitions=partitions, prefetch=prefetch)
    await broker.connect()
    urls = practice_urls or {DEFAULT_PRACTICE: pms_url}
    practices = Practices(
        {name: PracticeConfig(pms_url=url, token=SANDBOX_TOKEN) for name, url in urls.items()},
        lambda config, token: PmsClient(config.pms_url, token, timeout=30.0, concurrency=pms_concurrency),
    )
    workflows = WorkflowRunner(practices=practices, store=store, broker=broker)
    worker = Worker(
        broker=broker,
        store=store,
        practices=practices,
        reassign=workflows.reassign,
        partitions=list(range(partitions)),
        retry_delay=0.1,
        read_before_write=read_before_write,
    )
    results = await bind_results(broker)
    try:
        yield Pipeline(broker, store, practices.get(next(iter(urls))).pms, worker, results)
    finally:
        await worker.stop(timeout=5)
        await practices.close()
        await broker.close()
        await store.close()


def edit_commands(appointment_ids: list[int], count: int, tag: str) -> list[dict[str, Any]]:
    """``count`` edit_notes commands spread round-robin over the appointments."""
    return [
        {
            "type": "edit_notes",
            "command_id": f"{tag}-{i}",
            "appointment_id": appointment_ids[i % len(appointment_ids)],
            "notes": f"{tag} note {i}",
        }
        for i in range(count)
    ]


async def purge_partitions(amqp_url: str, partitions: int = 4) -> int:
    """Empty the partition queues; how many messages were in them."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        purged = 0
        for index in range(partitions):
            queue = await channel.declare_queue(partition_queue(index), passive=True)
            purged += (await queue.purge()).message_count or 0
        return purged


async def empty_partitions(amqp_url: str, before: str, partitions: int = 4) -> None:
    """Purge what an earlier drain left in the partition queues, and say so: a drain that
    stops at its count leaves the rest to the next one, which would count them as its own."""
    if left := await purge_partitions(amqp_url, partitions):
        print(f"{left} messages left in the partition queues before {before}: purged", file=sys.stderr, flush=True)


def log_to_file(path: Path) -> None:
    """Log as ``appt serve`` does (JSON lines, INFO) but into a file: the cost stays, the noise goes."""
    configure("json", "INFO", stream=open(path, "a"))  # noqa: SIM115 (open for the whole run)


@contextlib.asynccontextmanager
async def throwaway_schema() -> AsyncIterator[str]:
    """A store URL on a PostgreSQL schema of this run's own, dropped afterwards."""
    schema = f"appt_bench_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{PG_URL}?schema={schema}"
    finally:
        connection = await asyncpg.connect(PG_URL)
        try:
            await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await connection.close()


def sqlite_url(directory: str, name: str) -> str:
    return f"sqlite:///{os.path.join(directory, name)}"

"""Where the worker's CPU goes that the protocol floor's does not: threads, system calls, switches, tasks.

Run: ``python bench/bench_anatomy.py [--commands 2000 --rounds 3 --store sqlite|postgres]`` (Linux: it
reads ``/proc/self``). Each round drains ``--commands`` edit_notes through the protocol floor and
then through the worker under each read policy, exactly as ``bench_pipeline.py`` does, and takes
per command around each drain alone:

- CPU: the process's user and system time, and the event loop's thread apart from the others
  (the SQLite store's own thread is the other one);
- voluntary context switches (a thread blocking: on a queue, a lock, the GIL), per thread;
- tasks created (a counting task factory on the loop);
- file writes: system calls and bytes (``/proc/self/io`` counts ``write``/``pwrite``, so the log
  and the store's files; a socket's ``send`` is not counted there).

Medians over rounds. The pipeline's ratios come from ``bench_pipeline.py``; this one says
what the difference is made of, so a claim about it can be checked by running it again.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, fields
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_pipeline import (  # noqa: E402
    FIRST_ID,
    POLICIES,
    Figures,
    baseline_drain,
    drain_arguments,
    floor_consume,
    measured,
    store_urls,
    worker_round,
)
from bench.common import (  # noqa: E402
    appointments,
    edit_commands,
    log_to_file,
    result_line,
    sandbox_process,
    seed_sandbox,
    throwaway_vhost,
)
from consumer.service import tune_gc  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ThreadTimes:
    cpu: float  # seconds
    switches: int  # voluntary context switches


def thread_times() -> dict[int, ThreadTimes]:
    """Every thread of this process, by thread id."""
    times: dict[int, ThreadTimes] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/self/task/{tid}/status").read_text()
        except FileNotFoundError:  # ended in between
            continue
        switches = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        times[int(tid)] = ThreadTimes((int(stat[11]) + int(stat[12])) / TICKS, switches)
    return times


def written() -> tuple[int, int]:
    """File write system calls and bytes written by this process so far (sockets' sends are not in)."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io["syscw"]), int(io["wchar"])


@dataclass(frozen=True)
class Anatomy:
    """One drain, per command."""

    cpu_us: float
    user_us: float
    system_us: float
    loop_thread_us: float
    other_threads_us: float
    loop_thread_switches: float
    other_threads_switches: float
    tasks: float
    write_calls: float
    bytes_written: float


class Counting:
    """Takes the figures around one drain: a ``measure`` for ``worker_round``, and for the floor."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.taken: list[Anatomy] = []
        self._tasks = 0

    async def __call__(self, drain: Awaitable[float]) -> Figures:
        loop = asyncio.get_running_loop()
        previous_factory = loop.get_task_factory()
        loop.set_task_factory(self._counting_factory)
        self._tasks = 0
        before_threads, before_io, before_os = thread_times(), written(), os.times()
        try:
            figures = await measured(drain)
        finally:
            loop.set_task_factory(previous_factory)
        after_threads, after_io, after_os = thread_times(), written(), os.times()
        self.taken.append(self._anatomy(before_threads, after_threads, before_io, after_io, before_os, after_os))
        return figures

    def _counting_factory(
        self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any]
    ) -> asyncio.Task[Any]:
        self._tasks += 1
        return asyncio.Task(coro, loop=loop)

    def _anatomy(
        self,
        before: dict[int, ThreadTimes],
        after: dict[int, ThreadTimes],
        io_before: tuple[int, int],
        io_after: tuple[int, int],
        os_before: os.times_result,
        os_after: os.times_result,
    ) -> Anatomy:
        loop_tid = os.getpid()  # asyncio.run runs the loop in the main thread
        zero = ThreadTimes(0.0, 0)

        def spent(tids: set[int]) -> tuple[float, int]:
            cpu = sum(after[t].cpu - before.get(t, zero).cpu for t in tids)
            switches = sum(after[t].switches - before.get(t, zero).switches for t in tids)
            return cpu, switches

        loop_cpu, loop_switches = spent({loop_tid})
        other_cpu, other_switches = spent(set(after) - {loop_tid})
        user = os_after.user - os_before.user
        system = os_after.system - os_before.system
        per = 1 / self.count
        return Anatomy(
            cpu_us=(user + system) * per * 1e6,
            user_us=user * per * 1e6,
            system_us=system * per * 1e6,
            loop_thread_us=loop_cpu * per * 1e6,
            other_threads_us=other_cpu * per * 1e6,
            loop_thread_switches=loop_switches * per,
            other_threads_switches=other_switches * per,
            tasks=self._tasks * per,
            write_calls=(io_after[0] - io_before[0]) * per,
            bytes_written=(io_after[1] - io_before[1]) * per,
        )

    def medians(self) -> Anatomy:
        return Anatomy(**{f.name: median(getattr(a, f.name) for a in self.taken) for f in fields(Anatomy)})


async def run(count: int, appointment_count: int, rounds: int, store: str) -> dict[str, Anatomy]:
    tune_gc()
    ids = list(range(FIRST_ID, FIRST_ID + appointment_count))
    counters: dict[str, Counting] = {name: Counting(count) for name in ("floor", *POLICIES)}
    with throwaway_vhost() as amqp_url, tempfile.TemporaryDirectory() as workdir, sandbox_process() as sandbox:
        log_to_file(Path(workdir) / "worker.log")
        await seed_sandbox(sandbox.url, appointments(FIRST_ID, appointment_count))
        async with store_urls(store, workdir) as stores:
            for number in range(1, rounds + 1):
                await baseline_drain(
                    amqp_url,
                    ids,
                    count,
                    f"floor-{number}",
                    lambda prefetch, partitions: floor_consume(amqp_url, sandbox.url, count, prefetch, partitions),
                    counters["floor"],
                )
                for policy in POLICIES if number % 2 else POLICIES[::-1]:
                    commands = edit_commands(ids, count, f"{policy}-{number}")
                    await worker_round(amqp_url, stores[policy], sandbox.url, commands, policy, counters[policy])
                print(f"round {number} done", flush=True)
    return {name: counter.medians() for name, counter in counters.items()}


ROWS: list[tuple[str, Callable[[Anatomy], float], str]] = [
    ("CPU per command", lambda a: a.cpu_us, "us"),
    ("  user", lambda a: a.user_us, "us"),
    ("  system", lambda a: a.system_us, "us"),
    ("  the event loop's thread", lambda a: a.loop_thread_us, "us"),
    ("  other threads (the SQLite store's)", lambda a: a.other_threads_us, "us"),
    ("voluntary switches, event loop's thread", lambda a: a.loop_thread_switches, ""),
    ("voluntary switches, other threads", lambda a: a.other_threads_switches, ""),
    ("tasks created", lambda a: a.tasks, ""),
    ("file writes (the log, the store's files)", lambda a: a.write_calls, ""),
    ("bytes written to files", lambda a: a.bytes_written, ""),
]


def report(figures: dict[str, Anatomy], store: str, count: int, rounds: int) -> None:
    names = ["floor", *POLICIES]
    print(f"\nper command, medians over {rounds} rounds of {count} ({store}):")
    print(f"{'':42}" + "".join(f"{name:>14}" for name in names))
    for label, value, unit in ROWS:
        cells = "".join(f"{value(figures[name]):>12.{0 if unit else 2}f}{unit:>2}" for name in names)
        print(f"{label:42}{cells}")
    floor = figures["floor"]
    for policy in POLICIES:
        worker = figures[policy]
        print(
            result_line(
                "anatomy",
                store=store,
                read_before_write=policy,
                commands=count,
                rounds=rounds,
                cpu_us=worker.cpu_us,
                floor_cpu_us=floor.cpu_us,
                system_us=worker.system_us,
                floor_system_us=floor.system_us,
                other_threads_us=worker.other_threads_us,
                switches=worker.loop_thread_switches + worker.other_threads_switches,
                floor_switches=floor.loop_thread_switches + floor.other_threads_switches,
                tasks=worker.tasks,
                floor_tasks=floor.tasks,
                file_writes=worker.write_calls,
                file_bytes=worker.bytes_written,
            )
        )


def main() -> None:
    args = drain_arguments().parse_args()
    figures = asyncio.run(run(args.commands, args.appointments, args.rounds, args.store))
    report(figures, args.store, args.commands, args.rounds)


if __name__ == "__main__":
    main()

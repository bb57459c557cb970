"""The cycle collector's share of the worker: Python's default young threshold against `tune_gc`'s.

Run: ``python bench/bench_gc.py [--commands 1000 --rounds 8]``. The worker
(SQLite, ``always``, wired as in ``bench_pipeline.py``) drains ``--commands``
edits per round, the young-generation threshold alternating between Python's
default (700) and ``GC_YOUNG_THRESHOLD``, which goes first alternating by
round. Per round: the process's CPU per command and the time spent in the
collector (``gc.callbacks``). Single rounds are noisy on a shared machine,
so the pairs' ratios and their median are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_pipeline import FIRST_ID, worker_round  # noqa: E402
from bench.common import (  # noqa: E402
    appointments,
    edit_commands,
    log_to_file,
    result_line,
    sandbox_process,
    seed_sandbox,
    sqlite_url,
    throwaway_vhost,
)
from consumer.service import GC_YOUNG_THRESHOLD  # noqa: E402

PYTHON_DEFAULT = 700
SETTINGS = {"default": PYTHON_DEFAULT, "tuned": GC_YOUNG_THRESHOLD}


class CollectorClock:
    """Thread CPU seconds spent in the cycle collector since the last ``take``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_phase)

    def _on_phase(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._started

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


async def run(count: int, rounds: int) -> None:
    ids = list(range(FIRST_ID, FIRST_ID + 200))
    cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
    collector: dict[str, list[float]] = {name: [] for name in SETTINGS}
    clock = CollectorClock()
    _, middle, oldest = gc.get_threshold()
    with throwaway_vhost() as amqp_url, tempfile.TemporaryDirectory() as workdir, sandbox_process() as sandbox:
        log_to_file(Path(workdir) / "worker.log")
        await seed_sandbox(sandbox.url, appointments(FIRST_ID, len(ids)))
        store_url = sqlite_url(workdir, "store.sqlite3")
        for number in range(rounds):
            for name in SETTINGS if number % 2 else list(SETTINGS)[::-1]:
                gc.set_threshold(SETTINGS[name], middle, oldest)
                gc.collect()
                clock.take()
                figures = await worker_round(
                    amqp_url, store_url, sandbox.url, edit_commands(ids, count, f"{name}-{number}"), "always"
                )
                cpu[name].append(figures.cpu_us(count))
                collector[name].append(clock.take() / count * 1e6)
            print(
                f"round {number + 1}: "
                + ", ".join(
                    f"{n} {cpu[n][-1]:.0f} us CPU/command ({collector[n][-1]:.0f} in the collector)" for n in SETTINGS
                ),
                flush=True,
            )
    pairs = sorted(tuned / default for tuned, default in zip(cpu["tuned"], cpu["default"], strict=True))
    print("tuned/default per round, sorted:", ", ".join(f"{ratio:.2f}" for ratio in pairs))
    print(
        result_line(
            "gc",
            commands=count,
            rounds=rounds,
            default_cpu_us=median(cpu["default"]),
            tuned_cpu_us=median(cpu["tuned"]),
            default_collector_us=median(collector["default"]),
            tuned_collector_us=median(collector["tuned"]),
            ratio=median(pairs),
            lower_in=sum(ratio < 1 for ratio in pairs),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(run(args.commands, args.rounds))


if __name__ == "__main__":
    main()

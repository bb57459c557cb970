"""Reassignment: workflows/s end to end, and memory per in-flight workflow.

Run: ``python bench/bench_reassign.py [--count 200]``. Two phases, one run:

1. throughput at zero PMS latency: ``count`` plain edit_notes commands over
   ``count`` appointments (the baseline), then ``count`` reassign commands
   over the same appointments; each saga makes about six PMS calls and four
   store commits where an edit makes two and one, hence the ratio;
2. memory with the PMS slowed down (``--latency`` per call) so that all the
   messages are in flight at once: tracemalloc's peak divided by their
   number, for the baseline commands and for the workflows alike.

Correctness is checked on the sandbox afterwards: every original cancelled,
one live replacement per original, each for the new patient.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    Pipeline,
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
from consumer.service import tune_gc  # noqa: E402

FIRST_ID = 30_000
NEW_PATIENT = 5_000
REPLACEMENT_IDS = 900_000_000  # the sandbox numbers what it creates from here
PREFETCH = 64  # x 4 partitions: every workflow can be in flight at once
PMS_CONCURRENCY = 256
TIMEOUT = 180.0


def reassign_commands(ids: list[int], tag: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "reassign",
            "command_id": f"{tag}-{i}",
            "appointment_id": appointment_id,
            "patient_id": NEW_PATIENT + i,
        }
        for i, appointment_id in enumerate(ids)
    ]


async def rate_of(pipeline: Pipeline, commands: list[dict[str, Any]]) -> tuple[float, dict[str, int]]:
    """Commands/s from the first publish to the last result."""
    started = time.perf_counter()
    await publish_commands(pipeline.broker, commands)
    await pipeline.results.wait_for(len(commands), TIMEOUT)
    rate = len(commands) / (time.perf_counter() - started)
    return rate, await pipeline.results.take(len(commands))


async def memory_per_in_flight(pipeline: Pipeline, commands: list[dict[str, Any]]) -> tuple[float, float]:
    """Peak traced bytes per message, all of them in flight at once; and the seconds it took.

    With prefetch x partitions and the PMS semaphore both above the count, and
    every PMS call slow, all the messages are delivered and waiting on the PMS
    together: the peak is their joint footprint.
    """
    tracemalloc.start()
    started = time.perf_counter()
    await publish_commands(pipeline.broker, commands)
    await pipeline.results.wait_for(len(commands), TIMEOUT)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    await pipeline.results.take(len(commands))
    return peak / len(commands), elapsed


async def check_sandbox(url: str, ids: list[int]) -> str:
    """'ok', or what is wrong: each original cancelled, one live replacement on its slot."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/_sandbox/appointments") as response:
            everything = (await response.json())["appointments"]
    originals = [a for a in everything if a["id"] in set(ids)]
    not_cancelled = sum(a["state"] != "Cancelled" for a in originals)
    live = Counter(
        (a["start_time"], a["practitioner_id"])
        for a in everything
        if a["id"] >= REPLACEMENT_IDS and a["state"] != "Cancelled"
    )
    unreplaced = sum(live[(a["start_time"], a["practitioner_id"])] != 1 for a in originals)
    if not_cancelled or unreplaced or len(originals) != len(ids):
        return f"{not_cancelled} originals not cancelled, {unreplaced} without exactly one live replacement"
    return "ok"


async def run(count: int, latency: float) -> None:
    tune_gc()  # the process's cycle collector as `appt serve` sets it
    fast_ids = list(range(FIRST_ID, FIRST_ID + count))
    slow_ids = list(range(FIRST_ID + count, FIRST_ID + 2 * count))
    with throwaway_vhost() as amqp_url, tempfile.TemporaryDirectory() as workdir, sandbox_process() as sandbox:
        log_to_file(Path(workdir) / "worker.log")
        await seed_sandbox(sandbox.url, appointments(FIRST_ID, 2 * count))
        async with running_pipeline(
            amqp_url,
            sqlite_url(workdir, "reassign.sqlite3"),
            sandbox.url,
            prefetch=PREFETCH,
            pms_concurrency=PMS_CONCURRENCY,
        ) as pipeline:
            await pipeline.worker.start()
            await rate_of(pipeline, edit_commands(fast_ids[:20], 20, "warm"))
            edit_rate, edit_outcomes = await rate_of(pipeline, edit_commands(fast_ids, count, "edit"))
            saga_rate, saga_outcomes = await rate_of(pipeline, reassign_commands(fast_ids, "fast"))
            fast_check = await check_sandbox(sandbox.url, fast_ids)

            await sandbox_knob(sandbox.url, "latency", {"seconds": latency})
            edit_bytes, edit_seconds = await memory_per_in_flight(pipeline, edit_commands(slow_ids, count, "slow-edit"))
            saga_bytes, saga_seconds = await memory_per_in_flight(pipeline, reassign_commands(slow_ids, "slow"))
            slow_check = await check_sandbox(sandbox.url, slow_ids)
    print(
        f"edit_notes: {edit_rate:.0f} commands/s {edit_outcomes}; "
        f"reassign: {saga_rate:.0f} workflows/s {saga_outcomes}; sandbox check: {fast_check}"
    )
    print(f"ratio reassign / edit = {saga_rate / edit_rate:.2f}")
    print(
        f"memory at {latency * 1e3:.0f} ms/PMS call, {count} at once: {saga_bytes / 1024:.1f} KiB per in-flight "
        f"workflow (all done in {saga_seconds:.1f} s), {edit_bytes / 1024:.1f} KiB per in-flight edit "
        f"(all done in {edit_seconds:.1f} s); sandbox check: {slow_check}"
    )
    print(
        result_line(
            "reassign",
            workflows=count,
            workflows_per_s=saga_rate,
            edits_per_s=edit_rate,
            ratio=saga_rate / edit_rate,
            kib_per_workflow=saga_bytes / 1024,
            kib_per_edit=edit_bytes / 1024,
            in_flight=count,
            succeeded=saga_outcomes.get("succeeded", 0),
            check="ok" if fast_check == slow_check == "ok" else "FAILED",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per PMS call in the memory phase")
    args = parser.parse_args()
    asyncio.run(run(args.count, args.latency))


if __name__ == "__main__":
    main()

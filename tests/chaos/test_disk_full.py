"""A full disk under the SQLite store, under load: latency, never a message, and no crash loop.

The disk is a small tmpfs the test mounts for itself (the tests run as root on this machine;
``mount`` is what it allows, so no RLIMIT_FSIZE stand-in is needed), holding the store's file
and filled to the last byte by a filler file. While it is full the service keeps running, logs
an error, answers 503 on ``/readyz``, and acks and dead-letters nothing; once the filler is
removed it resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.broker import Broker
from consumer.sandbox import RunningSandbox
from consumer.store.opening import open_store
from tests.chaos.common import (
    STORE_DOWN_FOR,
    chaos_marks,
    chaos_seed,
    collecting,
    final_figures,
    mixed_load,
    readyz_is,
    scaled,
    seed_both,
    settle,
    two_practice_service,
    wait_for,
)

pytestmark = chaos_marks
DISK_SIZE = "16m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.fail("the disk-full test mounts a tmpfs: run it as root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(disk)], check=True, timeout=30)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, timeout=30)


def fill(path: Path) -> int:
    """Write ``path`` until the disk has no byte left; the bytes written."""
    written = 0
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as filler:
        while True:
            try:
                written += filler.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 2]  # the last few bytes too


async def test_full_disk_under_load_holds_messages_and_resumes_when_space_returns(
    amqp_url: str, tmp_path: Path, small_disk: Path, pms: RunningSandbox, north: RunningSandbox
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    store_url = f"sqlite:///{small_disk / 'appt.sqlite3'}"
    ids = seed_both(pms, north, scaled(16, 60))
    service = two_practice_service(store_url, amqp_url, tmp_path, pms, north)
    broker = Broker(amqp_url)
    await broker.connect()
    store = open_store(store_url)
    filler = small_disk / "filler"
    sent: list[str] = []
    try:
        async with collecting(amqp_url) as collector:
            await service.start().wait_ready(timeout=60)
            stop = asyncio.Event()
            load = asyncio.create_task(mixed_load(broker, {"default": pms, "north": north}, ids, rng, sent, stop))
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            filled = await asyncio.to_thread(fill, filler)
            not_ready_seen = await wait_for(lambda: readyz_is(service, 503), 15)
            held = await wait_for(lambda: "store unavailable" in service.log_text(), 30)
            answered_while_full = len(collector.results)
            await asyncio.sleep(STORE_DOWN_FOR)
            answered_while_full = len(collector.results) - answered_while_full
            filler.unlink()
            freed = time.monotonic()
            await wait_for(lambda: readyz_is(service, 200), 60)
            recovery = time.monotonic() - freed
            stop.set()
            await load
            await store.open()
            await settle(collector, sent, pms, north, store, service, timeout=scaled(90, 300))
            figures = await final_figures(collector, sent, pms, north, store, ids)
            restarted_service = service.starts != 1 or not service.running
    finally:
        await service.terminate()
        await store.close()
        await broker.close()
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()

    print(
        f"\nchaos disk_full disk=tmpfs:{DISK_SIZE} filled_bytes={filled} full_for_s={STORE_DOWN_FOR} "
        f"commands={len(sent)} results={len(collector.results)} answered_while_full={answered_while_full} "
        f"lost={figures['lost']} applied_twice={figures['applied_twice']} dead={figures['dead']} "
        f"duplicated={figures['duplicated']} mismatches={figures['mismatches']} "
        f"readyz_503_while_full={not_ready_seen} recovery_s={recovery:.1f} seed={seed}"
    )
    assert figures["details"] == {}, figures["details"]
    assert not_ready_seen and held, "503 and an error line while the disk is full"
    assert not restarted_service, "resumed without a service restart (no crash loop)"

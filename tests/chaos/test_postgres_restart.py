"""A PostgreSQL restart under load, on the PostgreSQL store: it costs latency, never a message.

The cluster restarted is one the test starts for itself (tests/helpers.PostgresCluster: initdb
in a temp dir, its own port), never the machine's shared PostgreSQL. While it is down nothing
is acked or dead-lettered (the worker holds what it can't commit until the store answers),
``/readyz`` answers 503, and it answers 200 again once PostgreSQL is back, with the same process.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

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
from tests.helpers import PostgresCluster

pytestmark = chaos_marks


async def test_postgres_restart_under_load_costs_latency_never_a_message(
    amqp_url: str, tmp_path: Path, pms: RunningSandbox, north: RunningSandbox
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    restarts = scaled(1, 4)
    cluster = PostgresCluster()
    await asyncio.to_thread(cluster.init)
    await asyncio.to_thread(cluster.start)
    ids = seed_both(pms, north, scaled(16, 60))
    service = two_practice_service(cluster.url, amqp_url, tmp_path, pms, north)
    broker = Broker(amqp_url)
    await broker.connect()
    store = open_store(cluster.url)
    sent: list[str] = []
    not_ready_seen: list[bool] = []
    recovery: list[float] = []
    try:
        async with collecting(amqp_url) as collector:
            await service.start().wait_ready(timeout=60)
            stop = asyncio.Event()
            load = asyncio.create_task(mixed_load(broker, {"default": pms, "north": north}, ids, rng, sent, stop))
            for _ in range(restarts):
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                await asyncio.to_thread(cluster.stop)
                not_ready_seen.append(await wait_for(lambda: readyz_is(service, 503), 15))
                await asyncio.sleep(STORE_DOWN_FOR)
                started = time.monotonic()
                await asyncio.to_thread(cluster.start)
                await wait_for(lambda: readyz_is(service, 200), 60)
                recovery.append(time.monotonic() - started)
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
        await asyncio.to_thread(cluster.remove)

    print(
        f"\nchaos postgres_restart restarts={restarts} commands={len(sent)} "
        f"results={len(collector.results)} lost={figures['lost']} applied_twice={figures['applied_twice']} "
        f"dead={figures['dead']} duplicated={figures['duplicated']} mismatches={figures['mismatches']} "
        f"double_bookings={figures['double_bookings']} orphans={figures['orphans']} "
        f"readyz_503_while_down={sum(not_ready_seen)}/{restarts} "
        f"recovery_s={','.join(f'{r:.1f}' for r in recovery)} seed={seed}"
    )
    assert figures["details"] == {}, figures["details"]
    assert all(not_ready_seen), "/readyz answered 503 during every outage"
    assert len(recovery) == restarts and not restarted_service, "ready again without a service restart"
    assert "store unavailable" in service.log_text()

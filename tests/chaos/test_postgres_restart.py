"""A PostgreSQL restart under load, on the PostgreSQL store: it costs latency, never a message.

The cluster restarted is one the test starts for itself (tests/helpers.PostgresCluster: initdb
in a temp dir, its own port), never the machine's shared PostgreSQL. While it is down nothing
is acked or dead-lettered (the worker holds what it can't commit until the store answers),
``/readyz`` answers 503, and it answers 200 again once PostgreSQL is back, with the same process.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import aiohttp

from consumer.broker import Broker
from consumer.store.base import open_store
from tests.chaos.common import chaos_marks, collecting, scaled, seed_slots
from tests.chaos.test_kill9 import (
    final_figures,
    mixed_load,
    north,
    north_details,
    pms,
    practices_file,
    settle,
    wait_for,
)
from tests.e2e.processes import SECRET, AppProcess, ServiceProcess, service_env
from tests.helpers import PostgresCluster

pytestmark = chaos_marks
# Longer than a message's whole transient-retry budget in service_env (5 deliveries, 0.2 s x
# delivery number between them, plus the worker's in-place retries): down this long, a store
# failure counted as an ordinary transient one would dead-letter messages.
DOWN_FOR = 8.0
__all__ = ["north", "pms"]  # the fixtures, shared with the kill -9 test


def kill9_service(store_url: str, amqp_url: str, tmp_path: Path, pms: Any, north: Any
                  ) -> tuple[list[int], dict[str, str], ServiceProcess]:
    """The kill -9 test's two practices (seeded alike, webhooks subscribed), served by an
    `appt serve` on ``store_url``: its appointment ids, environment and process."""
    ids = seed_slots(pms, scaled(16, 60))
    assert seed_slots(north, len(ids)) == ids
    env = service_env(pms_url=pms.url, store=store_url, amqp_url=amqp_url, APPT_RECONCILE_INTERVAL="2",
                      APPT_LOG_LEVEL="WARNING", APPT_PMS_TIMEOUT="5",
                      APPT_PRACTICES_FILE=str(practices_file(tmp_path / "practices.toml", pms, north)))
    service = ServiceProcess(env, tmp_path)
    pms.state.subscribe(f"{service.url}/webhooks/pms", SECRET)
    north.state.subscribe(f"{service.url}/webhooks/pms/north", SECRET)
    return ids, env, service


async def settled_figures(collector: Any, sent: list[str], pms: Any, north: Any, store: Any, ids: list[int],
                          env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """The kill -9 test's settle and end-state figures, both practices' invariants in ``details``."""
    await settle(collector, sent, pms, AppProcess(["reconcile"], env, tmp_path, "reconcile", ""),
                 store, timeout=scaled(90, 300), north=north)
    figures = await final_figures(collector, sent, pms, store, ids)
    figures["details"].update(await north_details(north, store))
    return figures


async def readiness(service: ServiceProcess) -> int:
    """``/readyz``'s status, 0 when it does not answer at all."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            async with http.get(f"{service.url}/readyz") as response:
                return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def test_postgres_restart_under_load_costs_latency_never_a_message(
    amqp_url: str, tmp_path: Path, pms: Any, north: Any
) -> None:
    seed = int(os.environ.get("APPT_CHAOS_SEED") or random.randrange(10**6))
    rng = random.Random(seed)
    restarts = scaled(1, 4)
    cluster = PostgresCluster()
    await asyncio.to_thread(cluster.init)
    await asyncio.to_thread(cluster.start)
    ids, env, service = kill9_service(cluster.url, amqp_url, tmp_path, pms, north)
    broker = Broker(amqp_url)
    await broker.connect()
    store = open_store(cluster.url)
    sent: list[str] = []
    not_ready_seen, recovery = [], []
    try:
        async with collecting(amqp_url) as collector:
            await service.start().wait_ready(timeout=60)
            stop = asyncio.Event()
            load = asyncio.create_task(mixed_load(broker, {"default": pms, "north": north}, ids, rng, sent, stop))
            for _ in range(restarts):
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                await asyncio.to_thread(cluster.stop)
                not_ready_seen.append(await wait_for(lambda: _is(readiness(service), 503), 15))
                await asyncio.sleep(DOWN_FOR)
                started = time.monotonic()
                await asyncio.to_thread(cluster.start)
                await wait_for(lambda: _is(readiness(service), 200), 60)
                recovery.append(time.monotonic() - started)
            stop.set()
            await load
            await store.open()
            figures = await settled_figures(collector, sent, pms, north, store, ids, env, tmp_path)
            restarted_service = service.starts != 1 or not service.running
    finally:
        await service.terminate()
        await store.close()
        await broker.close()
        await asyncio.to_thread(cluster.remove)

    print(f"\nchaos postgres_restart restarts={restarts} commands={len(sent)} "
          f"results={len(collector.results)} lost={figures['lost']} applied_twice={figures['applied_twice']} "
          f"dead={figures['dead']} duplicated={figures['duplicated']} mismatches={figures['mismatches']} "
          f"double_bookings={figures['double_bookings']} orphans={figures['orphans']} "
          f"readyz_503_while_down={sum(not_ready_seen)}/{restarts} "
          f"recovery_s={','.join(f'{r:.1f}' for r in recovery)} seed={seed}")
    assert figures["details"] == {}, figures["details"]
    assert all(not_ready_seen), "/readyz answered 503 during every outage"
    assert len(recovery) == restarts and not restarted_service, "ready again without a service restart"
    assert "store unavailable" in service.log_text()


async def _is(status: Any, expected: int) -> bool:
    return await status == expected

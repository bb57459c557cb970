"""The node leading the partition queues of a 3-node cluster killed (kill -9) under load, and
brought back: nothing lost, nothing applied twice, nothing dead-lettered.

The cluster is the test's own (``scripts/rabbitmq-cluster``: three nodes with their own names,
ports, data directories and cookie), never the machine's shared broker. `appt serve` gets the
three nodes as its address list and declares the partition queues first, so they are quorum queues
replicated on the three and led by the node it is connected to (RabbitMQ's default leader locator
is client-local): the first node killed is both the queues' leader and the service's own node, so
its consumers and publisher must move to a survivor while the queues elect a new leader. Later
kills (one more in the default run, four in the long form) take the service's node again if it
leads a queue, else the node leading the most (the service then keeps its connection and loses
only the leaders). The load is
the kill -9 test's (commands of two practices, PMS-side changes announced by webhooks, polling);
the test's own publisher resends what the broker did not confirm, as any client would.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consumer.broker import Broker, partition_queue
from consumer.sandbox import RunningSandbox
from consumer.store.opening import open_store
from tests.chaos.common import (
    Collector,
    chaos_marks,
    chaos_seed,
    collecting,
    final_figures,
    mixed_load,
    scaled,
    seed_both,
    settle,
    two_practice_service,
    wait_for,
)
from tests.helpers import free_port

pytestmark = chaos_marks
SERVICE_CONNECTION = "chaos-cluster-service"  # the service's connection name, to find its node
DOWN_FOR = 5.0  # seconds the killed node stays down, under load


class RabbitCluster:
    """Three RabbitMQ nodes of the test's own, clustered (``scripts/rabbitmq-cluster``)."""

    SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq-cluster"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = f"appt-chaos-{uuid.uuid4().hex[:8]}"
        self.ports = [free_port() for _ in range(3)]
        self.dist_ports = [free_port() for _ in range(3)]

    def start(self) -> None:
        ports, dist_ports = (",".join(map(str, p)) for p in (self.ports, self.dist_ports))
        self._run("start", str(self.directory), ports, dist_ports, self.name, timeout=300)

    def url(self, node: int, **query: str) -> str:
        """Node ``node``'s (1-3) AMQP URL, with connection options as query parameters."""
        options = "&".join(f"{k}={v}" for k, v in query.items())
        return f"amqp://guest:guest@127.0.0.1:{self.ports[node - 1]}/" + (f"?{options}" if options else "")

    def urls(self, **query: str) -> str:
        """The address list of the three, as APPT_AMQP_URL takes it."""
        return ",".join(self.url(node, **query) for node in (1, 2, 3))

    def node_name(self, node: int) -> str:
        return f"{self.name}-{node}@localhost"

    def ctl_json(self, node: int, *args: str) -> Any:
        """``rabbitmqctl ARGS --formatter json`` on node ``node``, parsed."""
        out = self._run("ctl", str(self.directory), str(node), *args, "--formatter", "json", "-q", timeout=60)
        return json.loads(out)

    def leaders(self, asked: int) -> dict[str, int]:
        """Each partition queue's leading node (1-3), as node ``asked`` sees the cluster."""
        by_name = {self.node_name(node): node for node in (1, 2, 3)}
        rows = self.ctl_json(asked, "list_queues", "name", "leader")
        return {row["name"]: by_name[row["leader"]] for row in rows if row["name"].startswith(partition_queue(0)[:-1])}

    def connection_nodes(self, asked: int, connection_name: str) -> list[int]:
        """The nodes (1-3) holding connections named ``connection_name`` (the node is the listener's port)."""
        rows = self.ctl_json(asked, "list_connections", "port", "client_properties")
        return [
            self.ports.index(row["port"]) + 1
            for row in rows
            if ["connection_name", "longstr", connection_name] in row["client_properties"]
        ]

    def kill(self, node: int) -> None:
        """kill -9 of the node's Erlang VM: a crash, no clean leave."""
        self._run("kill", str(self.directory), str(node), timeout=30)

    def start_node(self, node: int) -> None:
        self._run("start-node", str(self.directory), str(node), timeout=300)

    def stop(self) -> None:
        self._run("stop", str(self.directory), timeout=300)

    def _run(self, *args: str, timeout: float) -> str:
        done = subprocess.run([str(self.SCRIPT), *args], check=True, capture_output=True, text=True, timeout=timeout)
        return done.stdout


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RabbitCluster]:
    """The test's own cluster: the only brokers it may kill."""
    cluster = RabbitCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Kill:
    """One kill -9 of a node leading partition queues, and what it cost."""

    victim: int
    led: int  # partition queues the victim led when it was killed
    service_node: bool  # the service was connected to the victim
    recovery_s: float | None  # kill to the first result of a command sent after it; None: not within 60 s
    back_in_s: float  # kill to the victim serving again


async def kill_and_bring_back(cluster: RabbitCluster, collector: Collector, sent: list[str]) -> Kill:
    """Once 50 more commands have been answered, kill -9 a node leading partition queues (the
    service's own node when it leads any), wait for the pipeline to work without it, then start
    it again (after DOWN_FOR at least)."""
    answered = len(collector.results)
    await wait_for(lambda: len(collector.results) >= answered + 50, 30)
    service_node = await connected_node(cluster)
    leaders = list((await asyncio.to_thread(cluster.leaders, 1)).values())
    victim = service_node if service_node in leaders else max(leaders, key=leaders.count)
    killed = time.monotonic()
    await asyncio.to_thread(cluster.kill, victim)
    after_kill = len(sent)
    # Recovered once a command sent after the kill has its result, with the node still down: the
    # whole path (publish, new leader, the service's consumer on a survivor, PMS, result) works.
    recovered = await wait_for(lambda: any(c in collector.results for c in sent[after_kill:]), 60)
    recovery = time.monotonic() - killed if recovered else None
    await asyncio.sleep(max(0.0, killed + DOWN_FOR - time.monotonic()))
    await asyncio.to_thread(cluster.start_node, victim)
    return Kill(victim, leaders.count(victim), victim == service_node, recovery, time.monotonic() - killed)


async def connected_node(cluster: RabbitCluster) -> int:
    """The node the service is connected to, once it is connected (it may be reconnecting)."""
    deadline = time.monotonic() + 30
    while not (nodes := await asyncio.to_thread(cluster.connection_nodes, 1, SERVICE_CONNECTION)):
        assert time.monotonic() < deadline, "the service has no connection to the cluster"
        await asyncio.sleep(0.5)
    return nodes[0]


async def test_killing_the_leader_and_service_node_loses_nothing_and_applies_nothing_twice(
    cluster: RabbitCluster, tmp_path: Path, pms: RunningSandbox, north: RunningSandbox
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    # A quick reconnect (aio-pika waits 5 s after a short-lived connection by default), and a
    # connection name by which the service's node is found.
    service_urls = cluster.urls(name=SERVICE_CONNECTION, reconnect_interval="1")
    store_url = f"sqlite:///{tmp_path / 'appt.sqlite3'}"
    ids = seed_both(pms, north, scaled(16, 60))
    service = two_practice_service(store_url, service_urls, tmp_path, pms, north)
    store = open_store(store_url)
    sent: list[str] = []
    kills: list[Kill] = []
    try:
        await service.start().wait_ready(timeout=60)  # declares the partition queues: led by its node
        # The test's own clients fail over too, and its results queues are replicated.
        async with collecting(cluster.urls(reconnect_interval="1"), replicated=True) as collector:
            broker = Broker(cluster.urls(reconnect_interval="1"))
            await broker.connect()
            stop = asyncio.Event()
            load = asyncio.create_task(mixed_load(broker, {"default": pms, "north": north}, ids, rng, sent, stop))
            try:
                for _ in range(scaled(2, 5)):
                    kills.append(await kill_and_bring_back(cluster, collector, sent))
            finally:
                stop.set()
                await load
                await broker.close()
            await store.open()
            await settle(collector, sent, pms, north, store, service, timeout=scaled(90, 300))
            figures = await final_figures(collector, sent, pms, north, store, ids)
            same_process = service.starts == 1 and service.running
    finally:
        await service.terminate()
        await store.close()

    recovery = [k.recovery_s for k in kills]
    print(
        f"\nchaos cluster_failover kills={len(kills)} victims={[k.victim for k in kills]} "
        f"partitions_led={[k.led for k in kills]} service_node={[k.service_node for k in kills]} "
        f"commands={len(sent)} results={len(collector.results)} "
        f"lost={figures['lost']} applied_twice={figures['applied_twice']} dead={figures['dead']} "
        f"duplicated={figures['duplicated']} mismatches={figures['mismatches']} "
        f"double_bookings={figures['double_bookings']} orphans={figures['orphans']} "
        f"back_in_s={','.join(f'{k.back_in_s:.1f}' for k in kills)} "
        f"recovery_s={','.join('none' if r is None else f'{r:.1f}' for r in recovery)} seed={seed}"
    )
    assert kills[0].service_node, "the first node killed is the service's own (it declared the queues)"
    assert all(k.led > 0 for k in kills), "each node killed led partition queues"
    assert figures["details"] == {}, figures["details"]
    assert None not in recovery and same_process, "recovered with the node down, in the same process"

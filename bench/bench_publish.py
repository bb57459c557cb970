"""One confirmed publish: the Broker's path against aio-pika's own, CPU per publish.

Run: ``python bench/bench_publish.py [--publishes 2000 --rounds 6]``. The
Broker publishes straight through aiormq with ready-made properties; the
baseline, in the same process and on the same confirm channel, is what the
Broker did before: an ``aio_pika.Message`` through ``Exchange.publish`` under
``asyncio.timeout``. Both publish 32 at a time and wait for every confirm;
rounds alternate so drift on the machine hits both alike, and the median of
the rounds is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import result_line, throwaway_vhost  # noqa: E402
from consumer.broker import EVENTS_EXCHANGE, Broker  # noqa: E402

BODY = b'{"appointment_id": 1, "to_state": "Confirmed"}'
AT_ONCE = 32


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def cpu_per_publish(publish: Callable[[int], Awaitable[None]], count: int) -> float:
    """Microseconds of this process's CPU per confirmed publish."""
    started = cpu_seconds()
    for first in range(0, count, AT_ONCE):
        await asyncio.gather(*(publish(i) for i in range(first, min(count, first + AT_ONCE))))
    return (cpu_seconds() - started) / count * 1e6


async def run(count: int, rounds: int) -> None:
    with throwaway_vhost() as amqp_url:
        broker = Broker(amqp_url)
        await broker.connect()
        channel = await broker.channel()  # aio-pika's path needs a confirm channel of its own
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)

        async def via_broker(i: int) -> None:
            await broker.publish_event("bench.publish", BODY, message_id=f"b-{i}")

        async def via_aio_pika(i: int) -> None:
            message = aio_pika.Message(
                BODY,
                content_type="application/json",
                message_id=f"a-{i}",
                headers={},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            async with asyncio.timeout(5.0):
                await exchange.publish(message, "bench.publish", mandatory=False)

        broker_us, aio_pika_us = [], []
        try:
            for _ in range(rounds):
                aio_pika_us.append(await cpu_per_publish(via_aio_pika, count))
                broker_us.append(await cpu_per_publish(via_broker, count))
        finally:
            await broker.close()
    ours, theirs = statistics.median(broker_us), statistics.median(aio_pika_us)
    print(
        f"Broker (aiormq, ready-made properties): {ours:.0f} us CPU/publish "
        f"(rounds {', '.join(f'{v:.0f}' for v in broker_us)})"
    )
    print(
        f"aio-pika Message + Exchange.publish:    {theirs:.0f} us CPU/publish "
        f"(rounds {', '.join(f'{v:.0f}' for v in aio_pika_us)})"
    )
    print(f"ratio Broker / aio-pika = {ours / theirs:.2f}")
    print(
        result_line("publish", publishes=count, rounds=rounds, broker_us=ours, aio_pika_us=theirs, ratio=ours / theirs)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(run(args.publishes, args.rounds))


if __name__ == "__main__":
    main()

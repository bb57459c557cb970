"""The servers the benchmarks measure, one per process: ``servers.py KIND [options]``.

- ``bare``: an aiohttp handler that reads the body and answers 202 (the framework's ceiling);
- ``naive``: reads the body, publishes it with a confirm to the same quorum
  queues, answers 202 (the broker round trip's ceiling);
- ``service``: the real receiver from ``consumer.webhooks`` with a real Broker
  and a SQLite store, logging JSON lines as ``appt serve`` does;
- ``sandbox``: the PMS emulator.

Each prints ``READY <port>`` once it listens on loopback and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consumer.broker import INBOUND_EXCHANGE, Broker  # noqa: E402
from consumer.logs import configure  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from consumer.store.opening import open_store  # noqa: E402
from consumer.webhooks import BROKER_KEY, STORE_KEY, create_app  # noqa: E402

HOST = "127.0.0.1"
PUBLISHER = web.AppKey("publisher", aio_pika.abc.AbstractExchange)


async def bare_webhook(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202)


async def naive_webhook(request: web.Request) -> web.Response:
    """No verification, no validation: publish what came and wait for the confirm."""
    body = await request.read()
    webhook_id = request.headers.get("webhook-id", "")
    message = aio_pika.Message(body, message_id=webhook_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await request.app[PUBLISHER].publish(message, routing_key=webhook_id, mandatory=True)
    return web.Response(status=202)


def bare_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/webhooks/pms", bare_webhook)
    return app


def naive_app(amqp_url: str) -> web.Application:
    async def publisher(app: web.Application) -> AsyncIterator[None]:
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await Broker(amqp_url).declare_topology(channel)
        app[PUBLISHER] = await channel.get_exchange(INBOUND_EXCHANGE)
        yield
        await connection.close()

    app = web.Application()
    app.cleanup_ctx.append(publisher)
    app.router.add_post("/webhooks/pms", naive_webhook)
    return app


def service_app(amqp_url: str, store_url: str, secret: str) -> web.Application:
    settings = Settings(amqp_url=amqp_url, store=store_url, webhook_secrets=[secret])
    configure(settings.log_format, settings.log_level)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        store = open_store(settings.store)
        await store.open()
        broker = Broker(settings.amqp_url, partitions=settings.partitions)
        await broker.connect()
        app[BROKER_KEY] = broker
        app[STORE_KEY] = store
        yield
        await broker.close()
        await store.close()

    return create_app(settings, resources)


async def serve(app: web.Application) -> None:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    print(f"READY {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def serve_sandbox() -> None:
    from consumer.sandbox import running_sandbox

    async with running_sandbox(port=0) as sandbox:
        print(f"READY {sandbox.url.rsplit(':', 1)[1]}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["bare", "naive", "service", "sandbox"])
    parser.add_argument("--amqp", default="")
    parser.add_argument("--store", default="")
    parser.add_argument("--secret", default="")
    args = parser.parse_args()
    if args.kind == "sandbox":
        asyncio.run(serve_sandbox())
        return
    apps = {
        "bare": lambda: bare_app(),
        "naive": lambda: naive_app(args.amqp),
        "service": lambda: service_app(args.amqp, args.store, args.secret),
    }
    asyncio.run(serve(apps[args.kind]()))


if __name__ == "__main__":
    main()

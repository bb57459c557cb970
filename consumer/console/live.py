"""The overview's live tail: state-log records from ``appointments.events`` as server-sent events.

Each open page gets its own exclusive, auto-deleted queue bound to ``state.#``,
so a closed tab leaves nothing behind on the broker and a slow one holds back
no one else. A stream lasts until the browser leaves, so the service ends
them itself when it stops (``on_shutdown``), rather than waiting for the tabs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from consumer.broker import EVENTS_EXCHANGE
from consumer.webhooks import BROKER_KEY

KEEPALIVE = 15.0  # seconds: a comment line keeps proxies from closing an idle stream
TAIL_PREFETCH = 50
STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("live_streams")


def end_streams_on_shutdown(app: web.Application) -> None:
    app[STREAMS] = set()
    app.on_shutdown.append(_end_streams)


async def _end_streams(app: web.Application) -> None:
    for task in app[STREAMS]:
        task.cancel()


async def live_tail(request: web.Request) -> web.StreamResponse:
    channel = await request.config_dict[BROKER_KEY].channel()
    streams = request.app[STREAMS]
    task = asyncio.current_task()
    assert task is not None
    streams.add(task)
    try:
        await channel.set_qos(prefetch_count=TAIL_PREFETCH)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(EVENTS_EXCHANGE, routing_key="state.#")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        await response.write(b": tail open\n\n")  # the page shows "live" once this arrives
        async with queue.iterator() as messages:
            while True:
                try:
                    message = await asyncio.wait_for(anext(messages), KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                await message.ack()
                await response.write(b"event: state\ndata: " + message.body.replace(b"\n", b" ") + b"\n\n")
    except ConnectionResetError:  # the browser left
        pass
    finally:
        streams.discard(task)
        await channel.close()
    return response

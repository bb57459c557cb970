"""The HTTP listener's limits against slow and hostile clients.

aiohttp by itself keeps an idle connection for an hour and never closes a
connection still sending its request head, and its error page logs and
echoes the first bytes of an oversize header (a bearer token, a signature).
So `appt serve` listens through this module: a connection must deliver its
request head within ``http_idle_timeout`` of opening or of its last
response (aiohttp's keep-alive timer, armed at connect, covers both), the
body within ``http_body_timeout`` (see webhooks._read_body), and at most
``http_max_connections`` are open at once; the next ones are closed at once.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from aiohttp import web

from consumer.logs import get_logger
from consumer.settings import Settings

log = get_logger(__name__)


class QuietHandler(web.RequestHandler):
    """aiohttp's connection handler, with error answers that carry no request bytes.

    It also keeps itself in ``live`` from creation to connection loss: the
    cap must count connections accepted in the same loop pass, which
    aiohttp's own list learns of only one callback later.
    """

    def __init__(self, server: web.Server, *, live: set[QuietHandler], **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._live = live
        live.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._live.discard(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        log.warning("http.bad_request", status=status, error=type(exc).__name__ if exc else None)
        if request.writer.output_size > 0:  # as aiohttp's: nothing more can be sent
            raise ConnectionError("response already started")
        response = web.Response(status=status, text=HTTPStatus(status).phrase)
        response.force_close()
        return response


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed before a byte is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def make_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    return web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=settings.http_idle_timeout)


async def listen(runner: web.AppRunner, settings: Settings) -> asyncio.Server:
    """Listen on the configured address; the caller closes the returned server before the runner."""
    server = runner.server
    assert server is not None, "runner.setup() first"

    live: set[QuietHandler] = set()

    def connection() -> asyncio.Protocol:
        if len(live) >= settings.http_max_connections:
            log.warning("http.connection_refused", limit=settings.http_max_connections)
            return _Refused()
        # web.Server.__call__ builds aiohttp's own handler; ours, from the same arguments.
        return QuietHandler(server, live=live, loop=asyncio.get_running_loop(), **server._kwargs)

    return await asyncio.get_running_loop().create_server(connection, settings.http_host, settings.http_port)

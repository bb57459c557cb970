"""The OpenAPI document is built from the router: nothing served goes undocumented."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from consumer.openapi import OPERATIONS, openapi_document
from consumer.settings import Settings
from consumer.webhooks import create_app


async def _no_resources(app: web.Application) -> AsyncIterator[None]:
    yield


def _app() -> web.Application:
    return create_app(Settings(webhook_secrets=[]), _no_resources)


def test_every_route_of_the_app_is_in_the_document() -> None:
    document = openapi_document(_app().router)
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert documented == set(OPERATIONS)
    assert document["components"]["schemas"]["WebhookPayload"]["required"] == ["type", "data"]


async def _plain(request: web.Request) -> web.Response:
    return web.Response()


def test_a_route_without_documentation_stops_the_document() -> None:
    app = _app()
    app.router.add_get("/undocumented", _plain)
    with pytest.raises(LookupError, match="GET /undocumented is served but not documented"):
        openapi_document(app.router)

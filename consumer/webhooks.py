"""The HTTP face: webhooks in, health, metrics, and read-only appointment endpoints.

A webhook is answered 2xx only after RabbitMQ confirmed the message: a 202
means "durably queued", and anything less makes the PMS retry. The live
objects (broker, store) come from a cleanup context supplied by the caller, so
nothing is created at import time and tests wire in real ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from consumer import metrics
from consumer.broker import Broker, PublishFailed
from consumer.logs import get_logger
from consumer.messages import DEFAULT_PRACTICE, MAX_ID, ObservedEvent, WebhookPayload
from consumer.openapi import openapi_document
from consumer.practices import (
    Practice,
    PracticeConfig,
    Practices,
    UnknownPractice,
    client_factory,
    describe,
    load_configs,
)
from consumer.settings import Settings
from consumer.signing import (
    FutureTimestamp,
    SignatureError,
    StaleTimestamp,
    verify,
    verify_dentally,
)
from consumer.silence import WebhookSilences
from consumer.store.base import Store

SETTINGS_KEY = web.AppKey("settings", Settings)
BROKER_KEY = web.AppKey("broker", Broker)
STORE_KEY: web.AppKey[Store] = web.AppKey("store")
PRACTICES_KEY = web.AppKey("practices", Practices)
SILENCE_KEY = web.AppKey("webhook_silence", WebhookSilences)
# Optional: set by `appt serve`, so /readyz can say when the worker's handler is failing.
WORKER_FAILING_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("worker_failing")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DENTALLY_SIGNATURE = "X-Dentally-Signature"
READY_PING_TIMEOUT = 2.0
MAX_HISTORY_PAGE = 1000

Resources = Callable[[web.Application], AsyncIterator[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = get_logger(__name__)
ACCEPTED = metrics.WEBHOOKS.labels(result="accepted")  # bound once: every webhook counts here


def create_app(settings: Settings, resources: Resources) -> web.Application:
    """The aiohttp application; ``resources`` puts the broker and store under their keys.

    The practices (and their secrets) are loaded here so a malformed file or
    secret stops start-up instead of failing every request.
    """
    practices = Practices(load_configs(settings), client_factory(settings))
    for practice in practices:
        if not practice.config.webhook_secrets and not practice.config.dentally_signing_secret:
            log.error(
                "webhooks.no_secret_configured",
                practice=practice.name,
                hint="set APPT_WEBHOOK_SECRETS (or the practice's webhook_secrets); "
                "its webhooks are refused until then",
            )
    # Bodies are read by hand up to the limit (see _read_body), so the 413 is ours.
    app = web.Application(client_max_size=settings.max_message_bytes + 1, middlewares=[json_errors])
    app[SETTINGS_KEY] = settings
    app[PRACTICES_KEY] = practices
    app.cleanup_ctx.append(resources)
    app.router.add_post("/webhooks/pms", receive_webhook)
    app.router.add_post("/webhooks/pms/{practice}", receive_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", render_metrics)
    app.router.add_get("/practices", list_practices)
    app.router.add_get("/openapi.json", render_openapi)
    # [0-9], not \d: \d matches every script's digits, and "७५७" would alias "757".
    for prefix in ("", "/practices/{practice}"):
        app.router.add_get(prefix + r"/appointments/{id:[0-9]+}", get_appointment)
        app.router.add_get(prefix + r"/appointments/{id:[0-9]+}/history", get_history)
    return app


def _practice(request: web.Request) -> Practice:
    """The practice a route names (the routes without one mean the default practice)."""
    name = request.match_info.get("practice", DEFAULT_PRACTICE)
    try:
        return request.app[PRACTICES_KEY].get(name)
    except UnknownPractice:
        raise web.HTTPNotFound(
            text=json.dumps({"error": "unknown practice"}), content_type="application/json"
        ) from None


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method) answer JSON like ours do.

    A client (or the OpenAPI document) then meets one error shape on every path.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"error": (exc.reason or "error").lower()}, status=exc.status, headers=allow)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _refuse(result: str, status: int, message: str, **log_fields: Any) -> web.Response:
    metrics.WEBHOOKS.labels(result=result).inc()
    log.warning("webhook.refused", result=result, **log_fields)
    return _error(status, message)


async def _read_body(request: web.Request, limit: int, timeout: float) -> bytes | None:
    """The raw body, or None once it exceeds ``limit`` (without reading the rest).

    Raises TimeoutError when the whole body takes longer than ``timeout``: a
    client trickling (or stalling) its body must not hold a connection forever.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(timeout):
        while True:
            chunk = await request.content.read(limit + 1 - size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return None


def _verify(config: PracticeConfig, tolerance: int, request: web.Request, body: bytes) -> str:
    """Check the signature by whichever scheme the request carries, with this practice's
    secrets only; return the webhook id."""
    headers = request.headers
    if config.dentally_signing_secret and DENTALLY_SIGNATURE in headers and "webhook-signature" not in headers:
        verify_dentally(config.dentally_signing_secret, body, headers[DENTALLY_SIGNATURE])
        # The scheme signs the body only: an id from a header could be changed at will to
        # replay a captured body, so the id is the body's digest.
        return "sha256:" + hashlib.sha256(body).hexdigest()
    return verify(config.webhook_secrets, headers, body, tolerance=tolerance)


def _validation_text(exc: ValidationError) -> str:
    """Pydantic's errors without the input values (which would echo the body back)."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors())


def _observed_event(body: bytes, webhook_id: str, practice: str) -> ObservedEvent:
    """Raises ValidationError (a ValueError) or ValueError when the payload is unusable."""
    payload = WebhookPayload.model_validate_json(body)
    return ObservedEvent(
        type=payload.type,
        event_id=webhook_id,
        source="webhook",
        appointment=payload.appointment(),
        practice=practice,
    )


async def receive_webhook(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    name = request.match_info.get("practice", DEFAULT_PRACTICE)
    if name not in request.app[PRACTICES_KEY]:
        return _refuse("unknown_practice", 404, "unknown practice", practice=name[:100])
    practice = request.app[PRACTICES_KEY].get(name)
    try:
        body = await _read_body(request, settings.max_message_bytes, settings.http_body_timeout)
    except TimeoutError:
        response = _refuse("body_timeout", 408, f"body not received within {settings.http_body_timeout} s")
        await response.prepare(request)
        await response.write_eof()
        if request.transport is not None:  # or aiohttp lingers, reading the rest of the body for 10 s
            request.transport.close()
        return response
    if body is None:
        return _refuse("too_large", 413, f"body over {settings.max_message_bytes} bytes")
    try:
        webhook_id = _verify(practice.config, settings.webhook_tolerance, request, body)
    except (StaleTimestamp, FutureTimestamp) as exc:
        return _refuse(
            "stale", 401, "timestamp outside tolerance", reason=str(exc), webhook_id=request.headers.get("webhook-id")
        )
    except SignatureError as exc:
        return _refuse("bad_signature", 401, "invalid signature", reason=type(exc).__name__)
    try:
        event = _observed_event(body, webhook_id, practice.name)
    except ValidationError as exc:
        return _refuse("invalid", 400, _validation_text(exc), webhook_id=webhook_id)
    except ValueError as exc:
        return _refuse("invalid", 400, str(exc), webhook_id=webhook_id)
    fields = {
        "webhook_id": webhook_id,
        "type": event.type,
        "practice": practice.name,
        "appointment_id": event.appointment_id,
    }
    message = event.model_dump_json().encode()
    if len(message) > settings.max_message_bytes:  # the envelope adds a little to the body
        return _refuse("too_large", 413, f"message over {settings.max_message_bytes} bytes", **fields)
    try:
        await request.app[BROKER_KEY].publish_observed(
            message,
            practice=practice.name,
            appointment_id=event.appointment_id,
            message_id=webhook_id,
        )
    except PublishFailed as exc:
        metrics.WEBHOOKS.labels(result="unavailable").inc()
        log.error("webhook.unavailable", error=str(exc), **fields)
        return _error(503, "queue unavailable, retry")
    ACCEPTED.inc()
    log.debug("webhook.accepted", **fields)
    return web.json_response({"accepted": webhook_id}, status=202)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _store_answers(store: Store) -> bool:
    try:
        async with asyncio.timeout(READY_PING_TIMEOUT):
            await store.ping()
    except Exception:  # any failure means "not ready"; the reason is the store's to log
        return False
    return True


async def readyz(request: web.Request) -> web.Response:
    broker_ok = request.app[BROKER_KEY].connected
    store_ok = await _store_answers(request.app[STORE_KEY])
    worker_failing = request.app.get(WORKER_FAILING_KEY, lambda: False)()
    checks = {
        "broker": "ok" if broker_ok else "down",
        "store": "ok" if store_ok else "down",
        "worker": "failing" if worker_failing else "ok",
    }
    ready = broker_ok and store_ok and not worker_failing
    body: dict[str, Any] = {"status": "ready" if ready else "not ready", **checks}
    # A waiting practice is named but leaves the process ready: the others are being served.
    body["waiting_practices"] = [p.name for p in request.app[PRACTICES_KEY] if p.waiting]
    silences = request.app.get(SILENCE_KEY)
    if silences is not None:
        body["webhooks"] = silences.report([p.name for p in request.app[PRACTICES_KEY]], datetime.now(UTC))
    return web.json_response(body, status=200 if ready else 503)


async def list_practices(request: web.Request) -> web.Response:
    """Each practice's status, budget and parked messages (what `appt practices` prints).

    Open like /readyz and /metrics: it names practices, never an appointment or a token.
    """
    parked = await request.app[STORE_KEY].parked_counts()
    silences, now = request.app.get(SILENCE_KEY, WebhookSilences()), datetime.now(UTC)
    return web.json_response(
        {
            "practices": [
                describe(p, parked.get(p.name, 0), silences.of(p.name).report(now)) for p in request.app[PRACTICES_KEY]
            ]
        }
    )


async def render_metrics(request: web.Request) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def render_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app.router))


def _unauthorized(request: web.Request) -> web.Response | None:
    """None when the bearer token is right; the refusal to send otherwise.

    With no token configured the endpoints stay shut (503): appointment data
    must never be open by default.
    """
    token = request.app[SETTINGS_KEY].api_token
    if not token:
        return _error(503, "APPT_API_TOKEN not configured")
    given = request.headers.get("Authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        return web.json_response(
            {"error": "missing or wrong bearer token"},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


async def get_appointment(request: web.Request) -> web.Response:
    if (refusal := _unauthorized(request)) is not None:
        return refusal
    practice = _practice(request)
    appointment_id = _path_id(request)
    record = await request.app[STORE_KEY].get_appointment(appointment_id, practice.name)
    if record is None:
        return _error(404, f"appointment {appointment_id} unknown")
    return web.json_response(
        {
            "practice": record.practice,
            "appointment_id": record.appointment_id,
            "state": record.state,
            "patient_id": record.patient_id,
            "version": record.version,
            "upstream_updated_at": record.upstream_updated_at,
        }
    )


def _ascii_int(raw: str) -> int | None:
    """ASCII digits, canonically written (no sign, no leading zero), or None.

    Python's int() also takes "١", "+5", " 5 " and "0005": each would alias another value.
    """
    if not (raw.isascii() and raw.isdigit()) or (len(raw) > 1 and raw[0] == "0") or len(raw) > 19:
        return None
    return int(raw)


def _path_id(request: web.Request) -> int:
    """The appointment id of the path; 404 for one no appointment can have."""
    value = _ascii_int(request.match_info["id"])
    if value is None or not 0 < value <= MAX_ID:
        raise web.HTTPNotFound(text=json.dumps({"error": "appointment unknown"}), content_type="application/json")
    return value


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    value = _ascii_int(request.query.get(name, str(default)))
    if value is None or not low <= value <= high:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"{name} must be an integer in {low}..{high}"}),
            content_type="application/json",
        )
    return value


async def get_history(request: web.Request) -> web.Response:
    """One page of the state log; ``next_after_seq`` is null once the last page is served."""
    if (refusal := _unauthorized(request)) is not None:
        return refusal
    practice = _practice(request)
    appointment_id = _path_id(request)
    after_seq = _int_query(request, "after_seq", 0, 0, 2**63 - 1)
    limit = _int_query(request, "limit", 100, 1, MAX_HISTORY_PAGE)
    store = request.app[STORE_KEY]
    records = await store.history(appointment_id, practice=practice.name, after_seq=after_seq, limit=limit)
    if not records and await store.get_appointment(appointment_id, practice.name) is None:
        return _error(404, f"appointment {appointment_id} unknown")
    next_after_seq = records[-1].seq if len(records) == limit else None
    return web.json_response(
        {
            "records": [r.model_dump(mode="json") for r in records],
            "next_after_seq": next_after_seq,
        }
    )

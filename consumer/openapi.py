"""`GET /openapi.json`: the HTTP contract as an OpenAPI 3.1 document.

Bodies are the pydantic models below and in ``consumer.messages``; the paths
are read from the application's router, so a route added without a line in
``OPERATIONS`` stops the document (and its test) instead of going
undocumented. schemathesis fuzzes the live server against this document in
the suite (tests/integration/test_openapi.py).
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from consumer.messages import MAX_ID, StateLogRecord, WebhookPayload
from consumer.schemas import component_schemas


class WebhookAccepted(BaseModel):
    """202: the webhook is durably queued (the broker confirmed it)."""

    accepted: str


class ErrorAnswer(BaseModel):
    """Every refusal: what is wrong, never an echo of the body."""

    error: str


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    broker: Literal["ok", "down"]
    store: Literal["ok", "down"]
    waiting_practices: list[str] = []


class AppointmentView(BaseModel):
    practice: str
    appointment_id: int
    state: str
    patient_id: int | None
    version: int
    upstream_updated_at: str | None


class HistoryPage(BaseModel):
    """One page of an appointment's state log; ``next_after_seq`` is null on the last page."""

    records: list[StateLogRecord]
    next_after_seq: int | None


class OpenApiDocument(BaseModel):
    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


REQUEST_MODELS: list[type[BaseModel]] = [WebhookPayload]
RESPONSE_MODELS: list[type[BaseModel]] = [
    WebhookAccepted, ErrorAnswer, Health, Readiness, AppointmentView, HistoryPage, OpenApiDocument,
]
BEARER: list[dict[str, list[str]]] = [{"bearerAuth": []}]
ID_PARAMETER = {
    "name": "id", "in": "path", "required": True, "description": "The PMS appointment id.",
    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
}


PRACTICE_PARAMETER = {
    "name": "practice", "in": "path", "required": True, "description": "The practice (APPT_PRACTICES_FILE).",
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
}


class PracticesView(BaseModel):
    """Each practice's status, budget and waiting messages (what `appt practices` prints)."""

    practices: list[dict[str, Any]]


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


def _error(description: str) -> dict[str, Any]:
    return _json(ErrorAnswer, description)


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}}


def _query(name: str, low: int, high: int, default: int) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False,
            "schema": {"type": "integer", "minimum": low, "maximum": high, "default": default}}


RECEIVE_WEBHOOK: dict[str, Any] = {
    "operationId": "receiveWebhook",
    "summary": "A PMS appointment event: verified, validated, queued, then answered.",
    "description": (
        "Signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`) or,"
        " when configured, the PMS's own `X-Dentally-Signature`. 202 only after RabbitMQ confirmed."),
    "parameters": [
        _header("webhook-id", "Unique per event, the same on every retry; becomes the message id."),
        _header("webhook-timestamp", "Unix seconds; outside APPT_WEBHOOK_TOLERANCE is refused."),
        _header("webhook-signature", "Space-separated `v1,<base64 HMAC-SHA256>` entries."),
        _header("X-Dentally-Signature", "Hex HMAC-SHA256 of the body (APPT_DENTALLY_SIGNING_SECRET)."),
        _header("X-Dentally-Delivery", "The delivery id of the PMS's own scheme."),
    ],
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/WebhookPayload"}}}},
    "responses": {
        "202": _json(WebhookAccepted, "Durably queued (publisher confirm received)."),
        "400": _error("Signed, but not JSON or not a valid payload."),
        "401": _error("Signature missing or wrong, or timestamp outside tolerance."),
        "413": _error("Body over APPT_WEBHOOK_MAX_BODY."),
        "503": _error("RabbitMQ down or did not confirm: retry."),
    },
}
RECEIVE_PRACTICE_WEBHOOK = {
    **RECEIVE_WEBHOOK, "operationId": "receivePracticeWebhook",
    "summary": "A practice's PMS appointment event, verified with that practice's secrets only.",
    "parameters": [PRACTICE_PARAMETER, *RECEIVE_WEBHOOK["parameters"]],
    "responses": {**RECEIVE_WEBHOOK["responses"], "404": _error("Unknown practice.")},
}
UNAUTHORIZED = _error("Missing or wrong bearer token.")
NO_TOKEN = _error("APPT_API_TOKEN not configured: the read API stays shut.")
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/webhooks/pms"): RECEIVE_WEBHOOK,
    ("GET", "/healthz"): {
        "operationId": "healthz", "summary": "Liveness: 200 while the process runs.",
        "responses": {"200": _json(Health, "Alive.")},
    },
    ("GET", "/readyz"): {
        "operationId": "readyz", "summary": "Readiness: RabbitMQ connected and the store answering.",
        "responses": {"200": _json(Readiness, "Ready."), "503": _json(Readiness, "Not ready: names what is down.")},
    },
    ("GET", "/metrics"): {
        "operationId": "metrics", "summary": "Prometheus metrics (text exposition format).",
        "responses": {"200": {"description": "The metrics.",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    },
    ("GET", "/openapi.json"): {
        "operationId": "openapi", "summary": "This document.",
        "responses": {"200": _json(OpenApiDocument, "OpenAPI 3.1.")},
    },
    ("GET", "/appointments/{id}"): {
        "operationId": "getAppointment", "summary": "The service's record of one appointment.",
        "security": BEARER, "parameters": [ID_PARAMETER],
        "responses": {
            "200": _json(AppointmentView, "The record."),
            "401": UNAUTHORIZED, "404": _error("Never seen."), "503": NO_TOKEN,
        },
    },
    ("GET", "/appointments/{id}/history"): {
        "operationId": "getHistory", "summary": "One page of an appointment's state log, oldest first.",
        "security": BEARER,
        "parameters": [ID_PARAMETER, _query("after_seq", 0, MAX_ID, 0), _query("limit", 1, 1000, 100)],
        "responses": {
            "200": _json(HistoryPage, "A page; follow next_after_seq."),
            "400": _error("after_seq or limit out of range."),
            "401": UNAUTHORIZED, "404": _error("Never seen."), "503": NO_TOKEN,
        },
    },
}
OPERATIONS.update({
    ("POST", "/webhooks/pms/{practice}"): RECEIVE_PRACTICE_WEBHOOK,
    ("GET", "/practices"): {
        "operationId": "listPractices", "summary": "Each practice's status, budget and waiting messages.",
        "responses": {"200": _json(PracticesView, "The practices.")},
    },
    ("GET", "/practices/{practice}/appointments/{id}"): {
        **OPERATIONS[("GET", "/appointments/{id}")], "operationId": "getPracticeAppointment",
        "parameters": [PRACTICE_PARAMETER, ID_PARAMETER],
    },
    ("GET", "/practices/{practice}/appointments/{id}/history"): {
        **OPERATIONS[("GET", "/appointments/{id}/history")], "operationId": "getPracticeHistory",
        "parameters": [PRACTICE_PARAMETER, *OPERATIONS[("GET", "/appointments/{id}/history")]["parameters"]],
    },
})


# Served, deliberately left out: the operator console's HTML pages and form posts
# (consumer.console) are for a logged-in browser, not part of the API contract.
UNDOCUMENTED_PREFIX = "/console"


def _paths(router: web.UrlDispatcher) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        path = route.resource.canonical
        if path == UNDOCUMENTED_PREFIX or path.startswith(UNDOCUMENTED_PREFIX + "/"):
            continue
        operation = OPERATIONS.get((route.method, path))
        if operation is None:
            raise LookupError(f"{route.method} {path} is served but not documented: add it to"
                              " consumer.openapi.OPERATIONS")
        paths.setdefault(path, {})[route.method.lower()] = operation
    return paths


def openapi_document(router: web.UrlDispatcher) -> dict[str, Any]:
    """The document for the routes ``router`` serves."""
    _, requests = component_schemas(REQUEST_MODELS, "validation")
    _, responses = component_schemas(RESPONSE_MODELS, "serialization")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "appointment-consumer",
            "version": version("appointment-consumer"),
            "description": "Webhooks in, health, metrics and the read API of appointment-consumer.",
        },
        "paths": _paths(router),
        "components": {
            "schemas": {**responses, **requests},
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "APPT_API_TOKEN"}},
        },
    }

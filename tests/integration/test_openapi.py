"""`GET /openapi.json` describes every route, and the live server keeps to it.

schemathesis reads the document from a real `appt serve` (its own RabbitMQ
vhost, a SQLite store, the sandbox as PMS) and fuzzes every operation
statelessly. Each generated request goes out three ways: with valid auth (the
bearer token, or for the webhook a Standard Webhooks signature made by the
`before_call` hook below over the exact bytes sent), without any, and with a
wrong one. Every answer must be documented (status, content type, headers,
body schema) and none may be a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.core import NOT_SET

from consumer.openapi import OPERATIONS
from consumer.signing import sign
from tests.conftest import RABBIT_HOST, RABBIT_PORT, drop_vhost, make_vhost, require_service
from tests.e2e.processes import SECRET, SandboxProcess, ServiceProcess, service_env

API_TOKEN = "openapi-fuzz-token"
WRONG_SECRET = "whsec_d3Jvbmctc2VjcmV0LW5vdC1jb25maWd1cmVk"
# Examples per operation and auth variant; APPT_FUZZ_EXAMPLES=500 for a long run.
MAX_EXAMPLES = int(os.environ.get("APPT_FUZZ_EXAMPLES", "25"))
SIGN_WITH = "sign_with"  # a call() keyword the hook consumes: sign the body with this secret
WEBHOOK_OPERATION = ("POST", "/webhooks/pms")


def _body_bytes(body: Any) -> bytes:
    """What goes on the wire: negative cases may carry raw bytes, or no body at all."""
    if isinstance(body, bytes):
        return body
    if body is NOT_SET:
        return b""
    return json.dumps(body, allow_nan=False).encode()


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Case, kwargs: dict[str, Any]) -> None:
    """Sign a webhook as the PMS would: over the exact body bytes that go out."""
    secret = kwargs.pop(SIGN_WITH, None)
    if secret is None:
        return
    body = _body_bytes(case.body)
    webhook_id = f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time())
    kwargs["data"] = body  # sent as is (requests ignores `json` when `data` is given)
    case.headers = {
        **(case.headers or {}),
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        # The service's own signer (tests/unit/test_signing.py holds it to the reference
        # library): negative cases send bodies that aren't even UTF-8.
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    require_service("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    vhost = make_vhost()
    log_dir: Path = tmp_path_factory.mktemp("openapi")
    sandbox = SandboxProcess(log_dir).start()
    service = ServiceProcess(
        service_env(
            pms_url=sandbox.url,
            store=f"sqlite:///{log_dir / 'appt.sqlite3'}",
            amqp_url=f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}",
            APPT_API_TOKEN=API_TOKEN,
        ),
        log_dir,
    ).start()
    try:
        asyncio.run(sandbox.wait_ready())
        asyncio.run(service.wait_ready())
        yield service
    finally:
        asyncio.run(service.terminate())
        asyncio.run(sandbox.terminate())
        drop_vhost(vhost)
    assert "Traceback" not in service.log_text(), service.tail(60)


@pytest.fixture(scope="module")
def api_schema(live_service: ServiceProcess) -> Any:
    return schemathesis.openapi.from_url(f"{live_service.url}/openapi.json", timeout=10)


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def _auth_variants(method: str, path: str) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(headers, call keywords) for valid auth, none, and wrong auth."""
    if (method, path) == WEBHOOK_OPERATION:
        return [({}, {SIGN_WITH: SECRET}), ({}, {}), ({}, {SIGN_WITH: WRONG_SECRET})]
    return [({"Authorization": f"Bearer {API_TOKEN}"}, {}), ({}, {}), ({"Authorization": "Bearer not-the-token"}, {})]


# Negative cases need something to break: a parameter or a body.
FUZZ_RUNS = [
    (method, path, mode)
    for (method, path), operation in sorted(OPERATIONS.items())
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or "parameters" in operation or "requestBody" in operation
]


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ_RUNS, ids=lambda v: str(v))
def test_every_route_answers_as_documented(
    method: str,
    path: str,
    mode: GenerationMode,
    api_schema: Any,
    live_service: ServiceProcess,
    http: requests.Session,
) -> None:
    """schemathesis's pytest loader needs pytest < 9, so its strategies are driven here directly."""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def answers_as_documented(case: Case) -> None:
        for headers, keywords in _auth_variants(method, path):
            response = case.call(base_url=live_service.url, session=http, headers=headers, timeout=10, **keywords)
            case.validate_response(response)

    answers_as_documented()


def test_the_document_lists_every_route_the_server_serves(live_service: ServiceProcess) -> None:
    document = requests.get(f"{live_service.url}/openapi.json", timeout=10).json()
    assert document["openapi"] == "3.1.0"
    served = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert served == set(OPERATIONS)


def test_signed_webhooks_were_accepted_and_queued(live_service: ServiceProcess) -> None:
    """The fuzzing above did reach the pipeline: valid payloads were signed, queued, applied."""
    metrics = requests.get(f"{live_service.url}/metrics", timeout=10).text
    accepted = [
        line for line in metrics.splitlines() if line.startswith('appt_webhook_verifications_total{result="accepted"}')
    ]
    assert accepted and float(accepted[0].split()[-1]) > 0, metrics

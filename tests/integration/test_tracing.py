"""OpenTelemetry: one trace per change, across HTTP, RabbitMQ, the worker and the PMS.

The SDK's in-memory exporter collects the spans of the real pipeline (a test
vhost, SQLite, the sandbox over HTTP, the service's own HTTP app on loopback).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from consumer import tracing
from consumer.broker import INBOUND_EXCHANGE, OBSERVED_EXCHANGE
from consumer.settings import Settings
from consumer.signing import sign
from consumer.webhooks import BROKER_KEY, STORE_KEY, create_app
from tests.helpers import eventually, seed_pending, served
from tests.stack import Stack, running_stack

SECRET = "whsec_dHJhY2luZy10ZXN0LXNlY3JldC10cmFjaW5n"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test only (set up before the stack, so its PMS session is traced)."""
    exporter = InMemorySpanExporter()
    assert tracing.configure(exporter)
    yield exporter
    tracing.shutdown()


@pytest.fixture
async def stack(spans: InMemorySpanExporter, amqp_url: str, sqlite_url: str, sandbox: Any) -> AsyncIterator[Stack]:
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as running:
        yield running


@pytest.fixture
async def webhook_url(stack: Stack) -> AsyncIterator[str]:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        app[BROKER_KEY] = stack.broker
        app[STORE_KEY] = stack.store
        yield

    async with served(create_app(Settings(webhook_secrets=[SECRET]), resources)) as url:
        yield f"{url}/webhooks/pms"


async def post_webhook(url: str, appointment: dict[str, Any]) -> None:
    body = json.dumps({"type": "appointment.updated", "data": {"appointment": appointment}}).encode()
    webhook_id, now = f"msg_{uuid.uuid4().hex}", int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(SECRET, webhook_id, now, body),
    }
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as answer:
        assert answer.status == 202, await answer.text()


def ago(hours: int) -> str:
    """An updated_at in the past (one in the future is refused)."""
    return (datetime.now(UTC) - timedelta(hours=hours)).isoformat()


def in_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.context.trace_id == trace_id]


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} is a root"
    return next(s for s in spans if s.context.span_id == span.parent.span_id)


def one(spans: list[ReadableSpan], kind: SpanKind, name: str) -> ReadableSpan:
    found = [s for s in spans if s.kind == kind and s.name == name]
    assert len(found) == 1, [(s.kind, s.name) for s in spans]
    return found[0]


async def test_a_signed_webhook_and_the_pms_call_it_causes_are_one_trace(
    spans: InMemorySpanExporter, stack: Stack, sandbox: Any, webhook_url: str
) -> None:
    seed_pending(sandbox, 2101, state="Confirmed")
    await post_webhook(webhook_url, {"id": 2101, "state": "Cancelled", "updated_at": ago(2)})
    await eventually(lambda: stack.store.get_appointment(2101))
    spans.clear()
    # Cancelled -> Confirmed is impossible: something was missed, so the worker asks the PMS.
    await post_webhook(webhook_url, {"id": 2101, "state": "Confirmed", "updated_at": ago(1)})

    async def processed_with_a_get() -> list[ReadableSpan] | None:
        """The trace of the PMS GET, once the worker's span around it has ended too."""
        gets = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT and s.name == "GET"]
        trace = in_trace(spans, gets[0].context.trace_id) if gets else []
        return trace if any(s.kind == SpanKind.CONSUMER for s in trace) else None

    trace = await eventually(processed_with_a_get)
    pms_get = one(trace, SpanKind.CLIENT, "GET")
    server = one(trace, SpanKind.SERVER, "POST /webhooks/pms")
    assert server.parent is None  # the webhook started the trace
    publish = one(trace, SpanKind.PRODUCER, f"publish {OBSERVED_EXCHANGE}")
    process = next(s for s in trace if s.kind == SpanKind.CONSUMER)  # behind the observed exchange
    assert parent_of(publish, trace) is server
    assert parent_of(process, trace) is publish  # across RabbitMQ, by the traceparent header
    assert parent_of(pms_get, trace) is process
    assert pms_get.attributes is not None and "/v1/appointments/2101" in str(pms_get.attributes.get("http.url"))
    # The PMS (here the sandbox, an aiohttp app too) got the traceparent and continued it.
    assert parent_of(one(trace, SpanKind.SERVER, "GET /v1/appointments/{id}"), trace) is pms_get


async def test_a_command_with_a_traceparent_continues_the_callers_trace_to_its_result(
    spans: InMemorySpanExporter, stack: Stack, sandbox: Any
) -> None:
    seed_pending(sandbox, 2201)
    channel = await stack.broker.channel()  # a client of our own, not the service's Broker
    exchange = await channel.get_exchange(INBOUND_EXCHANGE)
    await exchange.publish(
        aio_pika.Message(
            json.dumps({"command_id": "trace-1", "type": "confirm", "appointment_id": 2201}).encode(),
            message_id="trace-1",
            content_type="application/json",
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        ),
        routing_key="2201",
    )
    assert (await stack.result("trace-1"))["outcome"] == "succeeded"

    async def the_result_publish() -> list[ReadableSpan] | None:
        trace = in_trace(spans, int(CALLER_TRACE, 16))
        done = any(
            s.name == "publish appointments.events"
            and s.attributes
            and s.attributes.get("messaging.rabbitmq.destination.routing_key") == "result.confirm.succeeded"
            for s in trace
        )
        # The worker's span ends last, after the ack.
        return trace if done and any(s.kind == SpanKind.CONSUMER for s in trace) else None

    trace = await eventually(the_result_publish)
    process = one(trace, SpanKind.CONSUMER, f"process {INBOUND_EXCHANGE}")
    assert process.parent is not None and format(process.parent.span_id, "016x") == CALLER_SPAN
    calls = [s for s in trace if s.kind == SpanKind.CLIENT]
    assert {s.name for s in calls} >= {"GET", "PUT"}, [s.name for s in calls]
    assert all(parent_of(call, trace) is process for call in calls)
    result = next(
        s
        for s in trace
        if s.attributes and s.attributes.get("messaging.rabbitmq.destination.routing_key") == "result.confirm.succeeded"
    )
    assert parent_of(result, trace) is process


async def test_tracing_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.configure()
    assert tracing.client_trace_configs() == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.configure()


def test_without_the_extra_nothing_is_traced_and_nothing_fails() -> None:
    """As on an install without `otel`: opentelemetry can't be imported, every hook is a no-op."""
    script = """
import sys
sys.modules["opentelemetry"] = None  # import fails as if not installed
import os
os.environ["OTEL_TRACES_EXPORTER"] = "console"
from consumer import tracing
assert tracing.trace is None
assert tracing.configure() is False
assert tracing.client_trace_configs() == []
import aiormq
with tracing.publish_span("x", "1", aiormq.spec.Basic.Properties(headers={})):
    pass
print("off")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "off", done.stderr

"""OpenTelemetry traces across the hops: webhook -> publish -> worker -> PMS -> result.

Optional: with the ``otel`` extra installed and the standard variables asking
for traces (``OTEL_TRACES_EXPORTER`` or an ``OTEL_EXPORTER_OTLP_*ENDPOINT``,
and not ``OTEL_SDK_DISABLED=true``), ``configure`` installs the SDK. Otherwise
every hook here is a no-op that costs one ``None`` check, and without the
extra nothing of OpenTelemetry is even imported.

The HTTP ends use the maintained instrumentations: aiohttp-server's for the
webhook and read API (it wraps every aiohttp app made after ``configure``),
aiohttp-client's trace config on the PMS session only. AMQP is
propagated by hand: the Broker publishes through aiormq, under aio-pika's
instrumented ``Exchange.publish``, and the worker's span must cover the task
that applies the message, not the consumer callback that only queues it. So
``traceparent`` goes into the AMQP headers of every publish, and the worker
continues whatever trace a message carries (a webhook's, or a client's command).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import aiohttp
import aiormq
from aio_pika.abc import AbstractIncomingMessage

try:
    from opentelemetry import propagate, trace
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
except ImportError:  # the `otel` extra is not installed: tracing stays off
    trace = None  # type: ignore[assignment]

T = TypeVar("T")
SERVICE_NAME = "appointment-consumer"

_provider: Any = None  # the SDK's TracerProvider while tracing is on
OFF = contextlib.nullcontext()  # what the hooks cost while tracing is off


def wanted() -> bool:
    """Whether the environment asks for traces (the standard OTEL_* variables)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter:
        return exporter != "none"
    return any(os.environ.get(name) for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter_from_env() -> Any:
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp") == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*


def configure(exporter: Any = None) -> bool:
    """Turn tracing on if the extra is there and asked for; ``exporter`` (tests) forces it on.

    Returns whether tracing is on. The service name and resource come from
    OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES as usual.
    """
    global _provider
    if trace is None or (exporter is None and not wanted()):
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter_from_env()))
    _provider = provider
    # A SERVER span per request of every aiohttp app made from now on (create_app runs after this).
    AioHttpServerInstrumentor().instrument(tracer_provider=provider)
    return True


def shutdown() -> None:
    """Flush and turn tracing off (on `appt serve` exit; after a test)."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        AioHttpServerInstrumentor().uninstrument()
        provider.shutdown()


def client_trace_configs() -> list[aiohttp.TraceConfig]:
    """The aiohttp-client instrumentation for the PMS session: a CLIENT span per call, traceparent sent."""
    return [create_trace_config(tracer_provider=_provider)] if _provider is not None else []


def _tracer() -> Any:
    return _provider.get_tracer(__name__)


def publish_span(
    exchange: str, routing_key: str, properties: aiormq.spec.Basic.Properties
) -> contextlib.AbstractContextManager[None]:
    """A PRODUCER span around one publish; its context goes out as ``traceparent`` in the headers."""
    return OFF if _provider is None else _publish_span(exchange, routing_key, properties)


@contextlib.contextmanager
def _publish_span(exchange: str, routing_key: str, properties: aiormq.spec.Basic.Properties) -> Iterator[None]:
    with _tracer().start_as_current_span(
        f"publish {exchange or 'reply'}",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "publish",
            "messaging.destination.name": exchange,
            "messaging.rabbitmq.destination.routing_key": routing_key,
            "messaging.message.id": properties.message_id or "",
        },
    ):
        headers = dict(properties.headers or {})
        propagate.inject(headers)
        properties.headers = headers
        yield


def _text_headers(message: AbstractIncomingMessage) -> dict[str, str]:
    """The headers a propagator can read: AMQP string values may arrive as bytes."""
    return {
        key: value.decode(errors="replace") if isinstance(value, bytes) else value
        for key, value in (message.headers or {}).items()
        if isinstance(value, (str, bytes))
    }


def processing(message: AbstractIncomingMessage, work: Awaitable[T]) -> Awaitable[T]:
    """``work`` (the worker applying ``message``), in a CONSUMER span continuing its trace when on."""
    return work if _provider is None else _processing(message, work)


async def _processing(message: AbstractIncomingMessage, work: Awaitable[T]) -> T:
    parent = propagate.extract(_text_headers(message))
    with _tracer().start_as_current_span(
        f"process {message.exchange or 'queue'}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": message.exchange or "",
            "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
            "messaging.message.id": message.message_id or "",
        },
    ):
        return await work

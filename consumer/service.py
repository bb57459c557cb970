"""`appt serve`: wires store, broker, PMS client, worker, workflows and HTTP together.

Resources live in the aiohttp app's cleanup context, so start-up and shutdown
happen in one place and in order: open store, connect broker, resume
unfinished workflows, consume (and prune in the background); on SIGTERM the reverse, letting in-flight
messages finish first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from aiohttp import web

from consumer import metrics
from consumer.broker import Broker
from consumer.deadletters import DeadLetterCollector
from consumer.http import listen, make_runner
from consumer.logs import configure, get_logger
from consumer.pms.client import PmsClient
from consumer.reconciler import Reconciler, run_reconciler
from consumer.retention import run_pruner
from consumer.settings import Settings
from consumer.silence import WebhookSilence
from consumer.store.base import open_store
from consumer.webhooks import BROKER_KEY, SILENCE_KEY, STORE_KEY, WORKER_FAILING_KEY, create_app
from consumer.worker import Worker
from consumer.workflows import WorkflowRunner

log = get_logger(__name__)

SANDBOX_PORT = 8700


def service_resources(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """The cleanup context that owns every long-lived resource of `appt serve`."""

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # Whatever started is stopped again, in reverse, also when a later start fails
        # (a store left open keeps its thread, and the process, alive).
        async with contextlib.AsyncExitStack() as started:
            store = open_store(settings.store)
            await store.open()
            started.push_async_callback(store.close)
            broker = Broker(settings.amqp_url, partitions=settings.partitions, prefetch=settings.prefetch)
            started.push_async_callback(broker.close)
            await broker.connect()
            pms = PmsClient(
                settings.pms_url, settings.pms_token, timeout=settings.pms_timeout,
                concurrency=settings.pms_concurrency, retry_attempts=settings.pms_retry_attempts,
                on_response=lambda method, route, status: metrics.PMS_CALLS.labels(route, str(status)).inc(),
                on_retry=lambda method, route, error: metrics.RETRIES.labels("pms").inc(),
            )
            started.push_async_callback(pms.close)
            workflows = WorkflowRunner(pms=pms, store=store, broker=broker, deadline=settings.workflow_deadline)
            await workflows.resume_unfinished()
            dead_letters = DeadLetterCollector(broker=broker, store=store)
            stop = asyncio.Event()
            background = [asyncio.create_task(workflows.watch(stop)),
                          asyncio.create_task(dead_letters.watch(stop))]
            silence = WebhookSilence()
            if settings.reconcile_interval > 0:
                reconciler = Reconciler(
                    pms, broker, store, horizon_days=settings.reconcile_horizon_days,
                    budget_share=settings.reconcile_budget_share,
                    use_updated_after=settings.reconcile_updated_after, silence=silence,
                    silence_grace=timedelta(seconds=settings.webhook_silence_grace),
                )
                background.append(asyncio.create_task(
                    run_reconciler(reconciler, settings.reconcile_interval, stop)))
            if settings.prune_interval > 0:
                background.append(asyncio.create_task(run_pruner(store, settings, stop)))
            started.push_async_callback(_cancelled, background)
            worker = Worker(
                broker=broker, store=store, pms=pms, reassign=workflows.reassign,
                partitions=settings.consumed_partitions(), max_deliveries=settings.max_deliveries,
                retry_delay=settings.retry_delay, max_message_bytes=settings.max_message_bytes,
            )
            started.push_async_callback(worker.stop)  # first to run on the way out (both consumers)
            await worker.start()
            await dead_letters.start()
            app[BROKER_KEY] = broker
            app[STORE_KEY] = store
            app[SILENCE_KEY] = silence
            app[WORKER_FAILING_KEY] = lambda: worker.failing
            log.info("service ready", http=f"{settings.http_host}:{settings.http_port}",
                     pms=settings.pms_url, store=settings.store.split("@")[-1])
            yield
            log.info("shutting down")
            stop.set()

    return resources


async def _cancelled(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve(settings: Settings, *, with_sandbox: bool = False) -> None:
    configure(settings.log_format, settings.log_level)
    async with contextlib.AsyncExitStack() as stack:
        if with_sandbox:
            settings = await _start_sandbox(stack, settings)
        app = create_app(settings, service_resources(settings))
        runner = make_runner(app, settings)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        listener = await listen(runner, settings)
        stack.callback(listener.close)  # stop accepting before the runner shuts connections
        await _wait_for_signal()


async def _start_sandbox(stack: contextlib.AsyncExitStack, settings: Settings) -> Settings:
    """The demo upstream: the sandbox in-process, posting its webhooks to this service."""
    from consumer.sandbox import running_sandbox

    sandbox = await stack.enter_async_context(running_sandbox(port=SANDBOX_PORT, token=settings.pms_token))
    secrets = settings.webhook_secrets or [
        "whsec_" + base64.b64encode(os.urandom(24)).decode()
    ]
    sandbox.state.subscribe(
        f"http://{settings.http_host}:{settings.http_port}/webhooks/pms", secrets[0]
    )
    log.info("sandbox running", url=sandbox.url)
    return settings.model_copy(update={"pms_url": sandbox.url, "webhook_secrets": secrets})


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

"""`appt serve`: wires store, broker, PMS client, worker, workflows and HTTP together.

Resources live in the aiohttp app's cleanup context, so start-up and shutdown
happen in one place and in order: open store, connect broker, resume
unfinished workflows, consume (and prune in the background); on SIGTERM the reverse, letting in-flight
messages finish first.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import timedelta
from typing import Any

from aiohttp import web

from consumer import tracing
from consumer.broker import Broker
from consumer.console import add_console
from consumer.deadletters import DeadLetterCollector
from consumer.http import listen, make_runner
from consumer.logs import configure, get_logger
from consumer.practices import Practice, Practices, PracticesError, load_configs
from consumer.reconciler import Reconciler, run_reconciler
from consumer.retention import run_pruner
from consumer.settings import Settings, default_store, default_store_path
from consumer.silence import WebhookSilences
from consumer.store.opening import open_store
from consumer.waiting import Resumer
from consumer.webhooks import BROKER_KEY, PRACTICES_KEY, SILENCE_KEY, STORE_KEY, WORKER_FAILING_KEY, create_app
from consumer.worker import Worker
from consumer.workflow_watch import WorkflowWatcher
from consumer.workflows import WorkflowRunner

log = get_logger(__name__)

# The webhook secret of the demo (`appt serve --with-sandbox` without APPT_WEBHOOK_SECRETS): fixed and
# documented, so the README's signed curl works against it. Never use it in front of a real PMS.
DEMO_WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# Container allocations (net of frees) between two young-generation collections; Python's default is 700.
GC_YOUNG_THRESHOLD = 10_000


class PortTaken(OSError):
    """A port `appt serve` needs is in use: found before anything starts."""


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
            practices = app[PRACTICES_KEY]
            started.push_async_callback(practices.close)
            workflows = WorkflowRunner(practices=practices, store=store, broker=broker)
            watcher = WorkflowWatcher(store=store, broker=broker, deadline=settings.workflow_deadline)
            await watcher.resume_unfinished()
            dead_letters = DeadLetterCollector(broker=broker, store=store)
            stop = asyncio.Event()
            background = [
                asyncio.create_task(watcher.watch(stop)),
                asyncio.create_task(dead_letters.watch(stop)),
                asyncio.create_task(Resumer(practices=practices, store=store, broker=broker).run(stop)),
            ]
            silences = WebhookSilences()
            if settings.reconcile_interval > 0:

                def reconciler_for(practice: Practice) -> Reconciler:
                    return Reconciler(
                        practice.pms,
                        broker,
                        store,
                        practice=practice.name,
                        horizon_days=settings.reconcile_horizon_days,
                        budget_share=settings.reconcile_budget_share,
                        use_updated_after=settings.reconcile_updated_after,
                        silence=silences.of(practice.name),
                        silence_grace=timedelta(seconds=settings.webhook_silence_grace),
                    )

                background.append(
                    asyncio.create_task(run_reconciler(practices, reconciler_for, settings.reconcile_interval, stop))
                )
            if settings.prune_interval > 0:
                background.append(asyncio.create_task(run_pruner(store, settings, stop)))
            started.push_async_callback(_cancelled, background)
            worker = Worker(
                broker=broker,
                store=store,
                practices=practices,
                reassign=workflows.reassign,
                partitions=settings.consumed_partitions(),
                max_deliveries=settings.max_deliveries,
                retry_delay=settings.retry_delay,
                probe_interval=settings.practice_probe_interval,
                max_message_bytes=settings.max_message_bytes,
                read_before_write=settings.read_before_write,
            )
            started.push_async_callback(worker.stop)  # first to run on the way out (both consumers)
            await worker.start()
            await dead_letters.start()
            app[BROKER_KEY] = broker
            app[STORE_KEY] = store
            app[SILENCE_KEY] = silences
            app[WORKER_FAILING_KEY] = lambda: worker.failing
            log.info(
                "service ready",
                http=f"{settings.http_host}:{settings.http_port}",
                practices=[p.name for p in practices],
                store=settings.store.split("@")[-1],
            )
            yield
            log.info("shutting down")
            stop.set()

    return resources


def tune_gc() -> None:
    """Set the cycle collector for a long-running worker, once everything is wired.

    Every young collection walks all the young objects still alive, and a worker
    keeps tens of thousands of them in flight (deliveries, requests, models): at
    Python's default of 700 allocations it collected ~0.1 times per command and
    spent ~7 % of the worker's CPU there; at 10,000, ~6x less time
    (``bench/bench_gc.py``). Garbage cycles then wait at most that many
    allocations (a few MB). ``gc.freeze`` moves what start-up built (modules,
    classes, the wiring: ~78,000 objects in the benchmark's process) out of
    every later collection, so the oldest generation's pauses no longer walk it.
    """
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


async def _cancelled(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve(settings: Settings, *, with_sandbox: bool = False) -> None:
    configure(settings.log_format, settings.log_level)
    # Before anything starts: a taken port found after the worker consumed and the reconciler
    # published would leave work half-done behind a failed start.
    check_ports_free(
        settings.http_host,
        {
            "APPT_HTTP_PORT": settings.http_port,
            **({"APPT_SANDBOX_PORT": settings.sandbox_port} if with_sandbox else {}),
        },
    )
    if settings.store == default_store():  # our default place is ours to make; a configured path is not
        default_store_path().parent.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        if tracing.configure():
            stack.callback(tracing.shutdown)
            log.info("tracing on", exporter=os.environ.get("OTEL_TRACES_EXPORTER", "otlp"))
        if with_sandbox:
            settings = await _start_sandbox(stack, settings)
        app = create_app(settings, service_resources(settings))
        add_console(app)
        runner = make_runner(app, settings)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        listener = await listen(runner, settings)
        stack.callback(listener.close)  # stop accepting before the runner shuts connections
        tune_gc()
        if with_sandbox:
            print_demo_banner(settings)
        await _wait_for_signal(lambda: _reload_practices(app[PRACTICES_KEY], settings))


async def _reload_practices(practices: Practices, settings: Settings) -> None:
    """SIGHUP: read the practices file (and token files) again; a bad file changes nothing."""
    try:
        changed = await practices.reload(load_configs(settings))
    except PracticesError as exc:
        log.error("practices not reloaded: the running configuration stays", error=str(exc))
        return
    log.info("practices reloaded", changed=changed)


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Bind each port once (as aiohttp will, SO_REUSEADDR) and let go; ``PortTaken`` names the setting."""
    for setting, port in ports.items():
        if port == 0:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise PortTaken(
                    f"{host}:{port} is taken ({exc.strerror}): stop what uses it, or set {setting} to another port"
                ) from None


async def _start_sandbox(stack: contextlib.AsyncExitStack, settings: Settings) -> Settings:
    """The demo upstream: the sandbox in-process, posting its webhooks to this service."""
    from consumer.sandbox import running_sandbox

    sandbox = await stack.enter_async_context(
        running_sandbox(host=settings.http_host, port=settings.sandbox_port, token=settings.pms_token)
    )
    secrets = settings.webhook_secrets or [DEMO_WEBHOOK_SECRET]
    sandbox.state.subscribe(f"http://{settings.http_host}:{settings.http_port}/webhooks/pms", secrets[0])
    log.info("sandbox running", url=sandbox.url)
    return settings.model_copy(update={"pms_url": sandbox.url, "webhook_secrets": secrets})


def print_demo_banner(settings: Settings) -> None:
    """What a newcomer needs to try the demo, once it is ready: where, what store, what secret, a first step."""
    url = f"http://{settings.http_host}:{settings.http_port}"
    secret = settings.webhook_secrets[0]
    whose = (
        "the documented demo default; set APPT_WEBHOOK_SECRETS to choose"
        if secret == DEMO_WEBHOOK_SECRET
        else "from APPT_WEBHOOK_SECRETS"
    )
    appt = sys.argv[0] if sys.argv[0].endswith("appt") else "appt"
    print(
        "\n".join(
            [
                "appt serve --with-sandbox: ready",
                f"  service  {url}  (POST /webhooks/pms, GET /readyz, GET /metrics)",
                f"  sandbox  {settings.pms_url}  (the PMS API under /v1, token {settings.pms_token!r}; "
                f"knobs POST /_sandbox/<knob>)",
                f"  store    {settings.store.split('@')[-1]}",
                f"  secret   {secret}  ({whose})",
                f'  try      curl -s -XPOST {settings.pms_url}/_sandbox/seed -d \'{{"fixture": "seed"}}\' && '
                f"{appt} send confirm --appointment 757579675 --wait 10",
            ]
        ),
        file=sys.stderr,
        flush=True,
    )


async def _wait_for_signal(on_hangup: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Until SIGTERM / SIGINT; each SIGHUP runs ``on_hangup`` (one at a time, in order)."""
    stop = asyncio.Event()
    hangups: asyncio.Queue[None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hangups.put_nowait, None)
    stopping = asyncio.create_task(stop.wait())
    while not stop.is_set():
        hangup = asyncio.create_task(hangups.get())
        await asyncio.wait({stopping, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if hangup.done():
            await on_hangup()
        else:
            hangup.cancel()

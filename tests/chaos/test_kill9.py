"""kill -9 of the real `appt serve` at random instants, under commands, webhooks and reassignments.

The service is restarted after every kill. Before every kill the first
practice's PMS fails a run of requests (reads and writes) past the in-process retries, so commands park and their
practice waits mid-load. Afterwards: every command has a result (repeats only
as identical redelivery repeats), the store agrees with the PMS, no slot is
double-booked, no replacement is orphaned, and each appointment edited in
order ends with the last edit sent. Both practices are checked, each against its own PMS;
a few appointments of each are named by nothing (no command, no PMS-side change), so only
catch-up polling can bring them into the store.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from consumer.broker import Broker
from consumer.sandbox import running_sandbox
from consumer.store.base import open_store
from tests.chaos.common import (
    Collector,
    applied_twice,
    chaos_marks,
    collecting,
    double_bookings,
    orphan_replacements,
    pms_side_change,
    publish_until_confirmed,
    random_command,
    scaled,
    seed_slots,
    state_mismatches,
)
from tests.e2e.processes import SECRET, AppProcess, ServiceProcess, service_env

pytestmark = chaos_marks
BURST_CHANCE = 0.05  # per tick of the load: 10-40 commands back to back
ORDERED = 4  # appointments (of the default practice) that get only edit_notes: the last one sent must win
UNTOUCHED = 2  # appointments no command or PMS-side change names: only catch-up polling brings them in
FAILED_REQUESTS = 150  # per outage: seconds of the load's requests, so commands fail past 2 client x 3 worker attempts


@pytest.fixture
async def pms() -> AsyncIterator[Any]:
    """The sandbox in this process, with no hourly budget to run out of."""
    async with running_sandbox(port=0, rate_limit=10**9) as sandbox:
        sandbox.state.set_webhook_retry_delay(0.05)  # a restarted service gets its webhooks soon
        sandbox.state.set_latency(0.03)  # so that a kill finds PMS calls and sagas in flight
        yield sandbox


@pytest.fixture
async def north() -> AsyncIterator[Any]:
    """A second practice's PMS: its own token, and the same appointment ids as the first's."""
    async with running_sandbox(port=0, token="north-token", rate_limit=10**9) as sandbox:
        sandbox.state.set_webhook_retry_delay(0.05)
        sandbox.state.set_latency(0.03)
        yield sandbox


def practices_file(path: Path, pms: Any, north: Any) -> Path:
    path.write_text(
        f'[practices.default]\npms_url = "{pms.url}"\ntoken = "sandbox-token"\nwebhook_secrets = ["{SECRET}"]\n\n'
        f'[practices.north]\npms_url = "{north.url}"\ntoken = "north-token"\nwebhook_secrets = ["{SECRET}"]\n'
    )
    return path


async def mixed_load(
    broker: Broker,
    sandboxes: dict[str, Any],
    ids: list[int],
    rng: random.Random,
    sent: list[str],
    stop: asyncio.Event,
    last_notes: dict[int, str] | None = None,
) -> None:
    """Commands on the queue and PMS-side changes (which the PMS announces by webhook), one in
    four to the second practice (same appointment ids, its own PMS). If given ``last_notes``, every
    tick also edits the notes of one of its appointments (nothing else touches them), remembering the
    last notes sent to each.

    A trickle with a burst now and then: the service drains a trickle as fast
    as it comes, and a kill must also land while a backlog is being worked.
    """
    tick = 0
    while not stop.is_set():
        for _ in range(rng.randint(10, 40) if rng.random() < BURST_CHANCE else 1):
            practice = "north" if rng.random() < 0.25 else "default"
            command = {**random_command(rng, ids), "practice": practice}
            await publish_until_confirmed(broker, command)
            sent.append(command["command_id"])
        if last_notes:
            ordered = rng.choice(list(last_notes))
            edit = {
                "type": "edit_notes",
                "appointment_id": ordered,
                "notes": f"edit {tick}",
                "command_id": f"ordered-{uuid.uuid4().hex[:12]}",
            }
            await publish_until_confirmed(broker, edit)
            sent.append(edit["command_id"])
            last_notes[ordered] = edit["notes"]
        if tick % 3 == 0:
            pms_side_change(rng, sandboxes["north" if tick % 12 == 0 else "default"], ids)
        tick += 1
        await asyncio.sleep(rng.uniform(0.005, 0.04))


async def wait_for(check: Callable[[], Any], timeout: float) -> bool:
    """Like eventually(), but answers False instead of raising, so the figures still print."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.2)


async def test_kill9_at_random_instants_loses_nothing_and_converges(
    amqp_url: str, tmp_path: Path, pms: Any, north: Any
) -> None:
    seed = int(os.environ.get("APPT_CHAOS_SEED") or random.randrange(10**6))
    rng = random.Random(seed)
    trials = scaled(4, 25)
    seeded = seed_slots(pms, scaled(24, 80) + ORDERED + UNTOUCHED)
    ids = seeded[: -ORDERED - UNTOUCHED]
    ordered = seeded[-ORDERED - UNTOUCHED : -UNTOUCHED]  # slots of their own: no replacement books them
    assert seed_slots(north, len(seeded)) == seeded  # the second practice's ordered slots are untouched too
    last_notes: dict[int, str] = dict.fromkeys(ordered, "")
    store_url = f"sqlite:///{tmp_path / 'appt.sqlite3'}"
    # Catch-up polling every 2 s: part of the chaos, and what heals a webhook lost in a kill.
    env = service_env(
        pms_url=pms.url,
        store=store_url,
        amqp_url=amqp_url,
        APPT_RECONCILE_INTERVAL="2",
        APPT_LOG_LEVEL="WARNING",
        APPT_PMS_TIMEOUT="5",
        APPT_PMS_RETRY_ATTEMPTS="2",
        PYTHONUNBUFFERED="1",  # a killed service's log lines are counted (waits)
        APPT_PRACTICES_FILE=str(practices_file(tmp_path / "practices.toml", pms, north)),
    )
    service = ServiceProcess(env, tmp_path)
    pms.state.subscribe(f"{service.url}/webhooks/pms", SECRET)
    north.state.subscribe(f"{service.url}/webhooks/pms/north", SECRET)
    broker = Broker(amqp_url)
    await broker.connect()
    store = open_store(store_url)
    sent: list[str] = []
    try:
        async with collecting(amqp_url) as collector:
            await service.start().wait_ready()
            await store.open()
            stop = asyncio.Event()
            load = asyncio.create_task(
                mixed_load(broker, {"default": pms, "north": north}, ids, rng, sent, stop, last_notes)
            )
            unanswered_at_kills = 0  # shows the kills landed under load
            for _ in range(trials):
                pms.state.fail_next("*", FAILED_REQUESTS, 500)  # the PMS down a moment: commands park, it waits
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                unanswered_at_kills += len(collector.lost(sent))
                service.kill()
                await service.start().wait_ready()
            stop.set()
            await load

            settled = await settle(
                collector,
                sent,
                pms,
                AppProcess(["reconcile"], env, tmp_path, "reconcile", ""),
                store,
                timeout=scaled(90, 400),
                north=north,
            )
            await service.terminate()
            figures = await final_figures(collector, sent, pms, store, ids)
            figures["details"].update(await north_details(north, store))
            figures["details"].update(out_of_order(pms, last_notes))
            waits = waits_logged(tmp_path)
    finally:
        await service.terminate()
        await store.close()
        await broker.close()

    print(f"\n{service.tail(15)}" if not settled else "")
    print(
        f"chaos kill9 practices=2 trials={trials} commands={len(sent)} unanswered_at_kills={unanswered_at_kills} events={figures['events']} "
        f"lost={figures['lost']} duplicated={figures['duplicated']} dead={figures['dead']} "
        f"diverging={figures['diverging']} applied_twice={figures['applied_twice']} "
        f"mismatches={figures['mismatches']} double_bookings={figures['double_bookings']} "
        f"orphans={figures['orphans']} anomalies={figures['anomalies']} sagas={figures['sagas']} "
        f"waits={waits} out_of_order={len(figures['details'].get('out_of_order', {}))} "
        f"north_mismatches={len(figures['details'].get('north_mismatches', []))} seed={seed}"
    )
    assert figures["details"] == {}, figures["details"]
    assert waits > 0  # the failed writes did make the practice wait mid-load


async def settle(
    collector: Collector,
    sent: list[str],
    pms: Any,
    reconcile: AppProcess,
    store: Any,
    *,
    timeout: float,
    north: Any,
) -> bool:
    """Wait for every result, every webhook delivered, one `appt reconcile`, then the store to agree."""
    answered = await wait_for(lambda: not collector.lost(sent), timeout)
    delivered = await wait_for(lambda: pms.state.webhooks.pending() == north.state.webhooks.pending() == 0, 30)
    assert await reconcile.start().wait_exit(60) == 0, reconcile.tail()
    deleted = _deleted_ids(pms)

    async def agreed() -> bool:
        return not (
            await state_mismatches(pms, store, deleted)
            or await state_mismatches(north, store, _deleted_ids(north), "north")
        )

    return answered and delivered and await wait_for(agreed, 30)


def _deleted_ids(pms: Any) -> set[int]:
    return {d.appointment_id for d in pms.state.deliveries if d.type == "appointment.deleted"}


def out_of_order(pms: Any, last_notes: dict[int, str]) -> dict[str, dict[int, tuple[str, str]]]:
    """Appointments whose PMS notes are not the last edit sent to them: (in the PMS, last sent)."""
    wrong = {
        i: (pms.state.get(i)["notes"], notes)
        for i, notes in last_notes.items()
        if notes and pms.state.get(i)["notes"] != notes
    }
    return {"out_of_order": wrong} if wrong else {}


def waits_logged(log_dir: Path) -> int:
    """How many times a practice started waiting, over every start of the service (each logs it once)."""
    return sum(path.read_text(errors="replace").count("practice waiting") for path in log_dir.glob("service.*.log"))


async def north_details(north: Any, store: Any) -> dict[str, Any]:
    """The second practice's invariants: its store records agree with its own PMS (its untouched
    appointments included), no double booking, no orphaned replacement."""
    details = {
        "north_mismatches": await state_mismatches(north, store, _deleted_ids(north), "north"),
        "north_double_bookings": double_bookings(north),
        "north_orphans": await orphan_replacements(north, store),
    }
    return {name: found for name, found in details.items() if found}


async def final_figures(collector: Collector, sent: list[str], pms: Any, store: Any, ids: list[int]) -> dict[str, Any]:
    touched = sorted({*ids, *(a["id"] for a in pms.state.all_appointments()), *_deleted_ids(pms)})
    details = {
        "lost": collector.lost(sent),
        "dead": collector.dead,
        "diverging": collector.diverging(),
        "applied_twice": await applied_twice(store, touched),
        "mismatches": await state_mismatches(pms, store, _deleted_ids(pms)),
        "double_bookings": double_bookings(pms),
        "orphans": await orphan_replacements(pms, store),
    }
    figures: dict[str, Any] = {name: len(found) for name, found in details.items()}
    figures["details"] = {name: found for name, found in details.items() if found}
    figures["events"] = len(collector.logs) + sum(len(r) for r in collector.results.values())
    figures["duplicated"] = collector.duplicated()
    figures["anomalies"] = collector.anomalies()
    figures["sagas"] = dict(Counter(w.state for w in await store.list_workflows()))
    return figures

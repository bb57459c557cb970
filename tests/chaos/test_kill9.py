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
import random
from pathlib import Path

from consumer.broker import Broker
from consumer.sandbox import RunningSandbox
from consumer.store.opening import open_store
from tests.chaos.common import (
    chaos_marks,
    chaos_seed,
    collecting,
    final_figures,
    mixed_load,
    scaled,
    seed_both,
    settle,
    two_practice_service,
)

pytestmark = chaos_marks
ORDERED = 4  # appointments (of the default practice) that get only edit_notes: the last one sent must win
UNTOUCHED = 2  # appointments no command or PMS-side change names: only catch-up polling brings them in
FAILED_REQUESTS = 150  # per outage: seconds of the load's requests, so commands fail past 2 client x 3 worker attempts


async def test_kill9_at_random_instants_loses_nothing_and_converges(
    amqp_url: str, tmp_path: Path, pms: RunningSandbox, north: RunningSandbox
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    trials = scaled(4, 25)
    # The second practice's ordered and untouched slots are named by nothing either.
    seeded = seed_both(pms, north, scaled(24, 80) + ORDERED + UNTOUCHED)
    ids = seeded[: -ORDERED - UNTOUCHED]
    ordered = seeded[-ORDERED - UNTOUCHED : -UNTOUCHED]  # slots of their own: no replacement books them
    last_notes: dict[int, str] = dict.fromkeys(ordered, "")
    store_url = f"sqlite:///{tmp_path / 'appt.sqlite3'}"
    # A killed service's log lines are counted (waits): AppProcess runs it unbuffered.
    service = two_practice_service(store_url, amqp_url, tmp_path, pms, north, APPT_PMS_RETRY_ATTEMPTS="2")
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

            settled = await settle(collector, sent, pms, north, store, service, timeout=scaled(90, 400))
            await service.terminate()
            figures = await final_figures(collector, sent, pms, north, store, ids)
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


def out_of_order(pms: RunningSandbox, last_notes: dict[int, str]) -> dict[str, dict[int, tuple[str | None, str]]]:
    """Appointments whose PMS notes are not the last edit sent to them: (in the PMS, last sent)."""
    in_pms = {i: (pms.state.get(i) or {}).get("notes") for i in last_notes}
    wrong = {i: (in_pms[i], notes) for i, notes in last_notes.items() if notes and in_pms[i] != notes}
    return {"out_of_order": wrong} if wrong else {}


def waits_logged(log_dir: Path) -> int:
    """How many times a practice started waiting, over every start of the service (each logs it once)."""
    return sum(path.read_text(errors="replace").count("practice waiting") for path in log_dir.glob("service.*.log"))

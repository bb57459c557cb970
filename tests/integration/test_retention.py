"""Retention on both stores: what is past its table's retention goes, what is younger or still
needed stays, and pruning alongside the worker's commits loses nothing and deadlocks nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer import metrics
from consumer.messages import utcnow
from consumer.retention import PAGING_GRACE, prune_once, run_pruner
from consumer.settings import DAY, load_settings
from consumer.store import Commit, InboxEntry, Store
from consumer.store.sqlite import SqliteStore
from consumer.worker import command_key
from tests.helpers import eventually
from tests.integration.test_store import (  # noqa: F401 (new_store and store are fixtures)
    StoreFactory,
    appointment,
    log,
    new_store,
    store,
    workflow,
)
from tests.stack import running_stack

APPT = str(Path(sys.executable).with_name("appt"))
RETENTION = 4.0  # seconds, in the pipeline test
KEEP_A_DAY = {"history_reads": PAGING_GRACE, "inbox": DAY, "workflows": DAY, "state_log": DAY}


async def commit_old_and_young(store: Store) -> datetime:
    """Two generations of rows, each with inbox entries, finished workflows and log records;
    returns a moment between them. The old generation also has an unfinished workflow."""
    await store.commit(
        Commit(
            workflow=workflow("wf-old-done", 1, state="completed"),
            logs=[log(1, workflow_id="wf-old-done")],
            inbox=InboxEntry("m-old-1"),
        )
    )
    await store.commit(
        Commit(
            workflow=workflow("wf-old-running", 2, state="replacement_created"),
            logs=[log(2, workflow_id="wf-old-running")],
            inbox=InboxEntry("m-old-2"),
        )
    )
    await store.commit(Commit(logs=[log(3), log(3)], inbox=InboxEntry("m-old-3")))
    await asyncio.sleep(0.02)
    between = utcnow()
    await asyncio.sleep(0.02)
    await store.commit(
        Commit(
            workflow=workflow("wf-young-done", 4, state="compensated"),
            logs=[log(4, workflow_id="wf-young-done")],
            inbox=InboxEntry("m-young-4"),
        )
    )
    return between


def a_day_after(moment: datetime) -> datetime:
    """The ``now`` at which a one-day retention cuts exactly at ``moment``."""
    return moment + timedelta(days=1)


async def log_tables(store: Store, *appointment_ids: int) -> dict[int, int]:
    return {a: len(await store.history(a)) for a in appointment_ids}


async def test_rows_past_retention_are_pruned_and_younger_or_needed_ones_kept(store: Store) -> None:
    between = await commit_old_and_young(store)

    reports = await prune_once(store, KEEP_A_DAY, batch=1, now=a_day_after(between), pause=0)

    pruned = {r.table: r.pruned for r in reports}
    assert pruned == {"history_reads": 0, "inbox": 3, "workflows": 1, "state_log": 3}
    assert [await store.inbox_get(m) is not None for m in ("m-old-1", "m-old-2", "m-old-3", "m-young-4")] == [
        False,
        False,
        False,
        True,
    ]
    assert await store.get_workflow("wf-old-done") is None
    assert await store.get_workflow("wf-old-running") is not None  # unfinished: never pruned
    assert await store.get_workflow("wf-young-done") is not None
    # the unfinished workflow's record stays (its redelivery re-publishes it); the young one too
    assert await log_tables(store, 1, 2, 3, 4) == {1: 0, 2: 1, 3: 0, 4: 1}
    oldest = {r.table: r.oldest for r in reports}
    assert oldest["inbox"] is not None and oldest["inbox"] > between


async def test_a_zero_retention_keeps_the_table(store: Store) -> None:
    between = await commit_old_and_young(store)

    reports = await prune_once(store, {**KEEP_A_DAY, "state_log": 0}, batch=10, now=a_day_after(between))

    assert {r.table: r.pruned for r in reports}["state_log"] == 0
    assert await log_tables(store, 1, 3) == {1: 1, 3: 2}


async def test_a_dry_run_counts_exactly_what_a_prune_then_deletes(store: Store) -> None:
    between = await commit_old_and_young(store)
    now = a_day_after(between)

    dry = await prune_once(store, KEEP_A_DAY, batch=2, now=now, dry_run=True)
    assert await store.inbox_get("m-old-1") is not None  # a dry run deletes nothing
    done = await prune_once(store, KEEP_A_DAY, batch=2, now=now, pause=0)

    assert [(r.table, r.pruned) for r in dry] == [(r.table, r.pruned) for r in done]
    assert sum(r.pruned for r in done) == 7


async def test_a_history_being_paged_keeps_its_records_until_the_grace_runs_out(store: Store) -> None:
    await store.commit(Commit(logs=[log(5, "Pending"), log(5, "Confirmed"), log(5, "Cancelled")]))
    await store.commit(Commit(logs=[log(6, "Pending")]))
    first_page = await store.history(5, limit=1)  # a reader is paging through appointment 5
    await asyncio.sleep(0.05)
    keep = {"history_reads": PAGING_GRACE, "state_log": 0.01}  # every record is past retention

    await prune_once(store, keep, batch=10, pause=0)
    rest = await store.history(5, after_seq=first_page[-1].seq or 0)

    assert [r.to_state for r in first_page + rest] == ["Pending", "Confirmed", "Cancelled"]
    assert await log_tables(store, 6) == {6: 0}  # nobody was reading appointment 6
    later = utcnow() + timedelta(seconds=PAGING_GRACE * 2)  # the reader stopped long ago
    await prune_once(store, keep, batch=10, now=later, pause=0)
    assert await store.oldest("state_log") is None
    assert await store.oldest("history_reads") is None


async def test_pruning_while_the_worker_commits_loses_nothing_and_deadlocks_nothing(
    new_store: StoreFactory,
) -> None:
    worker_store, pruner_store = new_store(), new_store()  # two connections, as two processes would
    await worker_store.open()
    await pruner_store.open()
    for batch in range(10):
        await worker_store.commit(Commit(logs=[log(1000 + i) for i in range(20)], inbox=InboxEntry(f"old-{batch}")))
    for i in range(20):
        await worker_store.commit(Commit(workflow=workflow(f"wf-old-{i}", 1000 + i, state="completed")))
    await asyncio.sleep(0.02)
    cutoff_moment = utcnow()
    await asyncio.sleep(0.02)
    writers, commits_each = 20, 8

    async def write(appointment_id: int) -> None:
        for version in range(commits_each):
            await worker_store.commit(
                Commit(
                    appointment=appointment(appointment_id, version=version),
                    logs=[log(appointment_id, f"S{version}")],
                    inbox=InboxEntry(f"new-{appointment_id}-{version}"),
                )
            )

    async def prune_until_done() -> int:
        pruned = 0
        while reports := await prune_once(pruner_store, KEEP_A_DAY, batch=7, now=a_day_after(cutoff_moment), pause=0):
            step = sum(r.pruned for r in reports)
            pruned += step
            if step == 0:
                return pruned
        raise AssertionError("unreachable")

    async with asyncio.timeout(60):  # a deadlock would hang here
        results = await asyncio.gather(prune_until_done(), *(write(a) for a in range(1, writers + 1)))

    assert results[0] == 10 + 200 + 20  # old inbox entries, old log records, old workflows
    for appointment_id in range(1, writers + 1):
        stored = await worker_store.get_appointment(appointment_id)
        assert stored is not None and stored.version == commits_each
        assert [r.to_state for r in await worker_store.history(appointment_id)] == [
            f"S{v}" for v in range(commits_each)
        ]
        for version in range(commits_each):
            assert await worker_store.inbox_get(f"new-{appointment_id}-{version}") is not None
    assert await worker_store.oldest("inbox") is not None
    assert await worker_store.prunable("inbox", cutoff_moment) == 0


async def test_two_pruners_together_delete_each_row_once(new_store: StoreFactory) -> None:
    first, second = new_store(), new_store()
    await first.open()
    await second.open()
    for i in range(150):
        await first.commit(Commit(inbox=InboxEntry(f"m-{i}")))
    now = a_day_after(utcnow())

    reports = await asyncio.gather(
        *(prune_once(s, {"inbox": DAY}, batch=11, now=now, pause=0) for s in (first, second))
    )

    assert sum(r[0].pruned for r in reports) == 150
    assert await first.oldest("inbox") is None


def test_appt_prune_dry_run_shows_what_would_go_and_prune_deletes_it(tmp_path: Path) -> None:
    path = tmp_path / "cli.sqlite3"

    async def fill() -> None:
        store = SqliteStore(str(path))
        await store.open()
        await commit_old_and_young(store)
        await store.close()

    asyncio.run(fill())
    time.sleep(1.1)  # everything is now older than a 1-second retention
    env = {**os.environ, "APPT_STORE": f"sqlite:///{path}", "APPT_INBOX_RETENTION": "1", "APPT_WORKFLOW_RETENTION": "1"}

    def prune(*args: str) -> list[dict[str, Any]]:
        finished = subprocess.run([APPT, "prune", *args], env=env, capture_output=True, text=True, timeout=60)
        assert finished.returncode == 0, finished.stderr
        return [json.loads(line) for line in finished.stdout.splitlines()]

    dry, done, again = prune("--dry-run"), prune(), prune("--dry-run")

    assert [(r["table"], r["pruned"], r["dry_run"]) for r in dry] == [
        ("history_reads", 0, True),
        ("inbox", 4, True),
        ("workflows", 2, True),
        ("state_log", 0, True),
    ]
    assert [(r["table"], r["pruned"]) for r in done] == [(r["table"], r["pruned"]) for r in dry]
    assert {r["table"]: r["oldest"] for r in done}["inbox"] is None
    assert {r["table"]: r["retention_s"] for r in done}["state_log"] is None  # 0: kept
    assert sum(r["pruned"] for r in again) == 0


async def test_sqlite_gives_pruned_space_back_and_empties_its_wal(tmp_path: Path) -> None:
    path = tmp_path / "compact.sqlite3"
    store = SqliteStore(str(path))
    await store.open()
    try:
        blob = {"padding": "x" * 10_000}
        for i in range(300):
            await store.commit(Commit(inbox=InboxEntry(f"m-{i}", blob)))
        await store.compact()
        before = path.stat().st_size

        await prune_once(store, {"inbox": DAY}, batch=500, now=a_day_after(utcnow()), pause=0)

        after = path.stat().st_size
        assert after < before / 5, (before, after)
        assert Path(f"{path}-wal").stat().st_size == 0
    finally:
        await store.close()


async def test_an_existing_sqlite_file_is_switched_to_incremental_auto_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE leftover (x)")
    store = SqliteStore(str(path))
    await store.open()
    await store.close()

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
async def test_with_a_tiny_retention_a_redelivery_inside_it_is_still_deduplicated(
    store_kind: str,
    amqp_url: str,
    sqlite_url: str,
    pg_url: str,
    sandbox: Any,
) -> None:
    """The whole pipeline with the pruner running every 50 ms over a few seconds' retention."""
    schema = f"test_retention_{uuid.uuid4().hex[:12]}"
    store_url = sqlite_url if store_kind == "sqlite" else f"{pg_url}?schema={schema}"
    try:
        await _redelivery_inside_a_tiny_retention(store_url, amqp_url, sandbox)
    finally:
        if store_kind == "postgres":
            conn = await asyncpg.connect(pg_url, timeout=5)
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            finally:
                await conn.close()


async def _redelivery_inside_a_tiny_retention(store_url: str, amqp_url: str, sandbox: Any) -> None:
    settings = load_settings(
        inbox_retention=RETENTION,
        workflow_retention=RETENTION,
        state_log_retention=RETENTION,
        prune_interval=0.05,
        prune_batch=5,
    )
    sandbox.state.seed(
        [
            {
                "id": 700 + i,
                "patient_id": 1013,
                "practitioner_id": 1,
                "state": "Pending",
                "start_time": f"2030-01-02T{9 + i:02d}:00:00Z",
                "finish_time": f"2030-01-02T{9 + i:02d}:30:00Z",
                "reason": "Exam",
            }
            for i in range(5)
        ]
    )
    pruned_before = _pruned_inbox()
    async with running_stack(amqp_url, store_url, sandbox.url) as stack:
        stop = asyncio.Event()
        pruner = asyncio.create_task(run_pruner(stack.store, settings, stop))
        try:
            first = await stack.send(
                {"type": "edit_notes", "appointment_id": 700, "notes": "first", "command_id": "c-first"}
            )
            assert (await stack.result(first))["outcome"] == "succeeded"
            reads = sandbox.state.call_count("GET /v1/appointments/{id}")
            await stack.send(
                {"type": "edit_notes", "appointment_id": 700, "notes": "first", "command_id": "c-first"}
            )  # the same command again, inside the window
            await eventually(lambda: stack.observer.result_counts.get("c-first") == 2, timeout=RETENTION)
            # the inbox answered it: not even the fresh GET a re-executed command would make
            assert sandbox.state.call_count("GET /v1/appointments/{id}") == reads
            assert sandbox.state.call_count("PUT /v1/appointments/{id}") == 1

            # a steady flow of commands while the pruner deletes around them
            sent = [
                await stack.send({"type": "edit_notes", "appointment_id": 700 + i % 5, "notes": f"n{i}"})
                for i in range(60)
            ]
            outcomes = [(await stack.result(c, timeout=30))["outcome"] for c in sent]
            assert outcomes == ["succeeded"] * 60
            assert [sandbox.state.get(700 + i)["notes"] for i in range(5)] == [f"n{55 + i}" for i in range(5)]
            assert stack.observer.dead == []

            await eventually(lambda: _inbox_gone(stack.store, command_key("c-first")), timeout=RETENTION + 10)
            assert _pruned_inbox() > pruned_before
        finally:
            stop.set()
            await pruner


async def _inbox_gone(store: Store, message_id: str) -> bool:
    return await store.inbox_get(message_id) is None


def _pruned_inbox() -> float:
    return metrics.REGISTRY.get_sample_value("appt_pruned_rows_total", {"table": "inbox"}) or 0.0

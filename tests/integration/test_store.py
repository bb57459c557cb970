"""The store contract, run against both backends: SQLite (a file in tmp_path) and a real
PostgreSQL (a fresh schema per test, dropped after).

The PostgreSQL variant fails, never skips, when the server is unreachable: a
skipped shared-store suite would hide exactly the bugs scale-out depends on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer.messages import StateLogRecord
from consumer.store import (
    TERMINAL_WORKFLOW_STATES,
    AppointmentRecord,
    Commit,
    DeadLetter,
    DeadLetterQuery,
    InboxEntry,
    ParkedMessage,
    StaleVersion,
    Store,
    StoreUnavailable,
    WorkflowRecord,
    schema,
)
from consumer.store.postgres import PostgresStore
from consumer.store.sqlite import SqliteStore
from tests.conftest import PG_URL
from tests.helpers import fail_transactions_writing

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
async def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Makes unopened stores on one database, as separate processes would; closes them after."""
    made: list[Store] = []
    schema = f"test_store_{uuid.uuid4().hex[:12]}"

    def make() -> Store:
        store: Store
        if request.param == "sqlite":
            store = SqliteStore(str(tmp_path / "store.sqlite3"))
        else:
            store = PostgresStore(PG_URL, schema=schema)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
    if request.param == "postgres":
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


@pytest.fixture
async def store(new_store: StoreFactory) -> Store:
    opened = new_store()
    await opened.open()
    return opened


def appointment(appointment_id: int = 1, version: int = 0, state: str = "Pending", **fields: Any) -> AppointmentRecord:
    values: dict[str, Any] = {"patient_id": None, **fields}
    return AppointmentRecord(appointment_id, state, version=version, **values)


def log(appointment_id: int = 1, to_state: str = "Pending", **fields: Any) -> StateLogRecord:
    return StateLogRecord.model_validate(
        {
            "appointment_id": appointment_id,
            "to_state": to_state,
            "machine": "appointment",
            "from_state": None,
            "trigger": "observe",
            "source": "webhook",
            **fields,
        }
    )


def workflow(
    workflow_id: str = "wf-1", appointment_id: int = 1, state: str = "started", version: int = 0
) -> WorkflowRecord:
    return WorkflowRecord(
        workflow_id=workflow_id,
        appointment_id=appointment_id,
        new_patient_id=42,
        state=state,
        command_id=f"cmd-{workflow_id}",
        version=version,
    )


async def test_opening_twice_migrates_once_and_keeps_data(new_store: StoreFactory) -> None:
    first = new_store()
    await first.open()
    await first.commit(Commit(appointment=appointment()))
    await first.close()

    second, third = new_store(), new_store()
    await asyncio.gather(second.open(), third.open())

    assert await second.get_appointment(1) == appointment(version=1)
    assert await third.get_appointment(1) == appointment(version=1)


async def test_inbox_rows_written_before_namespacing_keep_deduplicating(
    new_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inbox keys became ``<kind>:<id>``; a message processed before must still be a duplicate after."""
    with monkeypatch.context() as before:
        before.setattr(schema, "SQLITE_MIGRATIONS", schema.SQLITE_MIGRATIONS[:1])
        before.setattr(schema, "POSTGRES_MIGRATIONS", schema.POSTGRES_MIGRATIONS[:1])
        old = new_store()
        await old.open()
        for entry in (
            InboxEntry("c-1", {"outcome": "succeeded"}),
            InboxEntry("msg_1"),
            InboxEntry("reconcile:5:2026-01-01T00:00:00Z"),
        ):
            await _insert_v1_inbox(old, entry)  # as that version wrote them (no practice column yet)
        await old.close()
    upgraded = new_store()
    await upgraded.open()
    assert await upgraded.inbox_get("command:c-1") == InboxEntry("command:c-1", {"outcome": "succeeded"})
    assert await upgraded.inbox_get("webhook:msg_1") == InboxEntry("webhook:msg_1")
    assert await upgraded.inbox_get("reconcile:reconcile:5:2026-01-01T00:00:00Z") is not None
    assert await upgraded.inbox_get("c-1") is None


async def _insert_v1_inbox(store: Store, entry: InboxEntry) -> None:
    result = None if entry.result is None else schema.dumps(entry.result)
    if isinstance(store, SqliteStore):
        await store._run(
            lambda db: db.execute(  # noqa: SLF001 (the version-1 table, by hand)
                "INSERT INTO inbox (message_id, result, processed_at) VALUES (?, ?, '2026-01-01')",
                (entry.message_id, result),
            )
        )
        return
    assert isinstance(store, PostgresStore)
    async with store._connection() as conn:  # noqa: SLF001
        await conn.execute(
            "INSERT INTO inbox (message_id, result, processed_at) VALUES ($1, $2, now())", entry.message_id, result
        )


async def test_commit_round_trips_every_field(store: Store) -> None:
    stamp = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    record = AppointmentRecord(
        appointment_id=7,
        state="Confirmed",
        patient_id=99,
        upstream_updated_at="2024-05-06T07:08:09Z",
        data={"notes": "café ☕", "nested": {"list": [1, 2.5, None, True]}},
    )
    entry = log(
        7,
        "Confirmed",
        time=stamp,
        command_id="c1",
        webhook_id="w1",
        correlation_id="corr",
        detail={"reasons": {"state": ["nope"]}},
    )

    written = await store.commit(Commit(appointment=record, logs=[entry], inbox=InboxEntry("m1", {"ok": 1})))

    assert await store.get_appointment(7) == replace(record, version=1)
    assert written[0].seq is not None
    assert written == [entry.model_copy(update={"seq": written[0].seq})]
    assert await store.history(7) == written
    assert (await store.history(7))[0].time == stamp
    assert await store.inbox_get("m1") == InboxEntry("m1", {"ok": 1})
    assert await store.get_appointment(8) is None
    assert await store.inbox_get("m2") is None


async def test_naive_log_times_are_taken_as_utc(store: Store) -> None:
    await store.commit(Commit(logs=[log(time=datetime(2024, 1, 1, 12, 0))]))

    [found] = await store.history(1)

    assert found.time == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert found.time.utcoffset() is not None


async def test_each_commit_advances_the_version_by_one(store: Store) -> None:
    await store.commit(Commit(appointment=appointment()))
    await store.commit(Commit(appointment=appointment(version=1, state="Confirmed")))

    assert await store.get_appointment(1) == appointment(version=2, state="Confirmed")


async def test_a_stale_commit_is_refused_and_writes_nothing(store: Store) -> None:
    await store.commit(Commit(appointment=appointment()))
    await store.commit(Commit(appointment=appointment(version=1, state="Confirmed")))

    with pytest.raises(StaleVersion):
        await store.commit(
            Commit(
                appointment=appointment(version=1, state="Cancelled"),
                workflow=workflow(),
                logs=[log(to_state="Cancelled")],
                inbox=InboxEntry("late"),
            )
        )

    assert await store.get_appointment(1) == appointment(version=2, state="Confirmed")
    assert await store.get_workflow("wf-1") is None
    assert await store.history(1) == []
    assert await store.inbox_get("late") is None


async def test_version_zero_means_the_record_must_not_exist(store: Store) -> None:
    await store.commit(Commit(appointment=appointment()))

    with pytest.raises(StaleVersion):
        await store.commit(Commit(appointment=appointment(state="Confirmed"), logs=[log()]))

    assert await store.get_appointment(1) == appointment(version=1)
    assert await store.history(1) == []


async def test_a_version_above_zero_needs_the_record_to_exist(store: Store) -> None:
    with pytest.raises(StaleVersion):
        await store.commit(Commit(appointment=appointment(version=3)))

    assert await store.get_appointment(1) is None


async def test_two_writers_racing_on_one_version_only_one_wins(store: Store) -> None:
    await store.commit(Commit(appointment=appointment()))

    confirm = Commit(appointment=appointment(version=1, state="Confirmed"), inbox=InboxEntry("a"))
    cancel = Commit(appointment=appointment(version=1, state="Cancelled"), inbox=InboxEntry("b"))

    outcomes = await asyncio.gather(store.commit(confirm), store.commit(cancel), return_exceptions=True)

    assert sorted(type(o).__name__ for o in outcomes) == ["StaleVersion", "list"]
    winner = "Confirmed" if isinstance(outcomes[0], list) else "Cancelled"
    assert await store.get_appointment(1) == appointment(version=2, state=winner)
    assert [await store.inbox_get(m) is not None for m in ("a", "b")].count(True) == 1


async def test_two_store_instances_racing_on_one_version_only_one_wins(
    new_store: StoreFactory,
) -> None:
    """Two processes (separate connections or pools) sharing one database."""
    first, second = new_store(), new_store()
    await first.open()
    await second.open()
    await first.commit(Commit(appointment=appointment()))

    for round_ in range(1, 6):
        outcomes = await asyncio.gather(
            first.commit(Commit(appointment=appointment(version=round_, state="by-first"))),
            second.commit(Commit(appointment=appointment(version=round_, state="by-second"))),
            return_exceptions=True,
        )
        assert sorted(type(o).__name__ for o in outcomes) == ["StaleVersion", "list"]

    stored = await second.get_appointment(1)
    assert stored is not None and stored.version == 6


async def test_many_writers_creating_one_record_only_one_succeeds(
    new_store: StoreFactory,
) -> None:
    stores = [new_store() for _ in range(3)]
    for each in stores:
        await each.open()

    outcomes = await asyncio.gather(
        *(
            s.commit(Commit(appointment=appointment(state=f"by-{i}"), logs=[log(trigger=f"by-{i}")]))
            for i, s in enumerate(stores)
        ),
        return_exceptions=True,
    )

    assert [type(o).__name__ for o in outcomes].count("list") == 1
    assert len(await stores[0].history(1)) == 1


async def test_a_cancelled_commit_writes_all_or_nothing_and_leaves_the_store_usable(
    store: Store,
) -> None:
    """Cancelled at a different point each round: mid-transaction must roll back."""
    for round_ in range(10):
        entry = log(to_state=f"s{round_}")
        task = asyncio.create_task(store.commit(Commit(logs=[entry, entry], inbox=InboxEntry(f"m{round_}"))))
        for _ in range(round_):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

        written = [r for r in await store.history(1) if r.to_state == f"s{round_}"]
        assert len(written) in (0, 2)
        assert (await store.inbox_get(f"m{round_}") is not None) == (len(written) == 2)

    await store.commit(Commit(appointment=appointment()))
    assert await store.get_appointment(1) == appointment(version=1)


async def test_a_redelivered_message_is_refused_by_the_inbox(store: Store) -> None:
    done = InboxEntry("msg-1", {"outcome": "succeeded"})
    await store.commit(Commit(appointment=appointment(), inbox=done))

    with pytest.raises(StaleVersion):
        await store.commit(
            Commit(
                appointment=appointment(version=1, state="Confirmed"),
                logs=[log()],
                inbox=InboxEntry("msg-1", {"outcome": "other"}),
            )
        )

    assert await store.inbox_get("msg-1") == done
    assert await store.get_appointment(1) == appointment(version=1)
    assert await store.history(1) == []


async def test_an_inbox_entry_may_carry_no_result(store: Store) -> None:
    await store.commit(Commit(inbox=InboxEntry("ignored")))

    assert await store.inbox_get("ignored") == InboxEntry("ignored", None)


async def test_history_is_in_seq_order_and_pages_by_after_seq(store: Store) -> None:
    for n in range(5):
        await store.commit(Commit(logs=[log(1, f"s{n}"), log(2, f"other{n}")]))

    everything = await store.history(1)
    first_page = await store.history(1, limit=2)
    second_page = await store.history(1, after_seq=first_page[-1].seq or 0, limit=2)
    rest = await store.history(1, after_seq=second_page[-1].seq or 0)

    assert [r.to_state for r in everything] == ["s0", "s1", "s2", "s3", "s4"]
    assert [r.seq for r in everything] == sorted(r.seq or 0 for r in everything)
    assert first_page + second_page + rest == everything
    assert [r.to_state for r in rest] == ["s4"]
    assert await store.history(1, after_seq=everything[-1].seq or 0) == []


async def test_history_finds_workflow_records_through_the_linked_appointment(store: Store) -> None:
    saga = {"machine": "reassignment", "source": "workflow", "workflow_id": "wf-1"}
    await store.commit(
        Commit(
            logs=[
                log(10, "started", **saga),
                log(10, "replacement_created", detail={"replacement_id": 11}, **saga),
                log(11, "Pending", detail={"original_id": 10}),
                log(12, "Pending"),
            ]
        )
    )

    original = await store.history(10)
    replacement = await store.history(11)

    assert [r.to_state for r in original] == ["started", "replacement_created", "Pending"]
    assert [r.to_state for r in replacement] == ["replacement_created", "Pending"]
    assert replacement[0].detail == {"replacement_id": 11}
    assert [r.to_state for r in await store.history(12)] == ["Pending"]


async def test_workflow_round_trips_and_keeps_its_creation_time(store: Store) -> None:
    created = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
    started = WorkflowRecord(
        workflow_id="wf-1",
        appointment_id=1,
        new_patient_id=42,
        state="started",
        command_id="cmd-1",
        correlation_id="corr",
        created_at=created,
        data={"step": 1},
    )
    await store.commit(Commit(workflow=started))
    stored = await store.get_workflow("wf-1")
    assert stored is not None
    moved = WorkflowRecord(
        workflow_id="wf-1",
        appointment_id=1,
        new_patient_id=42,
        state="replacement_created",
        command_id="cmd-1",
        correlation_id="corr",
        replacement_id=2,
        last_error="timeout",
        attempts=3,
        version=stored.version,
        data={"step": 2},
    )
    await store.commit(Commit(workflow=moved))
    final = await store.get_workflow("wf-1")

    assert final is not None
    assert final.version == 2
    assert final.created_at == created
    assert final.updated_at is not None and final.updated_at.tzinfo is not None
    assert final.updated_at >= (stored.updated_at or final.updated_at)
    assert (final.state, final.replacement_id, final.last_error, final.attempts, final.data) == (
        "replacement_created",
        2,
        "timeout",
        3,
        {"step": 2},
    )
    with pytest.raises(StaleVersion):
        await store.commit(Commit(workflow=moved))  # version 1 was already moved on


async def test_one_unfinished_workflow_per_appointment(store: Store) -> None:
    await store.commit(Commit(workflow=workflow("wf-1")))

    with pytest.raises(StaleVersion):
        await store.commit(Commit(workflow=workflow("wf-2"), logs=[log()]))

    assert await store.get_workflow("wf-2") is None
    assert await store.history(1) == []
    active = await store.active_workflow(1)
    assert active is not None and active.workflow_id == "wf-1"


@pytest.mark.parametrize("terminal", sorted(TERMINAL_WORKFLOW_STATES))
async def test_a_finished_workflow_frees_the_appointment_for_the_next(store: Store, terminal: str) -> None:
    await store.commit(Commit(workflow=workflow("wf-1")))
    await store.commit(Commit(workflow=workflow("wf-1", state=terminal, version=1)))

    assert await store.active_workflow(1) is None
    await store.commit(Commit(workflow=workflow("wf-2")))

    active = await store.active_workflow(1)
    assert active is not None and active.workflow_id == "wf-2"


async def test_list_workflows_filters_by_state_and_by_unfinished(store: Store) -> None:
    states = ["started", "completed", "compensation_failed", "compensated"]
    for number, state in enumerate(states, start=1):
        started = workflow(f"wf-{number}", appointment_id=number, state=state)
        await store.commit(Commit(workflow=started))

    def ids(found: list[WorkflowRecord]) -> list[str]:
        return sorted(w.workflow_id for w in found)

    assert ids(await store.list_workflows()) == ["wf-1", "wf-2", "wf-3", "wf-4"]
    assert ids(await store.list_workflows(unfinished=True)) == ["wf-1", "wf-3"]
    assert ids(await store.list_workflows(states=frozenset({"compensation_failed"}))) == ["wf-3"]
    both = frozenset({"completed", "started"})
    assert ids(await store.list_workflows(states=both)) == ["wf-1", "wf-2"]
    assert ids(await store.list_workflows(states=frozenset({"completed"}), unfinished=True)) == []
    assert await store.list_workflows(states=frozenset()) == []


async def test_watermarks_are_stored_and_overwritten(store: Store) -> None:
    assert await store.get_watermark("reconcile") is None

    await store.set_watermark("reconcile", "2024-01-01T00:00:00Z")
    await store.set_watermark("reconcile", "2024-01-02T00:00:00Z")
    await store.set_watermark("other", "x")

    assert await store.get_watermark("reconcile") == "2024-01-02T00:00:00Z"
    assert await store.get_watermark("other") == "x"


async def test_ping_answers_while_open_and_raises_unavailable_once_closed(store: Store) -> None:
    await store.ping()
    await store.close()

    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.get_appointment(1)


async def test_an_unreachable_postgres_is_unavailable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:9/test", connect_timeout=2)

    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.open()


async def test_an_unopenable_sqlite_path_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "missing-dir" / "store.sqlite3"))

    with pytest.raises(StoreUnavailable):
        await store.open()


async def test_sqlite_in_memory_works() -> None:
    store = SqliteStore(":memory:")
    await store.open()
    try:
        await store.commit(Commit(appointment=appointment(), logs=[log()]))
        assert await store.get_appointment(1) == appointment(version=1)
    finally:
        await store.close()


# ---- practices: appointment and message ids are unique only inside a practice ----


async def test_the_same_appointment_id_in_two_practices_is_two_records(store: Store) -> None:
    north = replace(appointment(900, state="Confirmed"), practice="north")
    south = replace(appointment(900, state="Pending"), practice="south")
    await store.commit(Commit(appointment=north, logs=[log(900, "Confirmed", practice="north")]))
    await store.commit(Commit(appointment=south, logs=[log(900, "Pending", practice="south")]))

    assert await store.get_appointment(900, "north") == replace(north, version=1)
    assert await store.get_appointment(900, "south") == replace(south, version=1)
    assert await store.get_appointment(900) is None  # the default practice has no 900
    assert [r.to_state for r in await store.history(900, practice="north")] == ["Confirmed"]
    assert [r.practice for r in await store.history(900, practice="south")] == ["south"]
    with pytest.raises(StaleVersion):  # versions are per (practice, id)
        await store.commit(Commit(appointment=replace(north, state="Cancelled", version=0)))


async def test_the_inbox_and_unfinished_workflows_are_per_practice(store: Store) -> None:
    await store.commit(Commit(inbox=InboxEntry("c-1", {"outcome": "north"}, practice="north")))
    await store.commit(Commit(inbox=InboxEntry("c-1", {"outcome": "south"}, practice="south")))
    with pytest.raises(StaleVersion):
        await store.commit(Commit(inbox=InboxEntry("c-1", None, practice="north")))
    assert await store.inbox_get("c-1", "south") == InboxEntry("c-1", {"outcome": "south"}, "south")
    assert await store.inbox_get("c-1") is None

    await store.commit(Commit(workflow=replace(workflow("wf-n", 5), practice="north")))
    await store.commit(Commit(workflow=replace(workflow("wf-s", 5), practice="south")))
    active = await store.active_workflow(5, "south")
    assert active is not None and (active.workflow_id, active.practice) == ("wf-s", "south")
    assert await store.active_workflow(5) is None


V1_ROWS = [
    "INSERT INTO appointments VALUES (42, 'Confirmed', 7, 3, '2030-01-01T09:00:00Z', '{}', '2030-01-01')",
    "INSERT INTO inbox VALUES ('c-old', NULL, '2030-01-01')",
    "INSERT INTO state_log (time, appointment_id, machine, to_state, trigger, source, detail)"
    " VALUES ('2030-01-01T00:00:00.000000+00:00', 42, 'appointment', 'Confirmed', 'confirm', 'command', '{}')",
]


async def _assert_v1_data_is_the_default_practices(store: Store) -> None:
    record = await store.get_appointment(42)
    assert record is not None and (record.practice, record.state, record.version) == ("default", "Confirmed", 3)
    assert await store.inbox_get("webhook:c-old") == InboxEntry("webhook:c-old", None, "default")  # namespaced
    assert [(r.practice, r.to_state) for r in await store.history(42)] == [("default", "Confirmed")]
    await store.commit(Commit(appointment=replace(appointment(42), practice="north")))  # 42 is free there


async def test_a_sqlite_store_from_before_practices_keeps_its_data_as_the_default_practice(
    tmp_path: Path,
) -> None:
    import sqlite3

    from consumer.store import schema

    path = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for statement in schema.SQLITE_MIGRATIONS[0] + V1_ROWS:
        db.execute(statement)
    db.execute("INSERT INTO schema_version VALUES (1, '2030-01-01')")
    db.commit()
    db.close()
    store = SqliteStore(str(path))
    await store.open()
    try:
        await _assert_v1_data_is_the_default_practices(store)
    finally:
        await store.close()


async def test_a_postgres_store_from_before_practices_keeps_its_data_as_the_default_practice() -> None:
    from consumer.store import schema

    name = f"test_store_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
        await conn.execute(f"SET search_path = {name}")
        await conn.execute("CREATE TABLE schema_version (version integer PRIMARY KEY, applied_at timestamptz NOT NULL)")
        for statement in schema.POSTGRES_MIGRATIONS[0] + V1_ROWS:
            await conn.execute(statement)
        await conn.execute("INSERT INTO schema_version VALUES (1, now())")
        store = PostgresStore(PG_URL, schema=name)
        await store.open()
        try:
            await _assert_v1_data_is_the_default_practices(store)
        finally:
            await store.close()
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await conn.close()


# ---- parked messages of a practice that can't be served now ----


def parked(message_id: str, appointment_id: int = 1, practice: str = "north") -> ParkedMessage:
    return ParkedMessage(
        practice=practice,
        appointment_id=appointment_id,
        message_id=message_id,
        body=f'{{"id": "{message_id}"}}'.encode(),
        reason="Unauthorised: 401",
        reply_to="amq.rabbitmq.reply-to",
        correlation_id=f"corr-{message_id}",
    )


async def test_parked_messages_keep_their_order_and_are_handed_back_once_until_kept_again(store: Store) -> None:
    for message_id, appointment_id in (("a", 1), ("b", 2), ("c", 1)):
        await store.park(parked(message_id, appointment_id))
    await store.park(parked("a", 1))  # a redelivery parks nothing twice
    await store.park(parked("z", 1, practice="south"))

    assert await store.parked_counts() == {"north": 3, "south": 1}
    first = await store.parked_head("north", 1)
    assert first is not None and first[1] == "a"
    assert await store.parked_head("north", 3) is None

    now = datetime.now(UTC)
    handed = await store.hand_back("north", not_since=now - timedelta(seconds=60), limit=10)
    assert [(m.message_id, m.appointment_id) for m in handed] == [("a", 1), ("b", 2), ("c", 1)]
    assert handed[0] == replace(parked("a", 1), seq=first[0])  # every field round-trips
    assert await store.hand_back("north", not_since=now - timedelta(seconds=60), limit=10) == []
    assert [m.message_id for m in await store.hand_back("north", not_since=now + timedelta(seconds=1), limit=2)] == [
        "a",
        "b",
    ]  # long ago: again

    await store.keep_parked(handed[2].seq)
    assert [m.message_id for m in await store.hand_back("north", not_since=now - timedelta(seconds=60), limit=10)] == [
        "c"
    ]
    await store.unpark(first[0])
    second = await store.parked_head("north", 1)
    assert second is not None and second[1] == "c"
    assert await store.parked_counts() == {"north": 2, "south": 1}


def dead(key: str, **fields: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "reason": "invalid message: boom",
        "reason_class": "invalid",
        "deliveries": 1,
        "body": b'{"command_id": "' + key.encode() + b'"}',
        **fields,
    }
    return DeadLetter(key=key, **values)


async def test_a_dead_letter_is_kept_once_with_its_answer_and_listed_in_arrival_order(store: Store) -> None:
    failed = {"outcome": "failed", "command_id": "c-1"}
    first = await store.add_dead_letter(
        dead("command:c-1", headers={"x-appt-reason": "boom", "n": 1}, body=b"\xff\x00 not utf-8"),
        InboxEntry("c-1", failed),
    )
    again = await store.add_dead_letter(dead("command:c-1", reason="later"), InboxEntry("c-1", {"other": 1}))
    await store.add_dead_letter(dead("message:m-2", reason_class="exhausted", type="confirm", practice="p1"))
    await store.add_dead_letter(dead("message:m-3", reason="Gave up 50%_done"))

    assert first.new and not again.new
    assert again.letter == first.letter and again.letter.reason == "invalid message: boom"
    assert first.letter.body == b"\xff\x00 not utf-8" and first.letter.headers == {"x-appt-reason": "boom", "n": 1}
    assert again.answer == InboxEntry("c-1", failed)  # the first answer stands
    listed = await store.dead_letters(DeadLetterQuery())
    assert [d.key for d in listed] == ["command:c-1", "message:m-2", "message:m-3"]
    assert [d.dead_id for d in listed] == sorted(d.dead_id for d in listed)
    assert await store.dead_letters(DeadLetterQuery()) == listed  # reading changes nothing
    assert await store.count_dead_letters() == {"invalid": 2, "exhausted": 1}

    by_filters = [
        DeadLetterQuery(reason="50%_"),
        DeadLetterQuery(reason="50%x"),
        DeadLetterQuery(type="confirm"),
        DeadLetterQuery(practice="p1"),
        DeadLetterQuery(ids=(listed[0].dead_id, listed[2].dead_id)),
        DeadLetterQuery(key="message:m-2"),
    ]
    assert [[d.key for d in await store.dead_letters(q)] for q in by_filters] == [
        ["message:m-3"],
        [],
        ["message:m-2"],
        ["message:m-2"],
        ["command:c-1", "message:m-3"],
        ["message:m-2"],
    ]


async def test_a_dead_letter_is_settled_once_and_stays_on_record(store: Store) -> None:
    letter = (await store.add_dead_letter(dead("event:e-1"))).letter

    assert await store.settle_dead_letter(letter.dead_id, "replayed")
    assert not await store.settle_dead_letter(letter.dead_id, "purged")
    assert await store.dead_letters(DeadLetterQuery()) == []
    assert await store.count_dead_letters() == {}
    kept = await store.dead_letters(DeadLetterQuery(ids=(letter.dead_id,), status=None))
    assert [d.status for d in kept] == ["replayed"]
    assert not (await store.add_dead_letter(dead("event:e-1"))).new  # collected again: not revived
    assert await store.dead_letters(DeadLetterQuery()) == []


async def test_a_replay_result_supersedes_the_original_entry(store: Store) -> None:
    await store.add_dead_letter(dead("command:c-9"), InboxEntry("c-9", {"outcome": "failed"}))
    await store.commit(
        Commit(
            inbox=InboxEntry("c-9#replay-1", {"outcome": "succeeded"}),
            latest=InboxEntry("c-9", {"outcome": "succeeded"}),
        )
    )

    assert await store.inbox_get("c-9") == InboxEntry("c-9", {"outcome": "succeeded"})
    with pytest.raises(StaleVersion):  # a second copy of the same replay is a duplicate
        await store.commit(Commit(inbox=InboxEntry("c-9#replay-1", {"outcome": "succeeded"})))


async def test_a_stale_commit_in_a_batch_fails_alone_and_the_others_commit(store: Store) -> None:
    """Group commit: one transaction, a savepoint per commit."""
    await store.commit(Commit(appointment=appointment(1), inbox=InboxEntry("taken")))

    outcomes = await store.commit_batch(
        [
            Commit(appointment=appointment(2), logs=[log(2)], inbox=InboxEntry("m2")),
            Commit(appointment=appointment(1, version=5, state="Confirmed"), logs=[log(1)], inbox=InboxEntry("stale")),
            Commit(appointment=appointment(3), inbox=InboxEntry("taken")),  # a duplicate inbox id
            Commit(appointment=appointment(4), logs=[log(4)], inbox=InboxEntry("m4")),
        ]
    )

    assert [type(o).__name__ for o in outcomes] == ["list", "StaleVersion", "StaleVersion", "list"]
    assert await store.get_appointment(2) == appointment(2, version=1)
    assert await store.get_appointment(4) == appointment(4, version=1)
    assert [r.appointment_id for r in await store.history(2)] == [2]
    assert await store.inbox_get("m2") is not None and await store.inbox_get("m4") is not None
    assert await store.get_appointment(1) == appointment(1, version=1)
    assert await store.history(1) == []
    assert await store.inbox_get("stale") is None
    assert await store.get_appointment(3) is None


async def test_each_commit_of_a_batch_gets_back_its_own_records_in_order(store: Store) -> None:
    """PostgreSQL writes a batch's records in one round trip: each commit must still get its own."""
    await store.commit(Commit(appointment=appointment(3)))
    batch = [
        Commit(appointment=appointment(1), logs=[log(1), log(1, "Confirmed")], inbox=InboxEntry("m1")),
        Commit(inbox=InboxEntry("m2")),
        Commit(appointment=appointment(3, version=1, state="Confirmed"), logs=[log(3, "Confirmed")]),
    ]

    outcomes = await store.commit_batch(batch)

    written = [o for o in outcomes if isinstance(o, list)]
    assert [[(r.appointment_id, r.to_state) for r in o] for o in written] == [
        [(1, "Pending"), (1, "Confirmed")],
        [],
        [(3, "Confirmed")],
    ]
    seqs = [r.seq or 0 for o in written for r in o]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and 0 not in seqs
    assert [r.seq for r in await store.history(1)] == seqs[:2]
    assert [r.seq for r in await store.history(3)] == seqs[2:]
    assert await store.get_appointment(3) == appointment(3, version=2, state="Confirmed")
    assert await store.inbox_get("m2") is not None


async def test_commits_made_together_fail_alone_when_stale(store: Store) -> None:
    await store.commit(Commit(appointment=appointment(1)))

    outcomes = await asyncio.gather(
        *(store.commit(Commit(appointment=appointment(i), inbox=InboxEntry(f"m{i}"))) for i in range(1, 6)),
        return_exceptions=True,
    )

    assert [type(o).__name__ for o in outcomes] == ["StaleVersion", "list", "list", "list", "list"]
    assert [await store.get_appointment(i) for i in range(1, 6)] == [appointment(i, version=1) for i in range(1, 6)]
    assert await store.inbox_get("m1") is None


async def test_a_failed_transaction_fails_every_commit_of_its_batch_and_writes_none(store: Store) -> None:
    await fail_transactions_writing(store, "poison")
    batch = [Commit(appointment=appointment(i), logs=[log(i)], inbox=InboxEntry(f"m{i}")) for i in (1, 2)]

    outcomes = await asyncio.gather(
        store.commit(batch[0]),
        store.commit(Commit(inbox=InboxEntry("poison"))),
        store.commit(batch[1]),
        return_exceptions=True,
    )

    # The two good commits fail too: they shared the transaction, so nothing of theirs is durable.
    assert all(isinstance(o, StoreUnavailable | sqlite3.IntegrityError) for o in outcomes), outcomes
    for i in (1, 2):
        assert await store.get_appointment(i) is None
        assert await store.inbox_get(f"m{i}") is None
        assert await store.history(i) == []
    # Retried without the failing one, the batch commits whole.
    assert [type(o).__name__ for o in await store.commit_batch(batch)] == ["list", "list"]
    assert await store.get_appointment(2) == appointment(2, version=1)


async def test_seen_reads_the_inbox_entry_the_record_and_the_oldest_parked_message_at_once(store: Store) -> None:
    nothing = await store.seen("m1", "default", 1)
    assert (nothing.inbox, nothing.record, nothing.parked_head) == (None, None, None)

    await store.commit(
        Commit(appointment=appointment(1, data={"notes": "x"}), inbox=InboxEntry("m1", {"outcome": "succeeded"}))
    )
    await store.commit(Commit(inbox=InboxEntry("m2")))
    for message_id in ("p1", "p2"):
        await store.park(ParkedMessage("default", 1, message_id, b"{}", "waiting"))
    await store.park(ParkedMessage("north", 1, "p0", b"{}", "waiting"))

    seen = await store.seen("m1", "default", 1)
    assert seen.inbox == await store.inbox_get("m1")
    assert seen.record == await store.get_appointment(1)
    assert seen.parked_head == await store.parked_head("default", 1)
    assert seen.parked_head is not None and seen.parked_head[1] == "p1"
    assert (await store.seen("m2", "default", 2)).inbox == InboxEntry("m2")  # seen, with no result
    elsewhere = await store.seen("m1", "north", 1)
    assert (elsewhere.inbox, elsewhere.record, elsewhere.parked_head[1] if elsewhere.parked_head else None) == (
        None,
        None,
        "p0",
    )

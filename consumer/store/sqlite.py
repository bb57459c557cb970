"""The embedded store: one SQLite file, one process (or a few sharing the file).

One connection serves the whole process, so an ``asyncio.Lock`` guards every
use of it: without the lock, a read by one coroutine would see another's
uncommitted writes, and two transactions would interleave on one connection.
``BEGIN IMMEDIATE`` takes SQLite's write lock up front, so processes sharing
the file queue on ``busy_timeout`` instead of failing half-way through.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

from consumer.messages import StateLogRecord, utcnow
from consumer.store import schema
from consumer.store.base import (
    AppointmentRecord,
    Commit,
    InboxEntry,
    StaleVersion,
    StoreUnavailable,
    WorkflowRecord,
)

_UNIQUE_ERRORS = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})


class SqliteStore:
    def __init__(self, path: str, *, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        # isolation_level=None: the driver must not open transactions of its own.
        connecting = aiosqlite.connect(self._path, isolation_level=None)
        try:
            db = await connecting
        except sqlite3.Error as exc:
            # aiosqlite stops its worker thread without waiting for it; wait here, or
            # the thread reports to an event loop that may be gone by then.
            await asyncio.to_thread(connecting._thread.join, 5)
            raise StoreUnavailable(f"cannot open {self._path}: {exc}") from exc
        db.row_factory = sqlite3.Row
        self._db = db
        async with self._use():
            # busy_timeout first: switching to WAL itself waits for other processes.
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            await db.execute("PRAGMA journal_mode = WAL")
        await self._migrate()

    async def close(self) -> None:
        async with self._lock:  # let a transaction in progress finish first
            db, self._db = self._db, None
            if db is not None:
                await db.close()

    async def ping(self) -> None:
        async with self._use() as db:
            await db.execute("SELECT 1")

    async def commit(self, commit: Commit) -> list[StateLogRecord]:
        async with self._transaction() as db:
            if commit.appointment is not None:
                await _write_appointment(db, commit.appointment)
            if commit.workflow is not None:
                await _write_workflow(db, commit.workflow)
            written = [await _append_log(db, record) for record in commit.logs]
            if commit.inbox is not None:
                await db.execute(
                    "INSERT INTO inbox (message_id, result, processed_at) VALUES (?, ?, ?)",
                    (commit.inbox.message_id, _json_or_null(commit.inbox.result), _now()),
                )
        return written

    async def get_appointment(self, appointment_id: int) -> AppointmentRecord | None:
        row = await self._fetchone(
            f"SELECT {schema.APPOINTMENT_COLUMNS} FROM appointments WHERE appointment_id = ?",
            (appointment_id,),
        )
        return None if row is None else schema.appointment_from_row(row)

    async def inbox_get(self, message_id: str) -> InboxEntry | None:
        row = await self._fetchone(
            "SELECT message_id, result FROM inbox WHERE message_id = ?", (message_id,)
        )
        return None if row is None else schema.inbox_from_row(row)

    async def history(
        self, appointment_id: int, *, after_seq: int = 0, limit: int = 100
    ) -> list[StateLogRecord]:
        rows = await self._fetchall(
            f"SELECT {schema.LOG_COLUMNS} FROM state_log"
            " WHERE (appointment_id = ? OR related_appointment_id = ?) AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (appointment_id, appointment_id, after_seq, limit),
        )
        return [schema.log_from_row(row) for row in rows]

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        row = await self._fetchone(
            f"SELECT {schema.WORKFLOW_COLUMNS} FROM workflows WHERE workflow_id = ?",
            (workflow_id,),
        )
        return None if row is None else schema.workflow_from_row(row)

    async def active_workflow(self, appointment_id: int) -> WorkflowRecord | None:
        row = await self._fetchone(
            f"SELECT {schema.WORKFLOW_COLUMNS} FROM workflows"
            f" WHERE appointment_id = ? AND state NOT IN {schema.TERMINAL_SQL}",
            (appointment_id,),
        )
        return None if row is None else schema.workflow_from_row(row)

    async def list_workflows(
        self, *, states: frozenset[str] | None = None, unfinished: bool = False
    ) -> list[WorkflowRecord]:
        where = ["1 = 1"]
        params: list[Any] = []
        if states is not None:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(sorted(states))
        if unfinished:
            where.append(f"state NOT IN {schema.TERMINAL_SQL}")
        rows = await self._fetchall(
            f"SELECT {schema.WORKFLOW_COLUMNS} FROM workflows WHERE {' AND '.join(where)}"
            " ORDER BY created_at, workflow_id",
            params,
        )
        return [schema.workflow_from_row(row) for row in rows]

    async def get_watermark(self, name: str) -> str | None:
        row = await self._fetchone("SELECT value FROM watermarks WHERE name = ?", (name,))
        return None if row is None else str(row["value"])

    async def set_watermark(self, name: str, value: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO watermarks (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            async with db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version") as cur:
                row = await cur.fetchone()
            current = int(row[0]) if row is not None else 0
            for number, statements in enumerate(schema.SQLITE_MIGRATIONS, start=1):
                if number <= current:
                    continue
                for statement in statements:
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (number, _now()),
                )

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, exclusively, with driver errors turned into the store's own."""
        async with self._lock:
            if self._db is None:
                raise StoreUnavailable("the store is not open")
            try:
                yield self._db
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorname in _UNIQUE_ERRORS:
                    raise StaleVersion(str(exc)) from exc
                raise
            except sqlite3.OperationalError as exc:
                # Locked past busy_timeout, disk full, unreadable file: all transient.
                raise StoreUnavailable(str(exc)) from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._use() as db:
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException:
                # BaseException too: a cancelled commit must not leave the shared
                # connection inside an open transaction. aiosqlite runs statements
                # in order, so this ROLLBACK lands after any still in flight.
                await _rollback(db)
                raise

    async def _fetchone(self, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
        async with self._use() as db, db.execute(sql, params) as cur:
            row: sqlite3.Row | None = await cur.fetchone()
            return row

    async def _fetchall(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        async with self._use() as db, db.execute(sql, params) as cur:
            return list(await cur.fetchall())


async def _write_appointment(db: aiosqlite.Connection, record: AppointmentRecord) -> None:
    values = (
        record.state,
        record.patient_id,
        record.version + 1,
        record.upstream_updated_at,
        schema.dumps(record.data),
        _now(),
        record.appointment_id,
    )
    if record.version == 0:
        await db.execute(
            "INSERT INTO appointments (state, patient_id, version, upstream_updated_at, data,"
            " updated_at, appointment_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            values,
        )
        return
    cursor = await db.execute(
        "UPDATE appointments SET state = ?, patient_id = ?, version = ?,"
        " upstream_updated_at = ?, data = ?, updated_at = ?"
        " WHERE appointment_id = ? AND version = ?",
        (*values, record.version),
    )
    if cursor.rowcount != 1:
        raise StaleVersion(
            f"appointment {record.appointment_id} is not at version {record.version}"
        )


async def _write_workflow(db: aiosqlite.Connection, record: WorkflowRecord) -> None:
    now = _now()
    values = (
        record.appointment_id,
        record.new_patient_id,
        record.state,
        record.command_id,
        record.correlation_id,
        record.replacement_id,
        record.last_error,
        record.attempts,
        record.version + 1,
        now,
        schema.dumps(record.data),
        record.workflow_id,
    )
    if record.version == 0:
        created_at = schema.sqlite_time(record.created_at) if record.created_at else now
        await db.execute(
            "INSERT INTO workflows (appointment_id, new_patient_id, state, command_id,"
            " correlation_id, replacement_id, last_error, attempts, version, updated_at, data,"
            " workflow_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*values, created_at),
        )
        return
    cursor = await db.execute(
        "UPDATE workflows SET appointment_id = ?, new_patient_id = ?, state = ?, command_id = ?,"
        " correlation_id = ?, replacement_id = ?, last_error = ?, attempts = ?, version = ?,"
        " updated_at = ?, data = ? WHERE workflow_id = ? AND version = ?",
        (*values, record.version),
    )
    if cursor.rowcount != 1:
        raise StaleVersion(f"workflow {record.workflow_id} is not at version {record.version}")


async def _append_log(db: aiosqlite.Connection, record: StateLogRecord) -> StateLogRecord:
    cursor = await db.execute(
        schema.insert_log_sql(["?"] * 13), schema.log_values(record, schema.sqlite_time(record.time))
    )
    return record.model_copy(update={"seq": cursor.lastrowid})


async def _rollback(db: aiosqlite.Connection) -> None:
    try:
        await db.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "no transaction is active" not in str(exc):
            raise


def _json_or_null(value: Any) -> str | None:
    return None if value is None else schema.dumps(value)


def _now() -> str:
    return schema.sqlite_time(utcnow())

"""The embedded store: one SQLite file, one process (or a few sharing the file).

Each store operation is one plain function run on the store's own thread:
a read, or a whole transaction, crosses from the event loop to SQLite once.
(Through a driver that hops to its thread per statement, a command's three
store calls cost ~15 hops, each a self-pipe wake-up and a GIL hand-off: about
a quarter of the worker's CPU.) The thread (``one_thread.OneThread``) is the
only user of the connection and runs one function at a time, so no
transaction ever interleaves with another, and a caller cancelled while
waiting leaves its transaction to finish or roll back whole.
``BEGIN IMMEDIATE`` takes SQLite's write lock up front, so processes sharing
the file queue on ``busy_timeout`` instead of failing half-way through.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from consumer.messages import DEFAULT_PRACTICE, StateLogRecord, utcnow
from consumer.store import schema
from consumer.store.base import (
    AppointmentRecord,
    Collected,
    Commit,
    CommitOutcome,
    DeadLetter,
    DeadLetterQuery,
    GroupCommit,
    InboxEntry,
    NoStore,
    ParkedMessage,
    Seen,
    StaleVersion,
    StoreUnavailable,
    WorkflowRecord,
)
from consumer.store.one_thread import OneThread

# Below this much free space on the file's disk the store reports itself unavailable: a commit
# there fails with "database or disk is full", while a read (SELECT 1) still answers.
MIN_FREE_BYTES = 1024 * 1024
_AUTO_VACUUM_INCREMENTAL = 2
_UNIQUE_ERRORS = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})

T = TypeVar("T")
Connection = sqlite3.Connection


class SqliteStore:
    def __init__(self, path: str, *, busy_timeout_ms: int = 5000, create: bool = True) -> None:
        self._path = path
        self._create = create
        self._busy_timeout_ms = busy_timeout_ms
        self._db: Connection | None = None
        self._thread: OneThread | None = None
        self._group = GroupCommit(self.commit_batch)

    async def open(self) -> None:
        self._thread = OneThread("appt-sqlite")
        try:
            self._db = await self._call(self._connect)
            await self._in_transaction(_apply_migrations)
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> Connection:
        """Runs on the store's thread, the only one that ever touches the connection."""
        if not self._create and self._path != ":memory:" and not os.path.exists(self._path):
            raise NoStore(f"no store at {self._path} (is APPT_STORE the one the service uses?)")
        try:
            # isolation_level=None: the driver must not open transactions of its own.
            db = sqlite3.connect(self._path, isolation_level=None)
            db.row_factory = sqlite3.Row
            # busy_timeout first: switching to WAL itself waits for other processes.
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            db.execute("PRAGMA journal_mode = WAL")
            _incremental_auto_vacuum(db)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self._path}: {exc}") from exc
        return db

    async def close(self) -> None:
        """Let the operation in progress finish, then close the file and stop the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        db, self._db = self._db, None
        if db is not None:
            await thread.call(db.close)
        await thread.stop()

    async def ping(self) -> None:
        """Answers reads, and has room for a commit: a full disk is a store that is down."""
        await self._run(lambda db: db.execute("SELECT 1").fetchone())
        disk = os.statvfs(os.path.dirname(os.path.abspath(self._path)))
        if disk.f_bavail * disk.f_frsize < MIN_FREE_BYTES:
            raise StoreUnavailable(f"disk full: {disk.f_bavail * disk.f_frsize} bytes free for {self._path}")

    async def commit(self, commit: Commit) -> list[StateLogRecord]:
        return await self._group.commit(commit)

    async def commit_batch(self, commits: Sequence[Commit]) -> list[CommitOutcome]:
        return await self._in_transaction(partial(_commit_batch, commits=commits))

    async def get_appointment(self, appointment_id: int, practice: str = DEFAULT_PRACTICE) -> AppointmentRecord | None:
        row = await self._fetchone(
            f"SELECT {schema.APPOINTMENT_COLUMNS} FROM appointments WHERE practice = ? AND appointment_id = ?",
            (practice, appointment_id),
        )
        return None if row is None else schema.appointment_from_row(row)

    async def inbox_get(self, message_id: str, practice: str = DEFAULT_PRACTICE) -> InboxEntry | None:
        row = await self._fetchone(
            "SELECT practice, message_id, result FROM inbox WHERE practice = ? AND message_id = ?",
            (practice, message_id),
        )
        return None if row is None else schema.inbox_from_row(row)

    async def seen(self, message_id: str, practice: str, appointment_id: int) -> Seen:
        """On the store's thread, like every read: a second, read-only connection on the event
        loop never waited for the writer, but its page cache was dropped by each of the writer's
        commits, so the query read its pages afresh (~110 us of the loop's CPU per message against
        ~36 us warm on the writer's connection). See bench/README.md, issue 18."""
        row = await self._fetchone(schema.SEEN_SQL, schema.seen_params(message_id, practice, appointment_id))
        assert row is not None, "SEEN_SQL answers one row"
        return schema.seen_from_row(row, message_id, practice, appointment_id)

    async def history(
        self, appointment_id: int, *, practice: str = DEFAULT_PRACTICE, after_seq: int = 0, limit: int = 100
    ) -> list[StateLogRecord]:
        def read(db: Connection) -> list[sqlite3.Row]:
            db.execute(
                "INSERT INTO history_reads (appointment_id, read_at) VALUES (?, ?)"
                " ON CONFLICT (appointment_id) DO UPDATE SET read_at = excluded.read_at",
                (appointment_id, _now()),
            )
            return db.execute(
                f"SELECT {schema.LOG_COLUMNS} FROM state_log WHERE practice = ?"
                " AND (appointment_id = ? OR related_appointment_id = ?) AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (practice, appointment_id, appointment_id, after_seq, limit),
            ).fetchall()

        return [schema.log_from_row(row) for row in await self._in_transaction(read)]

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        row = await self._fetchone(
            f"SELECT {schema.WORKFLOW_COLUMNS} FROM workflows WHERE workflow_id = ?",
            (workflow_id,),
        )
        return None if row is None else schema.workflow_from_row(row)

    async def active_workflow(self, appointment_id: int, practice: str = DEFAULT_PRACTICE) -> WorkflowRecord | None:
        row = await self._fetchone(
            f"SELECT {schema.WORKFLOW_COLUMNS} FROM workflows"
            f" WHERE practice = ? AND appointment_id = ? AND state NOT IN {schema.TERMINAL_SQL}",
            (practice, appointment_id),
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
        def write(db: Connection) -> None:
            db.execute(
                "INSERT INTO watermarks (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

        await self._in_transaction(write)

    async def park(self, message: ParkedMessage) -> None:
        def write(db: Connection) -> None:
            db.execute(
                "INSERT INTO parked (practice, appointment_id, message_id, body, reply_to,"
                " correlation_id, replay, reason, parked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (practice, message_id) DO NOTHING",
                (
                    message.practice,
                    message.appointment_id,
                    message.message_id,
                    message.body,
                    message.reply_to,
                    message.correlation_id,
                    message.replay,
                    message.reason,
                    _now(),
                ),
            )

        await self._in_transaction(write)

    async def parked_head(self, practice: str, appointment_id: int) -> tuple[int, str] | None:
        row = await self._fetchone(
            "SELECT seq, message_id FROM parked WHERE practice = ? AND appointment_id = ? ORDER BY seq LIMIT 1",
            (practice, appointment_id),
        )
        return None if row is None else (int(row["seq"]), str(row["message_id"]))

    async def unpark(self, seq: int) -> None:
        await self._in_transaction(lambda db: db.execute("DELETE FROM parked WHERE seq = ?", (seq,)))

    async def hand_back(self, practice: str, *, not_since: datetime, limit: int) -> list[ParkedMessage]:
        def take(db: Connection) -> list[ParkedMessage]:
            rows = db.execute(
                f"SELECT {schema.PARKED_COLUMNS} FROM parked WHERE practice = ?"
                " AND (handed_back_at IS NULL OR handed_back_at < ?) ORDER BY seq LIMIT ?",
                (practice, schema.sqlite_time(not_since), limit),
            ).fetchall()
            db.executemany("UPDATE parked SET handed_back_at = ? WHERE seq = ?", [(_now(), row["seq"]) for row in rows])
            return [schema.parked_from_row(row) for row in rows]

        return await self._in_transaction(take)

    async def keep_parked(self, seq: int) -> None:
        await self._in_transaction(
            lambda db: db.execute("UPDATE parked SET handed_back_at = NULL WHERE seq = ?", (seq,))
        )

    async def parked_counts(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT practice, COUNT(*) AS n FROM parked GROUP BY practice", ())
        return {row["practice"]: int(row["n"]) for row in rows}

    async def prune(self, table: str, cutoff: datetime, limit: int) -> int:
        rule = schema.PRUNABLE[table]

        def delete(db: Connection) -> int:
            cursor = db.execute(
                f"DELETE FROM {rule.table} WHERE rowid IN (SELECT rowid FROM {rule.table}"
                f" WHERE {rule.time_column} < ? AND NOT ({rule.keep})"
                f" ORDER BY {rule.time_column} LIMIT ?)",
                (schema.sqlite_time(cutoff), limit),
            )
            return cursor.rowcount

        return await self._in_transaction(delete)

    async def prunable(self, table: str, cutoff: datetime) -> int:
        rule = schema.PRUNABLE[table]
        row = await self._fetchone(
            f"SELECT count(*) FROM {rule.table} WHERE {rule.time_column} < ? AND NOT ({rule.keep})",
            (schema.sqlite_time(cutoff),),
        )
        return int(row[0]) if row is not None else 0

    async def oldest(self, table: str) -> datetime | None:
        rule = schema.PRUNABLE[table]
        row = await self._fetchone(f"SELECT min({rule.time_column}) FROM {rule.table}", ())
        return None if row is None or row[0] is None else schema.parse_time(row[0])

    async def compact(self) -> None:
        """Hand the pages pruning freed back to the file system, and empty the WAL.

        Without this the file never shrinks, and the WAL keeps the size of its
        largest burst (a checkpoint reuses it, only TRUNCATE shrinks it)."""

        def shrink(db: Connection) -> None:
            # executescript steps it to the end: execute() frees one page per step, so one page.
            db.executescript("PRAGMA incremental_vacuum")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

        await self._run(shrink)

    async def add_dead_letter(
        self, letter: DeadLetter, answer: InboxEntry | None = None, latest: InboxEntry | None = None
    ) -> Collected:
        return await self._in_transaction(partial(_add_dead_letter, letter=letter, answer=answer, latest=latest))

    async def dead_letters(self, query: DeadLetterQuery) -> list[DeadLetter]:
        sql, params = schema.dead_letters_sql(query)
        return [schema.dead_letter_from_row(row) for row in await self._fetchall(sql, params)]

    async def settle_dead_letter(self, dead_id: int, status: str) -> bool:
        def write(db: Connection) -> bool:
            return db.execute(schema.SETTLE_DEAD_SQL, (status, _now(), dead_id)).rowcount == 1

        return await self._in_transaction(write)

    async def count_dead_letters(self) -> dict[str, int]:
        return {row["reason_class"]: row["n"] for row in await self._fetchall(schema.COUNT_DEAD_SQL, ())}

    async def _in_transaction(self, work: Callable[[Connection], T]) -> T:
        return await self._run(partial(_transaction, work))

    async def _run(self, operation: Callable[[Connection], T]) -> T:
        """Run ``operation`` on the store's thread with the connection; errors become the store's."""
        return await self._call(partial(self._with_connection, operation))

    def _with_connection(self, operation: Callable[[Connection], T]) -> T:
        if self._db is None:
            raise StoreUnavailable("the store is not open")
        with _store_errors():
            return operation(self._db)

    async def _call(self, function: Callable[[], T]) -> T:
        if self._thread is None:
            raise StoreUnavailable("the store is not open")
        return await self._thread.call(function)

    async def _fetchone(self, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
        row: sqlite3.Row | None = await self._run(lambda db: db.execute(sql, params).fetchone())
        return row

    async def _fetchall(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        return await self._run(lambda db: db.execute(sql, params).fetchall())


@contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorname in _UNIQUE_ERRORS:
            raise StaleVersion(str(exc)) from exc
        raise
    except sqlite3.OperationalError as exc:
        # Locked past busy_timeout, disk full, unreadable file: all transient.
        raise StoreUnavailable(str(exc)) from exc


def _incremental_auto_vacuum(db: Connection) -> None:
    """Pages freed by deletes can then be given back (``compact``). The mode takes
    effect on a file made without it only through one full VACUUM (once, at open)."""
    row = db.execute("PRAGMA auto_vacuum").fetchone()
    if row is not None and row[0] != _AUTO_VACUUM_INCREMENTAL:
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("VACUUM")


def _transaction(work: Callable[[Connection], T], db: Connection) -> T:
    """``work(db)`` inside one IMMEDIATE transaction, rolled back whole on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return result


def _commit_batch(db: Connection, commits: Sequence[Commit]) -> list[CommitOutcome]:
    """Each commit in a savepoint: a stale one is rolled back alone, anything else ends the batch."""
    outcomes: list[CommitOutcome] = []
    for commit in commits:
        db.execute("SAVEPOINT one_commit")
        try:
            with _store_errors():
                outcomes.append(_commit(db, commit))
        except StaleVersion as stale:
            db.execute("ROLLBACK TO one_commit")
            outcomes.append(stale)
        db.execute("RELEASE one_commit")
    return outcomes


def _commit(db: Connection, commit: Commit) -> list[StateLogRecord]:
    if commit.appointment is not None:
        _write_appointment(db, commit.appointment)
    if commit.workflow is not None:
        _write_workflow(db, commit.workflow)
    written = [_append_log(db, record) for record in commit.logs]
    if commit.inbox is not None:
        db.execute(
            "INSERT INTO inbox (practice, message_id, result, processed_at) VALUES (?, ?, ?, ?)",
            (commit.inbox.practice, commit.inbox.message_id, commit.inbox.result_text(), _now()),
        )
    if commit.latest is not None:
        _write_inbox(db, schema.UPSERT_INBOX_SQL, commit.latest)
    return written


def _add_dead_letter(
    db: Connection, letter: DeadLetter, answer: InboxEntry | None, latest: InboxEntry | None
) -> Collected:
    new = db.execute(schema.INSERT_DEAD_SQL, schema.dead_values(letter, _now())).rowcount == 1
    if answer is not None:
        _write_inbox(db, schema.INSERT_INBOX_IF_ABSENT_SQL, answer)
    if new and latest is not None:
        _write_inbox(db, schema.UPSERT_INBOX_SQL, latest)
    row = db.execute(f"SELECT {schema.DEAD_COLUMNS} FROM dead_letters WHERE dead_key = ?", (letter.key,)).fetchone()
    entry = None
    if answer is not None:
        found = db.execute(
            "SELECT practice, message_id, result FROM inbox WHERE practice = ? AND message_id = ?",
            (answer.practice, answer.message_id),
        ).fetchone()
        entry = schema.inbox_from_row(found)
    return Collected(schema.dead_letter_from_row(row), new, entry)


def _write_inbox(db: Connection, sql: str, entry: InboxEntry) -> None:
    db.execute(sql, (entry.practice, entry.message_id, entry.result_text(), _now()))


def _apply_migrations(db: Connection) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    row = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    current = int(row[0]) if row is not None else 0
    for number, statements in enumerate(schema.SQLITE_MIGRATIONS, start=1):
        if number <= current:
            continue
        for statement in statements:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (number, _now()))


def _write_appointment(db: Connection, record: AppointmentRecord) -> None:
    values = (
        record.state,
        record.patient_id,
        record.version + 1,
        record.upstream_updated_at,
        schema.dumps(record.data),
        _now(),
        record.practice,
        record.appointment_id,
    )
    if record.version == 0:
        db.execute(
            "INSERT INTO appointments (state, patient_id, version, upstream_updated_at, data,"
            " updated_at, practice, appointment_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )
        return
    cursor = db.execute(
        "UPDATE appointments SET state = ?, patient_id = ?, version = ?,"
        " upstream_updated_at = ?, data = ?, updated_at = ?"
        " WHERE practice = ? AND appointment_id = ? AND version = ?",
        (*values, record.version),
    )
    if cursor.rowcount != 1:
        raise StaleVersion(f"appointment {record.appointment_id} is not at version {record.version}")


def _write_workflow(db: Connection, record: WorkflowRecord) -> None:
    now = _now()
    values = (
        record.practice,
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
        db.execute(
            "INSERT INTO workflows (practice, appointment_id, new_patient_id, state, command_id,"
            " correlation_id, replacement_id, last_error, attempts, version, updated_at, data,"
            " workflow_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*values, created_at),
        )
        return
    cursor = db.execute(
        "UPDATE workflows SET practice = ?, appointment_id = ?, new_patient_id = ?, state = ?, command_id = ?,"
        " correlation_id = ?, replacement_id = ?, last_error = ?, attempts = ?, version = ?,"
        " updated_at = ?, data = ? WHERE workflow_id = ? AND version = ?",
        (*values, record.version),
    )
    if cursor.rowcount != 1:
        raise StaleVersion(f"workflow {record.workflow_id} is not at version {record.version}")


def _append_log(db: Connection, record: StateLogRecord) -> StateLogRecord:
    cursor = db.execute(
        schema.insert_log_sql(["?"] * schema.LOG_VALUE_COUNT),
        schema.log_values(record, schema.sqlite_time(record.time)),
    )
    return record.model_copy(update={"seq": cursor.lastrowid})


def _rollback(db: Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "no transaction is active" not in str(exc):
            raise


def _now() -> str:
    return schema.sqlite_time(utcnow())

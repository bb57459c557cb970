"""The shared store: PostgreSQL, for several worker processes or hosts.

Workers never lock rows while they think: they read, decide, and commit with
``UPDATE ... WHERE version = <read>``. Under READ COMMITTED a concurrent
update of the same row makes the loser's UPDATE re-check its WHERE against
the winner's row, match nothing, and so fail as ``StaleVersion``; an INSERT
for version 0 loses on the primary key instead. Every commit writes its parts
in one fixed order (appointment, workflow, logs, inbox), so two commits
cannot deadlock on each other's rows. Commits made together share one
transaction (``GroupCommit``; a savepoint each once one of them is refused); two processes' batches can
then meet on two rows in opposite orders, and the deadlock PostgreSQL
detects fails that one commit as ``StaleVersion``, which is retried.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

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
    ParkedMessage,
    Seen,
    StaleVersion,
    StoreUnavailable,
    WorkflowRecord,
)

# Any constant works; it only has to be the same in every process migrating this database.
_MIGRATION_LOCK = 0x61707074  # "appt"
_SEEN_SQL = schema.numbered(schema.SEEN_SQL)
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Errors that mean "the server or the network", not "the statement": retry later.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InternalClientError,  # a pooled connection cut mid-operation by a restart
)


class PostgresStore:
    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        max_connections: int = 10,
        connect_timeout: float = 5.0,
    ) -> None:
        """``schema`` gives each test run (or tenant) its own tables; created on open."""
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema must be a lower-case SQL identifier, got {schema!r}")
        self._url = url
        self._schema = schema
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._group = GroupCommit(self.commit_batch)

    async def open(self) -> None:
        settings = {"search_path": self._schema} if self._schema else {}
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._max_connections,
                timeout=self._connect_timeout,
                server_settings=settings,
                reset=_nothing_to_reset,
            )
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        await self._migrate()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    async def commit(self, commit: Commit) -> list[StateLogRecord]:
        return await self._group.commit(commit)

    async def commit_batch(self, commits: Sequence[Commit]) -> list[CommitOutcome]:
        """First as one plain transaction, each kind of statement one round trip for the whole
        batch (``_write_together``): a savepoint costs two round trips per commit, and commits
        are rarely refused. If one is, that transaction is rolled back whole and the batch is
        written again a commit at a time, a savepoint each, so the refused commit fails alone."""
        try:
            async with self._connection() as conn, conn.transaction():
                return list(await _write_together(conn, commits))
        except StaleVersion as refused:  # a version check, a taken key, a deadlock
            if len(commits) == 1:
                return [refused]
        return await self._commit_each(commits)

    async def _commit_each(self, commits: Sequence[Commit]) -> list[CommitOutcome]:
        outcomes: list[CommitOutcome] = []
        async with self._connection() as conn, conn.transaction():
            for commit in commits:
                try:
                    async with conn.transaction():  # a savepoint: a stale commit is rolled back alone
                        outcomes += await _write_together(conn, [commit])
                except (StaleVersion, asyncpg.UniqueViolationError, asyncpg.TransactionRollbackError) as exc:
                    outcomes.append(exc if isinstance(exc, StaleVersion) else StaleVersion(str(exc)))
        return outcomes

    async def get_appointment(self, appointment_id: int, practice: str = DEFAULT_PRACTICE) -> AppointmentRecord | None:
        row = await self._fetchrow(
            f"SELECT {schema.APPOINTMENT_COLUMNS} FROM appointments WHERE practice = $1 AND appointment_id = $2",
            practice,
            appointment_id,
        )
        return None if row is None else schema.appointment_from_row(row)

    async def inbox_get(self, message_id: str, practice: str = DEFAULT_PRACTICE) -> InboxEntry | None:
        row = await self._fetchrow(
            "SELECT practice, message_id, result FROM inbox WHERE practice = $1 AND message_id = $2",
            practice,
            message_id,
        )
        return None if row is None else schema.inbox_from_row(row)

    async def seen(self, message_id: str, practice: str, appointment_id: int) -> Seen:
        row = await self._fetchrow(_SEEN_SQL, *schema.seen_params(message_id, practice, appointment_id))
        assert row is not None, "SEEN_SQL answers one row"
        return schema.seen_from_row(row, message_id, practice, appointment_id)

    async def history(
        self, appointment_id: int, *, practice: str = DEFAULT_PRACTICE, after_seq: int = 0, limit: int = 100
    ) -> list[StateLogRecord]:
        """``seq`` comes from a sequence, so two commits that touch no common row may
        become visible out of ``seq`` order. Commits writing one appointment's record
        queue on its row, so that appointment's history pages in order."""
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO history_reads (appointment_id, read_at) VALUES ($1, now())"
                " ON CONFLICT (appointment_id) DO UPDATE SET read_at = excluded.read_at",
                appointment_id,
            )
            rows = await conn.fetch(
                f"SELECT {schema.LOG_COLUMNS} FROM state_log WHERE practice = $4"
                " AND (appointment_id = $1 OR related_appointment_id = $1) AND seq > $2"
                " ORDER BY seq LIMIT $3",
                appointment_id,
                after_seq,
                limit,
                practice,
            )
        return [schema.log_from_row(row) for row in rows]

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        row = await self._fetchrow(
            f"SELECT {schema.WORKFLOW_COLUMNS} FROM workflows WHERE workflow_id = $1",
            workflow_id,
        )
        return None if row is None else schema.workflow_from_row(row)

    async def active_workflow(self, appointment_id: int, practice: str = DEFAULT_PRACTICE) -> WorkflowRecord | None:
        row = await self._fetchrow(
            f"SELECT {schema.WORKFLOW_COLUMNS} FROM workflows"
            f" WHERE practice = $2 AND appointment_id = $1 AND state NOT IN {schema.TERMINAL_SQL}",
            appointment_id,
            practice,
        )
        return None if row is None else schema.workflow_from_row(row)

    async def list_workflows(
        self, *, states: frozenset[str] | None = None, unfinished: bool = False
    ) -> list[WorkflowRecord]:
        where = ["($1::text[] IS NULL OR state = ANY($1::text[]))"]
        if unfinished:
            where.append(f"state NOT IN {schema.TERMINAL_SQL}")
        rows = await self._fetch(
            f"SELECT {schema.WORKFLOW_COLUMNS} FROM workflows WHERE {' AND '.join(where)}"
            " ORDER BY created_at, workflow_id",
            None if states is None else sorted(states),
        )
        return [schema.workflow_from_row(row) for row in rows]

    async def get_watermark(self, name: str) -> str | None:
        row = await self._fetchrow("SELECT value FROM watermarks WHERE name = $1", name)
        return None if row is None else str(row["value"])

    async def set_watermark(self, name: str, value: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO watermarks (name, value) VALUES ($1, $2)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                name,
                value,
            )

    async def park(self, message: ParkedMessage) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO parked (practice, appointment_id, message_id, body, reply_to,"
                " correlation_id, replay, reason, parked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())"
                " ON CONFLICT (practice, message_id) DO NOTHING",
                message.practice,
                message.appointment_id,
                message.message_id,
                message.body,
                message.reply_to,
                message.correlation_id,
                message.replay,
                message.reason,
            )

    async def parked_head(self, practice: str, appointment_id: int) -> tuple[int, str] | None:
        row = await self._fetchrow(
            "SELECT seq, message_id FROM parked WHERE practice = $1 AND appointment_id = $2 ORDER BY seq LIMIT 1",
            practice,
            appointment_id,
        )
        return None if row is None else (int(row["seq"]), str(row["message_id"]))

    async def unpark(self, seq: int) -> None:
        async with self._connection() as conn:
            await conn.execute("DELETE FROM parked WHERE seq = $1", seq)

    async def hand_back(self, practice: str, *, not_since: datetime, limit: int) -> list[ParkedMessage]:
        rows = await self._fetch(
            "UPDATE parked SET handed_back_at = now() WHERE seq IN ("
            " SELECT seq FROM parked WHERE practice = $1 AND (handed_back_at IS NULL OR handed_back_at < $2)"
            " ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED)"
            f" RETURNING {schema.PARKED_COLUMNS}",
            practice,
            schema.utc(not_since),
            limit,
        )
        return sorted((schema.parked_from_row(row) for row in rows), key=lambda m: m.seq)

    async def keep_parked(self, seq: int) -> None:
        async with self._connection() as conn:
            await conn.execute("UPDATE parked SET handed_back_at = NULL WHERE seq = $1", seq)

    async def parked_counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT practice, COUNT(*) AS n FROM parked GROUP BY practice")
        return {row["practice"]: int(row["n"]) for row in rows}

    async def prune(self, table: str, cutoff: datetime, limit: int) -> int:
        """``SKIP LOCKED``: processes pruning together take disjoint rows, and a pruner
        never waits on a row a worker holds, so it can't join a deadlock."""
        rule = schema.PRUNABLE[table]
        async with self._connection() as conn:
            status = await conn.execute(
                f"WITH doomed AS (SELECT ctid FROM {rule.table}"
                f" WHERE {rule.time_column} < $1 AND NOT ({rule.keep})"
                f" ORDER BY {rule.time_column} LIMIT $2 FOR UPDATE SKIP LOCKED)"
                f" DELETE FROM {rule.table} WHERE ctid IN (SELECT ctid FROM doomed)",
                schema.utc(cutoff),
                limit,
            )
        return int(status.split()[-1])

    async def prunable(self, table: str, cutoff: datetime) -> int:
        rule = schema.PRUNABLE[table]
        count = await self._fetchval(
            f"SELECT count(*) FROM {rule.table} WHERE {rule.time_column} < $1 AND NOT ({rule.keep})",
            schema.utc(cutoff),
        )
        return int(count)

    async def oldest(self, table: str) -> datetime | None:
        rule = schema.PRUNABLE[table]
        value = await self._fetchval(f"SELECT min({rule.time_column}) FROM {rule.table}")
        return None if value is None else schema.parse_time(value)

    async def compact(self) -> None:
        """Nothing to ask: autovacuum makes deleted rows' space reusable, so the tables
        stop growing; a VACUUM FULL to shrink them would lock them exclusively."""

    async def add_dead_letter(
        self, letter: DeadLetter, answer: InboxEntry | None = None, latest: InboxEntry | None = None
    ) -> Collected:
        async with self._connection() as conn, conn.transaction():
            status = await conn.execute(schema.numbered(schema.INSERT_DEAD_SQL), *schema.dead_values(letter, utcnow()))
            new = status.endswith(" 1")
            if answer is not None:
                await _write_inbox(conn, schema.INSERT_INBOX_IF_ABSENT_SQL, answer)
            if new and latest is not None:
                await _write_inbox(conn, schema.UPSERT_INBOX_SQL, latest)
            row = await conn.fetchrow(f"SELECT {schema.DEAD_COLUMNS} FROM dead_letters WHERE dead_key = $1", letter.key)
            entry = None
            if answer is not None:
                found = await conn.fetchrow(
                    "SELECT practice, message_id, result FROM inbox WHERE practice = $1 AND message_id = $2",
                    answer.practice,
                    answer.message_id,
                )
                entry = schema.inbox_from_row(found)
        return Collected(schema.dead_letter_from_row(row), new, entry)

    async def dead_letters(self, query: DeadLetterQuery) -> list[DeadLetter]:
        sql, params = schema.dead_letters_sql(query)
        return [schema.dead_letter_from_row(row) for row in await self._fetch(schema.numbered(sql), *params)]

    async def settle_dead_letter(self, dead_id: int, status: str) -> bool:
        async with self._connection() as conn:
            done = await conn.execute(schema.numbered(schema.SETTLE_DEAD_SQL), status, utcnow(), dead_id)
        return str(done).endswith(" 1")

    async def count_dead_letters(self) -> dict[str, int]:
        return {row["reason_class"]: row["n"] for row in await self._fetch(schema.COUNT_DEAD_SQL)}

    async def _migrate(self) -> None:
        """Under an advisory lock, so processes starting together migrate one at a time
        (CREATE ... IF NOT EXISTS alone still races on the catalog)."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            if self._schema:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
            current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            for number, statements in enumerate(schema.POSTGRES_MIGRATIONS, start=1):
                if number <= current:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_version (version, applied_at) VALUES ($1, now())", number)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, with driver errors turned into the store's own."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn
        except (asyncpg.UniqueViolationError, asyncpg.TransactionRollbackError) as exc:
            # A unique key taken by a concurrent writer, or a serialisation failure
            # or deadlock: either way another writer got there first.
            raise StaleVersion(str(exc)) from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with self._connection() as conn:
            return await conn.fetchrow(sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self._connection() as conn:
            return await conn.fetchval(sql, *args)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            return list(await conn.fetch(sql, *args))


_INSERT_APPOINTMENT_SQL = (
    "INSERT INTO appointments (appointment_id, state, patient_id, version,"
    " upstream_updated_at, data, practice, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, now())"
)
_UPDATE_APPOINTMENT_SQL = (
    "UPDATE appointments SET state = $2, patient_id = $3, version = $4,"
    " upstream_updated_at = $5, data = $6, updated_at = now()"
    " WHERE practice = $7 AND appointment_id = $1 AND version = $8"
)
_INSERT_LOG_SQL = schema.insert_log_sql([f"${n}" for n in range(1, schema.LOG_VALUE_COUNT + 1)]) + " RETURNING seq"
_INSERT_INBOX_SQL = "INSERT INTO inbox (practice, message_id, result, processed_at) VALUES ($1, $2, $3, now())"


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """The pool's reset between two users of a connection: nothing to undo, so no round trip.

    asyncpg's default sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``
    on every release: a second round trip for each one-query read (``seen``, per message).
    The store leaves no session state behind: no LISTEN, no cursors or session settings
    (``search_path`` is set at connect), and its one advisory lock (migrations) is
    transaction-scoped. An open transaction is still rolled back by the pool (asyncpg's
    ``Connection._reset`` runs before this), and a broken connection is still discarded.
    """


async def _write_together(conn: asyncpg.Connection, commits: Sequence[Commit]) -> list[list[StateLogRecord]]:
    """Commits' writes, each kind of statement sent for all of them in one round trip.

    asyncpg's ``executemany``/``fetchmany`` pipeline one statement over many rows; a
    statement at a time cost an edit's commit three round trips, each ~50 us of the
    event loop's CPU. The parts always go in one fixed order (appointments, workflows,
    logs, inbox), so two writers cannot deadlock on each other's rows more than single
    commits could. A version that moved, a taken inbox id or a deadlock raises for all of
    ``commits``: ``commit_batch`` then writes them again one per savepoint (this same
    function, one commit at a time), so that commit alone fails.
    """
    appointments = [commit.appointment for commit in commits if commit.appointment is not None]
    if new := [record for record in appointments if record.version == 0]:
        await conn.executemany(_INSERT_APPOINTMENT_SQL, [_appointment_args(record) for record in new])
    if updated := [record for record in appointments if record.version != 0]:
        rows = await conn.fetchmany(
            _UPDATE_APPOINTMENT_SQL + " RETURNING appointment_id",
            [(*_appointment_args(record), record.version) for record in updated],
        )
        if len(rows) != len(updated):
            ids = {record.appointment_id for record in updated}
            moved = sorted(ids - {row[0] for row in rows}) or sorted(ids)  # or one of them written twice
            raise StaleVersion(f"appointments {moved} are not at the version read")
    for commit in commits:
        if commit.workflow is not None:  # a saga's step: rare next to the appointments' commits
            await _write_workflow(conn, commit.workflow)
    logs = [record for commit in commits for record in commit.logs]
    seqs = iter(await conn.fetchmany(_INSERT_LOG_SQL, [_log_args(record) for record in logs]) if logs else [])
    written = [[record.model_copy(update={"seq": next(seqs)["seq"]}) for record in commit.logs] for commit in commits]
    if inbox := [_inbox_args(commit.inbox) for commit in commits if commit.inbox is not None]:
        await conn.executemany(_INSERT_INBOX_SQL, inbox)
    for commit in commits:
        if commit.latest is not None:  # a replay's: rarer still
            await _write_inbox(conn, schema.UPSERT_INBOX_SQL, commit.latest)
    return written


def _appointment_args(record: AppointmentRecord) -> tuple[Any, ...]:
    """``_INSERT_APPOINTMENT_SQL``'s parameters, and ``_UPDATE_APPOINTMENT_SQL``'s but the version read."""
    return (
        record.appointment_id,
        record.state,
        record.patient_id,
        record.version + 1,
        record.upstream_updated_at,
        schema.dumps(record.data),
        record.practice,
    )


def _log_args(record: StateLogRecord) -> tuple[Any, ...]:
    return schema.log_values(record, schema.utc(record.time))


def _inbox_args(entry: InboxEntry) -> tuple[Any, ...]:
    return (entry.practice, entry.message_id, entry.result_text())


async def _write_workflow(conn: asyncpg.Connection, record: WorkflowRecord) -> None:
    args = (
        record.workflow_id,
        record.appointment_id,
        record.new_patient_id,
        record.state,
        record.command_id,
        record.correlation_id,
        record.replacement_id,
        record.last_error,
        record.attempts,
        record.version + 1,
        schema.dumps(record.data),
        record.practice,
    )
    if record.version == 0:
        created_at: datetime | None = schema.utc(record.created_at) if record.created_at else None
        await conn.execute(
            "INSERT INTO workflows (workflow_id, appointment_id, new_patient_id, state,"
            " command_id, correlation_id, replacement_id, last_error, attempts, version, data,"
            " practice, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, COALESCE($13, now()), now())",
            *args,
            created_at,
        )
        return
    status = await conn.execute(
        "UPDATE workflows SET appointment_id = $2, new_patient_id = $3, state = $4,"
        " command_id = $5, correlation_id = $6, replacement_id = $7, last_error = $8,"
        " attempts = $9, version = $10, data = $11, practice = $12, updated_at = now()"
        " WHERE workflow_id = $1 AND version = $13",
        *args,
        record.version,
    )
    if status != "UPDATE 1":
        raise StaleVersion(f"workflow {record.workflow_id} is not at version {record.version}")


async def _write_inbox(conn: asyncpg.Connection, sql: str, entry: InboxEntry) -> None:
    await conn.execute(schema.numbered(sql), entry.practice, entry.message_id, entry.result_text(), utcnow())

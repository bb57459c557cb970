"""What the SQLite and PostgreSQL stores share: the migrations, and row <-> record mapping.

Migrations are numbered by their position in the list and never edited once
released: a change to the schema is a new entry at the end, so every database
can be brought forward from whatever version it is at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic_core import to_json

from consumer.messages import StateLogRecord
from consumer.store.base import (
    TERMINAL_WORKFLOW_STATES,
    AppointmentRecord,
    DeadLetter,
    DeadLetterQuery,
    InboxEntry,
    ParkedMessage,
    Seen,
    WorkflowRecord,
)

# The SQL twin of TERMINAL_WORKFLOW_STATES, for queries; the migrations spell
# the same list out literally because an applied migration must never change.
TERMINAL_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(TERMINAL_WORKFLOW_STATES)) + ")"

# Inbox keys became ``<kind>:<sender's id>`` (worker.message_key). Rows written before
# carry the bare id: a command's row has a result, an observed event's has none, and
# the reconciler's ids already began with "reconcile:". Valid SQL in both dialects.
INBOX_NAMESPACES = """UPDATE inbox SET message_id = CASE
        WHEN result IS NOT NULL THEN 'command:'
        WHEN message_id LIKE 'reconcile:%' THEN 'reconcile:'
        ELSE 'webhook:' END || message_id"""


@dataclass(frozen=True)
class Prunable:
    """A table the pruner shortens: rows older than a cutoff go, oldest first, unless ``keep`` holds.

    ``keep`` is SQL over the table's row naming what is still needed whatever
    its age; both backends run it as written, so one rule serves both.
    """

    table: str
    time_column: str
    keep: str = "1 = 0"


# In the order the pruner visits them: expired history leases go first, so a
# lease still present when the state log is pruned is a live one.
PRUNABLE: dict[str, Prunable] = {
    rule.table: rule
    for rule in (
        Prunable("history_reads", "read_at"),
        Prunable("inbox", "processed_at"),
        Prunable("workflows", "updated_at", keep=f"state NOT IN {TERMINAL_SQL}"),
        Prunable(
            "state_log",
            "time",
            keep=(
                # the records of a workflow still running (its redelivery re-publishes them) ...
                "EXISTS (SELECT 1 FROM workflows w WHERE w.workflow_id = state_log.workflow_id"
                f" AND w.state NOT IN {TERMINAL_SQL})"
                # ... and of an appointment whose history someone is paging through
                " OR EXISTS (SELECT 1 FROM history_reads h"
                " WHERE h.appointment_id IN (state_log.appointment_id, state_log.related_appointment_id))"
            ),
        ),
    )
}

SQLITE_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE appointments (
            appointment_id INTEGER PRIMARY KEY,
            state TEXT NOT NULL,
            patient_id INTEGER,
            version INTEGER NOT NULL,
            upstream_updated_at TEXT,
            data TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE state_log (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            time TEXT NOT NULL,
            appointment_id INTEGER NOT NULL,
            related_appointment_id INTEGER,
            machine TEXT NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            trigger TEXT NOT NULL,
            source TEXT NOT NULL,
            command_id TEXT,
            webhook_id TEXT,
            workflow_id TEXT,
            correlation_id TEXT,
            detail TEXT NOT NULL
        )""",
        "CREATE INDEX state_log_appointment ON state_log (appointment_id, seq)",
        "CREATE INDEX state_log_related ON state_log (related_appointment_id, seq)",
        """CREATE TABLE workflows (
            workflow_id TEXT PRIMARY KEY,
            appointment_id INTEGER NOT NULL,
            new_patient_id INTEGER NOT NULL,
            state TEXT NOT NULL,
            command_id TEXT NOT NULL,
            correlation_id TEXT,
            replacement_id INTEGER,
            last_error TEXT,
            attempts INTEGER NOT NULL,
            version INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        """CREATE UNIQUE INDEX workflows_one_unfinished ON workflows (appointment_id)
            WHERE state NOT IN ('completed', 'compensated', 'rejected')""",
        "CREATE INDEX workflows_state ON workflows (state)",
        """CREATE TABLE inbox (
            message_id TEXT PRIMARY KEY,
            result TEXT,
            processed_at TEXT NOT NULL
        )""",
        "CREATE TABLE watermarks (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
    [
        """CREATE TABLE dead_letters (
            dead_id INTEGER PRIMARY KEY AUTOINCREMENT,
            dead_key TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            reason TEXT NOT NULL,
            reason_class TEXT NOT NULL,
            deliveries INTEGER NOT NULL,
            replay INTEGER NOT NULL,
            command_id TEXT,
            type TEXT,
            appointment_id INTEGER,
            practice TEXT,
            routing_key TEXT NOT NULL,
            message_id TEXT,
            correlation_id TEXT,
            reply_to TEXT,
            headers TEXT NOT NULL,
            body BLOB NOT NULL,
            dead_at TEXT NOT NULL,
            settled_at TEXT
        )""",
        "CREATE INDEX dead_letters_status ON dead_letters (status, dead_id)",
    ],
    [
        # Retention (issue 22): each pruned table is read oldest-first by its time column,
        # and history readers leave a lease so the records they page through stay put.
        "CREATE INDEX inbox_processed_at ON inbox (processed_at)",
        "CREATE INDEX workflows_updated_at ON workflows (updated_at)",
        "CREATE INDEX state_log_time ON state_log (time)",
        """CREATE TABLE history_reads (
            appointment_id INTEGER PRIMARY KEY,
            read_at TEXT NOT NULL
        )""",
    ],
    [INBOX_NAMESPACES],
    # 5: practices. Appointment ids (and partners' message ids) are unique only inside a
    # practice, so every keyed table gains ``practice``; what existed is the default's.
    # SQLite can't change a primary key in place: those tables are rebuilt.
    [
        """CREATE TABLE appointments_v2 (
            practice TEXT NOT NULL DEFAULT 'default',
            appointment_id INTEGER NOT NULL,
            state TEXT NOT NULL,
            patient_id INTEGER,
            version INTEGER NOT NULL,
            upstream_updated_at TEXT,
            data TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (practice, appointment_id)
        )""",
        """INSERT INTO appointments_v2 (practice, appointment_id, state, patient_id, version,
            upstream_updated_at, data, updated_at)
            SELECT 'default', appointment_id, state, patient_id, version, upstream_updated_at, data,
            updated_at FROM appointments""",
        "DROP TABLE appointments",
        "ALTER TABLE appointments_v2 RENAME TO appointments",
        """CREATE TABLE inbox_v2 (
            practice TEXT NOT NULL DEFAULT 'default',
            message_id TEXT NOT NULL,
            result TEXT,
            processed_at TEXT NOT NULL,
            PRIMARY KEY (practice, message_id)
        )""",
        """INSERT INTO inbox_v2 (practice, message_id, result, processed_at)
            SELECT 'default', message_id, result, processed_at FROM inbox""",
        "DROP TABLE inbox",
        "ALTER TABLE inbox_v2 RENAME TO inbox",
        "CREATE INDEX inbox_processed_at ON inbox (processed_at)",  # migration 3's, lost with the old table
        "ALTER TABLE state_log ADD COLUMN practice TEXT NOT NULL DEFAULT 'default'",
        "DROP INDEX state_log_appointment",
        "DROP INDEX state_log_related",
        "CREATE INDEX state_log_appointment ON state_log (practice, appointment_id, seq)",
        "CREATE INDEX state_log_related ON state_log (practice, related_appointment_id, seq)",
        "ALTER TABLE workflows ADD COLUMN practice TEXT NOT NULL DEFAULT 'default'",
        "DROP INDEX workflows_one_unfinished",
        """CREATE UNIQUE INDEX workflows_one_unfinished ON workflows (practice, appointment_id)
            WHERE state NOT IN ('completed', 'compensated', 'rejected')""",
    ],
    # 6: messages of practices that can't be served now wait here, in order (consumer/waiting.py).
    [
        """CREATE TABLE parked (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            practice TEXT NOT NULL,
            appointment_id INTEGER NOT NULL,
            message_id TEXT NOT NULL,
            body BLOB NOT NULL,
            reply_to TEXT,
            correlation_id TEXT,
            replay INTEGER NOT NULL,
            reason TEXT NOT NULL,
            parked_at TEXT NOT NULL,
            handed_back_at TEXT,
            UNIQUE (practice, message_id)
        )""",
        "CREATE INDEX parked_appointment ON parked (practice, appointment_id, seq)",
    ],
]

POSTGRES_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE appointments (
            appointment_id bigint PRIMARY KEY,
            state text NOT NULL,
            patient_id bigint,
            version bigint NOT NULL,
            upstream_updated_at text,
            data jsonb NOT NULL,
            updated_at timestamptz NOT NULL
        )""",
        """CREATE TABLE state_log (
            seq bigserial PRIMARY KEY,
            time timestamptz NOT NULL,
            appointment_id bigint NOT NULL,
            related_appointment_id bigint,
            machine text NOT NULL,
            from_state text,
            to_state text NOT NULL,
            trigger text NOT NULL,
            source text NOT NULL,
            command_id text,
            webhook_id text,
            workflow_id text,
            correlation_id text,
            detail jsonb NOT NULL
        )""",
        "CREATE INDEX state_log_appointment ON state_log (appointment_id, seq)",
        "CREATE INDEX state_log_related ON state_log (related_appointment_id, seq)",
        """CREATE TABLE workflows (
            workflow_id text PRIMARY KEY,
            appointment_id bigint NOT NULL,
            new_patient_id bigint NOT NULL,
            state text NOT NULL,
            command_id text NOT NULL,
            correlation_id text,
            replacement_id bigint,
            last_error text,
            attempts integer NOT NULL,
            version bigint NOT NULL,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            data jsonb NOT NULL
        )""",
        """CREATE UNIQUE INDEX workflows_one_unfinished ON workflows (appointment_id)
            WHERE state NOT IN ('completed', 'compensated', 'rejected')""",
        "CREATE INDEX workflows_state ON workflows (state)",
        """CREATE TABLE inbox (
            message_id text PRIMARY KEY,
            result jsonb,
            processed_at timestamptz NOT NULL
        )""",
        "CREATE TABLE watermarks (name text PRIMARY KEY, value text NOT NULL)",
    ],
    [
        """CREATE TABLE dead_letters (
            dead_id bigserial PRIMARY KEY,
            dead_key text NOT NULL UNIQUE,
            status text NOT NULL,
            reason text NOT NULL,
            reason_class text NOT NULL,
            deliveries integer NOT NULL,
            replay integer NOT NULL,
            command_id text,
            type text,
            appointment_id bigint,
            practice text,
            routing_key text NOT NULL,
            message_id text,
            correlation_id text,
            reply_to text,
            headers jsonb NOT NULL,
            body bytea NOT NULL,
            dead_at timestamptz NOT NULL,
            settled_at timestamptz
        )""",
        "CREATE INDEX dead_letters_status ON dead_letters (status, dead_id)",
    ],
    [
        "CREATE INDEX inbox_processed_at ON inbox (processed_at)",
        "CREATE INDEX workflows_updated_at ON workflows (updated_at)",
        "CREATE INDEX state_log_time ON state_log (time)",
        """CREATE TABLE history_reads (
            appointment_id bigint PRIMARY KEY,
            read_at timestamptz NOT NULL
        )""",
    ],
    [INBOX_NAMESPACES],
    # 5: practices (see the SQLite twin).
    [
        "ALTER TABLE appointments ADD COLUMN practice text NOT NULL DEFAULT 'default'",
        "ALTER TABLE appointments DROP CONSTRAINT appointments_pkey",
        "ALTER TABLE appointments ADD PRIMARY KEY (practice, appointment_id)",
        "ALTER TABLE inbox ADD COLUMN practice text NOT NULL DEFAULT 'default'",
        "ALTER TABLE inbox DROP CONSTRAINT inbox_pkey",
        "ALTER TABLE inbox ADD PRIMARY KEY (practice, message_id)",
        "ALTER TABLE state_log ADD COLUMN practice text NOT NULL DEFAULT 'default'",
        "DROP INDEX state_log_appointment",
        "DROP INDEX state_log_related",
        "CREATE INDEX state_log_appointment ON state_log (practice, appointment_id, seq)",
        "CREATE INDEX state_log_related ON state_log (practice, related_appointment_id, seq)",
        "ALTER TABLE workflows ADD COLUMN practice text NOT NULL DEFAULT 'default'",
        "DROP INDEX workflows_one_unfinished",
        """CREATE UNIQUE INDEX workflows_one_unfinished ON workflows (practice, appointment_id)
            WHERE state NOT IN ('completed', 'compensated', 'rejected')""",
    ],
    # 6: parked messages (see the SQLite twin).
    [
        """CREATE TABLE parked (
            seq bigserial PRIMARY KEY,
            practice text NOT NULL,
            appointment_id bigint NOT NULL,
            message_id text NOT NULL,
            body bytea NOT NULL,
            reply_to text,
            correlation_id text,
            replay integer NOT NULL,
            reason text NOT NULL,
            parked_at timestamptz NOT NULL,
            handed_back_at timestamptz,
            UNIQUE (practice, message_id)
        )""",
        "CREATE INDEX parked_appointment ON parked (practice, appointment_id, seq)",
    ],
]


class Row(Protocol):
    """A result row by column name: asyncpg's Record and sqlite3.Row both qualify."""

    def __getitem__(self, key: str) -> Any: ...


APPOINTMENT_COLUMNS = "practice, appointment_id, state, patient_id, version, upstream_updated_at, data"
WORKFLOW_COLUMNS = (
    "practice, workflow_id, appointment_id, new_patient_id, state, command_id, correlation_id,"
    " replacement_id, last_error, attempts, version, created_at, updated_at, data"
)
LOG_COLUMNS = (
    "seq, time, practice, appointment_id, machine, from_state, to_state, trigger, source,"
    " command_id, webhook_id, workflow_id, correlation_id, detail"
)


def utc(value: datetime) -> datetime:
    """Naive datetimes are taken as UTC, so nothing depends on the host's zone."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def sqlite_time(value: datetime) -> str:
    """A fixed-width UTC text form, so SQLite's text ordering is time ordering: always with its
    microseconds and ``+00:00`` (``isoformat``, half the CPU of the same ``strftime``)."""
    return utc(value).isoformat(timespec="microseconds")


def parse_time(value: datetime | str) -> datetime:
    """PostgreSQL returns datetimes, SQLite the text written by ``sqlite_time``."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return utc(value)


def dumps(value: Any) -> str:
    """JSON that also accepts datetimes, UUIDs, models: what pydantic would emit."""
    return to_json(value).decode()


def loads(value: Any) -> Any:
    """Both drivers hand JSON back as text (asyncpg has no jsonb codec set)."""
    return None if value is None else json.loads(value)


def related_appointment_id(record: StateLogRecord) -> int | None:
    """The other appointment a workflow record names, so ``history`` of either finds it."""
    for key in ("replacement_id", "original_id"):
        value = record.detail.get(key)
        if type(value) is int and value != record.appointment_id:
            return value
    return None


INSERT_LOG_COLUMNS = (
    "time, practice, appointment_id, related_appointment_id, machine, from_state, to_state, trigger, source,"
    " command_id, webhook_id, workflow_id, correlation_id, detail"
)


LOG_VALUE_COUNT = INSERT_LOG_COLUMNS.count(",") + 1


def insert_log_sql(placeholders: list[str]) -> str:
    """The one INSERT for a state-log record; each driver brings its placeholder style."""
    return f"INSERT INTO state_log ({INSERT_LOG_COLUMNS}) VALUES ({', '.join(placeholders)})"


def log_values(record: StateLogRecord, time: Any) -> tuple[Any, ...]:
    """Values in ``INSERT_LOG_COLUMNS`` order; ``time`` already in the driver's form."""
    return (
        time,
        record.practice,
        record.appointment_id,
        related_appointment_id(record),
        record.machine,
        record.from_state,
        record.to_state,
        record.trigger,
        record.source,
        record.command_id,
        record.webhook_id,
        record.workflow_id,
        record.correlation_id,
        dumps(record.detail),
    )


# One read before deciding on a message: its inbox entry, the oldest parked message of its
# appointment, and its appointment's record (see ``seen_from_row`` for the parameters' order).
SEEN_SQL = (
    "SELECT i.message_id AS inbox_id, i.result AS inbox_result,"
    " (SELECT seq FROM parked WHERE practice = ? AND appointment_id = ? ORDER BY seq LIMIT 1) AS parked_seq,"
    " (SELECT message_id FROM parked WHERE practice = ? AND appointment_id = ? ORDER BY seq LIMIT 1) AS parked_id,"
    " a.state, a.patient_id, a.version, a.upstream_updated_at, a.data"
    " FROM (SELECT 1) AS one"
    " LEFT JOIN inbox AS i ON i.practice = ? AND i.message_id = ?"
    " LEFT JOIN appointments AS a ON a.practice = ? AND a.appointment_id = ?"
)


def seen_params(message_id: str, practice: str, appointment_id: int) -> tuple[Any, ...]:
    appointment = (practice, appointment_id)
    return (*appointment, *appointment, practice, message_id, *appointment)


def seen_from_row(row: Row, message_id: str, practice: str, appointment_id: int) -> Seen:
    inbox = None if row["inbox_id"] is None else InboxEntry(message_id, loads(row["inbox_result"]), practice)
    record = None
    if row["state"] is not None:
        record = AppointmentRecord(
            practice=practice,
            appointment_id=appointment_id,
            state=row["state"],
            patient_id=row["patient_id"],
            version=row["version"],
            upstream_updated_at=row["upstream_updated_at"],
            data=loads(row["data"]),
        )
    parked = None if row["parked_seq"] is None else (int(row["parked_seq"]), str(row["parked_id"]))
    return Seen(inbox, record, parked)


def appointment_from_row(row: Row) -> AppointmentRecord:
    return AppointmentRecord(
        practice=row["practice"],
        appointment_id=row["appointment_id"],
        state=row["state"],
        patient_id=row["patient_id"],
        version=row["version"],
        upstream_updated_at=row["upstream_updated_at"],
        data=loads(row["data"]),
    )


def workflow_from_row(row: Row) -> WorkflowRecord:
    return WorkflowRecord(
        practice=row["practice"],
        workflow_id=row["workflow_id"],
        appointment_id=row["appointment_id"],
        new_patient_id=row["new_patient_id"],
        state=row["state"],
        command_id=row["command_id"],
        correlation_id=row["correlation_id"],
        replacement_id=row["replacement_id"],
        last_error=row["last_error"],
        attempts=row["attempts"],
        version=row["version"],
        created_at=parse_time(row["created_at"]),
        updated_at=parse_time(row["updated_at"]),
        data=loads(row["data"]),
    )


def log_from_row(row: Row) -> StateLogRecord:
    return StateLogRecord(
        seq=row["seq"],
        time=parse_time(row["time"]),
        practice=row["practice"],
        appointment_id=row["appointment_id"],
        machine=row["machine"],
        from_state=row["from_state"],
        to_state=row["to_state"],
        trigger=row["trigger"],
        source=row["source"],
        command_id=row["command_id"],
        webhook_id=row["webhook_id"],
        workflow_id=row["workflow_id"],
        correlation_id=row["correlation_id"],
        detail=loads(row["detail"]),
    )


PARKED_COLUMNS = "seq, practice, appointment_id, message_id, body, reply_to, correlation_id, replay, reason"


def parked_from_row(row: Row) -> ParkedMessage:
    return ParkedMessage(
        seq=row["seq"],
        practice=row["practice"],
        appointment_id=row["appointment_id"],
        message_id=row["message_id"],
        body=bytes(row["body"]),
        reply_to=row["reply_to"],
        correlation_id=row["correlation_id"],
        replay=row["replay"],
        reason=row["reason"],
    )


def inbox_from_row(row: Row) -> InboxEntry:
    return InboxEntry(message_id=row["message_id"], result=loads(row["result"]), practice=row["practice"])


DEAD_COLUMNS = (
    "dead_id, dead_key, status, reason, reason_class, deliveries, replay, command_id, type,"
    " appointment_id, practice, routing_key, message_id, correlation_id, reply_to, headers, body, dead_at"
)
INSERT_DEAD_SQL = (
    "INSERT INTO dead_letters (dead_key, status, reason, reason_class, deliveries, replay, command_id,"
    " type, appointment_id, practice, routing_key, message_id, correlation_id, reply_to, headers, body,"
    " dead_at) VALUES (?, 'dead', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (dead_key) DO NOTHING"
)
INSERT_INBOX_IF_ABSENT_SQL = (
    "INSERT INTO inbox (practice, message_id, result, processed_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (practice, message_id) DO NOTHING"
)
UPSERT_INBOX_SQL = (
    "INSERT INTO inbox (practice, message_id, result, processed_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (practice, message_id) DO UPDATE SET result = excluded.result, processed_at = excluded.processed_at"
)
SETTLE_DEAD_SQL = "UPDATE dead_letters SET status = ?, settled_at = ? WHERE dead_id = ? AND status = 'dead'"
COUNT_DEAD_SQL = "SELECT reason_class, count(*) AS n FROM dead_letters WHERE status = 'dead' GROUP BY reason_class"


def dead_values(letter: DeadLetter, dead_at: Any) -> tuple[Any, ...]:
    """Values for ``INSERT_DEAD_SQL``; ``dead_at`` already in the driver's form."""
    return (
        letter.key,
        letter.reason,
        letter.reason_class,
        letter.deliveries,
        letter.replay,
        letter.command_id,
        letter.type,
        letter.appointment_id,
        letter.practice,
        letter.routing_key,
        letter.message_id,
        letter.correlation_id,
        letter.reply_to,
        dumps(letter.headers),
        letter.body,
        dead_at,
    )


def dead_letters_sql(query: DeadLetterQuery) -> tuple[str, list[Any]]:
    """The SELECT for a query, with ``?`` placeholders, in arrival order."""
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if query.status is not None:
        where.append("status = ?")
        params.append(query.status)
    if query.ids is not None:
        where.append(f"dead_id IN ({', '.join('?' for _ in query.ids) or 'NULL'})")
        params.extend(query.ids)
    if query.key is not None:
        where.append("dead_key = ?")
        params.append(query.key)
    if query.reason is not None:
        where.append("lower(reason) LIKE ? ESCAPE '!'")
        literal = query.reason.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_")
        params.append(f"%{literal}%")
    if query.type is not None:
        where.append("type = ?")
        params.append(query.type)
    if query.practice is not None:
        where.append("practice = ?")
        params.append(query.practice)
    return f"SELECT {DEAD_COLUMNS} FROM dead_letters WHERE {' AND '.join(where)} ORDER BY dead_id", params


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2 ...`` (the SQL here has no literal ``?``)."""
    parts = sql.split("?")
    return "".join(part + (f"${n}" if n < len(parts) else "") for n, part in enumerate(parts, start=1))


def dead_letter_from_row(row: Row) -> DeadLetter:
    return DeadLetter(
        dead_id=row["dead_id"],
        key=row["dead_key"],
        status=row["status"],
        reason=row["reason"],
        reason_class=row["reason_class"],
        deliveries=row["deliveries"],
        replay=row["replay"],
        command_id=row["command_id"],
        type=row["type"],
        appointment_id=row["appointment_id"],
        practice=row["practice"],
        routing_key=row["routing_key"],
        message_id=row["message_id"],
        correlation_id=row["correlation_id"],
        reply_to=row["reply_to"],
        headers=loads(row["headers"]),
        body=bytes(row["body"]),
        dead_at=parse_time(row["dead_at"]),
    )

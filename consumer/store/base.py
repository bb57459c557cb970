"""The store's one interface: appointment records, the state log, workflows, inbox.

Everything a decision changes is written by one call, ``commit``, in one
transaction, with optimistic versioning: two workers that read the same
version cannot both win. That is what makes redelivery and scale-out safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pydantic_core import to_json

from consumer.messages import DEFAULT_PRACTICE, StateLogRecord


class StaleVersion(Exception):
    """The record changed since it was read; the caller reloads and decides again."""


class StoreUnavailable(Exception):
    """The store could not be reached (transient: retry)."""


class NoStore(StoreUnavailable):
    """A store opened read-only does not exist (APPT_STORE points elsewhere than the service's)."""


@dataclass(frozen=True)
class AppointmentRecord:
    """What the service believes about one appointment.

    ``version`` is the store's optimistic-lock counter (0 = never stored).
    ``upstream_updated_at`` is the PMS's ``updated_at`` of the last snapshot
    adopted, used to refuse stale events.
    """

    appointment_id: int
    state: str
    patient_id: int | None
    version: int = 0
    upstream_updated_at: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    practice: str = DEFAULT_PRACTICE


@dataclass(frozen=True)
class WorkflowRecord:
    """One reassignment workflow; ``version`` as for appointments."""

    workflow_id: str
    appointment_id: int
    new_patient_id: int
    state: str
    command_id: str
    correlation_id: str | None = None
    replacement_id: int | None = None
    last_error: str | None = None
    attempts: int = 0
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    data: dict[str, Any] = field(default_factory=dict)
    practice: str = DEFAULT_PRACTICE


@dataclass(frozen=True)
class InboxEntry:
    """A processed message id and the result it produced (re-published on redelivery).

    Keyed by (practice, message id): two practices' partners may pick the same ids."""

    message_id: str
    result: dict[str, Any] | None = None
    practice: str = DEFAULT_PRACTICE
    result_json: str | None = None
    """The result already serialised (the body its publish sends), written as is instead of
    ``result``: the worker serialises each result once. Entries read back carry ``result``."""

    def result_text(self) -> str | None:
        """The result as stored: JSON text, or None."""
        if self.result_json is not None:
            return self.result_json
        return None if self.result is None else to_json(self.result).decode()


@dataclass(frozen=True)
class Seen:
    """What the store holds about one inbound message and its appointment, read in one call
    before deciding on it (one query instead of three on the hot path)."""

    inbox: InboxEntry | None
    """The message's inbox entry: not None means it was processed already."""
    record: AppointmentRecord | None
    parked_head: tuple[int, str] | None
    """The seq and message id of the appointment's oldest parked message, if any."""


@dataclass(frozen=True)
class ParkedMessage:
    """An inbound message of a practice that can't be served now, kept in order until it can.

    ``seq`` (assigned by the store) is the order messages are handed back in;
    an appointment's later messages wait behind its oldest parked one.
    """

    practice: str
    appointment_id: int
    message_id: str
    body: bytes
    reason: str
    reply_to: str | None = None
    correlation_id: str | None = None
    replay: int = 0
    """N for the Nth `appt dead replay` of a message (handed back with that header again)."""
    seq: int = 0


@dataclass(frozen=True)
class DeadLetter:
    """A message dead-lettered to ``appointments.dead``, kept by the store so an operator can
    list, replay or purge it (a queue can't be listed without taking messages off it).

    ``key`` identifies the dead letter across redeliveries of it (the command or event id
    when the body names one, else the AMQP message id or the body's digest, plus ``#replay-N``
    for a replay's death), so collecting it twice stores it once. ``dead_id`` is the store's
    order of arrival, the id operators type. ``status``: ``dead`` until replayed or purged.
    """

    key: str
    reason: str
    reason_class: str
    deliveries: int
    body: bytes
    routing_key: str = ""
    replay: int = 0
    command_id: str | None = None
    type: str | None = None
    appointment_id: int | None = None
    practice: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    status: str = "dead"
    dead_id: int = 0
    dead_at: datetime | None = None


@dataclass(frozen=True)
class DeadLetterQuery:
    """Which dead letters an operator means: by id, or by what they are (all filters AND)."""

    ids: tuple[int, ...] | None = None
    key: str | None = None
    reason: str | None = None
    """A case-insensitive substring of the reason."""
    type: str | None = None
    practice: str | None = None
    status: str | None = "dead"
    """None: whatever their status (replayed and purged ones are kept for the record)."""


@dataclass(frozen=True)
class Collected:
    """What ``add_dead_letter`` found or wrote."""

    letter: DeadLetter
    """As stored (the first copy, if this one was a repeat)."""
    new: bool
    answer: InboxEntry | None
    """The inbox entry of the answer's id as it now stands: what to publish."""


@dataclass(frozen=True)
class Commit:
    """Everything one decision writes, atomically.

    ``appointment.version`` / ``workflow.version`` are the versions *read*;
    the store writes version + 1 and raises ``StaleVersion`` if the stored
    version is not the one read (0 means "must not exist yet").
    """

    appointment: AppointmentRecord | None = None
    workflow: WorkflowRecord | None = None
    logs: list[StateLogRecord] = field(default_factory=list)
    inbox: InboxEntry | None = None
    latest: InboxEntry | None = None
    """A replay's result, written over the entry of the id it replays (inserted or
    replaced), so a later duplicate of the original gets the newest result."""


CommitOutcome = list[StateLogRecord] | StaleVersion
"""One commit of a batch: its log records with ``seq`` assigned, or the ``StaleVersion`` that
refused it alone (its savepoint rolled back, the rest of the batch unaffected)."""


GATHER_TURNS = 8  # at most, before a batch is written (see GroupCommit._gather)


class GroupCommit:
    """Commits handed in together go to the store as one transaction, a savepoint each.

    One transaction (one fsync on SQLite, one round trip of COMMIT on
    PostgreSQL) per batch instead of per message: the commits that arrive
    while a batch is being written wait and form the next one. A stale
    version or a duplicate inbox id fails its own commit only. A failure of
    the transaction itself (its COMMIT, the connection, the disk) fails every
    commit of the batch, so each caller retries as it would have alone. A
    caller returns only once the COMMIT holding its commit succeeded, so
    nothing is acked before it is durable.
    """

    def __init__(self, write_batch: Callable[[Sequence[Commit]], Awaitable[list[CommitOutcome]]]) -> None:
        self._write_batch = write_batch
        self._pending: list[tuple[Commit, asyncio.Future[list[StateLogRecord]]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def commit(self, commit: Commit) -> list[StateLogRecord]:
        future: asyncio.Future[list[StateLogRecord]] = asyncio.get_running_loop().create_future()
        self._pending.append((commit, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The batch holding it is being written: a cancelled caller returns once that
            # settled, so no write of its lands after it has given up.
            await asyncio.wait([future])
            future.exception()  # read, so a failure nobody awaits any more is not reported as lost
            raise

    async def _write_all(self) -> None:
        try:
            while self._pending:
                await self._gather()
                batch, self._pending = self._pending, []
                await self._write(batch)
        finally:
            self._writer = None

    async def _gather(self) -> None:
        """Let the event loop turn while each turn brings more commits (up to ``GATHER_TURNS``).

        A transaction costs ~250 us of CPU here, most of it its COMMIT, whatever
        it holds. Under load every turn of the loop completes more messages, so a
        few turns make a batch several times larger; when idle, the first turn
        brings nothing and the batch goes at once.
        """
        for _ in range(GATHER_TURNS):
            waiting = len(self._pending)
            await asyncio.sleep(0)
            if len(self._pending) == waiting:
                return

    async def _write(self, batch: list[tuple[Commit, asyncio.Future[list[StateLogRecord]]]]) -> None:
        try:
            outcomes = await self._write_batch([commit for commit, _ in batch])
        except BaseException as exc:  # nothing of the batch was written: every commit in it failed
            for _, future in batch:
                future.set_exception(_copy_of(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, StaleVersion):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _copy_of(error: BaseException) -> BaseException:
    """An exception of its own for each waiting caller (one instance raised in several tasks
    would collect all their tracebacks)."""
    if isinstance(error, StaleVersion | StoreUnavailable):
        copy = type(error)(*error.args)
        copy.__cause__ = error
        return copy
    if isinstance(error, asyncio.CancelledError):
        return StoreUnavailable("the store was closed while the commit was being written")
    return error


TERMINAL_WORKFLOW_STATES = frozenset({"completed", "compensated", "rejected"})


class Store(Protocol):
    async def open(self) -> None:
        """Connect and create or migrate the schema."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` if the store does not answer or could not take a commit."""

    async def commit(self, commit: Commit) -> list[StateLogRecord]:
        """Apply atomically; return the log records with ``seq`` assigned.

        Raises ``StaleVersion`` when a version check fails, and then writes nothing.
        Commits made at the same time share one transaction (``GroupCommit``).
        """

    async def commit_batch(self, commits: Sequence[Commit]) -> list[CommitOutcome]:
        """Apply the commits in one transaction, one outcome per commit.

        A commit refused by a version check or a taken inbox id is rolled back
        alone (a savepoint each; its outcome is the ``StaleVersion``). Any other
        failure, the COMMIT's included, rolls back the whole batch and raises.
        """

    # Appointment ids are unique only inside a practice: every keyed read names one.

    async def get_appointment(
        self, appointment_id: int, practice: str = DEFAULT_PRACTICE
    ) -> AppointmentRecord | None: ...

    async def inbox_get(self, message_id: str, practice: str = DEFAULT_PRACTICE) -> InboxEntry | None: ...

    async def seen(self, message_id: str, practice: str, appointment_id: int) -> Seen:
        """The message's inbox entry, its appointment's record and oldest parked message, at once."""

    async def history(
        self, appointment_id: int, *, practice: str = DEFAULT_PRACTICE, after_seq: int = 0, limit: int = 100
    ) -> list[StateLogRecord]:
        """Records of this practice naming this appointment (as ``appointment_id`` or in a
        workflow's detail ``replacement_id``/``original_id``), in ``seq`` order.

        Each call renews the appointment's read lease (``history_reads``): the
        pruner leaves the records of an appointment read within the paging
        grace, so a reader paging through a history never loses its middle."""

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None: ...

    async def active_workflow(self, appointment_id: int, practice: str = DEFAULT_PRACTICE) -> WorkflowRecord | None:
        """The unfinished workflow on this original appointment, if any."""

    async def list_workflows(
        self, *, states: frozenset[str] | None = None, unfinished: bool = False
    ) -> list[WorkflowRecord]: ...

    async def get_watermark(self, name: str) -> str | None: ...

    # Parked messages of practices that can't be served now (see consumer/waiting.py).

    async def park(self, message: ParkedMessage) -> None:
        """Keep a message until its practice can be served; the same id twice is kept once."""

    async def parked_head(self, practice: str, appointment_id: int) -> tuple[int, str] | None:
        """The seq and message id of this appointment's oldest parked message, if any."""

    async def unpark(self, seq: int) -> None:
        """Forget a parked message: it was processed."""

    async def hand_back(self, practice: str, *, not_since: datetime, limit: int) -> list[ParkedMessage]:
        """Up to ``limit`` of the practice's parked messages not handed back since
        ``not_since``, oldest first, marked as handed back now (in one transaction)."""

    async def keep_parked(self, seq: int) -> None:
        """A handed-back message that must wait again: hand it back at the next chance."""

    async def parked_counts(self) -> dict[str, int]:
        """Parked messages per practice."""

    async def prune(self, table: str, cutoff: datetime, limit: int) -> int:
        """Delete up to ``limit`` rows of a ``schema.PRUNABLE`` table older than ``cutoff``,
        oldest first, skipping what its rule keeps; return how many went.

        One short transaction: the pruner calls it batch after batch, so the
        worker's commits interleave instead of waiting behind one long delete."""

    async def prunable(self, table: str, cutoff: datetime) -> int:
        """How many rows ``prune`` would delete with this cutoff (for ``appt prune --dry-run``)."""

    async def oldest(self, table: str) -> datetime | None:
        """The time of the table's oldest row (the oldest one kept, after a prune)."""

    async def compact(self) -> None:
        """Give freed space back where the backend needs asking (SQLite); cheap to repeat."""

    async def add_dead_letter(
        self, letter: DeadLetter, answer: InboxEntry | None = None, latest: InboxEntry | None = None
    ) -> Collected:
        """Keep ``letter`` unless its key is known, in one transaction with ``answer``, its
        inbox entry (also kept only if that id has none). A new letter also writes ``latest``
        (see ``Commit.latest``)."""

    async def dead_letters(self, query: DeadLetterQuery) -> list[DeadLetter]:
        """In arrival order (``dead_id``)."""

    async def settle_dead_letter(self, dead_id: int, status: str) -> bool:
        """Mark a ``dead`` letter ``replayed`` or ``purged``; False if it was not ``dead``."""

    async def count_dead_letters(self) -> dict[str, int]:
        """Letters still ``dead``, by reason class."""

    async def set_watermark(self, name: str, value: str) -> None: ...


async def iter_history(
    store: Store, appointment_id: int, *, practice: str = DEFAULT_PRACTICE, after_seq: int = 0
) -> AsyncIterator[StateLogRecord]:
    """Every record naming this appointment after ``after_seq``, page by page, in seq order."""
    while page := await store.history(appointment_id, practice=practice, after_seq=after_seq, limit=500):
        for record in page:
            yield record
        after_seq = page[-1].seq or after_seq


async def records_of(
    store: Store, appointment_id: int, message_id: str, practice: str = DEFAULT_PRACTICE
) -> list[StateLogRecord]:
    """The state-log records one message (a command or an event id) produced, in seq order."""
    return [
        r
        async for r in iter_history(store, appointment_id, practice=practice)
        if message_id in (r.command_id, r.webhook_id)
    ]

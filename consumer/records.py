"""Translations between the PMS's JSON, the domain's snapshots and the store's records.

Kept in one place so that "what the service believes" is built the same way
by commands, observed events and the reassignment workflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from consumer.messages import (
    DEFAULT_PRACTICE,
    MAX_CLOCK_SKEW,
    CommandResult,
    Outcome,
    Source,
    StateLogRecord,
    parse_time,
    utcnow,
)
from consumer.store.base import AppointmentRecord, Store, WorkflowRecord
from statemachines.appointment import Snapshot, Transition

DELETED = "Deleted"


class Unread(Enum):
    """A record not read yet (as opposed to ``None``: read, and not there)."""

    UNREAD = "unread"


UNREAD = Unread.UNREAD


async def stored_record(
    store: Store, appointment_id: int, practice: str, known: AppointmentRecord | None | Unread
) -> AppointmentRecord | None:
    """``known`` when the caller read it already (the worker reads it with the inbox entry), else the store's."""
    if known is UNREAD:
        return await store.get_appointment(appointment_id, practice)
    return known


def snapshot_from_pms(appointment: dict[str, Any], *, deleted: bool = False) -> Snapshot:
    return Snapshot(
        appointment_id=int(appointment["id"]),
        state=DELETED if deleted else str(appointment.get("state") or "Pending"),
        patient_id=appointment.get("patient_id"),
        notes=appointment.get("notes"),
        updated_at=appointment.get("updated_at"),
    )


def snapshot_from_record(record: AppointmentRecord | None) -> Snapshot | None:
    if record is None:
        return None
    return Snapshot(
        appointment_id=record.appointment_id,
        state=record.state,
        patient_id=record.patient_id,
        notes=record.data.get("notes"),
        updated_at=record.upstream_updated_at,
    )


def is_not_newer(candidate: str | None, stored: str | None) -> bool:
    """True when ``candidate`` is no newer than what is stored (a stale or repeated event).

    Never raises, and never trusts a stored time that can't be compared (no
    zone, unparsable) or lies in the future: such a value, written before
    events' times were checked (messages.check_upstream_time), would
    otherwise make every genuine later event look stale, for good.
    """
    old = _comparable(stored)
    new = _comparable(candidate)
    if old is None or new is None or old > utcnow() + MAX_CLOCK_SKEW:
        return False
    return new <= old


def is_older(candidate: str | None, stored: str | None) -> bool:
    """True when ``candidate`` is strictly older than what is stored (adopting it would go back);
    trusted stored times only, as for ``is_not_newer``."""
    old = _comparable(stored)
    new = _comparable(candidate)
    if old is None or new is None or old > utcnow() + MAX_CLOCK_SKEW:
        return False
    return new < old


def _comparable(value: str | None) -> datetime | None:
    try:
        moment = parse_time(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return moment if moment is not None and moment.tzinfo is not None else None


@dataclass(frozen=True)
class Origin:
    """Who caused a change, in which practice: stamped on every state-log record it produces."""

    source: Source
    practice: str = DEFAULT_PRACTICE
    command_id: str | None = None
    webhook_id: str | None = None
    workflow_id: str | None = None
    correlation_id: str | None = None

    def log(self, transition: Transition) -> StateLogRecord:
        return StateLogRecord(
            practice=self.practice,
            appointment_id=transition.appointment_id,
            machine=transition.machine,  # type: ignore[arg-type]
            from_state=transition.from_state,
            to_state=transition.to_state,
            trigger=transition.trigger,
            source=self.source,
            command_id=self.command_id,
            webhook_id=self.webhook_id,
            workflow_id=self.workflow_id or transition.detail.get("workflow_id"),
            correlation_id=self.correlation_id,
            detail=transition.detail,
        )

    def logs(self, transitions: list[Transition]) -> list[StateLogRecord]:
        return [self.log(t) for t in transitions]


@dataclass
class Decision:
    """What handling one inbound message decided: written in one commit, then published."""

    record: AppointmentRecord | None = None
    logs: list[StateLogRecord] = field(default_factory=list)
    result: CommandResult | None = None
    workflow: WorkflowRecord | None = None
    republish: list[StateLogRecord] = field(default_factory=list)
    """Records committed earlier whose publish may not have happened (a workflow resumed after
    a crash, or a publish that failed mid-saga): published again; observers de-duplicate by seq."""


def new_record(
    previous: AppointmentRecord | None,
    state: str,
    patient_id: int | None,
    upstream: dict[str, Any] | None,
    *,
    practice: str,
) -> AppointmentRecord:
    """The record to write, carrying the version read (the store checks and bumps it)."""
    base_data = previous.data if previous else {}
    data = dict(upstream) if upstream is not None else dict(base_data)
    updated_at = (upstream or {}).get("updated_at") or (previous.upstream_updated_at if previous else None)
    return AppointmentRecord(
        practice=practice,
        appointment_id=(previous.appointment_id if previous else int(data["id"])),
        state=state,
        patient_id=patient_id,
        version=previous.version if previous else 0,
        upstream_updated_at=updated_at,
        data=data,
    )


def result_for(
    command: Any,
    outcome: Outcome,
    *,
    reasons: dict[str, list[str]] | None = None,
    appointment: dict[str, Any] | None = None,
    workflow_id: str | None = None,
) -> CommandResult:
    return CommandResult(
        command_id=command.command_id,
        type=command.type,
        practice=command.practice,
        appointment_id=command.appointment_id,
        outcome=outcome,
        reasons=reasons or {},
        appointment=appointment,
        workflow_id=workflow_id,
        correlation_id=command.correlation_id,
    )

"""Carry out one command against the PMS with the write protocol of the design.

Fresh GET, reconcile (the PMS is the truth), guard, send only the allowed
fields; on a 422 that names another current status, GET again, reconcile and
decide once more. Transient PMS errors propagate: the worker retries them.

Under ``APPT_READ_BEFORE_WRITE=on_conflict`` the fresh GET is skipped when a
stored record can decide: the write goes straight from it, and the protocol
above runs only if it can't (no record, the record says refused or already
done, which a stale record may say wrongly) or the PMS refuses the write.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from consumer.messages import Cancel, Confirm, EditNotes, SetPatient
from consumer.pms.client import PmsClient
from consumer.pms.errors import NotFound, Rejected
from consumer.records import (
    UNREAD,
    Decision,
    Origin,
    Unread,
    new_record,
    result_for,
    snapshot_from_pms,
    snapshot_from_record,
    stored_record,
)
from consumer.store.base import AppointmentRecord, Store
from statemachines.appointment import Appointment, Refused, Write, bound

STATUS_REASON = "The appointment can not be updated as the current status is:"

SimpleCommand = Confirm | Cancel | SetPatient | EditNotes
ReadBeforeWrite = Literal["always", "on_conflict"]


def already_done(appt: Appointment, command: SimpleCommand) -> bool:
    """A command whose goal already holds succeeds without a write (redelivery, or done elsewhere)."""
    match command:
        case Confirm():
            return appt.state == "Confirmed"
        case Cancel():
            return appt.state == "Cancelled"
        case SetPatient(patient_id=patient_id):
            return appt.patient_id == patient_id
        case EditNotes(notes=notes):
            return appt.notes == notes
    return False


def names_other_status(rejected: Rejected) -> bool:
    return any(STATUS_REASON in reason for reasons in rejected.params.values() for reason in reasons)


async def cancellation_reason_id(pms: PmsClient, reason: str) -> int:
    """Map the command's reason text to the PMS's reason id (refused if unknown or archived)."""
    try:
        return await pms.cancellation_reason_id(reason)
    except LookupError:
        archived = any(
            item.archived and item.reason.casefold() == reason.casefold() for item in await pms.cancellation_reasons()
        )
        names = ", ".join(repr(item.reason) for item in await pms.live_cancellation_reasons())
        problem = "is archived" if archived else "is not a known cancellation reason"
        raise Refused({"reason": [f"{problem} (live reasons: {names})"]}) from None


async def plan(pms: PmsClient, appt: Appointment, command: SimpleCommand) -> Write:
    match command:
        case Confirm():
            return appt.plan_confirm()
        case Cancel(reason=reason):
            return appt.plan_cancel(reason, await cancellation_reason_id(pms, reason))
        case SetPatient(patient_id=patient_id):
            return appt.plan_set_patient(patient_id)
        case EditNotes(notes=notes):
            return appt.plan_edit({"notes": notes})
    raise TypeError(f"not a simple command: {command!r}")


async def execute(
    command: SimpleCommand,
    pms: PmsClient,
    store: Store,
    origin: Origin,
    read_before_write: ReadBeforeWrite = "always",
    *,
    stored: AppointmentRecord | None | Unread = UNREAD,
) -> Decision:
    """``stored``: the appointment's record if the caller has read it (else it is read here)."""
    stored = await stored_record(store, command.appointment_id, command.practice, stored)
    if read_before_write == "on_conflict" and stored is not None:
        written = await _write_from_record(command, pms, stored, origin)
        if written is not None:
            return written
    return await _read_then_write(command, pms, stored, origin)


async def _write_from_record(
    command: SimpleCommand, pms: PmsClient, stored: AppointmentRecord, origin: Origin
) -> Decision | None:
    """Write as the stored record says; ``None`` when only a fresh read can decide."""
    with bound(snapshot_from_record(stored), command.appointment_id) as appt:
        if already_done(appt, command):
            return None
        try:
            write = await plan(pms, appt, command)
            answer = await pms.update_appointment(command.appointment_id, write.fields)
        except (Refused, Rejected):
            return None
        except NotFound:
            return _gone(command, stored, origin)
        upstream = answer.model_dump(mode="json")
        logs = origin.logs(appt.applied(write, snapshot_from_pms(upstream)))
        return _decided(command, stored, appt, upstream, logs, "succeeded")


async def _read_then_write(
    command: SimpleCommand, pms: PmsClient, stored: AppointmentRecord | None, origin: Origin
) -> Decision:
    try:
        upstream = (await pms.get_appointment(command.appointment_id)).model_dump(mode="json")
    except NotFound:
        return _gone(command, stored, origin)
    reconcile_origin = dataclasses.replace(origin, source="reconcile")
    with bound(snapshot_from_record(stored), command.appointment_id) as appt:
        logs = reconcile_origin.logs(appt.reconcile(snapshot_from_pms(upstream)))
        for attempt in (1, 2):
            if already_done(appt, command):
                return _decided(command, stored, appt, upstream, logs, "succeeded")
            try:
                write = await plan(pms, appt, command)
            except Refused as refused:
                return _decided(command, stored, appt, upstream, logs, "rejected", refused.reasons)
            try:
                answer = await pms.update_appointment(command.appointment_id, write.fields)
            except Rejected as rejected:
                if attempt == 1 and names_other_status(rejected):
                    upstream = (await pms.get_appointment(command.appointment_id)).model_dump(mode="json")
                    logs += reconcile_origin.logs(appt.reconcile(snapshot_from_pms(upstream)))
                    continue
                return _decided(command, stored, appt, upstream, logs, "rejected", rejected.params)
            upstream = answer.model_dump(mode="json")
            logs += origin.logs(appt.applied(write, snapshot_from_pms(upstream)))
            return _decided(command, stored, appt, upstream, logs, "succeeded")
    raise AssertionError("unreachable: the loop always returns")


def _gone(command: SimpleCommand, stored: AppointmentRecord | None, origin: Origin) -> Decision:
    """The PMS no longer has it: refuse, and if we knew it, record that it was deleted."""
    result = result_for(command, "rejected", reasons={"appointment_id": ["not found in the PMS"]})
    if stored is None:
        return Decision(result=result)
    reconcile_origin = dataclasses.replace(origin, source="reconcile")
    with bound(snapshot_from_record(stored), command.appointment_id) as appt:
        gone = snapshot_from_pms({**stored.data, "id": stored.appointment_id}, deleted=True)
        logs = reconcile_origin.logs(appt.reconcile(gone))
        record = new_record(stored, appt.state, appt.patient_id, None, practice=command.practice)
    return Decision(record=record, logs=logs, result=result)


def _decided(
    command: SimpleCommand,
    stored: AppointmentRecord | None,
    appt: Appointment,
    upstream: dict[str, Any],
    logs: list[Any],
    outcome: Any,
    reasons: dict[str, list[str]] | None = None,
) -> Decision:
    record = new_record(stored, appt.state, appt.patient_id, upstream, practice=command.practice)
    return Decision(
        record=record,
        logs=logs,
        result=result_for(command, outcome, reasons=reasons, appointment=upstream),
    )

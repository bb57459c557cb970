"""The PMS's appointment rules, as data and one pure check.

The texts are the PMS's own 422 ``params`` wording, so a refusal decided here
reads exactly like one the PMS would have sent, and clients handle both alike.
The sandbox emulator implements the same table independently: keep them equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PENDING = "Pending"
CONFIRMED = "Confirmed"
ARRIVED = "Arrived"
IN_SURGERY = "In surgery"
COMPLETED = "Completed"
CANCELLED = "Cancelled"
DID_NOT_ATTEND = "Did not attend"
DELETED = "Deleted"
"""Observed only: the PMS deleted the appointment; nothing can be written to it."""
NEW = "New"
"""Our pseudo-state for an appointment never read from the PMS."""

STATES: tuple[str, ...] = (
    PENDING,
    CONFIRMED,
    ARRIVED,
    IN_SURGERY,
    COMPLETED,
    CANCELLED,
    DID_NOT_ATTEND,
)
"""The values the PMS accepts for ``state``."""

LEGAL_MOVES: dict[str, frozenset[str]] = {
    PENDING: frozenset({CONFIRMED, ARRIVED, CANCELLED, DID_NOT_ATTEND}),
    CONFIRMED: frozenset({ARRIVED, CANCELLED, DID_NOT_ATTEND}),
    ARRIVED: frozenset({IN_SURGERY, COMPLETED}),
    IN_SURGERY: frozenset({COMPLETED}),
    COMPLETED: frozenset(),
    CANCELLED: frozenset(),
    DID_NOT_ATTEND: frozenset(),
}

EDITABLE_FIELDS = frozenset(
    {
        "start_time",
        "finish_time",
        "duration",
        "reason",
        "state",
        "notes",
        "practitioner_id",
        "patient_id",
        "metadata",
        "appointment_cancellation_reason_id",
    }
)

# The cancellation reason id travels with a state change, so it is writable
# wherever ``state`` is (otherwise a Confirmed appointment could not be cancelled).
_STATUS_FIELDS = frozenset({"state", "notes", "appointment_cancellation_reason_id"})

WRITABLE_FIELDS: dict[str, frozenset[str]] = {
    PENDING: EDITABLE_FIELDS,
    CONFIRMED: _STATUS_FIELDS,
    # The PMS lets a patient be attached to a walk-in once it has arrived.
    ARRIVED: _STATUS_FIELDS | {"patient_id"},
    IN_SURGERY: _STATUS_FIELDS | {"patient_id"},
}
"""Fields a write may carry in each state; states not listed accept no write."""

CANNOT_CHANGE_PATIENT = "can not change patients"
SAME_REQUEST_AS_PATIENT = "can not be updated in the same request as patient_id"
BLANK = "can't be blank"
NOT_PERMITTED = "is not a permitted attribute"
NOT_IN_LIST = "is not included in the list"
REASSIGN_HINT = "use reassign to move this slot to another patient"

Reasons = dict[str, list[str]]


def status_reason(state: str) -> str:
    return f"The appointment can not be updated as the current status is: {state}"


def is_legal_observation(old: str, new: str) -> bool:
    """Whether an observed move could have happened through the PMS's own rules.

    First sight and deletion are always legal; staying put is legal (another
    field changed).
    """
    return old in (NEW, new) or new == DELETED or new in LEGAL_MOVES.get(old, frozenset())


def write_reasons(state: str, patient_id: int | None, fields: Mapping[str, Any]) -> Reasons:
    """Every reason the PMS would give for refusing ``fields`` written now.

    One reason per field, the PMS's most specific first, and all fields at
    once, so the caller can fix everything in one go.
    """
    reasons: Reasons = {}
    for name, value in fields.items():
        reason = _field_reason(state, patient_id, fields, name, value)
        if reason is not None:
            reasons[name] = [reason]
    return reasons


def _field_reason(state: str, patient_id: int | None, fields: Mapping[str, Any], name: str, value: Any) -> str | None:
    if name not in EDITABLE_FIELDS:
        return NOT_PERMITTED
    if name == "patient_id" and patient_id is not None and value != patient_id:
        return CANNOT_CHANGE_PATIENT
    if name == "state":
        return _state_reason(state, value, with_patient="patient_id" in fields)
    if name not in WRITABLE_FIELDS.get(state, frozenset()):
        return status_reason(state)
    return None


def _state_reason(current: str, value: Any, *, with_patient: bool) -> str | None:
    if value not in STATES:
        return NOT_IN_LIST
    if value not in LEGAL_MOVES.get(current, frozenset()):
        return status_reason(current)
    if with_patient:
        return SAME_REQUEST_AS_PATIENT
    return None


def merge(*parts: Reasons) -> Reasons:
    """Join reason dicts, keeping every text (a field may be refused for two reasons)."""
    merged: Reasons = {}
    for part in parts:
        for name, texts in part.items():
            merged.setdefault(name, []).extend(texts)
    return merged

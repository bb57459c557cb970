"""The PMS's write rules, as the real one words them.

Kept pure (dicts in, reasons out) so the emulator's behaviour can be read in
one place. The reason texts are compared verbatim by the state machine's
tests, so they are constants, never built ad hoc elsewhere.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

PENDING = "Pending"
CONFIRMED = "Confirmed"
ARRIVED = "Arrived"
IN_SURGERY = "In surgery"
COMPLETED = "Completed"
CANCELLED = "Cancelled"
DID_NOT_ATTEND = "Did not attend"

STATES = (PENDING, CONFIRMED, ARRIVED, IN_SURGERY, COMPLETED, CANCELLED, DID_NOT_ATTEND)
LEGAL_MOVES: dict[str, frozenset[str]] = {
    PENDING: frozenset({CONFIRMED, ARRIVED, CANCELLED, DID_NOT_ATTEND}),
    CONFIRMED: frozenset({ARRIVED, CANCELLED, DID_NOT_ATTEND}),
    ARRIVED: frozenset({IN_SURGERY, COMPLETED}),
    IN_SURGERY: frozenset({COMPLETED}),
    COMPLETED: frozenset(),
    CANCELLED: frozenset(),
    DID_NOT_ATTEND: frozenset(),
}
FINAL_STATES = frozenset({COMPLETED, CANCELLED, DID_NOT_ATTEND})
UNDELETABLE_STATES = frozenset({ARRIVED, IN_SURGERY, COMPLETED})
# Once an appointment leaves Pending it is "locked": only these may change.
# The cancellation reason travels with a move to Cancelled, so it is allowed too.
LOCKED_WRITABLE = frozenset({"state", "notes", "appointment_cancellation_reason_id"})

# The live PMS lists each reason with a type, and keeps retired ones as "archived"
# (listed, but refused for new cancellations).
CANCELLATION_REASONS: dict[int, dict[str, Any]] = {
    1: {"reason": "Booked in error", "reason_type": "Practice", "archived": False},
    2: {"reason": "Patient cancelled", "reason_type": "Patient", "archived": False},
    3: {"reason": "Practice cancelled", "reason_type": "Practice", "archived": False},
    4: {"reason": "Other", "reason_type": "Other", "archived": False},
    5: {"reason": "Snow", "reason_type": "Practice", "archived": True},
}
HIDDEN_UNLESS_CANCELLED = frozenset({"Cancelled", "Did not attend"})
# The practice's local time zone: the live PMS answers times with its offset and milliseconds.
PRACTICE_TZ = ZoneInfo("Europe/London")
MAX_METADATA_PAIRS = 3
MAX_METADATA_KEY = 40
MAX_METADATA_VALUE = 500

CANT_CHANGE_PATIENTS = "can not change patients"
SAME_REQUEST_AS_PATIENT = "can not be updated in the same request as patient_id"
BLANK = "can't be blank"
INVALID = "is invalid"
NOT_PERMITTED = "is not a permitted attribute"
NOT_IN_LIST = "is not included in the list"
FINISH_BEFORE_START = "must be after start_time"
ARCHIVED = "is archived"
TOO_MANY_PAIRS = f"can have at most {MAX_METADATA_PAIRS} key/value pairs"
KEY_TOO_LONG = f"keys can be at most {MAX_METADATA_KEY} characters"
VALUE_TOO_LONG = f"values can be at most {MAX_METADATA_VALUE} characters"


def status_message(state: str) -> str:
    return f"The appointment can not be updated as the current status is: {state}"


def delete_refused_message(state: str) -> str:
    return f"can not delete an appointment in state {state}"


def stamp_field(state: str) -> str:
    """The ``*_at`` field stamped when an appointment enters ``state``."""
    return state.lower().replace(" ", "_") + "_at"


Reasons = dict[str, list[str]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time with an offset (or Z), as an aware UTC datetime; None if not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(UTC)


def format_time(value: datetime) -> str:
    """As the live PMS writes times: the practice's local offset, milliseconds (``...02.776+01:00``)."""
    return value.astimezone(PRACTICE_TZ).isoformat(timespec="milliseconds")


def next_millisecond(now: datetime, last: datetime) -> datetime:
    """``now`` to the millisecond, but strictly after ``last``: stamps must never tie or go back."""
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    return max(now, last + timedelta(milliseconds=1))


_TYPE_CHECKS: dict[str, Any] = {
    "patient_id": lambda v: v is None or _is_int(v),
    "practitioner_id": _is_int,
    "start_time": lambda v: parse_time(v) is not None,
    "finish_time": lambda v: parse_time(v) is not None,
    "duration": lambda v: _is_int(v) and v > 0,
    "reason": lambda v: v is None or isinstance(v, str),
    "state": lambda v: isinstance(v, str),
    "notes": lambda v: v is None or isinstance(v, str),
    "metadata": lambda v: v is None or isinstance(v, dict),
    "appointment_cancellation_reason_id": lambda v: v is None or _is_int(v),
    "booked_via_api": lambda v: isinstance(v, bool),
}
WRITABLE_FIELDS = frozenset(_TYPE_CHECKS)


def normalise(fields: dict[str, Any]) -> dict[str, Any]:
    """Times in one canonical UTC form, so "changed?" compares instants, not spellings."""
    out = dict(fields)
    for key in ("start_time", "finish_time"):
        parsed = parse_time(out.get(key))
        if parsed is not None:
            out[key] = format_time(parsed)
    return out


def _add(reasons: Reasons, field: str, reason: str) -> None:
    reasons.setdefault(field, []).append(reason)


def _metadata_reasons(metadata: dict[str, Any], reasons: Reasons) -> None:
    if len(metadata) > MAX_METADATA_PAIRS:
        _add(reasons, "metadata", TOO_MANY_PAIRS)
    if any(len(str(key)) > MAX_METADATA_KEY for key in metadata):
        _add(reasons, "metadata", KEY_TOO_LONG)
    if any(len(str(value)) > MAX_METADATA_VALUE for value in metadata.values()):
        _add(reasons, "metadata", VALUE_TOO_LONG)


def _shape_reasons(fields: dict[str, Any]) -> Reasons:
    """Unknown fields, wrong types, and a state the PMS does not know."""
    reasons: Reasons = {}
    for key, value in fields.items():
        if key not in WRITABLE_FIELDS:
            _add(reasons, key, NOT_PERMITTED)
        elif not _TYPE_CHECKS[key](value):
            _add(reasons, key, INVALID)
        elif key == "state" and value not in STATES:
            _add(reasons, key, NOT_IN_LIST)
        elif key == "metadata" and value:
            _metadata_reasons(value, reasons)
    return reasons


def _cross_field_reasons(merged: dict[str, Any], valid: dict[str, Any], reasons: Reasons) -> None:
    """Rules spanning fields, checked on the record as it would be after the write."""
    if valid.get("state") == CANCELLED and "state" not in reasons:
        _cancellation_reasons(merged, reasons)
    if "start_time" not in reasons and "finish_time" not in reasons:
        _time_order(merged, reasons)


def _cancellation_reasons(merged: dict[str, Any], reasons: Reasons) -> None:
    reason_id = merged.get("appointment_cancellation_reason_id")
    if reason_id is None:
        _add(reasons, "appointment_cancellation_reason_id", BLANK)
    elif reason_id not in CANCELLATION_REASONS:
        _add(reasons, "appointment_cancellation_reason_id", INVALID)
    elif CANCELLATION_REASONS[reason_id]["archived"]:
        _add(reasons, "appointment_cancellation_reason_id", ARCHIVED)


def _time_order(merged: dict[str, Any], reasons: Reasons) -> None:
    start, finish = parse_time(merged.get("start_time")), parse_time(merged.get("finish_time"))
    if start is not None and finish is not None and finish <= start:
        _add(reasons, "finish_time", FINISH_BEFORE_START)


def check_create(fields: dict[str, Any]) -> Reasons:
    """Reasons a POST is refused (empty: accepted)."""
    reasons = _shape_reasons(fields)
    for key in ("start_time", "finish_time", "practitioner_id"):
        if fields.get(key) is None:
            reasons[key] = [BLANK]
    valid = {k: v for k, v in normalise(fields).items() if k not in reasons}
    _cross_field_reasons({"state": PENDING, **valid}, valid, reasons)
    return reasons


def check_update(current: dict[str, Any], fields: dict[str, Any]) -> Reasons:
    """Reasons a PUT of ``fields`` onto ``current`` is refused (empty: accepted).

    All violations are listed at once, as the real PMS does. A PUT whose
    ``state`` is the current state is a move not in the table, hence refused
    (Confirmed -> Confirmed names the current status).
    """
    reasons = _shape_reasons(fields)
    valid = {k: v for k, v in normalise(fields).items() if k not in reasons}
    state = current["state"]
    if state in FINAL_STATES:
        for key in valid:
            _add(reasons, key, status_message(state))
        return reasons
    stored_patient = current.get("patient_id")
    patient_changes = "patient_id" in valid and valid["patient_id"] != stored_patient
    if patient_changes and stored_patient is not None:
        _add(reasons, "patient_id", CANT_CHANGE_PATIENTS)
    if state != PENDING:
        for key, value in valid.items():
            if key in LOCKED_WRITABLE or value == current.get(key):
                continue
            if key == "patient_id" and stored_patient is not None:
                continue  # already named by "can not change patients"
            _add(reasons, key, status_message(state))
    if "state" in valid:
        if valid["state"] not in LEGAL_MOVES[state]:
            _add(reasons, "state", status_message(state))
        if patient_changes:
            _add(reasons, "state", SAME_REQUEST_AS_PATIENT)
    _cross_field_reasons({**current, **valid}, valid, reasons)
    return reasons

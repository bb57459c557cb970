"""The appointment lifecycle: one shared machine, a light model per message.

The machine mirrors the PMS, it does not drive it. ``plan_*`` decide what may
be written (refusing with the PMS's own reasons before a request is made),
``applied`` records a write the PMS accepted, and ``reconcile`` adopts what
the PMS reports, however surprising: the PMS is the source of truth, so an
observed move is logged (and flagged when illegal), never fought.

Pure and synchronous: no IO here, and no callbacks that could fail after a
state change (``transitions`` has no rollback).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from transitions import Machine

from statemachines import rules
from statemachines.rules import (
    CANCELLED,
    CONFIRMED,
    DELETED,
    LEGAL_MOVES,
    NEW,
    PENDING,
    STATES,
    Reasons,
)

__all__ = [
    "LEGAL_MOVES",
    "MACHINE",
    "MACHINE_STATES",
    "STATES",
    "Appointment",
    "Refused",
    "Snapshot",
    "Transition",
    "Write",
    "bound",
    "build_machine",
    "machine_definition",
    "unbind",
]

MACHINE_STATES: tuple[str, ...] = (NEW, *STATES, DELETED)
"""Every state a model can be in; the initial pseudo-state first."""

_SET_PATIENT_FROM = tuple(state for state, fields in rules.WRITABLE_FIELDS.items() if "patient_id" in fields)
_EDIT_FROM = tuple(rules.WRITABLE_FIELDS)


class Refused(Exception):
    """A write the PMS would refuse, with its reasons shaped like its 422 ``params``."""

    def __init__(self, reasons: Reasons) -> None:
        self.reasons = reasons
        super().__init__("; ".join(f"{name}: {', '.join(texts)}" for name, texts in reasons.items()))


@dataclass(frozen=True)
class Snapshot:
    """What the PMS says (or the store last adopted) about one appointment."""

    appointment_id: int
    state: str
    patient_id: int | None
    notes: str | None = None
    updated_at: str | None = None


@dataclass(frozen=True)
class Transition:
    """One state-log record as the domain knows it; the adapter adds source, ids and time."""

    machine: str
    appointment_id: int
    from_state: str | None
    to_state: str
    trigger: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Write:
    """A write the guards allow: ``fields`` is exactly the PUT body.

    ``detail`` is what the log should remember about the command but the PMS
    has no field for (e.g. the cancellation reason text). A Write with no
    fields needs no request: what was asked already holds.
    """

    trigger: str
    fields: dict[str, Any]
    detail: dict[str, Any] = field(default_factory=dict)


def _moves_to(dest: str, target: str | None = None) -> bool:
    """Routes ``edit``/``observe`` to the transition whose destination was asked for."""
    return target == dest


def _keeps_state(target: str | None = None) -> bool:
    return target is None


def machine_definition() -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """States (initial first) and the transition table, as given to ``Machine``.

    ``dest`` None is an internal transition (data changes, state stays);
    ``source`` "*" is any state.
    """
    moves = [(source, dest) for source, dests in LEGAL_MOVES.items() for dest in sorted(dests)]
    table: list[dict[str, Any]] = [
        {"trigger": "confirm", "source": PENDING, "dest": CONFIRMED},
        {"trigger": "cancel", "source": [PENDING, CONFIRMED], "dest": CANCELLED},
        {"trigger": "set_patient", "source": list(_SET_PATIENT_FROM), "dest": None},
        {"trigger": "edit", "source": list(_EDIT_FROM), "dest": None, "conditions": [_keeps_state]},
        *(
            {
                "trigger": "edit",
                "source": source,
                "dest": dest,
                "conditions": [partial(_moves_to, dest)],
            }
            for source, dest in moves
        ),
        *(
            {
                "trigger": "observe",
                "source": "*",
                "dest": dest,
                "conditions": [partial(_moves_to, dest)],
            }
            for dest in MACHINE_STATES
            if dest != NEW
        ),
    ]
    return MACHINE_STATES, table


class SharedMachine(Machine):
    """A machine shared by many short-lived models, binding each only what it uses.

    ``Machine.add_model`` also gives every model an ``is_<state>`` per state and a
    method per event, and looks up ``on_enter_<state>``/``on_exit_<state>`` on it for
    each state: most of a bind's cost, for methods nothing here calls (callers go
    through the typed methods of ``Appointment``, which use ``trigger`` and
    ``may_trigger``, still bound by ``add_model``). Transitions, conditions and states
    are the machine's own, unchanged.
    """

    def _add_model_to_state(self, state: Any, model: Any) -> None:
        """No ``is_<state>`` convenience, and no ``on_enter``/``on_exit`` methods to find."""

    def _add_trigger_to_model(self, trigger: str, model: Any) -> None:
        """No per-event method: events are fired by name through ``trigger``."""


def build_machine() -> Machine:
    """A machine with no models: built once at import, shared by every message."""
    states, table = machine_definition()
    return SharedMachine(
        model=None,
        states=list(states),
        transitions=table,
        initial=NEW,
        auto_transitions=False,
        send_event=False,
        name="appointment",
    )


MACHINE = build_machine()


class Appointment:
    """One appointment, bound to a machine only for the duration of a message.

    The machine adds the untyped ``trigger``/``may_trigger`` (only those: see
    ``SharedMachine``); the typed methods below are the only way callers fire them.
    """

    state: str
    trigger: Callable[..., bool]
    may_trigger: Callable[..., bool]

    def __init__(self, appointment_id: int, snapshot: Snapshot | None) -> None:
        self.appointment_id = appointment_id
        self.patient_id: int | None = snapshot.patient_id if snapshot else None
        self.notes: str | None = snapshot.notes if snapshot else None
        self.updated_at: str | None = snapshot.updated_at if snapshot else None

    def plan_confirm(self) -> Write:
        return self._planned("confirm", {"state": CONFIRMED})

    def plan_cancel(self, reason: str, reason_id: int | None = None) -> Write:
        fields: dict[str, Any] = {"state": CANCELLED}
        if reason_id is not None:
            fields["appointment_cancellation_reason_id"] = reason_id
        blank: Reasons = {} if reason.strip() else {"appointment_cancellation_reason_id": [rules.BLANK]}
        self._refuse_if(rules.merge(self._reasons(fields), blank))
        return Write("cancel", fields, {"reason": reason.strip()})

    def plan_set_patient(self, patient_id: int) -> Write:
        if patient_id == self.patient_id:
            return Write("set_patient", {})
        reasons = self._reasons({"patient_id": patient_id})
        if self.patient_id is not None:
            reasons["hint"] = [rules.REASSIGN_HINT]
        self._refuse_if(reasons)
        return Write("set_patient", {"patient_id": patient_id})

    def plan_edit(self, fields: dict[str, Any]) -> Write:
        return self._planned("edit", fields)

    def applied(self, write: Write, result: Snapshot) -> list[Transition]:
        """Record a write the PMS accepted, then adopt what it answered.

        If the PMS answered something other than what the write implies
        (someone else changed it in between), the extra reconcile record
        explains the drift.
        """
        records = []
        target = write.fields.get("state")
        if write.fields and self.may_trigger(write.trigger, target=target):
            before = self.state
            self.trigger(write.trigger, target=target)
            self.patient_id = write.fields.get("patient_id", self.patient_id)
            self.notes = write.fields.get("notes", self.notes)
            detail = {"fields": dict(write.fields), **write.detail}
            records.append(self._record(before, write.trigger, detail))
        return records + self.reconcile(result)

    def reconcile(self, upstream: Snapshot) -> list[Transition]:
        """Adopt what the PMS says; one record when anything changed, none otherwise.

        An illegal move or a patient swap is adopted all the same and flagged
        as an anomaly. A state the PMS should not have (not in our table) is
        flagged and the known state kept, so the model stays usable. Never raises.
        """
        drift = self._drift(upstream)
        if not drift:
            self.updated_at = upstream.updated_at or self.updated_at
            return []
        before = self.state
        known = upstream.state in MACHINE_STATES and upstream.state != NEW
        legal = known and rules.is_legal_observation(before, upstream.state)
        patient_swapped = self.patient_id is not None and upstream.patient_id != self.patient_id
        if known:
            self.trigger("observe", target=upstream.state)
        self.patient_id = upstream.patient_id
        self.notes = upstream.notes
        self.updated_at = upstream.updated_at or self.updated_at
        detail: dict[str, Any] = {
            "legal": legal,
            "anomaly": not legal or patient_swapped,
            "drift": drift,
        }
        if not known:
            detail["unknown_state"] = upstream.state
        return [self._record(before, "reconcile", detail)]

    def _drift(self, upstream: Snapshot) -> dict[str, list[Any]]:
        old_state = None if self.state == NEW else self.state
        pairs = {
            "state": (old_state, upstream.state),
            "patient_id": (self.patient_id, upstream.patient_id),
            "notes": (self.notes, upstream.notes),
        }
        return {name: [old, new] for name, (old, new) in pairs.items() if old != new}

    def _record(self, before: str, trigger: str, detail: dict[str, Any]) -> Transition:
        return Transition(
            machine="appointment",
            appointment_id=self.appointment_id,
            from_state=None if before == NEW else before,
            to_state=self.state,
            trigger=trigger,
            detail=detail,
        )

    def _planned(self, trigger: str, fields: dict[str, Any]) -> Write:
        self._refuse_if(self._reasons(fields))
        return Write(trigger, dict(fields))

    def _reasons(self, fields: dict[str, Any]) -> Reasons:
        return rules.write_reasons(self.state, self.patient_id, fields)

    @staticmethod
    def _refuse_if(reasons: Reasons) -> None:
        if reasons:
            raise Refused(reasons)


@contextmanager
def bound(snapshot: Snapshot | None, appointment_id: int) -> Iterator[Appointment]:
    """A model bound to the shared machine for one message, always unbound after.

    ``snapshot`` None means never seen: the model starts in "New". Unbinding
    also drops the per-model methods the machine attached, which point back at
    the model, so a finished model is freed at once rather than by the cycle
    collector.
    """
    if snapshot is not None and snapshot.appointment_id != appointment_id:
        raise ValueError(f"snapshot is for {snapshot.appointment_id}, not {appointment_id}")
    model = Appointment(appointment_id, snapshot)
    MACHINE.add_model(model, initial=snapshot.state if snapshot else NEW)
    try:
        yield model
    finally:
        unbind(MACHINE, model)


def unbind(machine: Machine, model: object) -> None:
    """Remove ``model`` from ``machine`` and drop the methods the machine attached to it."""
    machine.remove_model(model)
    attached = [name for name, value in vars(model).items() if isinstance(value, partial)]
    for name in attached:
        delattr(model, name)

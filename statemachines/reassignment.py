"""The reassignment saga: move a slot to another patient the only way the PMS allows.

Book a replacement for the new patient, cancel the original "Booked in
error", done; if the original can't be cancelled, undo the replacement. This
module only decides: it says which step the adapter must run next and records
the outcome the adapter reports. A step reported out of order raises
``InvalidStep``: a saga that silently ignores an outcome loses track of a
live appointment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from transitions import Machine, MachineError

from statemachines.appointment import Transition, unbind

REQUESTED = "requested"
REPLACEMENT_CREATED = "replacement_created"
ORIGINAL_CANCELLED = "original_cancelled"
COMPLETED = "completed"
COMPENSATING = "compensating"
COMPENSATED = "compensated"
COMPENSATION_FAILED = "compensation_failed"

STATES: tuple[str, ...] = (
    REQUESTED,
    REPLACEMENT_CREATED,
    ORIGINAL_CANCELLED,
    COMPLETED,
    COMPENSATING,
    COMPENSATED,
    COMPENSATION_FAILED,
)
TERMINAL = frozenset({COMPLETED, COMPENSATED})
CANCEL_REASON = "Booked in error"


class Step(StrEnum):
    """What the adapter must do next."""

    CREATE_REPLACEMENT = "create_replacement"
    CANCEL_ORIGINAL = "cancel_original"
    FINISH = "finish"
    REMOVE_REPLACEMENT = "remove_replacement"
    NONE = "none"
    """Terminal, or parked in compensation_failed until someone retries."""


NEXT_STEP: dict[str, Step] = {
    REQUESTED: Step.CREATE_REPLACEMENT,
    REPLACEMENT_CREATED: Step.CANCEL_ORIGINAL,
    ORIGINAL_CANCELLED: Step.FINISH,
    COMPENSATING: Step.REMOVE_REPLACEMENT,
    COMPENSATION_FAILED: Step.NONE,
    COMPLETED: Step.NONE,
    COMPENSATED: Step.NONE,
}

COMPENSATIONS: dict[str, Step] = {REPLACEMENT_CREATED: Step.REMOVE_REPLACEMENT}
"""Which compensation undoes reaching a state: the only one with a remote effect to undo."""

TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "replacement_booked", "source": REQUESTED, "dest": REPLACEMENT_CREATED},
    {"trigger": "original_cancelled", "source": REPLACEMENT_CREATED, "dest": ORIGINAL_CANCELLED},
    {"trigger": "finish", "source": ORIGINAL_CANCELLED, "dest": COMPLETED},
    # Nothing was booked yet, so there is nothing to undo.
    {"trigger": "cancel_failed", "source": REQUESTED, "dest": COMPENSATED},
    {"trigger": "cancel_failed", "source": REPLACEMENT_CREATED, "dest": COMPENSATING},
    # Someone else cancelled, deleted or moved the replacement before the original was
    # cancelled: it no longer holds the slot, so the original is kept, and what is left of the
    # replacement is theirs (nothing of the saga's own remains to undo).
    {"trigger": "replacement_changed", "source": REPLACEMENT_CREATED, "dest": COMPENSATED},
    {"trigger": "replacement_removed", "source": COMPENSATING, "dest": COMPENSATED},
    {"trigger": "compensation_error", "source": COMPENSATING, "dest": COMPENSATION_FAILED},
    {"trigger": "retry", "source": COMPENSATION_FAILED, "dest": COMPENSATING},
]


class InvalidStep(Exception):
    """An outcome reported that cannot happen in the saga's current state."""


def machine_definition() -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """States (initial first) and the transition table, as given to ``Machine``."""
    return STATES, TRANSITIONS


MACHINE = Machine(
    model=None,
    states=list(STATES),
    transitions=TRANSITIONS,
    initial=REQUESTED,
    auto_transitions=False,
    name="reassignment",
)


class _SagaState:
    """What the shared machine manages: only the state.

    Kept apart from ``Reassignment`` because its typed methods carry the
    event names, which the machine would otherwise try to attach to it.
    """

    state: str
    trigger: Callable[..., bool]


class Reassignment:
    """One reassignment workflow, bound to the shared machine for one step."""

    def __init__(
        self,
        workflow_id: str,
        appointment_id: int,
        new_patient_id: int,
        replacement_id: int | None,
        last_error: str | None,
        core: _SagaState,
    ) -> None:
        self.workflow_id = workflow_id
        self.appointment_id = appointment_id
        self.new_patient_id = new_patient_id
        self.replacement_id = replacement_id
        self.last_error = last_error
        self._core = core

    @property
    def state(self) -> str:
        return self._core.state

    def next_step(self) -> Step:
        return NEXT_STEP[self.state]

    def replacement_booked(self, replacement_id: int) -> Transition:
        return self._fire("replacement_booked", replacement_id=replacement_id)

    def original_cancelled(self) -> Transition:
        return self._fire("original_cancelled")

    def finish(self) -> Transition:
        return self._fire("finish")

    def cancel_failed(self, reason: str) -> Transition:
        return self._fire("cancel_failed", reason=reason)

    def replacement_changed(self, reason: str) -> Transition:
        return self._fire("replacement_changed", reason=reason)

    def replacement_removed(self) -> Transition:
        return self._fire("replacement_removed")

    def compensation_error(self, reason: str) -> Transition:
        return self._fire("compensation_error", reason=reason)

    def retry(self) -> Transition:
        return self._fire("retry")

    def _fire(self, trigger: str, *, replacement_id: int | None = None, reason: str | None = None) -> Transition:
        """Move the machine, then record; an invalid outcome raises before anything changes."""
        before = self.state
        try:
            self._core.trigger(trigger)
        except MachineError:
            raise InvalidStep(
                f"{trigger} is not a valid outcome in state {before} (workflow {self.workflow_id})"
            ) from None
        if replacement_id is not None:
            self.replacement_id = replacement_id
        detail: dict[str, Any] = {
            "workflow_id": self.workflow_id,
            "original_id": self.appointment_id,
            "replacement_id": self.replacement_id,
            "new_patient_id": self.new_patient_id,
        }
        if reason is not None:
            self.last_error = reason
            detail["reason"] = reason
        return Transition(
            machine="reassignment",
            appointment_id=self.appointment_id,
            from_state=before,
            to_state=self.state,
            trigger=trigger,
            detail=detail,
        )


@contextmanager
def bound_reassignment(
    workflow_id: str,
    appointment_id: int,
    new_patient_id: int,
    state: str = REQUESTED,
    replacement_id: int | None = None,
    last_error: str | None = None,
) -> Iterator[Reassignment]:
    """A workflow bound to the shared machine for one step, always unbound after."""
    core = _SagaState()
    MACHINE.add_model(core, initial=state)
    try:
        yield Reassignment(workflow_id, appointment_id, new_patient_id, replacement_id, last_error, core)
    finally:
        unbind(MACHINE, core)


@dataclass(frozen=True)
class Slot:
    """Where and when an appointment is: what the replacement must share with the original.

    Times are compared as instants: the PMS may answer the same time with another offset.
    """

    practitioner_id: int | None
    start: datetime | None
    finish: datetime | None

    def __str__(self) -> str:
        start = self.start.isoformat() if self.start else "?"
        finish = self.finish.isoformat() if self.finish else "?"
        return f"{start}..{finish} (practitioner {self.practitioner_id})"


def slot_of(appointment: Mapping[str, Any]) -> Slot:
    return Slot(
        appointment.get("practitioner_id"),
        _instant(appointment.get("start_time")),
        _instant(appointment.get("finish_time")),
    )


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def link_marker(workflow_id: str, original_id: int) -> dict[str, Any]:
    """Metadata on the replacement: how a resumed workflow finds what it already booked."""
    return {"reassigned_from": original_id, "reassignment_workflow": workflow_id}


def replacement_note(original_id: int, workflow_id: str) -> str:
    return f"Rebooked from appointment {original_id}, new patient (reassignment {workflow_id})."


def original_cancel_note(replacement_id: int, workflow_id: str) -> str:
    return f"{CANCEL_REASON}: moved to appointment {replacement_id} (reassignment {workflow_id})."

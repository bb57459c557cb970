"""The saga says what to do next, records outcomes, and refuses outcomes out of order."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from statemachines.appointment import Transition
from statemachines.reassignment import (
    CANCEL_REASON,
    COMPENSATIONS,
    MACHINE,
    STATES,
    TERMINAL,
    InvalidStep,
    Reassignment,
    Step,
    bound_reassignment,
    link_marker,
    original_cancel_note,
    replacement_note,
    slot_of,
)

WORKFLOW = "wf-1"
ORIGINAL = 757579675
NEW_PATIENT = 1014
REPLACEMENT = 757579999


def moves(records: list[Transition]) -> list[tuple[str | None, str, str]]:
    return [(r.from_state, r.trigger, r.to_state) for r in records]


def test_happy_path_books_cancels_and_finishes() -> None:
    with bound_reassignment(WORKFLOW, ORIGINAL, NEW_PATIENT) as saga:
        steps = [saga.next_step()]
        records = [saga.replacement_booked(REPLACEMENT)]
        steps.append(saga.next_step())
        records.append(saga.original_cancelled())
        steps.append(saga.next_step())
        records.append(saga.finish())
        steps.append(saga.next_step())
        assert saga.state == "completed"
        assert saga.replacement_id == REPLACEMENT
    assert steps == [Step.CREATE_REPLACEMENT, Step.CANCEL_ORIGINAL, Step.FINISH, Step.NONE]
    assert moves(records) == [
        ("requested", "replacement_booked", "replacement_created"),
        ("replacement_created", "original_cancelled", "original_cancelled"),
        ("original_cancelled", "finish", "completed"),
    ]


def test_records_name_the_original_the_workflow_and_the_replacement() -> None:
    with bound_reassignment(WORKFLOW, ORIGINAL, NEW_PATIENT) as saga:
        record = saga.replacement_booked(REPLACEMENT)
    assert record.machine == "reassignment"
    assert record.appointment_id == ORIGINAL
    assert record.detail == {
        "workflow_id": WORKFLOW,
        "original_id": ORIGINAL,
        "replacement_id": REPLACEMENT,
        "new_patient_id": NEW_PATIENT,
    }


def test_cancel_failing_after_booking_compensates_by_removing_the_replacement() -> None:
    with bound_reassignment(
        WORKFLOW, ORIGINAL, NEW_PATIENT, state="replacement_created", replacement_id=REPLACEMENT
    ) as saga:
        failed = saga.cancel_failed("current status is: Arrived")
        assert saga.next_step() == Step.REMOVE_REPLACEMENT
        removed = saga.replacement_removed()
        assert saga.next_step() == Step.NONE
        assert saga.last_error == "current status is: Arrived"
    assert moves([failed, removed]) == [
        ("replacement_created", "cancel_failed", "compensating"),
        ("compensating", "replacement_removed", "compensated"),
    ]
    assert failed.detail["reason"] == "current status is: Arrived"


def test_cancel_failing_before_anything_was_booked_has_nothing_to_undo() -> None:
    with bound_reassignment(WORKFLOW, ORIGINAL, NEW_PATIENT) as saga:
        record = saga.cancel_failed("original is Arrived")
        assert saga.state == "compensated"
        assert saga.next_step() == Step.NONE
    assert record.detail["replacement_id"] is None


def test_failing_compensation_parks_and_retry_resumes_it() -> None:
    with bound_reassignment(WORKFLOW, ORIGINAL, NEW_PATIENT, state="compensating", replacement_id=REPLACEMENT) as saga:
        parked = saga.compensation_error("503 from PMS")
        assert saga.next_step() == Step.NONE
        assert saga.last_error == "503 from PMS"
        retried = saga.retry()
        assert saga.next_step() == Step.REMOVE_REPLACEMENT
        saga.replacement_removed()
        assert saga.state == "compensated"
    assert moves([parked, retried]) == [
        ("compensating", "compensation_error", "compensation_failed"),
        ("compensation_failed", "retry", "compensating"),
    ]
    assert parked.detail["reason"] == "503 from PMS"


def test_the_only_compensated_step_is_the_booked_replacement() -> None:
    assert COMPENSATIONS == {"replacement_created": Step.REMOVE_REPLACEMENT}


def test_terminal_states_need_no_further_step() -> None:
    assert TERMINAL == {"completed", "compensated"}
    for state in TERMINAL:
        with bound_reassignment(WORKFLOW, ORIGINAL, NEW_PATIENT, state=state) as saga:
            assert saga.next_step() == Step.NONE


OUTCOMES: dict[str, Callable[[Reassignment], Transition]] = {
    "replacement_booked": lambda s: s.replacement_booked(REPLACEMENT),
    "original_cancelled": lambda s: s.original_cancelled(),
    "finish": lambda s: s.finish(),
    "cancel_failed": lambda s: s.cancel_failed("x"),
    "replacement_changed": lambda s: s.replacement_changed("x"),
    "replacement_removed": lambda s: s.replacement_removed(),
    "compensation_error": lambda s: s.compensation_error("x"),
    "retry": lambda s: s.retry(),
}
VALID_FROM = {
    "replacement_booked": {"requested"},
    "original_cancelled": {"replacement_created"},
    "finish": {"original_cancelled"},
    "cancel_failed": {"requested", "replacement_created"},
    "replacement_changed": {"replacement_created"},
    "replacement_removed": {"compensating"},
    "compensation_error": {"compensating"},
    "retry": {"compensation_failed"},
}


@pytest.mark.parametrize(
    ("state", "outcome"),
    [(state, outcome) for state in STATES for outcome in OUTCOMES if state not in VALID_FROM[outcome]],
)
def test_outcome_out_of_order_raises_and_changes_nothing(state: str, outcome: str) -> None:
    with bound_reassignment(WORKFLOW, ORIGINAL, NEW_PATIENT, state=state) as saga:
        with pytest.raises(InvalidStep, match=outcome):
            OUTCOMES[outcome](saga)
        assert (saga.state, saga.replacement_id, saga.last_error) == (state, None, None)


def test_binding_workflows_leaves_the_shared_machine_as_it_was() -> None:
    baseline = len(MACHINE.models)
    for n in range(500):
        with bound_reassignment(f"wf-{n}", n + 1, NEW_PATIENT) as saga:
            saga.replacement_booked(n + 10_000)
    assert len(MACHINE.models) == baseline


def test_link_marker_and_notes_point_both_ways() -> None:
    assert link_marker(WORKFLOW, ORIGINAL) == {
        "reassigned_from": ORIGINAL,
        "reassignment_workflow": WORKFLOW,
    }
    note = replacement_note(ORIGINAL, WORKFLOW)
    assert str(ORIGINAL) in note and WORKFLOW in note
    cancel_note = original_cancel_note(REPLACEMENT, WORKFLOW)
    assert str(REPLACEMENT) in cancel_note and WORKFLOW in cancel_note
    assert CANCEL_REASON == "Booked in error"


def test_a_replacement_changed_by_someone_else_ends_the_saga_with_nothing_to_undo() -> None:
    with bound_reassignment(WORKFLOW, ORIGINAL, NEW_PATIENT) as saga:
        saga.replacement_booked(REPLACEMENT)
        changed = saga.replacement_changed("replacement was cancelled by someone else")
        assert saga.state == "compensated" and saga.next_step() == Step.NONE
    assert (changed.from_state, changed.trigger) == ("replacement_created", "replacement_changed")
    assert changed.detail["reason"] == "replacement was cancelled by someone else"


def test_slots_compare_instants_not_spellings() -> None:
    utc = {"practitioner_id": 7, "start_time": "2030-03-04T10:00:00Z", "finish_time": "2030-03-04T10:30:00Z"}
    local = {
        "practitioner_id": 7,
        "start_time": "2030-03-04T11:00:00.000+01:00",
        "finish_time": "2030-03-04T11:30:00+01:00",
    }
    assert slot_of(utc) == slot_of(local)
    assert slot_of(utc) != slot_of({**utc, "start_time": "2030-03-04T10:15:00Z"})
    assert slot_of(utc) != slot_of({**utc, "practitioner_id": 8})


def test_the_link_marker_fits_the_pms_metadata_limits_for_the_longest_command_id() -> None:
    from consumer.messages import Reassign
    from consumer.sandbox.rules import MAX_METADATA_KEY, MAX_METADATA_PAIRS, MAX_METADATA_VALUE
    from consumer.workflows import workflow_id_for

    longest = "c" * Reassign.model_json_schema()["properties"]["command_id"]["maxLength"]
    marker = link_marker(workflow_id_for(longest), 2**63 - 1)
    assert len(marker) <= MAX_METADATA_PAIRS
    assert all(len(key) <= MAX_METADATA_KEY for key in marker)
    assert all(len(str(value)) <= MAX_METADATA_VALUE for value in marker.values())

"""The appointment machine refuses what the PMS refuses, in its words, and adopts what it sees."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statemachines.appointment import (
    LEGAL_MOVES,
    MACHINE,
    MACHINE_STATES,
    STATES,
    Appointment,
    Refused,
    Snapshot,
    Write,
    bound,
)

APPT = 757579675
PATIENT = 1013
OTHER = 1014


def status(state: str) -> str:
    return f"The appointment can not be updated as the current status is: {state}"


def snap(state: str, patient_id: int | None = PATIENT, notes: str | None = None) -> Snapshot:
    return Snapshot(APPT, state, patient_id, notes)


def refusal(appt: Appointment, plan: str, *args: Any) -> dict[str, list[str]]:
    with pytest.raises(Refused) as caught:
        getattr(appt, plan)(*args)
    return caught.value.reasons


# --- the seed scenario ----------------------------------------------------------


def test_seed_state_and_patient_together_refused_with_both_reasons_and_nothing_changes() -> None:
    with bound(snap("Pending"), APPT) as appt:
        reasons = refusal(appt, "plan_edit", {"state": "Confirmed", "patient_id": OTHER})
        assert reasons == {
            "patient_id": ["can not change patients"],
            "state": ["can not be updated in the same request as patient_id"],
        }
        assert (appt.state, appt.patient_id) == ("Pending", PATIENT)


def test_confirmed_refuses_state_and_patient_with_status_and_patient_reasons() -> None:
    with bound(snap("Confirmed"), APPT) as appt:
        reasons = refusal(appt, "plan_edit", {"state": "Confirmed", "patient_id": OTHER})
    assert reasons == {
        "state": [status("Confirmed")],
        "patient_id": ["can not change patients"],
    }


def test_refused_reads_as_one_line_per_field() -> None:
    exc = Refused({"state": ["a"], "patient_id": ["b", "c"]})
    assert str(exc) == "state: a; patient_id: b, c"


# --- confirm ---------------------------------------------------------------------


def test_confirm_plans_only_the_state_field_from_pending() -> None:
    with bound(snap("Pending"), APPT) as appt:
        assert appt.plan_confirm() == Write("confirm", {"state": "Confirmed"})
        assert appt.state == "Pending"


@pytest.mark.parametrize("state", ["Confirmed", "Arrived", "In surgery", "Completed", "Cancelled", "Did not attend"])
def test_confirm_refused_unless_pending(state: str) -> None:
    with bound(snap(state), APPT) as appt:
        assert refusal(appt, "plan_confirm") == {"state": [status(state)]}


# --- cancel ----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["Pending", "Confirmed"])
def test_cancel_from_pending_or_confirmed_sends_state_and_reason_id(state: str) -> None:
    with bound(snap(state), APPT) as appt:
        write = appt.plan_cancel(" patient phoned ", reason_id=7)
    assert write.fields == {"state": "Cancelled", "appointment_cancellation_reason_id": 7}
    assert write.detail == {"reason": "patient phoned"}


def test_cancel_without_reason_id_omits_the_key() -> None:
    with bound(snap("Pending"), APPT) as appt:
        assert appt.plan_cancel("ill").fields == {"state": "Cancelled"}


def test_cancel_with_blank_reason_is_refused() -> None:
    with bound(snap("Pending"), APPT) as appt:
        assert refusal(appt, "plan_cancel", "   ") == {"appointment_cancellation_reason_id": ["can't be blank"]}


def test_cancel_when_arrived_is_refused_by_status() -> None:
    with bound(snap("Arrived"), APPT) as appt:
        assert refusal(appt, "plan_cancel", "ill", 7) == {"state": [status("Arrived")]}


def test_cancel_when_cancelled_lists_every_offending_field_and_the_blank_reason() -> None:
    with bound(snap("Cancelled"), APPT) as appt:
        reasons = refusal(appt, "plan_cancel", "", 7)
    assert reasons == {
        "state": [status("Cancelled")],
        "appointment_cancellation_reason_id": [status("Cancelled"), "can't be blank"],
    }


# --- set_patient -----------------------------------------------------------------


@pytest.mark.parametrize("state", ["Pending", "Arrived", "In surgery"])
def test_set_patient_allowed_while_none_is_set(state: str) -> None:
    with bound(snap(state, patient_id=None), APPT) as appt:
        assert appt.plan_set_patient(OTHER) == Write("set_patient", {"patient_id": OTHER})


@pytest.mark.parametrize("state", ["Confirmed", "Cancelled", "Completed", "Did not attend", "Deleted"])
def test_set_patient_refused_by_status(state: str) -> None:
    with bound(snap(state, patient_id=None), APPT) as appt:
        assert refusal(appt, "plan_set_patient", OTHER) == {"patient_id": [status(state)]}


def test_set_patient_over_another_patient_refused_with_hint_to_reassign() -> None:
    with bound(snap("Pending"), APPT) as appt:
        assert refusal(appt, "plan_set_patient", OTHER) == {
            "patient_id": ["can not change patients"],
            "hint": ["use reassign to move this slot to another patient"],
        }


@pytest.mark.parametrize("state", ["Pending", "Confirmed", "Cancelled"])
def test_setting_the_same_patient_again_is_an_empty_write(state: str) -> None:
    with bound(snap(state), APPT) as appt:
        assert appt.plan_set_patient(PATIENT) == Write("set_patient", {})


# --- edit ------------------------------------------------------------------------


def test_pending_accepts_every_editable_field() -> None:
    fields = {
        "start_time": "2025-01-01T09:00:00Z",
        "finish_time": "2025-01-01T09:30:00Z",
        "duration": 30,
        "reason": "Exam",
        "notes": "n",
        "practitioner_id": 3,
        "metadata": {"k": "v"},
    }
    with bound(snap("Pending"), APPT) as appt:
        assert appt.plan_edit(fields) == Write("edit", fields)


def test_confirmed_accepts_only_state_and_notes() -> None:
    with bound(snap("Confirmed"), APPT) as appt:
        assert appt.plan_edit({"state": "Arrived", "notes": "here"}).fields == {
            "state": "Arrived",
            "notes": "here",
        }
        reasons = refusal(appt, "plan_edit", {"start_time": "x", "duration": 10, "notes": "ok"})
    assert reasons == {"start_time": [status("Confirmed")], "duration": [status("Confirmed")]}


@pytest.mark.parametrize("state", ["Cancelled", "Completed", "Did not attend"])
def test_terminal_states_accept_no_write_at_all(state: str) -> None:
    with bound(snap(state), APPT) as appt:
        assert refusal(appt, "plan_edit", {"notes": "n", "reason": "r"}) == {
            "notes": [status(state)],
            "reason": [status(state)],
        }


def test_unknown_fields_and_states_named_with_everything_else() -> None:
    with bound(snap("Pending"), APPT) as appt:
        reasons = refusal(appt, "plan_edit", {"colour": "red", "state": "Rescheduled", "notes": "fine"})
    assert reasons == {
        "colour": ["is not a permitted attribute"],
        "state": ["is not included in the list"],
    }


@pytest.mark.parametrize(("source", "dest"), [(s, d) for s in STATES for d in STATES])
def test_state_edits_follow_the_legal_move_table(source: str, dest: str) -> None:
    with bound(snap(source), APPT) as appt:
        if dest in LEGAL_MOVES[source]:
            assert appt.plan_edit({"state": dest}).fields == {"state": dest}
        else:
            assert refusal(appt, "plan_edit", {"state": dest}) == {"state": [status(source)]}


def test_removing_the_patient_is_changing_it() -> None:
    with bound(snap("Pending"), APPT) as appt:
        assert refusal(appt, "plan_edit", {"patient_id": None}) == {"patient_id": ["can not change patients"]}


# --- applied ---------------------------------------------------------------------


def test_applied_confirm_records_the_move_and_no_drift_when_the_pms_agrees() -> None:
    with bound(snap("Pending"), APPT) as appt:
        write = appt.plan_confirm()
        records = appt.applied(write, snap("Confirmed"))
        assert appt.state == "Confirmed"
    assert [(r.trigger, r.from_state, r.to_state) for r in records] == [("confirm", "Pending", "Confirmed")]
    assert records[0].machine == "appointment"
    assert records[0].appointment_id == APPT
    assert records[0].detail == {"fields": {"state": "Confirmed"}}


def test_applied_cancel_keeps_the_reason_text_for_the_log() -> None:
    with bound(snap("Confirmed"), APPT) as appt:
        [record] = appt.applied(appt.plan_cancel("ill", 7), snap("Cancelled"))
    assert record.detail == {
        "fields": {"state": "Cancelled", "appointment_cancellation_reason_id": 7},
        "reason": "ill",
    }


def test_applied_set_patient_is_an_internal_transition() -> None:
    with bound(snap("Pending", patient_id=None), APPT) as appt:
        [record] = appt.applied(appt.plan_set_patient(OTHER), snap("Pending", patient_id=OTHER))
        assert appt.patient_id == OTHER
    assert (record.trigger, record.from_state, record.to_state) == (
        "set_patient",
        "Pending",
        "Pending",
    )


def test_applied_edit_moves_state_and_updates_notes() -> None:
    with bound(snap("Confirmed"), APPT) as appt:
        write = appt.plan_edit({"state": "Arrived", "notes": "in the chair"})
        [record] = appt.applied(write, snap("Arrived", notes="in the chair"))
        assert (appt.state, appt.notes) == ("Arrived", "in the chair")
    assert (record.trigger, record.from_state, record.to_state) == ("edit", "Confirmed", "Arrived")


def test_applied_explains_drift_when_the_pms_answers_something_else() -> None:
    with bound(snap("Pending"), APPT) as appt:
        records = appt.applied(appt.plan_confirm(), snap("Arrived", notes="walked in"))
        assert appt.state == "Arrived"
    assert [(r.trigger, r.from_state, r.to_state) for r in records] == [
        ("confirm", "Pending", "Confirmed"),
        ("reconcile", "Confirmed", "Arrived"),
    ]
    assert records[1].detail == {
        "legal": True,
        "anomaly": False,
        "drift": {"state": ["Confirmed", "Arrived"], "notes": [None, "walked in"]},
    }


def test_applied_write_that_no_longer_fits_the_state_only_adopts_the_result() -> None:
    with bound(snap("Cancelled"), APPT) as appt:
        records = appt.applied(Write("confirm", {"state": "Confirmed"}), snap("Confirmed"))
    assert [(r.trigger, r.detail["anomaly"]) for r in records] == [("reconcile", True)]


def test_applied_empty_write_records_nothing() -> None:
    with bound(snap("Confirmed"), APPT) as appt:
        assert appt.applied(appt.plan_set_patient(PATIENT), snap("Confirmed")) == []


# --- reconcile -------------------------------------------------------------------


def test_reconcile_with_nothing_new_records_nothing() -> None:
    with bound(snap("Confirmed"), APPT) as appt:
        assert appt.reconcile(snap("Confirmed")) == []


def test_first_sight_has_no_from_state_and_is_legal() -> None:
    with bound(None, APPT) as appt:
        assert appt.state == "New"
        [record] = appt.reconcile(snap("Confirmed"))
        assert appt.state == "Confirmed"
    assert record.from_state is None
    assert record.to_state == "Confirmed"
    assert record.trigger == "reconcile"
    assert record.detail == {
        "legal": True,
        "anomaly": False,
        "drift": {"state": [None, "Confirmed"], "patient_id": [None, PATIENT]},
    }


def test_legal_upstream_move_is_adopted_quietly() -> None:
    with bound(snap("Pending"), APPT) as appt:
        [record] = appt.reconcile(snap("Confirmed"))
    assert record.detail == {
        "legal": True,
        "anomaly": False,
        "drift": {"state": ["Pending", "Confirmed"]},
    }


def test_illegal_upstream_move_is_adopted_and_flagged() -> None:
    with bound(snap("Cancelled"), APPT) as appt:
        [record] = appt.reconcile(snap("Confirmed"))
        assert appt.state == "Confirmed"
    assert (record.from_state, record.to_state) == ("Cancelled", "Confirmed")
    assert record.detail["legal"] is False
    assert record.detail["anomaly"] is True


def test_patient_swap_upstream_is_an_anomaly_even_without_a_move() -> None:
    with bound(snap("Pending"), APPT) as appt:
        [record] = appt.reconcile(snap("Pending", patient_id=OTHER))
        assert appt.patient_id == OTHER
    assert record.detail == {
        "legal": True,
        "anomaly": True,
        "drift": {"patient_id": [PATIENT, OTHER]},
    }


def test_patient_set_for_the_first_time_upstream_is_no_anomaly() -> None:
    with bound(snap("Pending", patient_id=None), APPT) as appt:
        [record] = appt.reconcile(snap("Pending", patient_id=OTHER))
    assert record.detail["anomaly"] is False


def test_deletion_is_legal_from_any_state_and_then_nothing_can_be_written() -> None:
    with bound(snap("Arrived"), APPT) as appt:
        [record] = appt.reconcile(snap("Deleted"))
        assert record.detail["legal"] is True
        assert refusal(appt, "plan_edit", {"notes": "x"}) == {"notes": [status("Deleted")]}


def test_unknown_upstream_state_is_flagged_and_the_known_state_kept() -> None:
    with bound(snap("Pending"), APPT) as appt:
        [record] = appt.reconcile(snap("Rescheduled"))
        assert appt.state == "Pending"
    assert record.detail["anomaly"] is True
    assert record.detail["unknown_state"] == "Rescheduled"


# --- binding ---------------------------------------------------------------------


def test_binding_many_models_leaves_the_shared_machine_as_it_was() -> None:
    baseline = len(MACHINE.models)
    for appointment_id in range(1, 2001):
        with bound(Snapshot(appointment_id, "Pending", None), appointment_id) as appt:
            appt.applied(appt.plan_confirm(), Snapshot(appointment_id, "Confirmed", None))
            assert len(MACHINE.models) == baseline + 1
    assert len(MACHINE.models) == baseline


def test_models_are_unbound_even_when_the_block_raises() -> None:
    baseline = len(MACHINE.models)
    with pytest.raises(Refused), bound(snap("Cancelled"), APPT) as appt:
        appt.plan_confirm()
    assert len(MACHINE.models) == baseline
    assert not hasattr(appt, "trigger")


def test_nested_bindings_are_independent() -> None:
    with bound(snap("Pending"), APPT) as first, bound(Snapshot(2, "Confirmed", None), 2) as second:
        first.applied(first.plan_confirm(), snap("Confirmed"))
        assert (first.state, second.state) == ("Confirmed", "Confirmed")
        second.applied(second.plan_cancel("ill"), Snapshot(2, "Cancelled", None))
        assert (first.state, second.state) == ("Confirmed", "Cancelled")


def test_snapshot_for_another_appointment_is_a_programming_error() -> None:
    with pytest.raises(ValueError), bound(snap("Pending"), APPT + 1):
        pass


# --- property: whatever happens, only Refused escapes and the state stays known ---

_field_values = st.one_of(st.sampled_from([*STATES, "Rescheduled"]), st.integers(0, 3), st.none(), st.text(max_size=3))
_fields = st.dictionaries(
    st.sampled_from(
        [
            "state",
            "notes",
            "patient_id",
            "start_time",
            "metadata",
            "appointment_cancellation_reason_id",
            "colour",
        ]
    ),
    _field_values,
    max_size=4,
)
_snapshots = st.builds(
    Snapshot,
    appointment_id=st.just(APPT),
    state=st.sampled_from([*STATES, "Deleted", "Rescheduled"]),
    patient_id=st.one_of(st.none(), st.integers(1, 3)),
    notes=st.one_of(st.none(), st.sampled_from(["a", "b"])),
)
_actions = st.one_of(
    st.tuples(st.just("plan_confirm")),
    st.tuples(
        st.just("plan_cancel"),
        st.sampled_from(["", " ", "ill"]),
        st.one_of(st.none(), st.integers(1, 3)),
    ),
    st.tuples(st.just("plan_set_patient"), st.integers(1, 3)),
    st.tuples(st.just("plan_edit"), _fields),
    st.tuples(st.just("reconcile"), _snapshots),
)


@settings(max_examples=300, deadline=None)
@given(
    start=st.one_of(st.none(), _snapshots.filter(lambda s: s.state != "Rescheduled")),
    actions=st.lists(_actions, max_size=12),
    results=_snapshots,
)
def test_any_sequence_only_refuses_and_stays_in_a_known_state(
    start: Snapshot | None, actions: list[tuple[Any, ...]], results: Snapshot
) -> None:
    with bound(start, APPT) as appt:
        for name, *args in actions:
            try:
                outcome = getattr(appt, name)(*args)
            except Refused as refused:
                assert refused.reasons and all(refused.reasons.values())
                continue
            if isinstance(outcome, Write) and outcome.fields:
                records = appt.applied(outcome, results)
                assert records[0].trigger == outcome.trigger, "a planned write must be one the machine accepts"
                assert "state" not in outcome.fields or "patient_id" not in outcome.fields
            assert appt.state in MACHINE_STATES

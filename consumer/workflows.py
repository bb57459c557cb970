"""Runs the reassignment saga against the PMS, durably.

The saga's state is in the store before and after every remote call, so a
process killed at any instant resumes where it was:
- killed after the replacement was booked but before that was recorded: the
  replacement is found again by its link marker, never booked twice;
- killed after the original was cancelled but before that was recorded: the
  fresh GET shows it cancelled, and the step counts as done;
- a refused token or a spent budget at any step leaves the saga at that step:
  its command is parked while the practice waits (consumer/waiting.py), and
  the step runs again when the practice can be served; never a compensation;
- a compensation that keeps failing parks the workflow in
  ``compensation_failed`` (metric, error log, ``appt sagas --stuck``) until
  ``appt sagas retry``.

Watching the workflows between deliveries (deadlines, gauges, alarms, handing
unfinished and overdue ones back to the pipeline) is consumer/workflow_watch.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from consumer.broker import Broker, PublishFailed
from consumer.commands import STATUS_REASON, execute, names_other_status
from consumer.failpoints import failpoint
from consumer.logs import get_logger
from consumer.messages import DEFAULT_PRACTICE, CommandResult, Reassign, SetPatient, StateLogRecord
from consumer.pms.client import PmsClient, spending_for
from consumer.pms.errors import NotFound, PmsError, RateLimited, Rejected, Unauthorised, Unavailable
from consumer.practices import Practices
from consumer.records import (
    Decision,
    Origin,
    is_older,
    new_record,
    result_for,
    snapshot_from_pms,
    snapshot_from_record,
)
from consumer.store.base import Commit, StaleVersion, Store, WorkflowRecord, records_of
from statemachines.appointment import Appointment, Refused, Transition, Write, bound
from statemachines.reassignment import (
    CANCEL_REASON,
    COMPENSATION_FAILED,
    COMPLETED,
    REPLACEMENT_CREATED,
    REQUESTED,
    Slot,
    Step,
    bound_reassignment,
    link_marker,
    original_cancel_note,
    replacement_note,
    slot_of,
)

log = get_logger(__name__)

CANCELLABLE = ("Pending", "Confirmed")
LIVE = ("Pending", "Confirmed", "Arrived", "In surgery", "Completed")
"""States in which an appointment holds its slot (Cancelled and Did not attend free it)."""
COPIED_FIELDS = ("practitioner_id", "start_time", "finish_time", "duration", "reason")
NOT_SERVED = (Unauthorised, RateLimited)
"""A refused token or a spent budget: the PMS did not look at the request, so it is no answer
about the appointment. A step meeting one leaves the saga where it is, and its practice waits."""


class ReplacementChanged(Exception):
    """Someone else cancelled, deleted or moved the replacement: it no longer holds the slot."""

    def __init__(self, reason: str, replacement: dict[str, Any] | None) -> None:
        super().__init__(reason)
        self.replacement = replacement


class WorkflowBusy(Exception):
    """Another runner moved this workflow on (seen as a version conflict)."""


def workflow_id_for(command_id: str, practice: str = DEFAULT_PRACTICE) -> str:
    """Deterministic, so a redelivered command finds its workflow instead of starting another.

    Command ids are unique per practice only, so another practice's id names its practice."""
    if practice == DEFAULT_PRACTICE:
        return f"reassign-{command_id}"
    return f"reassign-{practice}.{command_id}"


class WorkflowRunner:
    def __init__(
        self,
        *,
        practices: Practices,
        store: Store,
        broker: Broker,
        compensation_attempts: int = 3,
        compensation_backoff: float = 0.5,
    ) -> None:
        self._practices = practices
        self._store = store
        self._broker = broker
        self._compensation_attempts = compensation_attempts
        self._compensation_backoff = compensation_backoff
        self._unpublished: set[str] = set()  # workflows with a record whose publish failed

    # ---- entry points -------------------------------------------------------

    def _pms(self, practice: str) -> PmsClient:
        return self._practices.get(practice).pms

    async def reassign(self, command: Reassign) -> Decision:
        """Handle a ``reassign`` command (called by the worker, serialised on the appointment)."""
        with spending_for("workflows"):
            return await self._reassign(command)

    async def _reassign(self, command: Reassign) -> Decision:
        workflow = await self._store.get_workflow(workflow_id_for(command.command_id, command.practice))
        redelivered = workflow is not None
        original: dict[str, Any] | None = None  # read by this call, before anything was booked
        if workflow is None:
            started = await self._start(command)
            if isinstance(started, Decision):
                return started
            workflow, original = started
        workflow = await self._drive(workflow, original)
        decision = Decision(result=result_of(command, workflow))
        if redelivered or workflow.workflow_id in self._unpublished:
            # A crash (or a broker failure) may have come between a step's commit and its publish.
            self._unpublished.discard(workflow.workflow_id)
            decision.republish = await records_of(
                self._store, command.appointment_id, command.command_id, command.practice
            )
        return decision

    async def retry(self, workflow_id: str) -> WorkflowRecord:
        """`appt sagas retry`: run a parked workflow's compensation again.

        Only a parked one: nothing else drives it (its command was acked). An
        unfinished one belongs to the pipeline (see ``WorkflowWatcher.requeue``).
        """
        workflow = await self._store.get_workflow(workflow_id)
        if workflow is None:
            raise LookupError(f"no workflow {workflow_id}")
        if workflow.state != COMPENSATION_FAILED:
            raise ValueError(f"workflow {workflow_id} is {workflow.state}, not {COMPENSATION_FAILED}")
        workflow = await self._record(workflow, lambda saga: saga.retry(), attempts=workflow.attempts + 1)
        with spending_for("workflows"):
            return await self._drive(workflow)

    # ---- starting -----------------------------------------------------------

    async def _start(self, command: Reassign) -> tuple[WorkflowRecord, dict[str, Any]] | Decision:
        """Decide whether a workflow is needed at all; if so, persist it before any remote call."""
        try:
            original = (await self._pms(command.practice).get_appointment(command.appointment_id)).model_dump(
                mode="json"
            )
        except NotFound:
            return Decision(
                result=result_for(command, "rejected", reasons={"appointment_id": ["not found in the PMS"]})
            )
        if original.get("patient_id") is None:
            return await self._plain_set_patient(command)
        if original["patient_id"] == command.patient_id:
            return Decision(result=result_for(command, "succeeded", appointment=original))
        if original.get("state") not in CANCELLABLE:
            reasons = {"state": [f"{STATUS_REASON} {original.get('state')}"]}
            return Decision(result=result_for(command, "rejected", reasons=reasons, appointment=original))
        active = await self._store.active_workflow(command.appointment_id, command.practice)
        if active is not None:
            reasons = {"appointment_id": [f"a reassignment is already running ({active.workflow_id})"]}
            return Decision(result=result_for(command, "rejected", reasons=reasons))
        workflow = WorkflowRecord(
            practice=command.practice,
            workflow_id=workflow_id_for(command.command_id, command.practice),
            appointment_id=command.appointment_id,
            new_patient_id=command.patient_id,
            state=REQUESTED,
            command_id=command.command_id,
            correlation_id=command.correlation_id,
            data={"original": {k: original.get(k) for k in COPIED_FIELDS}},
        )
        start = StateLogRecord(
            practice=command.practice,
            appointment_id=command.appointment_id,
            machine="reassignment",
            from_state=None,
            to_state=REQUESTED,
            trigger="reassign",
            source="workflow",
            command_id=command.command_id,
            workflow_id=workflow.workflow_id,
            correlation_id=command.correlation_id,
            detail={
                "workflow_id": workflow.workflow_id,
                "original_id": command.appointment_id,
                "new_patient_id": command.patient_id,
            },
        )
        await self._commit(Commit(workflow=workflow, logs=[start]))
        return dataclasses.replace(workflow, version=1), original

    async def _plain_set_patient(self, command: Reassign) -> Decision:
        """No patient yet: the PMS allows setting one, so no workflow is needed."""
        set_patient = SetPatient(
            command_id=command.command_id,
            appointment_id=command.appointment_id,
            practice=command.practice,
            patient_id=command.patient_id,
            correlation_id=command.correlation_id,
        )
        origin = Origin(
            "command", practice=command.practice, command_id=command.command_id, correlation_id=command.correlation_id
        )
        decision = await execute(set_patient, self._pms(command.practice), self._store, origin)
        if decision.result is not None:
            decision.result = decision.result.model_copy(update={"type": "reassign"})
        return decision

    # ---- driving ------------------------------------------------------------

    async def _drive(self, workflow: WorkflowRecord, original: dict[str, Any] | None = None) -> WorkflowRecord:
        """Run the saga's steps to the end (or to a park).

        ``original`` is the original as this call read it just before persisting a new
        workflow (a first attempt): nothing can have been booked yet, so the link-marker
        lookup is skipped, and that read (with the POST's answer for the replacement) is
        the evidence for the cancel. Every request is budget: a first attempt spends 3
        (GET, POST, PUT). ``None`` (a resumed workflow) reads everything afresh.
        """
        while True:
            with self._saga(workflow) as saga:
                step = saga.next_step()
            if step is Step.NONE:
                return workflow
            if step is Step.CREATE_REPLACEMENT:
                workflow = await self._create_replacement(workflow, original)
            elif step is Step.CANCEL_ORIGINAL:
                workflow = await self._cancel_original(workflow, original)
                original = None
            elif step is Step.FINISH:
                workflow = await self._record(workflow, lambda saga: saga.finish())
            elif step is Step.REMOVE_REPLACEMENT:
                workflow = await self._remove_replacement(workflow)

    async def _create_replacement(self, workflow: WorkflowRecord, held: dict[str, Any] | None) -> WorkflowRecord:
        # Resuming: look for a replacement booked before a crash first: once booked, it must be
        # recorded (and undone by compensation if need be), whatever the original has become since.
        # A first attempt (``held``: the original as just read) has booked nothing yet.
        found = None if held is not None else await self._find_replacement(workflow)
        if found is None:
            try:
                original = held or (
                    await self._pms(workflow.practice).get_appointment(workflow.appointment_id)
                ).model_dump(mode="json")
            except NotFound:
                reason = "original was deleted by someone else before the replacement was booked"
                return await self._record(workflow, lambda saga: saga.cancel_failed(reason))
            if original.get("state") not in CANCELLABLE:
                reason = f"original is {original.get('state')} before the replacement was booked"
                return await self._record_with(
                    workflow,
                    lambda saga: saga.cancel_failed(reason),
                    workflow.appointment_id,
                    original,
                    lambda appt: appt.reconcile(snapshot_from_pms(original)),
                )
            if slot_of(original) != booked_slot(workflow):
                workflow = await self._follow_original(workflow, original)
            failpoint("before_create_replacement")
            try:
                created = await self._pms(workflow.practice).create_appointment(self._replacement_fields(workflow))
                found = created.model_dump(mode="json")
                failpoint("after_create_replacement")
            except Unavailable:
                # The POST may have been applied before the answer was lost: look, never blindly re-post.
                found = await self._find_replacement(workflow)
                if found is None:
                    raise
            except Rejected as rejected:
                reason = f"replacement refused by the PMS: {rejected.params}"
                return await self._record(workflow, lambda saga: saga.cancel_failed(reason))
        replacement, replacement_id = found, int(found["id"])
        # The replacement gets its own record and first log entry now, not only when its webhook arrives.
        recorded = await self._record_with(
            workflow,
            lambda saga: saga.replacement_booked(replacement_id),
            replacement_id,
            replacement,
            lambda appt: appt.reconcile(snapshot_from_pms(replacement)),
            data={"replacement": replacement},
        )
        failpoint("after_record_replacement")
        return recorded

    async def _follow_original(self, workflow: WorkflowRecord, original: dict[str, Any]) -> WorkflowRecord:
        """The original moved before anything was booked: book at its new time.

        Saved before the POST, so a resumed workflow looks for its replacement where it was booked.
        """
        log.info(
            "original moved before the replacement was booked",
            workflow_id=workflow.workflow_id,
            booked=str(booked_slot(workflow)),
            now=str(slot_of(original)),
        )
        copied = {k: original.get(k) for k in COPIED_FIELDS}
        updated = dataclasses.replace(workflow, data={**workflow.data, "original": copied})
        await self._commit(Commit(workflow=updated))
        return dataclasses.replace(updated, version=workflow.version + 1)

    def _replacement_fields(self, workflow: WorkflowRecord) -> dict[str, Any]:
        original = workflow.data.get("original", {})
        fields = {k: original[k] for k in COPIED_FIELDS if original.get(k) is not None}
        fields.update(
            patient_id=workflow.new_patient_id,
            notes=replacement_note(workflow.appointment_id, workflow.workflow_id),
            metadata=link_marker(workflow.workflow_id, workflow.appointment_id),
            booked_via_api=True,
        )
        return fields

    async def _find_replacement(self, workflow: WorkflowRecord) -> dict[str, Any] | None:
        """The live appointment carrying this workflow's link marker, if one was booked."""
        original = workflow.data.get("original", {})
        # The replacement starts when the original does: the PMS's [after, before) start-time
        # window around it. Cancelled rows stay hidden (a DELETE that cancels leaves no live one).
        candidates = await self._pms(workflow.practice).list_appointments(
            after=original["start_time"],
            before=original["finish_time"],
            practitioner_id=original.get("practitioner_id"),
        )
        marker = link_marker(workflow.workflow_id, workflow.appointment_id)
        for candidate in candidates:
            metadata = candidate.metadata or {}
            if all(metadata.get(k) == v for k, v in marker.items()) and candidate.state != "Cancelled":
                return candidate.model_dump(mode="json")
        return None

    async def _cancel_original(self, workflow: WorkflowRecord, held: dict[str, Any] | None) -> WorkflowRecord:
        """Cancel the original "Booked in error", once the replacement is known to hold its slot.

        On a first attempt (``held``: the original as read before the POST) the POST's answer
        is that evidence and the held read plans the cancel: a change since shows in the PUT's
        answer (moved), its 422 (read again, decide once more) or its 404. A resumed workflow
        reads the original and the replacement first.

        Only a failed or refused cancel is a reason to compensate. A read that fails
        propagates: it changed nothing, so the step is retried (a redelivery, or the
        overdue sweep), never compensated.
        """
        assert workflow.replacement_id is not None
        note = original_cancel_note(workflow.replacement_id, workflow.workflow_id)
        try:
            reason_id = await self._pms(workflow.practice).cancellation_reason_id(CANCEL_REASON)
        except LookupError as exc:
            reason = f"original can not be cancelled: {exc}"
            return await self._record(workflow, lambda saga: saga.cancel_failed(reason))
        for attempt in (1, 2):
            if attempt == 1 and held is not None:
                upstream = held
            else:
                try:
                    upstream = (await self._pms(workflow.practice).get_appointment(workflow.appointment_id)).model_dump(
                        mode="json"
                    )
                except NotFound:
                    return await self._original_deleted(workflow)
                if upstream.get("state") == "Cancelled":  # done before a crash, or by someone else
                    return await self._original_done(workflow, None, upstream, None)
            if attempt == 1 and held is None:
                workflow = await self._replacement_holds_slot(workflow, upstream)
                if workflow.state != REPLACEMENT_CREATED:
                    return workflow
            try:
                write = self._plan_cancel(workflow, upstream, reason_id, note)
            except Refused as refused:
                return await self._cancel_failed(
                    workflow, f"original can not be cancelled: {refused.reasons}", upstream
                )
            failpoint("before_cancel_original")
            try:
                answer = await self._pms(workflow.practice).update_appointment(
                    workflow.appointment_id,
                    write.fields,
                    # Called only while this iteration awaits the write, so the loop variables are current.
                    before_retry=lambda: self._recheck(workflow, slot_of(upstream)),  # noqa: B023
                )
                failpoint("after_cancel_original")
            except ReplacementChanged as changed:  # seen during the cancel's retry backoff
                return await self._replacement_changed(workflow, str(changed), changed.replacement)
            except Rejected as rejected:
                if attempt == 1 and names_other_status(rejected):
                    continue  # the state moved behind our back: read again, decide once more
                return await self._cancel_failed(
                    workflow, f"PMS refused to cancel the original: {rejected.params}", upstream
                )
            except NotFound:
                return await self._original_deleted(workflow)
            except Unavailable as exc:
                # The PUT may have been applied before its answer was lost: compensating then would
                # leave the slot with no live appointment. Read again (a failing read propagates, and
                # the step is retried later); only an original still standing is compensated for.
                try:
                    upstream = (await self._pms(workflow.practice).get_appointment(workflow.appointment_id)).model_dump(
                        mode="json"
                    )
                except NotFound:
                    return await self._original_deleted(workflow)
                if upstream.get("state") == "Cancelled":
                    return await self._original_done(workflow, None, upstream, None)
                return await self._cancel_failed(workflow, f"PMS kept failing to cancel the original: {exc}", upstream)
            return await self._original_done(workflow, upstream, answer.model_dump(mode="json"), write)
        raise AssertionError("unreachable: the loop always returns")

    async def _cancel_failed(self, workflow: WorkflowRecord, reason: str, upstream: dict[str, Any]) -> WorkflowRecord:
        """The original stays: compensate, adopting the last read of it."""
        return await self._record_with(
            workflow,
            lambda saga: saga.cancel_failed(reason),
            workflow.appointment_id,
            upstream,
            lambda appt: appt.reconcile(snapshot_from_pms(upstream)),
        )

    async def _replacement_holds_slot(self, workflow: WorkflowRecord, original: dict[str, Any]) -> WorkflowRecord:
        """Before the original is let go, the replacement must be live and in the original's slot.

        This read is the one the result needs anyway (the replacement as it is), made before the
        cancel instead of after it. The replacement cancelled, deleted or moved by someone else
        ends the saga with the original kept (``replacement_changed``); the original moved by
        someone else since the booking is followed: the replacement is moved to its new time.
        """
        try:
            replacement = await self._look_at_replacement(workflow, slot_of(original))
        except ReplacementChanged as changed:
            return await self._replacement_changed(workflow, str(changed), changed.replacement)
        workflow = dataclasses.replace(workflow, data={**workflow.data, "replacement": replacement})
        if slot_of(original) == booked_slot(workflow):
            return workflow
        moved = replacement  # already there: moved by a run killed before it could record that
        if slot_of(replacement) != slot_of(original):
            try:
                moved = await self._move_replacement(workflow, original)
            except (Rejected, NotFound) as exc:
                reason = (
                    f"original was moved by someone else to {slot_of(original)} after the replacement "
                    f"was booked, and the replacement could not follow: {exc}"
                )
                return await self._cancel_failed(workflow, reason, original)
        note = (
            f"moved by someone else to {slot_of(original)} after the replacement was booked; "
            "the replacement was moved with it"
        )
        copied = {k: original.get(k) for k in COPIED_FIELDS}
        updated = dataclasses.replace(
            workflow,
            data=merge_data(workflow.data, {"original": copied, "replacement": moved, "reasons": {"original": [note]}}),
        )
        await self._commit(Commit(workflow=updated))
        return dataclasses.replace(updated, version=workflow.version + 1)

    async def _look_at_replacement(self, workflow: WorkflowRecord, original: Slot) -> dict[str, Any]:
        """The replacement as the PMS has it; ``ReplacementChanged`` unless it is live, and where it
        was booked or where the original is now (the saga may have moved it there itself)."""
        replacement_id = workflow.replacement_id
        assert replacement_id is not None
        try:
            replacement = (await self._pms(workflow.practice).get_appointment(replacement_id)).model_dump(mode="json")
        except NotFound:
            raise ReplacementChanged(
                f"replacement {replacement_id} was deleted by someone else before the original was cancelled", None
            ) from None
        if replacement.get("state") not in LIVE:
            raise ReplacementChanged(
                f"replacement {replacement_id} was made {replacement.get('state')} by "
                "someone else before the original was cancelled",
                replacement,
            )
        if slot_of(replacement) not in (booked_slot(workflow), original):
            raise ReplacementChanged(
                f"replacement {replacement_id} was moved by someone else to "
                f"{slot_of(replacement)} before the original was cancelled; left there",
                replacement,
            )
        return replacement

    async def _recheck(self, workflow: WorkflowRecord, original: Slot) -> None:
        """Before a retried cancel: the replacement may have changed during the backoff."""
        await self._look_at_replacement(workflow, original)

    async def _move_replacement(self, workflow: WorkflowRecord, original: dict[str, Any]) -> dict[str, Any]:
        """Move the replacement to where the original is now (the saga's own booking, still Pending)."""
        replacement_id = workflow.replacement_id
        assert replacement_id is not None
        fields = {k: original[k] for k in ("practitioner_id", "start_time", "finish_time") if original.get(k)}
        log.info(
            "replacement follows the moved original",
            workflow_id=workflow.workflow_id,
            replacement_id=replacement_id,
            to=str(slot_of(original)),
        )
        moved = (await self._pms(workflow.practice).update_appointment(replacement_id, fields)).model_dump(mode="json")
        failpoint("after_move_replacement")
        return moved

    async def _replacement_changed(
        self, workflow: WorkflowRecord, reason: str, replacement: dict[str, Any] | None
    ) -> WorkflowRecord:
        replacement_id = workflow.replacement_id
        assert replacement_id is not None
        log.warning(
            "replacement changed by someone else: original kept",
            workflow_id=workflow.workflow_id,
            replacement_id=replacement_id,
            reason=reason,
        )
        data = {"reasons": {"original": ["left as it was: not cancelled"], "replacement": [reason]}}
        if replacement is None:
            return await self._record_gone(
                workflow, lambda saga: saga.replacement_changed(reason), replacement_id, data=data
            )
        seen = replacement
        return await self._record_with(
            workflow,
            lambda saga: saga.replacement_changed(reason),
            replacement_id,
            seen,
            lambda appt: appt.reconcile(snapshot_from_pms(seen)),
            data={**data, "replacement": seen},
        )

    def _plan_cancel(self, workflow: WorkflowRecord, upstream: dict[str, Any], reason_id: int, note: str) -> Write:
        with bound(snapshot_from_pms(upstream), workflow.appointment_id) as appt:
            write = appt.plan_cancel(CANCEL_REASON, reason_id)
        return Write(trigger=write.trigger, fields={**write.fields, "notes": note})

    async def _original_deleted(self, workflow: WorkflowRecord) -> WorkflowRecord:
        """Deleted by someone else once the replacement was booked: like a cancel by someone else,
        the old patient no longer holds the slot and the replacement does, so the step is done."""
        reason = "deleted by someone else before this saga cancelled it"
        recorded = await self._record_gone(
            workflow,
            lambda saga: saga.original_cancelled(),
            workflow.appointment_id,
            data={"reasons": {"original": [reason]}},
        )
        failpoint("after_record_cancelled")
        return recorded

    async def _original_done(
        self,
        workflow: WorkflowRecord,
        before: dict[str, Any] | None,
        after: dict[str, Any],
        write: Write | None,
    ) -> WorkflowRecord:
        """Record the saga step and the original's new state in one commit.

        The cancel's answer carries the original's current times: if it was moved between the
        read and the cancel, the replacement is moved after it (no request when nothing moved).
        """

        def observe(appt: Appointment) -> list[Transition]:
            transitions = appt.reconcile(snapshot_from_pms(before)) if before else []
            if write is not None:
                return transitions + appt.applied(write, snapshot_from_pms(after))
            return transitions + appt.reconcile(snapshot_from_pms(after))

        data: dict[str, Any] = {}
        if workflow.workflow_id not in (after.get("notes") or ""):
            data["reasons"] = {"original": ["cancelled by someone else before this saga cancelled it"]}
        elif slot_of(after) != booked_slot(workflow):
            data = await self._follow_after_cancel(workflow, after)
        recorded = await self._record_with(
            workflow,
            lambda saga: saga.original_cancelled(),
            workflow.appointment_id,
            after,
            observe,
            data=data,
        )
        failpoint("after_record_cancelled")
        return recorded

    async def _follow_after_cancel(self, workflow: WorkflowRecord, original: dict[str, Any]) -> dict[str, Any]:
        """The original was moved in the instant between its read and its cancel: the replacement follows."""
        moved_to = slot_of(original)
        try:
            moved = await self._move_replacement(workflow, original)
        except (Rejected, NotFound) as exc:
            log.error(
                "original moved while being cancelled and the replacement could not follow",
                workflow_id=workflow.workflow_id,
                replacement_id=workflow.replacement_id,
                error=str(exc),
            )
            return {
                "outcome": "failed",
                "reasons": {
                    "original": [f"moved by someone else to {moved_to} while this saga cancelled it; cancelled"],
                    "replacement": [f"could not follow it, stays at {booked_slot(workflow)}: {exc}"],
                },
            }
        return {
            "original": {k: original.get(k) for k in COPIED_FIELDS},
            "replacement": moved,
            "reasons": {
                "original": [
                    f"moved by someone else to {moved_to} while this saga cancelled it; "
                    "the replacement was moved with it"
                ]
            },
        }

    async def _record_gone(
        self, workflow: WorkflowRecord, outcome: Any, appointment_id: int, *, data: dict[str, Any]
    ) -> WorkflowRecord:
        """Record a saga step with an appointment the PMS no longer has (a 404): it is Deleted."""

        stored = await self._store.get_appointment(appointment_id, workflow.practice)
        gone = snapshot_from_pms({**(stored.data if stored else {}), "id": appointment_id}, deleted=True)
        known = None if stored else {"id": appointment_id}  # a record is kept with what was known of it
        return await self._record_with(
            workflow, outcome, appointment_id, known, lambda appt: appt.reconcile(gone), data=data
        )

    async def _record_with(
        self,
        workflow: WorkflowRecord,
        outcome: Any,
        appointment_id: int,
        upstream: dict[str, Any] | None,
        observe: Callable[[Appointment], list[Transition]],
        *,
        data: dict[str, Any] | None = None,
    ) -> WorkflowRecord:
        """Record a saga step with one appointment's new record and log, in one commit.

        A webhook about the same appointment may commit first (a version
        conflict): re-read and rebuild, unless the workflow itself moved on.
        An answer older than what is stored (a webhook already brought a newer
        state) is not adopted: the saga step is recorded alone.
        """
        origin = self._origin(workflow)
        for _ in range(3):
            stored = await self._store.get_appointment(appointment_id, workflow.practice)
            if (
                stored is not None
                and upstream is not None
                and is_older(upstream.get("updated_at"), stored.upstream_updated_at)
            ):
                return await self._record(workflow, outcome, data=data)
            with bound(snapshot_from_record(stored), appointment_id) as appt:
                transitions = observe(appt)
                record = new_record(stored, appt.state, appt.patient_id, upstream, practice=workflow.practice)
            try:
                return await self._record(
                    workflow, outcome, appointment=record, extra_logs=origin.logs(transitions), data=data
                )
            except StaleVersion:
                await self._ensure_unchanged(workflow)
        raise StaleVersion(f"appointment {appointment_id} kept changing")

    async def _remove_replacement(self, workflow: WorkflowRecord) -> WorkflowRecord:
        replacement_id = workflow.replacement_id
        if replacement_id is None:
            return await self._record(workflow, lambda saga: saga.replacement_removed())
        error = ""
        for attempt in range(1, self._compensation_attempts + 1):
            try:
                failpoint("before_remove_replacement")
                await self._delete_or_cancel(self._pms(workflow.practice), replacement_id)
                failpoint("after_remove_replacement")
                return await self._record(workflow, lambda saga: saga.replacement_removed())
            except NOT_SERVED:
                raise  # the practice waits (consumer/waiting.py) and this step is tried again then
            except (PmsError, LookupError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "compensation failed",
                    workflow_id=workflow.workflow_id,
                    replacement_id=replacement_id,
                    attempt=attempt,
                    error=error,
                )
                await asyncio.sleep(self._compensation_backoff * attempt)
        log.error(
            "compensation failed for good: workflow parked",
            workflow_id=workflow.workflow_id,
            replacement_id=replacement_id,
            error=error,
        )
        reason = f"could not remove replacement {replacement_id}: {error}"
        return await self._record(workflow, lambda saga: saga.compensation_error(reason))

    @staticmethod
    async def _delete_or_cancel(pms: PmsClient, replacement_id: int) -> None:
        """Delete the replacement; where the PMS refuses a delete, cancel it instead."""
        try:
            await pms.delete_appointment(replacement_id)
        except NotFound:
            return  # already gone (deleted before a crash)
        except Rejected:
            current = await pms.get_appointment(replacement_id)
            if current.state == "Cancelled":
                return
            reason_id = await pms.cancellation_reason_id(CANCEL_REASON)
            await pms.update_appointment(
                replacement_id,
                {
                    "state": "Cancelled",
                    "appointment_cancellation_reason_id": reason_id,
                    "notes": f"{CANCEL_REASON}: reassignment compensated",
                },
            )

    # ---- persistence --------------------------------------------------------

    def _saga(self, workflow: WorkflowRecord) -> Any:
        return bound_reassignment(
            workflow.workflow_id,
            workflow.appointment_id,
            workflow.new_patient_id,
            state=workflow.state,
            replacement_id=workflow.replacement_id,
            last_error=workflow.last_error,
        )

    def _origin(self, workflow: WorkflowRecord) -> Origin:
        return Origin(
            "workflow",
            practice=workflow.practice,
            command_id=workflow.command_id,
            workflow_id=workflow.workflow_id,
            correlation_id=workflow.correlation_id,
        )

    async def _record(
        self,
        workflow: WorkflowRecord,
        outcome: Any,
        *,
        attempts: int | None = None,
        appointment: Any = None,
        extra_logs: list[StateLogRecord] | None = None,
        data: dict[str, Any] | None = None,
    ) -> WorkflowRecord:
        """Fire the saga trigger for an outcome and persist it with its log, atomically.

        ``data`` is merged into the workflow's data (its ``reasons`` key by key): what the
        result will say, saved with the step that makes it true.
        """
        with self._saga(workflow) as saga:
            transition = outcome(saga)
            merged = merge_data(workflow.data, data or {})
            if transition.trigger == "cancel_failed":  # kept apart: a later compensation error must not hide it
                merged["cancel_error"] = saga.last_error
            updated = dataclasses.replace(
                workflow,
                state=saga.state,
                replacement_id=saga.replacement_id,
                last_error=saga.last_error,
                data=merged,
                attempts=workflow.attempts if attempts is None else attempts,
            )
        logs = [self._origin(workflow).log(transition), *(extra_logs or [])]
        await self._commit(Commit(workflow=updated, appointment=appointment, logs=logs))
        log.info(
            "workflow step",
            workflow_id=workflow.workflow_id,
            from_state=workflow.state,
            to_state=updated.state,
            replacement_id=updated.replacement_id,
        )
        return dataclasses.replace(updated, version=workflow.version + 1)

    async def _commit(self, commit: Commit) -> None:
        """Commit a step, then publish its records live; a failed publish is made good at the end.

        The step is done once committed: a broker hiccup must not fail (or compensate) the
        saga. The command's final publish sends the records again (see ``reassign``).
        """
        for record in await self._store.commit(commit):
            try:
                await self._broker.publish_event(
                    record.routing_key(), record.model_dump_json().encode(), message_id=f"log-{record.seq}"
                )
            except PublishFailed as exc:
                if commit.workflow is not None:
                    self._unpublished.add(commit.workflow.workflow_id)
                log.warning("state record not published yet", seq=record.seq, error=str(exc))

    async def _ensure_unchanged(self, workflow: WorkflowRecord) -> None:
        current = await self._store.get_workflow(workflow.workflow_id)
        if current is None or current.version != workflow.version:
            raise WorkflowBusy(f"workflow {workflow.workflow_id} was moved on by another runner")


def merge_data(data: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``data``, with ``reasons`` merged per appointment rather than replaced."""
    merged = {**data, **update}
    if "reasons" in data and "reasons" in update:
        merged["reasons"] = {**data["reasons"], **update["reasons"]}
    return merged


def booked_slot(workflow: WorkflowRecord) -> Slot:
    """Where the replacement is (or is to be) booked: the original's slot as the saga last saw it."""
    return slot_of(workflow.data.get("original", {}))


def result_of(command: Reassign, workflow: WorkflowRecord) -> CommandResult:
    """The reassign's one terminal result, from what the workflow recorded (no IO: it can't fail).

    ``reasons`` say what happened to each appointment when it is not the plain story
    (original cancelled "Booked in error" by this saga, replacement booked in its slot).
    """
    reasons: dict[str, list[str]] = dict(workflow.data.get("reasons", {}))
    replacement = workflow.data.get("replacement")
    if workflow.state == COMPLETED:
        outcome = workflow.data.get("outcome", "succeeded")
        return result_for(command, outcome, reasons=reasons, appointment=replacement, workflow_id=workflow.workflow_id)
    if "replacement" not in reasons:  # the original could not be cancelled (not: the replacement changed)
        cancel_error = workflow.data.get("cancel_error") or workflow.last_error
        reasons["original"] = [cancel_error or "the original could not be cancelled"]
        if workflow.state == COMPENSATION_FAILED:
            reasons["compensation"] = [
                f"{workflow.last_error}; parked in {COMPENSATION_FAILED}: see appt sagas --stuck"
            ]
        elif workflow.replacement_id is None:
            reasons["compensation"] = ["nothing was booked, nothing to undo"]
        else:
            reasons["compensation"] = [f"replacement {workflow.replacement_id} removed; original left as it was"]
    return result_for(command, "failed", reasons=reasons, workflow_id=workflow.workflow_id)

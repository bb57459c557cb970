"""Watches reassignment workflows, so none is left behind once the service runs.

``consumer/workflows.py`` drives a saga while its command is delivered; this
module keeps an eye on the workflows in the store between deliveries:
- every workflow is driven to its end by the running service: on start,
  every unfinished one a previous process left is handed back to the
  pipeline, and while it runs, every overdue one (untouched past its deadline,
  not parked with its waiting practice) is handed back again, at most once
  per deadline; the pipeline keeps it to one driver, never this module;
- the alarm is raised once per stuck workflow (parked in
  ``compensation_failed``, or overdue): an error log, ``appt sagas --stuck``;
- the gauges (``appt_workflows{state}``, ``appt_workflows_stuck``) are kept
  current.
Deadlines live in the store (the workflow's ``updated_at``), not in a process.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from consumer import metrics
from consumer.broker import Broker, PublishFailed
from consumer.logs import get_logger
from consumer.messages import Reassign
from consumer.periodic import every
from consumer.store.base import Store, WorkflowRecord
from statemachines.reassignment import COMPENSATION_FAILED, STATES, TERMINAL

log = get_logger(__name__)


def is_stuck(workflow: WorkflowRecord, *, deadline: float, now: datetime | None = None) -> bool:
    """Parked, or unfinished and untouched for longer than the deadline (deadlines live in the store)."""
    return workflow.state == COMPENSATION_FAILED or is_overdue(workflow, deadline=deadline, now=now)


def is_overdue(workflow: WorkflowRecord, *, deadline: float, now: datetime | None = None) -> bool:
    """Unfinished, not parked, and untouched for longer than the deadline."""
    if workflow.state in TERMINAL or workflow.state == COMPENSATION_FAILED or workflow.updated_at is None:
        return False
    age = ((now or datetime.now(UTC)) - workflow.updated_at).total_seconds()
    return age > deadline


class WorkflowWatcher:
    """One per `appt serve` (``tick`` keeps its alarms per process); `appt sagas retry` makes its own to hand back."""

    def __init__(self, *, store: Store, broker: Broker, deadline: float = 300.0) -> None:
        self._store = store
        self._broker = broker
        self._deadline = deadline
        self._alerted: set[str] = set()
        self._handed_back: dict[str, datetime] = {}  # overdue workflows this process republished, and when

    async def resume_unfinished(self) -> int:
        """On start: hand every workflow a previous process left mid-way back to the pipeline.

        Its command is published again (same id, keyed on the same appointment),
        so the partition's single active consumer drives it, serialised with the
        redelivery of the original message; the inbox drops whichever comes
        second. Driving it here instead could race another process starting at
        the same moment, and two drivers could both book a replacement.
        Parked workflows wait for `appt sagas retry`.
        """
        resumed = 0
        for workflow in await self._store.list_workflows(unfinished=True):
            if workflow.state == COMPENSATION_FAILED:
                continue
            try:
                await self.requeue(workflow)
                resumed += 1
            except PublishFailed as exc:  # the original message's redelivery still resumes it
                log.warning("workflow not handed back now", workflow_id=workflow.workflow_id, error=str(exc))
        return resumed

    async def requeue(self, workflow: WorkflowRecord) -> None:
        """Publish the workflow's command again, to be driven by whoever consumes its partition."""
        command = Reassign(
            command_id=workflow.command_id,
            appointment_id=workflow.appointment_id,
            practice=workflow.practice,
            patient_id=workflow.new_patient_id,
            correlation_id=workflow.correlation_id,
        )
        await self._broker.publish_inbound(
            command.model_dump_json().encode(),
            practice=command.practice,
            appointment_id=command.appointment_id,
            message_id=command.command_id,
        )
        log.info("workflow handed back to the pipeline", workflow_id=workflow.workflow_id, state=workflow.state)

    async def watch(self, stop: asyncio.Event, interval: float = 5.0) -> None:
        """Keep the workflow gauges, alarms and deadlines: see ``tick``."""
        await every(interval, stop, self.tick, "workflow watch")

    async def tick(self) -> None:
        """Refresh the gauges, raise the alarm once per stuck workflow, hand back overdue ones.

        An unfinished workflow untouched past its deadline (its command dead-lettered, or lost
        between deliveries), and not parked with its waiting practice, is handed back to the
        pipeline, at most once per deadline by this process: the running service drives every
        workflow to its end, no restart needed. The pipeline keeps it to one driver (the
        partition's single active consumer, per-appointment order, the inbox).
        """
        workflows = await self._store.list_workflows(unfinished=True)  # finished ones only grow
        now = datetime.now(UTC)
        for state in STATES:
            if state not in TERMINAL:
                metrics.WORKFLOWS.labels(state).set(sum(w.state == state for w in workflows))
        stuck = [w for w in workflows if is_stuck(w, deadline=self._deadline, now=now)]
        metrics.STUCK_WORKFLOWS.set(len(stuck))
        for workflow in stuck:
            if workflow.workflow_id not in self._alerted:
                self._alerted.add(workflow.workflow_id)
                log.error(
                    "workflow stuck: operator action needed (appt sagas --stuck)",
                    workflow_id=workflow.workflow_id,
                    state=workflow.state,
                    appointment_id=workflow.appointment_id,
                    last_error=workflow.last_error,
                )
        unfinished = {w.workflow_id for w in workflows}
        self._handed_back = {k: v for k, v in self._handed_back.items() if k in unfinished}
        for workflow in workflows:
            if is_overdue(workflow, deadline=self._deadline, now=now) and await self._left_behind(workflow):
                await self._hand_back_overdue(workflow, now)

    async def _left_behind(self, workflow: WorkflowRecord) -> bool:
        """Nothing else will drive it: its command is not parked with its waiting practice (a refused
        token, a spent budget: it comes back from there, in order), and it has not moved since it
        was listed (its parked command may have just driven it to the end). A copy handed back
        behind a parked command would only re-send its result."""
        if await self._store.parked_head(workflow.practice, workflow.appointment_id) is not None:
            return False
        current = await self._store.get_workflow(workflow.workflow_id)
        return current is not None and current.version == workflow.version

    async def _hand_back_overdue(self, workflow: WorkflowRecord, now: datetime) -> None:
        handed = self._handed_back.get(workflow.workflow_id)
        if handed is not None and (now - handed).total_seconds() < self._deadline:
            return
        try:
            await self.requeue(workflow)
        except PublishFailed as exc:  # the next tick tries again
            log.warning("overdue workflow not handed back now", workflow_id=workflow.workflow_id, error=str(exc))
            return
        self._handed_back[workflow.workflow_id] = now

"""Apply a change seen upstream (webhook or reconciler) to the appointment machine.

Events may arrive late, twice or out of order. An event no newer than what is
stored is stale and skipped; an impossible move (say Cancelled, then
Confirmed) means something was missed, so a fresh GET decides: the final state
always equals the PMS's.
"""

from __future__ import annotations

from typing import Any

from consumer.logs import get_logger
from consumer.messages import ObservedEvent
from consumer.pms.client import PmsClient
from consumer.pms.errors import NotFound
from consumer.records import (
    UNREAD,
    Decision,
    Origin,
    Unread,
    is_not_newer,
    new_record,
    snapshot_from_pms,
    snapshot_from_record,
    stored_record,
)
from consumer.store.base import AppointmentRecord, Store
from statemachines.appointment import bound

log = get_logger(__name__)


async def observe(
    event: ObservedEvent, pms: PmsClient, store: Store, known: AppointmentRecord | None | Unread = UNREAD
) -> Decision:
    """``known``: the appointment's record if the caller has read it (else it is read here)."""
    origin = Origin(event.source, practice=event.practice, webhook_id=event.event_id)
    stored = await stored_record(store, event.appointment_id, event.practice, known)
    deleted = event.type == "appointment.deleted"
    snapshot = snapshot_from_pms(event.appointment, deleted=deleted)
    if stored is not None and not deleted and is_not_newer(snapshot.updated_at, stored.upstream_updated_at):
        log.info(
            "stale event skipped",
            event_id=event.event_id,
            appointment_id=event.appointment_id,
            event_updated_at=snapshot.updated_at,
            stored_updated_at=stored.upstream_updated_at,
        )
        return Decision()
    upstream = dict(event.appointment)
    with bound(snapshot_from_record(stored), event.appointment_id) as appt:
        logs = origin.logs(appt.reconcile(snapshot))
        if any(record.detail.get("anomaly") for record in logs) and not deleted:
            upstream, gone = await _fresh(pms, event.appointment_id, fallback=upstream)
            fresh_origin = Origin("reconcile", practice=event.practice, webhook_id=event.event_id)
            logs += fresh_origin.logs(appt.reconcile(snapshot_from_pms(upstream, deleted=gone)))
        record = new_record(stored, appt.state, appt.patient_id, upstream, practice=event.practice)
    return Decision(record=record, logs=logs)


async def _fresh(pms: PmsClient, appointment_id: int, *, fallback: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The PMS's current view and whether it is gone (a 404 means deleted)."""
    try:
        return (await pms.get_appointment(appointment_id)).model_dump(mode="json"), False
    except NotFound:
        return fallback, True

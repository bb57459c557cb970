"""The PMS's resources as the client returns them.

Unknown fields are kept (``extra="allow"``): the PMS adds fields over time
and the service stores the full snapshot, so nothing is lost by parsing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class PmsAppointment(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: int
    uuid: str | None = None
    patient_id: int | None = None
    practitioner_id: int | None = None
    start_time: str | None = None
    finish_time: str | None = None
    duration: int | None = None
    reason: str | None = None
    state: str
    notes: str | None = None
    metadata: dict[str, Any] | None = None
    appointment_cancellation_reason_id: int | None = None
    pending_at: str | None = None
    confirmed_at: str | None = None
    arrived_at: str | None = None
    in_surgery_at: str | None = None
    completed_at: str | None = None
    cancelled_at: str | None = None
    did_not_attend_at: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    booked_via_api: bool | None = None
    version: int | None = None  # the sandbox's change counter; absent on the real PMS


class CancellationReason(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: int
    reason: str
    reason_type: str | None = None
    archived: bool = False  # listed, but refused for new cancellations

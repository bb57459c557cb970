"""The message contract: commands in, observed events in, results and state logs out.

These pydantic models are the public contract; ``appt schema`` exports them as
JSON Schema for clients in other languages. Unknown fields are refused so a
typo in a client is an error, not a silently ignored field.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

MAX_MESSAGE_BYTES = 64 * 1024
MAX_ID = 2**63 - 1  # ids are stored as BIGINT: a larger one is invalid input, not a transient failure

Id = Annotated[int, Field(gt=0, le=MAX_ID)]

DEFAULT_PRACTICE = "default"
PRACTICE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# No dots: the inbound routing key is ``<practice>.<appointment_id>``. Path-safe for the HTTP routes.
PracticeName = Annotated[str, Field(pattern=PRACTICE_PATTERN)]

Source = Literal["webhook", "command", "workflow", "reconcile"]
Outcome = Literal["succeeded", "rejected", "failed"]


def inbound_routing_key(practice: str, appointment_id: int) -> str:
    """``<practice>.<appointment_id>``; the default practice keeps the bare id it always had,
    so its messages hash to the partitions they always did (order holds across an upgrade)."""
    return str(appointment_id) if practice == DEFAULT_PRACTICE else f"{practice}.{appointment_id}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Command(_Strict):
    command_id: Annotated[str, Field(min_length=1, max_length=200)]
    appointment_id: Id
    practice: PracticeName = DEFAULT_PRACTICE
    correlation_id: str | None = None


class Confirm(_Command):
    type: Literal["confirm"] = "confirm"


class Cancel(_Command):
    type: Literal["cancel"] = "cancel"
    reason: Annotated[str, Field(min_length=1, max_length=500)]


class SetPatient(_Command):
    type: Literal["set_patient"] = "set_patient"
    patient_id: Id


class Reassign(_Command):
    type: Literal["reassign"] = "reassign"
    patient_id: Id


class EditNotes(_Command):
    type: Literal["edit_notes"] = "edit_notes"
    notes: Annotated[str, Field(max_length=10_000)]


Command = Annotated[
    Union[Confirm, Cancel, SetPatient, Reassign, EditNotes], Field(discriminator="type")
]
COMMAND_TYPES = ("confirm", "cancel", "set_patient", "reassign", "edit_notes")

EventType = Literal[
    "appointment.created",
    "appointment.updated",
    "appointment.state_changed",
    "appointment.deleted",
]


class ObservedEvent(_Strict):
    """A change seen upstream (a webhook, or a row found by the reconciler).

    ``appointment`` is the PMS's appointment object as sent; only the fields the
    machines need are required, the rest is kept for the record.
    """

    type: EventType
    event_id: Annotated[str, Field(min_length=1, max_length=200)]
    source: Literal["webhook", "reconcile"]
    appointment: dict[str, Any]
    practice: PracticeName = DEFAULT_PRACTICE
    received_at: datetime = Field(default_factory=utcnow)

    @field_validator("appointment")
    @classmethod
    def _has_an_id(cls, appointment: dict[str, Any]) -> dict[str, Any]:
        """The id keys the ordering, the record and the log: an event without one can never apply."""
        appointment_id = appointment.get("id")
        if type(appointment_id) is not int or not 0 < appointment_id <= MAX_ID:
            raise ValueError(f"appointment.id must be a positive 64-bit integer, got {appointment_id!r}")
        return appointment

    @property
    def appointment_id(self) -> int:
        return int(self.appointment["id"])


Inbound = Annotated[
    Union[Confirm, Cancel, SetPatient, Reassign, EditNotes, ObservedEvent],
    Field(discriminator="type"),
]
INBOUND: TypeAdapter[Any] = TypeAdapter(Inbound)
COMMAND: TypeAdapter[Any] = TypeAdapter(Command)


class WebhookPayload(BaseModel):
    """What the PMS posts. The live PMS's shape is not documented, so two are accepted:
    ``{"type", "timestamp", "data": {"appointment": {...}}}`` (Standard Webhooks style) and
    ``{"event", "object", "data": {...the appointment...}}``."""

    model_config = ConfigDict(extra="allow")

    type: EventType
    timestamp: datetime | None = None
    data: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _event_envelope(cls, value: Any) -> Any:
        """The ``event`` envelope names its type ``event``."""
        if isinstance(value, dict) and "type" not in value and "event" in value:
            return {**value, "type": value["event"]}
        return value

    def appointment(self) -> dict[str, Any]:
        inner = self.data.get("appointment", self.data)
        if not isinstance(inner, dict) or not isinstance(inner.get("id"), int):
            raise ValueError("data.appointment.id (an integer) is required")
        return inner


class StateLogRecord(BaseModel):
    """One transition of one machine: the unit of observability.

    ``seq`` is assigned by the store on commit and is unique and increasing,
    so observers can de-duplicate redelivered records by it.
    """

    model_config = ConfigDict(extra="forbid")

    seq: int | None = None
    time: datetime = Field(default_factory=utcnow)
    practice: str = DEFAULT_PRACTICE
    appointment_id: int
    machine: Literal["appointment", "reassignment"]
    from_state: str | None
    to_state: str
    trigger: str
    source: Source
    command_id: str | None = None
    webhook_id: str | None = None
    workflow_id: str | None = None
    correlation_id: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)

    def routing_key(self) -> str:
        return f"state.{self.machine}.{self.to_state.replace(' ', '_')}"


class CommandResult(BaseModel):
    """The answer to one command, published as ``result.<type>.<outcome>``."""

    model_config = ConfigDict(extra="forbid")

    command_id: str
    type: str
    practice: str = DEFAULT_PRACTICE
    appointment_id: int
    outcome: Outcome
    reasons: dict[str, list[str]] = Field(default_factory=dict)
    appointment: dict[str, Any] | None = None
    workflow_id: str | None = None
    correlation_id: str | None = None
    deliveries: int | None = None
    """Set on a dead letter's ``failed`` result: how many times the message was delivered."""
    replay: int = 0
    """0 for the command as sent; N for its Nth replay by ``appt dead replay``, whose
    result supersedes the earlier ones of the same ``command_id``."""
    time: datetime = Field(default_factory=utcnow)

    def routing_key(self) -> str:
        return f"result.{self.type}.{self.outcome}"

    def message_id(self) -> str:
        """The AMQP message id observers de-duplicate on: a replay's result is a new message."""
        suffix = f"-replay-{self.replay}" if self.replay else ""
        return f"result-{self.command_id}{suffix}"


def json_schemas() -> dict[str, Any]:
    """Every public message as JSON Schema, for ``appt schema``."""
    return {
        "command": COMMAND.json_schema(),
        "observed_event": ObservedEvent.model_json_schema(),
        "webhook_payload": WebhookPayload.model_json_schema(),
        "command_result": CommandResult.model_json_schema(),
        "state_log_record": StateLogRecord.model_json_schema(),
    }

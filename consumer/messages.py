"""The message contract: commands in, observed events in, results and state logs out.

These pydantic models are the public contract; ``appt schema`` exports them as
JSON Schema for clients in other languages. Unknown fields are refused so a
typo in a client is an error, not a silently ignored field.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

# The default of APPT_MAX_MESSAGE_BYTES: a webhook body and an inbound message alike.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
MAX_ID = 2**63 - 1  # ids are stored as BIGINT: a larger one is invalid input, not a transient failure
# Our message ids are these ids with a short prefix (``result-<command_id>``), and AMQP's
# shortstr properties (message_id, correlation_id, reply_to) hold 255 bytes at most.
MAX_ID_BYTES = 200
MAX_SHORTSTR_BYTES = 255
# How far ahead of our clock an upstream ``updated_at`` may be before it is a lie, not a skew.
MAX_CLOCK_SKEW = timedelta(minutes=5)

# Strict: "500060", 500060.0 and true are not ids (pydantic's lax mode would take them).
Id = Annotated[int, Field(strict=True, gt=0, le=MAX_ID)]


def fits_bytes(value: str, limit: int) -> bool:
    """Whether ``value`` is at most ``limit`` bytes in UTF-8 (AMQP counts bytes, not characters)."""
    return len(value.encode()) <= limit


def _within_bytes(limit: int) -> AfterValidator:
    """A length limit in UTF-8 bytes, for fields that become AMQP properties."""

    def check(value: str) -> str:
        if not fits_bytes(value, limit):
            raise ValueError(f"must be at most {limit} bytes in UTF-8")
        return value

    return AfterValidator(check)


# max_length (characters) puts the limit in the JSON Schema; the byte check is the binding one.
MessageId = Annotated[str, Field(min_length=1, max_length=MAX_ID_BYTES), _within_bytes(MAX_ID_BYTES)]
ShortStr = Annotated[str, Field(max_length=MAX_SHORTSTR_BYTES), _within_bytes(MAX_SHORTSTR_BYTES)]


def is_positive_id(value: object) -> bool:
    """An id as the PMS sends it: a JSON integer (not a bool) in the 64-bit range."""
    return type(value) is int and 0 < value <= MAX_ID


def parse_time(value: str) -> datetime:
    """An ISO 8601 time (``Z`` allowed); raises ValueError when unparsable."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def check_upstream_time(value: object, now: datetime | None = None) -> None:
    """An upstream ``updated_at`` orders events: a bad one would win every comparison or break them.

    Refused: not a string, unparsable, without a zone (incomparable with the
    others) or later than now plus ``MAX_CLOCK_SKEW`` (it would make every
    genuine later event look stale).
    """
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError("updated_at must be an ISO 8601 string")
    try:
        moment = parse_time(value)
    except ValueError:
        raise ValueError("updated_at must be an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise ValueError("updated_at must carry a time zone")
    if moment > (now or utcnow()) + MAX_CLOCK_SKEW:
        raise ValueError(f"updated_at is more than {MAX_CLOCK_SKEW} in the future")


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


def routing_key_names(routing_key: str, practice: str, appointment_id: int) -> bool:
    """Whether a delivery's routing key names the body's practice and appointment.

    Ordering is per routing key, so a key naming another appointment (or the
    same id in another practice) would order this one's messages with a
    stranger's. ``<practice>.<id>`` is accepted, and for the default practice
    its bare ``<id>`` too; the id spelled canonically.
    """
    return routing_key in (inbound_routing_key(practice, appointment_id), f"{practice}.{appointment_id}")


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Command(_Strict):
    command_id: MessageId
    appointment_id: Id
    practice: PracticeName = DEFAULT_PRACTICE
    correlation_id: ShortStr | None = None


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


Command = Annotated[Confirm | Cancel | SetPatient | Reassign | EditNotes, Field(discriminator="type")]
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
    event_id: MessageId
    source: Literal["webhook", "reconcile"]
    appointment: dict[str, Any]
    practice: PracticeName = DEFAULT_PRACTICE
    received_at: datetime = Field(default_factory=utcnow)

    @field_validator("appointment")
    @classmethod
    def _has_an_id(cls, appointment: dict[str, Any]) -> dict[str, Any]:
        """The id keys the ordering, the record and the log: an event without one can never apply.

        ``updated_at`` decides which of two events is newer, so it is checked too.
        """
        if not is_positive_id(appointment.get("id")):
            raise ValueError("appointment.id must be a positive 64-bit integer")
        check_upstream_time(appointment.get("updated_at"))
        return appointment

    @property
    def appointment_id(self) -> int:
        return int(self.appointment["id"])


Inbound = Annotated[
    Confirm | Cancel | SetPatient | Reassign | EditNotes | ObservedEvent,
    Field(discriminator="type"),
]
INBOUND: TypeAdapter[Any] = TypeAdapter(Inbound)
COMMAND: TypeAdapter[Any] = TypeAdapter(Command)


class WebhookAppointment(BaseModel):
    """The PMS's appointment object: only its id is required here, the rest is kept as sent."""

    model_config = ConfigDict(extra="allow")

    # Not the strict Id: JSON Schema calls 42.0 an integer, and the OpenAPI document must not
    # promise what is refused; a bool is still no id.
    id: Annotated[int, Field(gt=0, le=MAX_ID)]

    @field_validator("id", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        """JSON's ``true`` or ``"5"`` is no id (pydantic would read them as 1 and 5); ``42.0`` is 42."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("appointment id must be an integer")
        return value


class WebhookData(BaseModel):
    model_config = ConfigDict(extra="allow")

    appointment: WebhookAppointment


class WebhookPayload(BaseModel):
    """What the PMS posts. The live PMS's shape is not documented, so two are accepted:
    ``{"type", "timestamp", "data": {"appointment": {...}}}`` (Standard Webhooks style) and
    ``{"event", "object", "data": {...the appointment...}}``.

    ``data``'s schema says both (the appointment's id is what is required), so
    the OpenAPI document generated from it promises exactly what is accepted.
    """

    model_config = ConfigDict(extra="allow")

    type: EventType
    timestamp: datetime | None = None
    # Left to right: with an "appointment" key, that is the appointment.
    data: WebhookData | WebhookAppointment = Field(union_mode="left_to_right")

    @model_validator(mode="before")
    @classmethod
    def _event_envelope(cls, value: Any) -> Any:
        """The ``event`` envelope names its type ``event``."""
        if isinstance(value, dict) and "type" not in value and "event" in value:
            return {**value, "type": value["event"]}
        return value

    def appointment(self) -> dict[str, Any]:
        inner = self.data.appointment if isinstance(self.data, WebhookData) else self.data
        return inner.model_dump()


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

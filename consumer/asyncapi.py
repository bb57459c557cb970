"""`appt asyncapi`: the AMQP contract as an AsyncAPI 3.0 document.

Payload schemas come from the pydantic models in ``consumer.messages`` (the
ones the worker validates with), so the document can't drift from the code;
channel and header names come from ``consumer.broker``. Tools that render or
generate clients (AsyncAPI Studio, ``asyncapi generate``) read it as is.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from pydantic import BaseModel

from consumer.broker import (
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    DELIVERIES_HEADER,
    EVENTS_EXCHANGE,
    INBOUND_EXCHANGE,
    OBSERVED_EXCHANGE,
    REASON_CLASS_HEADER,
    REASON_HEADER,
    REPLAY_HEADER,
    ROUTING_KEY_HEADER,
)
from consumer.messages import (
    COMMAND_TYPES,
    Cancel,
    CommandResult,
    Confirm,
    EditNotes,
    ObservedEvent,
    Reassign,
    SetPatient,
    StateLogRecord,
)
from consumer.schemas import component_schemas

AMQP_BINDING = "0.3.0"

COMMANDS: dict[str, type[BaseModel]] = {
    "confirm": Confirm,
    "cancel": Cancel,
    "set_patient": SetPatient,
    "reassign": Reassign,
    "edit_notes": EditNotes,
}

# One example per message, as a client would send or receive it; the test
# validates each against its payload and header schemas.
EXAMPLE_TIME = "2026-11-25T15:51:28.019790Z"
COMMAND_EXAMPLES: dict[str, dict[str, Any]] = {
    "confirm": {"command_id": "c-1", "type": "confirm", "appointment_id": 757579675},
    "cancel": {"command_id": "c-2", "type": "cancel", "appointment_id": 757579675, "reason": "Patient cancelled"},
    "set_patient": {"command_id": "c-3", "type": "set_patient", "appointment_id": 757579675, "patient_id": 1014},
    "reassign": {
        "command_id": "c-4",
        "type": "reassign",
        "appointment_id": 757579675,
        "patient_id": 1014,
        "correlation_id": "booking-991",
    },
    "edit_notes": {"command_id": "c-5", "type": "edit_notes", "appointment_id": 757579675, "notes": "bring x-rays"},
}
OBSERVED_EXAMPLE = {
    "type": "appointment.state_changed",
    "event_id": "msg_2KWPBgLlAfxdpx2AI54pPJ85f1W",
    "source": "webhook",
    "received_at": EXAMPLE_TIME,
    "appointment": {
        "id": 757579675,
        "state": "Confirmed",
        "patient_id": 1013,
        "updated_at": "2026-11-25T15:51:27.000+00:00",
    },
}
RESULT_EXAMPLE = {
    "command_id": "c-3",
    "type": "set_patient",
    "appointment_id": 757579675,
    "outcome": "rejected",
    "reasons": {
        "patient_id": ["can not change patients"],
        "hint": ["use reassign to move this slot to another patient"],
    },
    "appointment": {"id": 757579675, "state": "Pending", "patient_id": 1013},
    "workflow_id": None,
    "correlation_id": None,
    "deliveries": None,
    "replay": 0,
    "time": EXAMPLE_TIME,
}
STATE_LOG_EXAMPLE = {
    "seq": 7,
    "time": EXAMPLE_TIME,
    "appointment_id": 757579675,
    "machine": "appointment",
    "from_state": "Confirmed",
    "to_state": "Cancelled",
    "trigger": "cancel",
    "source": "workflow",
    "command_id": "c-4",
    "webhook_id": None,
    "workflow_id": "reassign-c-4",
    "correlation_id": None,
    "detail": {"fields": {"state": "Cancelled", "appointment_cancellation_reason_id": 1}},
}
DEAD_LETTER_EXAMPLE = {"command_id": "c-9", "type": "confirm", "appointment_id": "not-a-number"}
TRACEPARENT_EXAMPLE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _headers(*, reply: bool = False, dead: bool = False) -> dict[str, Any]:
    """AMQP properties and headers a message carries (properties named as in AMQP 0-9-1)."""
    properties: dict[str, Any] = {
        "message_id": _string("AMQP property: the command id, webhook id or record id (the inbox key)."),
        "correlation_id": _string("AMQP property: echoed on the result; defaults to the command id."),
        "traceparent": _string(
            "AMQP header: W3C trace context; the service continues this trace.",
            pattern="^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        ),
    }
    if reply:
        properties["reply_to"] = _string("AMQP property: a queue that also gets the command's result.")
        properties[REPLAY_HEADER] = {
            "type": "integer",
            "minimum": 1,
            "description": "AMQP header: set by `appt dead replay` on its Nth replay of a dead letter.",
        }
    if dead:
        properties[REASON_HEADER] = _string("AMQP header: why the message was given up on.")
        properties[REASON_CLASS_HEADER] = _string("AMQP header: the reason's class.", enum=["invalid", "exhausted"])
        properties[DELIVERIES_HEADER] = {
            "type": "integer",
            "minimum": 0,
            "description": "AMQP header: deliveries before it was given up on.",
        }
        properties[ROUTING_KEY_HEADER] = _string("AMQP header: the routing key it was published with.")
    return {"type": "object", "properties": properties}


def _message(
    name: str,
    title: str,
    payload: dict[str, Any],
    headers: dict[str, Any],
    example: dict[str, Any],
    example_headers: dict[str, Any],
) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "contentType": "application/json",
        "headers": headers,
        "payload": payload,
        "correlationId": {"location": "$message.header#/correlation_id"},
        "bindings": {"amqp": {"messageType": name, "bindingVersion": AMQP_BINDING}},
        "examples": [{"name": name, "headers": example_headers, "payload": example}],
    }


def _messages() -> dict[str, Any]:
    models: list[type[BaseModel]] = [*COMMANDS.values(), ObservedEvent, CommandResult, StateLogRecord]
    refs, schemas = component_schemas(models)
    messages: dict[str, Any] = {}
    for type_, model in COMMANDS.items():
        example = COMMAND_EXAMPLES[type_]
        messages[type_] = _message(
            type_,
            f"Command: {type_}",
            refs[model],
            _headers(reply=True),
            example,
            {
                "message_id": example["command_id"],
                "correlation_id": example["command_id"],
                "reply_to": "amq.gen-reply",
                "traceparent": TRACEPARENT_EXAMPLE,
            },
        )
    messages["observed_event"] = _message(
        "observed_event",
        "A change seen at the PMS (webhook or catch-up poll)",
        refs[ObservedEvent],
        _headers(),
        OBSERVED_EXAMPLE,
        {"message_id": OBSERVED_EXAMPLE["event_id"]},
    )
    messages["command_result"] = _message(
        "command_result",
        "The result of one command",
        refs[CommandResult],
        _headers(),
        RESULT_EXAMPLE,
        {"message_id": "result-c-3", "correlation_id": "c-3"},
    )
    messages["state_log_record"] = _message(
        "state_log_record",
        "One transition of one machine",
        refs[StateLogRecord],
        _headers(),
        STATE_LOG_EXAMPLE,
        {"message_id": "state-7"},
    )
    messages["dead_letter"] = _message(
        "dead_letter",
        "A message the service gave up on, body unchanged",
        {"description": "The original body, as it was published (it may not even be JSON)."},
        _headers(dead=True),
        DEAD_LETTER_EXAMPLE,
        {
            "message_id": "c-9",
            REASON_HEADER: "invalid: appointment_id: Input should be a valid integer",
            REASON_CLASS_HEADER: "invalid",
            DELIVERIES_HEADER: 1,
            ROUTING_KEY_HEADER: "not-a-number",
        },
    )
    return {"messages": messages, "schemas": schemas}


def _channel_refs(channel: str, *names: str) -> list[dict[str, str]]:
    return [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in names]


def _exchange(name: str, type_: str | None, **extra: Any) -> dict[str, Any]:
    exchange: dict[str, Any] = {"name": name, "durable": True, "autoDelete": False, "vhost": "/"}
    if type_:
        exchange["type"] = type_
    return {"amqp": {"is": "routingKey", "exchange": {**exchange, **extra}, "bindingVersion": AMQP_BINDING}}


def _channels() -> dict[str, Any]:
    return {
        "inbound": {
            "address": "{routing_key}",
            "title": INBOUND_EXCHANGE,
            "description": (
                f"Commands into exchange `{INBOUND_EXCHANGE}`, the partners' only write (consistent-hash"
                " on the routing key onto the partition queues `appointments.inbound.p0..pN-1`, each a"
                " quorum queue with single-active-consumer): every message of one appointment is"
                " handled in order. The routing key must name the body's practice and appointment."
            ),
            "parameters": {
                "routing_key": {
                    "description": (
                        "`<practice>.<appointment_id>`, or a bare `<appointment_id>` for the"
                        " default practice (the id in decimal)."
                    )
                }
            },
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in COMMAND_TYPES},
            # The binding's exchange types don't include RabbitMQ's plugin type.
            "bindings": _exchange(INBOUND_EXCHANGE, None, **{"x-type": "x-consistent-hash"}),
        },
        "observed": {
            "address": "{routing_key}",
            "title": OBSERVED_EXCHANGE,
            "description": (
                f"Observed events, published only by the service's own webhook receiver and poller to"
                f" fanout exchange `{OBSERVED_EXCHANGE}`, which is bound into `{INBOUND_EXCHANGE}` so"
                " they share the partitions (and the order) of commands. Partners have no write"
                f" permission here; an observed event arriving through `{INBOUND_EXCHANGE}` is"
                " dead-lettered as forged."
            ),
            "parameters": {"routing_key": {"description": "As on the inbound channel."}},
            "messages": {"observed_event": {"$ref": "#/components/messages/observed_event"}},
            "bindings": _exchange(OBSERVED_EXCHANGE, "fanout"),
        },
        "results": {
            "address": "result.{command_type}.{outcome}",
            "title": f"{EVENTS_EXCHANGE}: results",
            "description": f"One result per command on topic exchange `{EVENTS_EXCHANGE}`; bind `result.#`.",
            "parameters": {
                "command_type": {"enum": list(COMMAND_TYPES)},
                "outcome": {"enum": ["succeeded", "rejected", "failed"]},
            },
            "messages": {"command_result": {"$ref": "#/components/messages/command_result"}},
            "bindings": _exchange(EVENTS_EXCHANGE, "topic"),
        },
        "stateLogs": {
            "address": "state.{machine}.{to_state}",
            "title": f"{EVENTS_EXCHANGE}: state logs",
            "description": (
                f"One record per transition on topic exchange `{EVENTS_EXCHANGE}` (spaces in the state"
                " as `_`); bind `state.#`. At-least-once: de-duplicate by `seq`."
            ),
            "parameters": {
                "machine": {"enum": ["appointment", "reassignment"]},
                "to_state": {"description": "The state entered, e.g. Confirmed, In_surgery, completed."},
            },
            "messages": {"state_log_record": {"$ref": "#/components/messages/state_log_record"}},
            "bindings": _exchange(EVENTS_EXCHANGE, "topic"),
        },
        "replies": {
            "address": None,
            "title": "reply_to",
            "description": "The queue a command named in its `reply_to` property (the default exchange).",
            "messages": {"command_result": {"$ref": "#/components/messages/command_result"}},
        },
        "deadLetters": {
            "address": DEAD_QUEUE,
            "title": DEAD_QUEUE,
            "description": (
                f"Fanout exchange `{DEAD_EXCHANGE}` into quorum queue `{DEAD_QUEUE}`: invalid messages"
                " and those that failed past the delivery limit, with the reason in a header."
            ),
            "messages": {"dead_letter": {"$ref": "#/components/messages/dead_letter"}},
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {
                        "name": DEAD_QUEUE,
                        "durable": True,
                        "exclusive": False,
                        "autoDelete": False,
                        "vhost": "/",
                    },
                    "bindingVersion": AMQP_BINDING,
                }
            },
        },
    }


def _operations() -> dict[str, Any]:
    persistent = {"amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": AMQP_BINDING}}
    return {
        "receiveCommand": {
            "action": "receive",
            "channel": {"$ref": "#/channels/inbound"},
            "summary": "Apply a command (idempotent by command_id) and answer with its result.",
            "messages": _channel_refs("inbound", *COMMAND_TYPES),
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
            "reply": {
                "address": {
                    "location": "$message.header#/reply_to",
                    "description": "Sent there too when the command named a reply_to queue.",
                },
                "channel": {"$ref": "#/channels/replies"},
                "messages": _channel_refs("replies", "command_result"),
            },
        },
        "receiveObservedEvent": {
            "action": "receive",
            "channel": {"$ref": "#/channels/observed"},
            "summary": "Adopt a change seen at the PMS (published by the webhook receiver and the poller).",
            "messages": _channel_refs("observed", "observed_event"),
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
        },
        "sendResult": {
            "action": "send",
            "channel": {"$ref": "#/channels/results"},
            "summary": "Publish each command's result after the store commit.",
            "messages": _channel_refs("results", "command_result"),
            "bindings": persistent,
        },
        "sendStateLog": {
            "action": "send",
            "channel": {"$ref": "#/channels/stateLogs"},
            "summary": "Publish every transition of every machine after the store commit.",
            "messages": _channel_refs("stateLogs", "state_log_record"),
            "bindings": persistent,
        },
        "sendDeadLetter": {
            "action": "send",
            "channel": {"$ref": "#/channels/deadLetters"},
            "summary": "Give up on a message that can never be processed as it is.",
            "messages": _channel_refs("deadLetters", "dead_letter"),
            "bindings": persistent,
        },
    }


def asyncapi_document(amqp_host: str = "127.0.0.1:5672") -> dict[str, Any]:
    """The whole document; ``amqp_host`` is the server entry's host (the broker clients use)."""
    components = _messages()
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "appointment-consumer",
            "version": version("appointment-consumer"),
            "description": (
                "Commands in, results and state logs out, dead letters aside: the AMQP contract of"
                " the service that keeps a partner system's appointments in step with the PMS."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": amqp_host,
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RabbitMQ (APPT_AMQP_URL).",
            },
        },
        "channels": _channels(),
        "operations": _operations(),
        "components": components,
    }

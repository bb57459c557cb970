"""Hostile bytes against the pure checks: parsing, ids, times, routing keys, inbox keys, replies."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumer.broker import INBOUND_EXCHANGE, OBSERVED_EXCHANGE
from consumer.messages import ObservedEvent, check_upstream_time, routing_key_names
from consumer.records import is_not_newer
from consumer.worker import InvalidMessage, check_trusted, message_key, parse, reply_queue

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def command(**fields: Any) -> bytes:
    return json.dumps({"type": "confirm", "command_id": "c-1", "appointment_id": 42, **fields}).encode()


def event(**fields: Any) -> dict[str, Any]:
    return {"type": "appointment.updated", "event_id": "e-1", "source": "webhook", "appointment": {"id": 42, **fields}}


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "confirm", "command_id": "c", "appointment_id": ' + b"9" * 5000 + b"}",  # int() digit limit
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe",
        b'{"type": "confirm", "command_id": "c\\u0000", "appointment_id": 1e400}',
    ],
)
def test_any_bytes_either_parse_or_are_invalid(body: bytes) -> None:
    with pytest.raises(InvalidMessage):
        parse(body)


@pytest.mark.parametrize("appointment_id", ["500060", 500060.0, True, 0, 2**63])
def test_ids_are_strict_integers(appointment_id: object) -> None:
    with pytest.raises(InvalidMessage, match="appointment_id"):
        parse(command(appointment_id=appointment_id))


def test_the_size_limit_is_the_one_given() -> None:
    body = command(correlation_id="x" * 200)
    assert parse(body, len(body)).appointment_id == 42
    with pytest.raises(InvalidMessage, match="exceeds the limit"):
        parse(body, len(body) - 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("command_id", "é" * 101),  # 101 characters, 202 bytes
        ("correlation_id", "c" * 256),
    ],
)
def test_strings_that_become_amqp_properties_are_limited_in_bytes(field: str, value: str) -> None:
    with pytest.raises(InvalidMessage, match=field):
        parse(command(**{field: value}))
    assert parse(command(**{field: value[:100]}))


@pytest.mark.parametrize("updated_at", ["2026-06-01T12:06:00Z", "2026-06-01T12:00:00", "soon", 1780000000])
def test_an_upstream_time_ahead_of_the_skew_or_without_zone_is_refused(updated_at: object) -> None:
    with pytest.raises(ValueError, match="updated_at"):
        check_upstream_time(updated_at, now=NOW)


def test_an_upstream_time_within_the_skew_is_taken() -> None:
    check_upstream_time("2026-06-01T12:04:00Z", now=NOW)
    check_upstream_time("2026-06-01T13:04:00.123+01:00", now=NOW)
    check_upstream_time(None, now=NOW)


def test_an_observed_event_with_a_future_time_is_invalid() -> None:
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    with pytest.raises(InvalidMessage, match="updated_at"):
        parse(json.dumps(event(updated_at=future)).encode())


@pytest.mark.parametrize(
    ("candidate", "stored", "expected"),
    [
        ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", True),
        ("2026-01-03T00:00:00Z", "2026-01-02T00:00:00Z", False),
        ("2026-01-01T00:00:00Z", "2099-01-01T00:00:00Z", False),  # a poisoned stored time is not trusted
        ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00", False),  # naive: incomparable, never raises
        ("2026-01-01T00:00:00", "2026-01-02T00:00:00Z", False),
        ("garbage", "2026-01-02T00:00:00Z", False),
        (None, "2026-01-02T00:00:00Z", False),
    ],
)
def test_staleness_never_raises_and_never_trusts_a_bad_stored_time(
    candidate: str | None, stored: str, expected: bool
) -> None:
    assert is_not_newer(candidate, stored) is expected


@pytest.mark.parametrize(
    ("routing_key", "practice", "expected"),
    [
        ("42", "default", True),
        ("default.42", "default", True),
        ("north.42", "north", True),
        ("42", "north", False),
        ("south.42", "north", False),
        ("north.42", "default", False),
        ("43", "default", False),
        ("042", "default", False),
        ("", "default", False),
        ("42.43", "default", False),
    ],
)
def test_the_routing_key_must_name_the_bodys_practice_and_appointment(
    routing_key: str, practice: str, expected: bool
) -> None:
    assert routing_key_names(routing_key, practice, 42) is expected


def test_inbox_keys_are_namespaced_by_kind_and_source() -> None:
    same_id = "msg_1"
    keys = {
        message_key(parse(command(command_id=same_id))),
        message_key(ObservedEvent.model_validate(event() | {"event_id": same_id})),
        message_key(ObservedEvent.model_validate(event() | {"event_id": same_id, "source": "reconcile"})),
    }
    assert keys == {"command:msg_1", "webhook:msg_1", "reconcile:msg_1"}


def test_only_the_observed_exchange_may_carry_observed_events() -> None:
    observed = ObservedEvent.model_validate(event())
    check_trusted(observed, OBSERVED_EXCHANGE)
    check_trusted(parse(command()), INBOUND_EXCHANGE)
    with pytest.raises(InvalidMessage, match="appointments.observed"):
        check_trusted(observed, INBOUND_EXCHANGE)


@pytest.mark.parametrize(
    ("reply_to", "expected"),
    [
        ("caller.replies", "caller.replies"),
        ("amq.rabbitmq.reply-to", "amq.rabbitmq.reply-to"),
        ("appointments.dead", None),
        ("appointments.inbound.p0", None),
        ("", None),
        (None, None),
    ],
)
def test_replies_never_go_to_the_services_own_queues(reply_to: str | None, expected: str | None) -> None:
    assert reply_queue(reply_to) == expected

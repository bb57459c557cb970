"""`appt asyncapi` is a valid AsyncAPI 3.0 document whose examples fit their schemas.

The specification's JSON Schema is the one the AsyncAPI tools use, from the
`@asyncapi/specs` npm package that scripts/bootstrap.sh installs into .tools/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from consumer.asyncapi import asyncapi_document
from consumer.messages import COMMAND_TYPES, INBOUND, CommandResult, StateLogRecord

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / ".tools/npm/node_modules/@asyncapi/specs/schemas/3.0.0-without-$id.json"
DOCUMENT = asyncapi_document()
MESSAGES: dict[str, Any] = DOCUMENT["components"]["messages"]


def _resolving(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with the document's components beside it, so its $refs resolve."""
    return {**schema, "components": DOCUMENT["components"]}


def test_the_cli_prints_the_document() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "asyncapi"], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == json.loads(json.dumps(DOCUMENT))


def test_the_document_is_valid_against_the_asyncapi_3_0_schema() -> None:
    assert SPEC.exists(), f"{SPEC} missing: run scripts/bootstrap.sh (npm install @asyncapi/specs)"
    spec = json.loads(SPEC.read_text())
    errors = sorted(
        jsonschema.Draft7Validator(spec).iter_errors(json.loads(json.dumps(DOCUMENT))),
        key=lambda e: list(e.absolute_path),
    )
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors[:10])


def test_a_broken_document_is_caught_by_that_schema() -> None:
    spec = json.loads(SPEC.read_text())
    broken = json.loads(json.dumps(DOCUMENT))
    broken["operations"]["sendResult"]["action"] = "publish"  # AsyncAPI 2's verb, gone in 3.0
    assert not jsonschema.Draft7Validator(spec).is_valid(broken)


def test_it_has_the_channels_and_operations_of_the_contract() -> None:
    assert set(DOCUMENT["channels"]) == {"inbound", "observed", "results", "stateLogs", "replies", "deadLetters"}
    assert DOCUMENT["channels"]["inbound"]["title"] == "appointments.inbound"
    assert set(DOCUMENT["channels"]["inbound"]["messages"]) == set(COMMAND_TYPES)
    # Observed events have their own, service-only exchange: partners can't forge one (issue 12).
    assert DOCUMENT["channels"]["observed"]["title"] == "appointments.observed"
    assert set(DOCUMENT["channels"]["observed"]["messages"]) == {"observed_event"}
    assert DOCUMENT["operations"]["receiveObservedEvent"]["channel"] == {"$ref": "#/channels/observed"}
    actions = {name: op["action"] for name, op in DOCUMENT["operations"].items()}
    assert actions == {
        "receiveCommand": "receive",
        "receiveObservedEvent": "receive",
        "sendResult": "send",
        "sendStateLog": "send",
        "sendDeadLetter": "send",
    }
    assert DOCUMENT["operations"]["receiveCommand"]["reply"]["address"]["location"] == ("$message.header#/reply_to")
    assert "x-appt-reason" in MESSAGES["dead_letter"]["headers"]["properties"]
    for name in COMMAND_TYPES:
        assert {"message_id", "correlation_id", "reply_to"} <= set(MESSAGES[name]["headers"]["properties"])


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_every_example_matches_its_message_schema(name: str) -> None:
    message = MESSAGES[name]
    assert message["examples"], name
    for example in message["examples"]:
        jsonschema.Draft202012Validator(_resolving(message["payload"])).validate(example["payload"])
        jsonschema.Draft202012Validator(message["headers"]).validate(example["headers"])


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_a_wrong_example_fails_its_schema(name: str) -> None:
    """The schemas have teeth: an unknown field is refused (the dead letter takes any body)."""
    message = MESSAGES[name]
    wrong = {**message["examples"][0]["payload"], "unknown_field": 1}
    valid = jsonschema.Draft202012Validator(_resolving(message["payload"])).is_valid(wrong)
    assert valid is (name == "dead_letter")


def test_the_examples_are_what_the_service_accepts_and_sends() -> None:
    """The pydantic models agree with the JSON Schemas generated from them."""
    for name in [*COMMAND_TYPES, "observed_event"]:
        INBOUND.validate_python(MESSAGES[name]["examples"][0]["payload"])
    CommandResult.model_validate(MESSAGES["command_result"]["examples"][0]["payload"])
    StateLogRecord.model_validate(MESSAGES["state_log_record"]["examples"][0]["payload"])


def test_the_linked_copy_in_docs_is_current() -> None:
    """README links docs/asyncapi.json: regenerate it with `appt asyncapi > docs/asyncapi.json`."""
    committed = json.loads((ROOT / "docs" / "asyncapi.json").read_text())
    assert committed == json.loads(json.dumps(DOCUMENT))

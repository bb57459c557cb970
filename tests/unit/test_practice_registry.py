"""The practice registry: where each practice's PMS, token and secrets come from, and reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer import metrics
from consumer.messages import COMMAND, inbound_routing_key
from consumer.practices import (
    PracticeConfig,
    Practices,
    PracticesError,
    UnknownPractice,
    client_factory,
    load_configs,
)
from consumer.settings import Settings

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def write(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "practices.toml"
    path.write_text(text)
    return Settings(practices_file=str(path))


def test_without_a_file_there_is_one_default_practice_from_the_single_practice_variables() -> None:
    settings = Settings(pms_url="https://pms.example", pms_token="t0k", webhook_secrets=[SECRET])
    assert load_configs(settings) == {
        "default": PracticeConfig(pms_url="https://pms.example", token="t0k", webhook_secrets=[SECRET]),
    }


def test_the_file_names_each_practice_with_a_token_or_a_token_file(tmp_path: Path) -> None:
    (tmp_path / "south.token").write_text("south-token\n")
    settings = write(
        tmp_path,
        f"""
[practices.north]
pms_url = "http://north"
token = "north-token"
webhook_secrets = ["{SECRET}"]
dentally_signing_secret = "d-north"

[practices.south]
pms_url = "http://south"
token_file = "{tmp_path / "south.token"}"
""",
    )
    configs = load_configs(settings)
    assert sorted(configs) == ["north", "south"]
    assert configs["north"].webhook_secrets == [SECRET]
    assert configs["north"].dentally_signing_secret == "d-north"
    assert configs["north"].read_token() == "north-token"
    assert configs["south"].read_token() == "south-token"  # stripped of the newline


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[practices.north]\npms_url = "x"\n', "exactly one of token or token_file"),
        ('[practices.north]\npms_url = "x"\ntoken = "a"\ntoken_file = "/f"\n', "exactly one of token"),
        ('[practices."No.Dots"]\npms_url = "x"\ntoken = "a"\n', "practice name 'No.Dots'"),
        ('[practices.north]\npms_url = "x"\ntoken = "a"\nwebhook_secrets = ["whsec_%%%"]\n', "practices.north"),
        ('[practices.north]\npms_url = "x"\ntoken = "a"\ncolour = "red"\n', "colour"),
        ("[other]\n", "no [practices.<name>] table"),
        ("not toml [", "Expected '='"),
    ],
)
def test_a_bad_file_stops_the_load_with_a_line_naming_the_problem(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(PracticesError) as raised:
        load_configs(write(tmp_path, text))
    assert str(raised.value).startswith("APPT_PRACTICES_FILE ") and names in str(raised.value)


def test_a_missing_practices_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(PracticesError, match="APPT_PRACTICES_FILE"):
        load_configs(Settings(practices_file=str(tmp_path / "absent.toml")))


def test_an_unknown_practice_is_a_lookup_error() -> None:
    practices = Practices(load_configs(Settings()), client_factory(Settings()))
    assert "default" in practices and "north" not in practices
    with pytest.raises(UnknownPractice):
        practices.get("north")


async def test_reload_replaces_only_what_changed_and_reads_token_files_again(tmp_path: Path) -> None:
    token_file = tmp_path / "north.token"
    token_file.write_text("refused")
    text = f"""
[practices.north]
pms_url = "http://north"
token_file = "{token_file}"

[practices.south]
pms_url = "http://south"
token = "south"
"""
    settings = write(tmp_path, text)
    practices = Practices(load_configs(settings), client_factory(settings))
    north, south = practices.get("north"), practices.get("south")

    assert await practices.reload(load_configs(settings)) == []  # nothing changed: same clients
    assert practices.get("north") is north

    token_file.write_text("fixed")
    assert await practices.reload(load_configs(settings)) == ["north"]
    assert practices.get("north").token == "fixed" and practices.get("north") is not north
    assert practices.get("south") is south

    write(tmp_path, text.replace('[practices.south]\npms_url = "http://south"\ntoken = "south"\n', ""))
    assert await practices.reload(load_configs(settings)) == ["south"]
    assert "south" not in practices
    await practices.close()


async def test_a_reload_that_cannot_read_a_token_changes_nothing(tmp_path: Path) -> None:
    token_file = tmp_path / "north.token"
    token_file.write_text("good")
    settings = write(tmp_path, f'[practices.north]\npms_url = "x"\ntoken_file = "{token_file}"\n')
    practices = Practices(load_configs(settings), client_factory(settings))
    before = practices.get("north")
    configs = load_configs(settings)
    token_file.unlink()
    with pytest.raises(PracticesError, match="token_file"):
        await practices.reload(configs)
    assert practices.get("north") is before
    await practices.close()


async def test_a_wait_is_alerted_once_and_ends_only_when_the_pms_answers_a_probe() -> None:
    """The worker writes the error line when ``wait`` says a wait started: a probe that meets the
    same refusal goes on with that wait. A probe keeps the waiting status (the metric, GET
    /practices) until the PMS answers it: it showed ``ok`` while the probe was in flight."""
    practices = Practices(load_configs(Settings()), client_factory(Settings()))
    practice = practices.get("default")

    assert practice.wait("token_refused", 5.0, "401") is True
    practice.probe()  # its parked messages try the PMS again
    assert (practice.status, practice.served) == ("token_refused", True)
    assert status_metric("token_refused") == 1 and status_metric("ok") == 0
    practice.pms.on_response("DELETE", "DELETE /v1/appointments/{id}", 401)  # type: ignore[misc]
    assert practice.wait("token_refused", 10.0, "401") is False
    assert (practice.status, practice.served) == ("token_refused", False)
    practice.pms.on_response("GET", "GET /v1/appointments/{id}", 200)  # type: ignore[misc]
    assert practice.status == "token_refused"  # an answer to no probe (sent before the wait) ends nothing
    practice.probe()
    practice.pms.on_response("GET", "GET /v1/appointments/{id}", 200)  # type: ignore[misc]
    assert (practice.status, practice.retry_at, practice.probing) == ("ok", None, False)
    assert status_metric("ok") == 1 and status_metric("token_refused") == 0
    assert practice.wait("unreachable", 15.0, "503") is True  # a new wait, alerted again
    await practices.close()


def status_metric(status: str) -> float:
    return metrics.PRACTICE_STATUS.labels("default", status)._value.get()  # noqa: SLF001 (a test reads the gauge)


def test_commands_name_their_practice_and_the_routing_key_carries_it() -> None:
    bare = COMMAND.validate_python({"type": "confirm", "command_id": "c", "appointment_id": 9})
    north = COMMAND.validate_python({"type": "confirm", "command_id": "c", "appointment_id": 9, "practice": "north"})
    assert (bare.practice, north.practice) == ("default", "north")
    assert inbound_routing_key("default", 9) == "9"  # unchanged for single-practice deployments
    assert inbound_routing_key("north", 9) == "north.9"
    with pytest.raises(ValueError):
        COMMAND.validate_python({"type": "confirm", "command_id": "c", "appointment_id": 9, "practice": "north.9"})

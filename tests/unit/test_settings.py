"""Configuration: defaults that run locally, and bad values that name their variable."""

from __future__ import annotations

import pytest

from consumer.cli import EXIT_CONFIG, main
from consumer.settings import SettingsError, load_settings


def test_defaults_are_the_embedded_local_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("APPT_AMQP_URL", "APPT_STORE", "APPT_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.store.startswith("sqlite://")
    assert settings.log_format == "json"


def test_secrets_are_a_comma_or_space_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPT_WEBHOOK_SECRETS", "whsec_YWFh, whsec_YmJi Y2Nj")
    assert load_settings().webhook_secrets == ["whsec_YWFh", "whsec_YmJi", "Y2Nj"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("APPT_HTTP_PORT", "eighty"),
        ("APPT_HTTP_PORT", "70000"),
        ("APPT_LOG_FORMAT", "xml"),
        ("APPT_STORE", "mysql://db"),
        ("APPT_PREFETCH", "0"),
        ("APPT_WORKER_PARTITIONS", "9-3"),
        ("APPT_INBOX_RETENTION", "-1"),
        ("APPT_STATE_LOG_RETENTION", "3600"),  # shorter than the inbox's 7 days
        ("APPT_PRUNE_BATCH", "0"),
        ("APPT_PRACTICE_PROBE_INTERVAL", "0"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_worker_partitions_select_a_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPT_PARTITIONS", "8")
    monkeypatch.setenv("APPT_WORKER_PARTITIONS", "0-2,5")
    assert load_settings().consumed_partitions() == [0, 1, 2, 5]


def test_the_cli_stops_with_a_one_line_reason_and_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPT_HTTP_PORT", "eighty")
    assert main(["sagas"]) == EXIT_CONFIG
    assert "APPT_HTTP_PORT" in capsys.readouterr().err


def test_a_bad_store_url_is_named_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPT_STORE", "mysql://app:hunter2@db/appt")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "APPT_STORE" in str(raised.value) and "hunter2" not in str(raised.value)
    assert "mysql://app:***@db/appt" in str(raised.value)


def test_a_malformed_secret_is_one_line_exit_3_without_the_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPT_WEBHOOK_SECRETS", "whsec_Zm9vY, whsec_hunts")  # 5 base64 digits: no bytes
    assert main(["sagas"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "APPT_WEBHOOK_SECRETS" in err
    assert "hunts" not in err and "Zm9vY" not in err


def test_the_message_size_limit_is_also_read_under_its_earlier_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPT_WEBHOOK_MAX_BODY", "4096")
    assert load_settings().max_message_bytes == 4096
    monkeypatch.setenv("APPT_MAX_MESSAGE_BYTES", "8192")
    assert load_settings().max_message_bytes == 8192


def test_the_state_log_may_be_bounded_but_never_below_the_inbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """A redelivery the inbox catches re-publishes its records from the log."""
    monkeypatch.setenv("APPT_INBOX_RETENTION", "86400")
    monkeypatch.setenv("APPT_STATE_LOG_RETENTION", "86400")
    assert load_settings().state_log_retention == 86400
    monkeypatch.setenv("APPT_INBOX_RETENTION", "0")  # an inbox kept for good needs its log kept too
    with pytest.raises(SettingsError, match="APPT_STATE_LOG_RETENTION"):
        load_settings()

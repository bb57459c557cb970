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
    monkeypatch.setenv("APPT_WEBHOOK_SECRETS", "whsec_a, whsec_b whsec_c")
    assert load_settings().webhook_secrets == ["whsec_a", "whsec_b", "whsec_c"]


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


def test_the_state_log_may_be_bounded_but_never_below_the_inbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """A redelivery the inbox catches re-publishes its records from the log."""
    monkeypatch.setenv("APPT_INBOX_RETENTION", "86400")
    monkeypatch.setenv("APPT_STATE_LOG_RETENTION", "86400")
    assert load_settings().state_log_retention == 86400
    monkeypatch.setenv("APPT_INBOX_RETENTION", "0")  # an inbox kept for good needs its log kept too
    with pytest.raises(SettingsError, match="APPT_STATE_LOG_RETENTION"):
        load_settings()

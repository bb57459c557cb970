"""Configuration from the environment (prefix ``APPT_``).

A bad value must stop start-up with a message that names the variable, so an
operator fixes the deployment instead of reading a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from consumer.messages import DEFAULT_MAX_MESSAGE_BYTES
from consumer.signing import secret_key

ENV_PREFIX = "APPT_"
# Never echoed in an error: their values are credentials.
SECRET_SETTINGS = frozenset({"pms_token", "webhook_secrets", "dentally_signing_secret", "api_token"})
DAY = 86_400.0


class SettingsError(Exception):
    """Raised with one line per bad variable, each naming the variable."""


def default_store_path() -> Path:
    """An absolute place, so every verb finds the same store whatever the current directory.

    ``$XDG_DATA_HOME/appt/appt.sqlite3``, i.e. ``~/.local/share/appt/appt.sqlite3`` by default.
    """
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).absolute() / "appt" / "appt.sqlite3"


def default_store() -> str:
    return f"sqlite:///{default_store_path()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    store: str = Field(default_factory=default_store)
    practices_file: str | None = None
    pms_url: str = "http://127.0.0.1:8700"
    pms_token: str = "sandbox-token"
    pms_timeout: float = Field(10.0, gt=0)
    pms_concurrency: int = Field(8, ge=1, le=256)
    pms_retry_attempts: int = Field(4, ge=1, le=20)
    pms_reasons_ttl: float = Field(3600.0, ge=0)
    read_before_write: Literal["always", "on_conflict"] = "always"
    webhook_secrets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_tolerance: int = Field(300, ge=1)
    # One limit for a webhook's body and an inbound message, so a 202 always means "will be
    # applied". APPT_WEBHOOK_MAX_BODY, its earlier name, is still read.
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        le=64 * 1024 * 1024,
        validation_alias=AliasChoices(
            "max_message_bytes", "APPT_MAX_MESSAGE_BYTES", "webhook_max_body", "APPT_WEBHOOK_MAX_BODY"
        ),
    )
    dentally_signing_secret: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    sandbox_port: int = Field(8700, ge=0, le=65535)
    api_token: str | None = None
    http_idle_timeout: float = Field(15.0, gt=0)
    http_body_timeout: float = Field(30.0, gt=0)
    http_max_connections: int = Field(512, ge=1)
    log_format: Literal["json", "console"] = "json"
    log_level: str = "INFO"
    prefetch: int = Field(64, ge=1, le=1000)
    partitions: int = Field(4, ge=1, le=64)
    worker_partitions: str = "all"
    max_deliveries: int = Field(5, ge=1, le=100)
    retry_delay: float = Field(1.0, ge=0)
    reconcile_interval: float = Field(60.0, ge=0)
    reconcile_horizon_days: int = Field(30, ge=1, le=366)
    reconcile_budget_share: float = Field(0.10, gt=0, le=1)
    reconcile_updated_after: bool = False
    webhook_silence_grace: float = Field(120.0, gt=0)
    workflow_deadline: float = Field(300.0, gt=0)
    practice_probe_interval: float = Field(5.0, gt=0)
    # Retention, in seconds; 0 keeps for good. Why these defaults: README "Retention".
    inbox_retention: float = Field(7 * DAY, ge=0)
    workflow_retention: float = Field(30 * DAY, ge=0)
    state_log_retention: float = Field(0.0, ge=0)
    prune_interval: float = Field(60.0, ge=0)
    prune_batch: int = Field(500, ge=1, le=100_000)

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        """Secrets come as one comma- or space-separated variable, for rotation."""
        if isinstance(value, str):
            return [s for s in value.replace(",", " ").split() if s]
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _decodable_secrets(cls, secrets: list[str]) -> list[str]:
        """A malformed secret stops start-up here, not at the first webhook."""
        for secret in secrets:
            secret_key(secret)
        return secrets

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///PATH or a postgresql:// URL")
        return value

    @field_validator("state_log_retention")
    @classmethod
    def _log_outlives_inbox(cls, value: float, info: ValidationInfo) -> float:
        """A redelivery the inbox catches re-publishes its records from the log, so
        the log must be kept at least as long as the inbox."""
        inbox = info.data.get("inbox_retention")
        if value and inbox is not None and (inbox == 0 or value < inbox):
            raise ValueError(f"must be 0 (keep) or at least APPT_INBOX_RETENTION ({inbox:g})")
        return value

    @field_validator("worker_partitions")
    @classmethod
    def _partition_list(cls, value: str) -> str:
        if value != "all":
            parse_partitions(value, 64)
        return value

    @model_validator(mode="after")
    def _worker_partitions_exist(self) -> Settings:
        if self.worker_partitions != "all":
            try:
                parse_partitions(self.worker_partitions, self.partitions)
            except ValueError as exc:
                raise ValueError(f"APPT_WORKER_PARTITIONS: {exc} (APPT_PARTITIONS is {self.partitions})") from None
        return self

    def consumed_partitions(self) -> list[int]:
        """The partitions this worker consumes: all, or a list like ``0,1`` / ``0-3``."""
        if self.worker_partitions == "all":
            return list(range(self.partitions))
        return [p for p in parse_partitions(self.worker_partitions, self.partitions)]


def parse_partitions(spec: str, count: int) -> list[int]:
    found: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                found.update(range(lo, hi + 1))
            elif part:
                found.add(int(part))
    except ValueError:
        raise ValueError("must be all, or partition numbers like 0,1 or 0-3") from None
    if not found or min(found) < 0 or max(found) >= count:
        raise ValueError(f"partitions must lie in 0..{count - 1}")
    return sorted(found)


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning pydantic's errors into one line naming every bad ``APPT_*`` variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a cross-field check names its variables itself
                lines.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            field = str(err["loc"][0]).lower().removeprefix(ENV_PREFIX.lower()) if err["loc"] else ""
            got = "" if field in SECRET_SETTINGS else f" (got {_shown(err.get('input'))})"
            lines.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']}{got}")
        raise SettingsError("invalid configuration: " + "; ".join(lines)) from None


def redact_url(url: str) -> str:
    """The URL with its password replaced, for messages an operator (or a log) sees."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if not password:
        return url
    return url.replace(f":{password}@", ":***@", 1)


def _shown(value: Any) -> str:
    return repr(redact_url(value) if isinstance(value, str) and "://" in value else value)

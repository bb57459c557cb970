"""The practices this service serves: the one place that knows each one's PMS, token and secrets.

A partner integrates with many practices, each with its own PMS token (and
so its own hourly budget) and webhook secret, and appointment ids unique
only inside it. Code that needs a practice's client or secrets asks the
registry by name (the name travels on every message); nothing else holds a
token. Without ``APPT_PRACTICES_FILE`` there is one practice, ``default``,
built from ``APPT_PMS_URL`` / ``APPT_PMS_TOKEN`` / ``APPT_WEBHOOK_SECRETS``,
so a single-practice deployment works as it always did.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from consumer import metrics
from consumer.messages import DEFAULT_PRACTICE, PRACTICE_PATTERN
from consumer.pms.client import PmsClient
from consumer.settings import Settings
from consumer.signing import secret_key

UNKNOWN_PRACTICE = {"practice": ["unknown practice"]}

Status = Literal["ok", "budget_spent", "token_refused", "unreachable"]
STATUSES: tuple[Status, ...] = get_args(Status)
REFUSALS = (401, 403, 429)
"""HTTP statuses by which the PMS refuses a practice's token or budget rather than answer it."""


class PracticesError(Exception):
    """The practices file can't be used; the message names the file and the practice."""


class UnknownPractice(LookupError):
    """No practice of that name is configured."""


class PracticeConfig(BaseModel):
    """One ``[practices.<name>]`` table of the practices file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pms_url: Annotated[str, Field(min_length=1)]
    token: str | None = None
    token_file: Path | None = None
    webhook_secrets: list[str] = Field(default_factory=list)
    dentally_signing_secret: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> PracticeConfig:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("set exactly one of token or token_file")
        for secret in self.webhook_secrets:
            secret_key(secret)  # a malformed secret stops the load, not every request
        return self

    def read_token(self) -> str:
        """The token, read from ``token_file`` at each (re)load so a rotated file takes effect."""
        if self.token is not None:
            return self.token
        assert self.token_file is not None
        try:
            return self.token_file.read_text().strip()
        except OSError as exc:
            raise PracticesError(f"token_file {self.token_file}: {exc}") from exc


def load_configs(settings: Settings) -> dict[str, PracticeConfig]:
    """The practices to serve, from ``APPT_PRACTICES_FILE`` or the single-practice variables."""
    if settings.practices_file is None:
        try:
            return {
                DEFAULT_PRACTICE: PracticeConfig(
                    pms_url=settings.pms_url,
                    token=settings.pms_token,
                    webhook_secrets=settings.webhook_secrets,
                    dentally_signing_secret=settings.dentally_signing_secret,
                )
            }
        except ValidationError as exc:
            raise PracticesError(f"APPT_WEBHOOK_SECRETS: {exc.errors()[0]['msg']}") from None
    path = Path(settings.practices_file)
    try:
        tables = tomllib.loads(path.read_text()).get("practices")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PracticesError(f"APPT_PRACTICES_FILE {path}: {exc}") from exc
    if not isinstance(tables, dict) or not tables:
        raise PracticesError(f"APPT_PRACTICES_FILE {path}: no [practices.<name>] table")
    configs: dict[str, PracticeConfig] = {}
    for name, table in tables.items():
        if not re.fullmatch(PRACTICE_PATTERN, name):
            raise PracticesError(f"APPT_PRACTICES_FILE {path}: practice name {name!r} must match {PRACTICE_PATTERN}")
        try:
            configs[name] = PracticeConfig.model_validate(table)
        except (ValidationError, ValueError) as exc:
            raise PracticesError(f"APPT_PRACTICES_FILE {path}: [practices.{name}]: {exc}") from None
    return configs


ClientFactory = Callable[[PracticeConfig, str], PmsClient]


def client_factory(settings: Settings) -> ClientFactory:
    """PMS clients with the process-wide tuning (timeouts, concurrency, retries) of ``APPT_PMS_*``."""

    def make(config: PracticeConfig, token: str) -> PmsClient:
        return PmsClient(
            config.pms_url,
            token,
            timeout=settings.pms_timeout,
            concurrency=settings.pms_concurrency,
            retry_attempts=settings.pms_retry_attempts,
            reasons_ttl=settings.pms_reasons_ttl,
            on_response=lambda method, route, status: metrics.pms_calls(route, status).inc(),
            on_retry=lambda method, route, error: metrics.RETRIES.labels("pms").inc(),
        )

    return make


@dataclass
class Practice:
    """A practice as served now: its configuration, its token, the PMS client holding it,
    and whether it can be served (see consumer/waiting.py)."""

    name: str
    config: PracticeConfig
    token: str
    pms: PmsClient
    status: Status = "ok"
    retry_at: float | None = None
    """Epoch seconds when a waiting practice is tried again (the budget reset, the next probe of a
    refused token or an unreachable PMS); None while it is served."""
    reason: str = ""
    probing: bool = False
    """Tried again (its parked messages handed back) and not answered yet: it keeps its waiting
    status until the PMS answers, so nobody sees it ``ok`` while a probe may still fail."""

    def __post_init__(self) -> None:
        self._report()

    @property
    def waiting(self) -> bool:
        return self.status != "ok"

    @property
    def served(self) -> bool:
        """Its messages may go to the PMS: it does not wait, or a probe is trying it."""
        return not self.waiting or self.probing

    def wait(self, status: Status, retry_at: float | None, reason: str) -> bool:
        """Start (or go on) waiting; True when it was not waiting (a probe failing again goes on
        with the same wait, so the wait is alerted once, not at every probe)."""
        started = not self.waiting
        self.status, self.retry_at, self.reason, self.probing = status, retry_at, reason, False
        self._report()
        return started

    def probe(self) -> None:
        """Its retry time has come: let its messages try the PMS again, still waiting."""
        self.probing = True

    def answered(self, status: int) -> None:
        """A response of the PMS to this practice: an answer to a probe (not a refusal of its
        token or budget, nor a failure) ends its wait."""
        if self.probing and 0 < status < 500 and status not in REFUSALS:
            self.resume()

    def resume(self) -> None:
        """Served again: the PMS answered a probe, or nothing of it is left to probe with."""
        self.status, self.retry_at, self.reason, self.probing = "ok", None, "", False
        self._report()

    def _report(self) -> None:
        for status in STATUSES:
            metrics.PRACTICE_STATUS.labels(self.name, status).set(1 if status == self.status else 0)


def describe(practice: Practice, parked: int, webhooks: dict[str, Any]) -> dict[str, Any]:
    """One practice as `appt practices` and ``GET /practices`` show it (``webhooks``: its silence report)."""
    return {
        "practice": practice.name,
        "status": practice.status,
        "retry_at": _iso(practice.retry_at),
        "reason": practice.reason or None,
        "budget": {
            **practice.pms.budget(),
            "reset": _iso(practice.pms.budget()["reset"]),
            "spent_this_hour": practice.pms.spent(),
        },
        "waiting_messages": parked,
        "webhooks": webhooks,
    }


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


class Practices:
    """The registry: practices by name, each owning its PMS client; reloadable (SIGHUP)."""

    def __init__(self, configs: dict[str, PracticeConfig], make_client: ClientFactory) -> None:
        self._make_client = make_client
        self._practices = {name: self._practice(name, config, config.read_token()) for name, config in configs.items()}

    def _practice(self, name: str, config: PracticeConfig, token: str) -> Practice:
        """The practice and its client, which tells it of every response (see ``Practice.answered``)."""
        practice = Practice(name, config, token, self._make_client(config, token))
        report = practice.pms.on_response

        def on_response(method: str, route: str, status: int) -> None:
            practice.answered(status)
            if report is not None:
                report(method, route, status)

        practice.pms.on_response = on_response
        return practice

    def get(self, name: str) -> Practice:
        try:
            return self._practices[name]
        except KeyError:
            raise UnknownPractice(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._practices

    def __iter__(self) -> Iterator[Practice]:
        return iter(list(self._practices.values()))

    async def reload(self, configs: dict[str, PracticeConfig]) -> list[str]:
        """Take a new configuration; return the names that were replaced, added or removed.

        Every token is read before anything changes, so a bad reload changes nothing.
        A practice whose table and token are unchanged keeps its client (and its pacing);
        calls in flight on a replaced client finish on it.
        """
        tokens = {name: config.read_token() for name, config in configs.items()}
        old, fresh, changed = self._practices, {}, []
        for name, config in configs.items():
            current = old.get(name)
            if current is not None and current.config == config and current.token == tokens[name]:
                fresh[name] = current
            else:
                fresh[name] = self._practice(name, config, tokens[name])
                changed.append(name)
        for name in old:
            if name not in configs:
                changed.append(name)
                for status in STATUSES:
                    metrics.PRACTICE_STATUS.remove(name, status)
        self._practices = fresh
        for name, practice in old.items():
            if fresh.get(name) is not practice:
                await practice.pms.close()
        return changed

    async def close(self) -> None:
        for practice in self._practices.values():
            await practice.pms.close()

"""Async client for the PMS REST API (Dentally-shaped).

What it guarantees to callers:

- every failure is one of the typed errors in ``consumer.pms.errors``;
- GET, PUT and DELETE are retried on transient failures (5xx, timeouts,
  connection errors, 429 / the 403 rate-limit block), with full-jitter
  exponential backoff that never waits less than the PMS asked for;
- POST is **never** retried: a create whose answer was lost may have
  happened, and only the caller can look for it (the saga's marker) before
  trying again;
- a server asking us to wait longer than ``max_retry_after`` is not waited
  for in-process: the ``RateLimited`` is raised so the pipeline can redeliver
  later instead of holding a worker for up to an hour;
- requests are paced on the ``x-ratelimit-*`` headers (the hourly budget is
  per token, shared by every worker) and bounded by a semaphore.

A retried PUT may have been applied by the attempt whose answer was lost; a
state move then comes back as a 422 naming the new status. The write
protocol handles that (GET again, reconcile), not this client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)
from tenacity.wait import wait_random_exponential

from consumer import tracing
from consumer.pms.errors import (
    Misconfigured,
    NotFound,
    PmsError,
    RateLimited,
    Rejected,
    Unauthorised,
    Unavailable,
)
from consumer.pms.models import CancellationReason, PmsAppointment
from consumer.retrying import first_then_retried

LIST_ROUTE = "GET /v1/appointments"
CREATE_ROUTE = "POST /v1/appointments"
GET_ROUTE = "GET /v1/appointments/{id}"
UPDATE_ROUTE = "PUT /v1/appointments/{id}"
DELETE_ROUTE = "DELETE /v1/appointments/{id}"
REASONS_ROUTE = "GET /v1/appointment_cancellation_reasons"

MAX_PER_PAGE = 100  # the live PMS answers a larger per_page with 25 rows, silently
DEFAULT_HOURLY_LIMIT = 3600

OnResponse = Callable[[str, str, int], None]
OnRetry = Callable[[str, str, BaseException], None]
Headers = CIMultiDictProxy[str]


def _header_float(headers: Headers, name: str) -> float | None:
    try:
        return float(headers[name])
    except (KeyError, ValueError):
        return None


def retry_after_seconds(headers: Headers, now: float) -> float | None:
    """``Retry-After`` (seconds or an HTTP date), else time until ``x-ratelimit-reset``."""
    raw = headers.get("Retry-After")
    if raw is not None:
        try:
            return max(0.0, float(raw))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(raw).timestamp() - now)
            except (TypeError, ValueError):
                pass
    reset = _header_float(headers, "x-ratelimit-reset")
    return max(0.0, reset - now) if reset is not None else None


class Pacer:
    """Spends the hourly budget evenly once it runs low, instead of hitting the block.

    ``remaining`` and ``reset_at`` come from the last response; each request
    reserves one unit. Below ``low_water`` remaining, requests are spaced
    ``time-to-reset / remaining`` apart; at zero they wait for the reset.
    """

    def __init__(self, low_water: int, clock: Callable[[], float] = time.time) -> None:
        self.low_water = low_water
        self.limit = DEFAULT_HOURLY_LIMIT  # the budget per clock hour, as the PMS last said
        self.remaining: int | None = None
        self.reset_at: float | None = None
        self._clock = clock
        self._next_slot = 0.0

    def observe(self, headers: Headers) -> None:
        remaining = _header_float(headers, "x-ratelimit-remaining")
        reset = _header_float(headers, "x-ratelimit-reset")
        if remaining is not None and reset is not None:
            self.remaining, self.reset_at = int(remaining), reset
        limit = _header_float(headers, "x-ratelimit-limit")
        if limit is not None:
            self.limit = int(limit)

    def reserve(self, max_wait: float) -> float:
        """Seconds to wait before the next request; ``RateLimited`` if over ``max_wait``."""
        now = self._clock()
        if self.remaining is None or self.reset_at is None or now >= self.reset_at:
            return 0.0
        spreading = 0 < self.remaining < self.low_water
        if self.remaining <= 0:
            wait = self.reset_at - now
        else:
            wait = max(0.0, self._next_slot - now) if spreading else 0.0
        if wait > max_wait:
            raise RateLimited("hourly request budget (nearly) spent", status=0, retry_after=wait)
        if spreading:
            slot = now + wait
            self._next_slot = slot + (self.reset_at - slot) / self.remaining
        self.remaining = max(0, self.remaining - 1)
        return wait


PURPOSES = ("commands", "workflows", "polling")
_purpose: ContextVar[str] = ContextVar("pms_purpose", default="commands")


@contextlib.contextmanager
def spending_for(purpose: str) -> Iterator[None]:
    """Count the PMS requests made inside (tasks started inside too) as spent for ``purpose``."""
    token = _purpose.set(purpose)
    try:
        yield
    finally:
        _purpose.reset(token)


class PmsClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        concurrency: int = 8,
        retry_attempts: int = 4,
        backoff_base: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 60.0,
        reasons_ttl: float = 3600.0,
        user_agent: str = "appointment-consumer/0.1",
        on_response: OnResponse | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        self._api = base_url.rstrip("/") + "/v1"
        self._headers = {
            "Authorization": f"Bearer {token}",
            "User-Agent": user_agent,
            "Accept": "application/json",
        }
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._retry_attempts = retry_attempts
        self._backoff = wait_random_exponential(multiplier=backoff_base, max=max_backoff)
        self._max_retry_after = max_retry_after
        self._pacer = Pacer(low_water=concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._reasons: list[CancellationReason] | None = None
        self._reasons_ttl = reasons_ttl
        self._reasons_expire = 0.0
        self._spent_hour = -1
        self._spent = dict.fromkeys(PURPOSES, 0)
        self.on_response = on_response
        self.on_retry = on_retry
        self.retries = 0

    async def __aenter__(self) -> PmsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def budget(self) -> dict[str, float | None]:
        """The hourly budget as the PMS last reported it (remaining and reset None before its first answer)."""
        return {"limit": self._pacer.limit, "remaining": self._pacer.remaining, "reset": self._pacer.reset_at}

    def spent(self) -> dict[str, int]:
        """Requests this client sent in the current clock hour, by purpose (commands, workflows,
        polling): what this service took of the budget, and for what."""
        self._count_for_hour()
        return dict(self._spent)

    def _count_for_hour(self) -> None:
        hour = int(time.time() // 3600)
        if hour != self._spent_hour:
            self._spent_hour, self._spent = hour, dict.fromkeys(PURPOSES, 0)

    # ---- API ----------------------------------------------------------------

    async def get_appointment(self, appointment_id: int) -> PmsAppointment:
        answer: PmsAppointment = await self._retried(
            "GET", GET_ROUTE, f"/appointments/{appointment_id}", parse=_appointment_answer
        )
        return answer

    @property
    def hourly_limit(self) -> int:
        """The token's requests per clock hour (``x-ratelimit-limit``; 3,600 until an answer said)."""
        return self._pacer.limit

    async def list_appointments(
        self,
        *,
        after: str,
        before: str,
        cancelled: bool = False,
        updated_after: str | None = None,
        patient_id: int | None = None,
        practitioner_id: int | None = None,
        per_page: int = MAX_PER_PAGE,
    ) -> list[PmsAppointment]:
        """Every appointment starting in [after, before), in the PMS's order.

        The window is required by the PMS; ``cancelled`` asks for Cancelled and
        Did not attend rows too (hidden otherwise). Pages are read until a short
        one: ``total_pages`` is not trusted, and a ``per_page`` over 100 would be
        answered with 25 rows, so it is refused here.
        """
        if not 0 < per_page <= MAX_PER_PAGE:
            raise ValueError(f"per_page must be in 1..{MAX_PER_PAGE}")
        given = {
            "after": after,
            "before": before,
            "cancelled": "true" if cancelled else None,
            "updated_after": updated_after,
            "patient_id": patient_id,
            "practitioner_id": practitioner_id,
            "per_page": per_page,
        }
        params = {name: str(value) for name, value in given.items() if value is not None}
        found: list[PmsAppointment] = []
        page = 1
        while True:
            body = await self._retried("GET", LIST_ROUTE, "/appointments", params={**params, "page": str(page)})
            rows = body["appointments"]
            found.extend(_parse(PmsAppointment, item) for item in rows)
            if len(rows) < per_page:
                return found
            page += 1

    async def create_appointment(self, fields: dict[str, Any]) -> PmsAppointment:
        """One attempt only: see the module docstring."""
        answer: PmsAppointment = await self._send(
            "POST", CREATE_ROUTE, "/appointments", parse=_appointment_answer, json={"appointment": fields}
        )
        return answer

    async def update_appointment(
        self,
        appointment_id: int,
        fields: dict[str, Any],
        *,
        before_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> PmsAppointment:
        """``before_retry`` is awaited before each retry, after the backoff: a caller whose write
        depends on something else can look again, and raise to abandon the write."""
        answer: PmsAppointment = await self._retried(
            "PUT",
            UPDATE_ROUTE,
            f"/appointments/{appointment_id}",
            json={"appointment": fields},
            before_retry=before_retry,
            parse=_appointment_answer,
        )
        return answer

    async def delete_appointment(self, appointment_id: int) -> None:
        await self._retried("DELETE", DELETE_ROUTE, f"/appointments/{appointment_id}")

    async def cancellation_reasons(self) -> list[CancellationReason]:
        """The practice's reasons (a client is one practice's). They rarely change and every
        request is budget, so they are kept for ``reasons_ttl`` seconds, then fetched again
        (a reason archived or added in the PMS is seen within that time)."""
        if self._reasons is None or time.monotonic() >= self._reasons_expire:
            body = await self._retried("GET", REASONS_ROUTE, "/appointment_cancellation_reasons")
            self._reasons = [_parse(CancellationReason, r) for r in body["appointment_cancellation_reasons"]]
            self._reasons_expire = time.monotonic() + self._reasons_ttl
        return self._reasons

    async def live_cancellation_reasons(self) -> list[CancellationReason]:
        """The reasons a new cancellation may use (archived ones are refused by the PMS)."""
        return [known for known in await self.cancellation_reasons() if not known.archived]

    async def cancellation_reason_id(self, reason: str) -> int:
        """The id of a live reason by its text (e.g. "Booked in error"); ``LookupError`` if
        absent or archived."""
        for known in await self.live_cancellation_reasons():
            if known.reason.casefold() == reason.casefold():
                return known.id
        raise LookupError(f"the PMS has no live cancellation reason {reason!r}")

    # ---- transport ----------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, trace_configs=tracing.client_trace_configs()
            )
        return self._session

    async def _retried(
        self,
        method: str,
        route: str,
        path: str,
        *,
        before_retry: Callable[[], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> Any:
        def before_sleep(state: RetryCallState) -> None:
            self.retries += 1
            error = state.outcome.exception() if state.outcome else None
            if self.on_retry is not None and error is not None:
                self.on_retry(method, route, error)

        def policy() -> AsyncRetrying:
            return AsyncRetrying(
                stop=stop_after_attempt(self._retry_attempts),
                wait=self._wait,
                retry=retry_if_exception(self._worth_retrying),
                before_sleep=before_sleep,
                reraise=True,
            )

        async def attempt(number: int) -> Any:
            if before_retry is not None and number > 1:
                await before_retry()
            return await self._send(method, route, path, **kwargs)

        return await first_then_retried(attempt, policy)

    def _worth_retrying(self, error: BaseException) -> bool:
        if isinstance(error, RateLimited):
            return error.retry_after <= self._max_retry_after
        return isinstance(error, Unavailable)

    def _wait(self, state: RetryCallState) -> float:
        """Jittered backoff, but never sooner than the PMS asked."""
        backoff = float(self._backoff(state))
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RateLimited):
            return max(backoff, error.retry_after)
        return backoff

    async def _send(
        self, method: str, route: str, path: str, *, parse: Callable[[bytes], Any] | None = None, **kwargs: Any
    ) -> Any:
        """The answer's body: ``parse(raw)`` of a 2xx when given, else its JSON (or text)."""
        async with self._semaphore:
            wait = self._pacer.reserve(self._max_retry_after)
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                async with self._http().request(method, self._api + path, **kwargs) as response:
                    self._pacer.observe(response.headers)
                    status, headers = response.status, response.headers
                    raw = await response.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                self._report(method, route, 0)
                raise Unavailable(f"{route}: {type(exc).__name__} {exc}".strip()) from exc
        self._report(method, route, status)
        if status < 300:
            return parse(raw) if parse is not None else _body(status, raw)
        raise _error(status, headers, _body(status, raw), route)

    def _report(self, method: str, route: str, status: int) -> None:
        self._count_for_hour()
        self._spent[_purpose.get()] += 1
        if self.on_response is not None:
            self.on_response(method, route, status)


def _body(status: int, raw: bytes) -> Any:
    """The JSON answer, or its text when it is not JSON (an error page); decoded once."""
    if status == 204 or not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError too
        return raw.decode("utf-8", errors="replace")


def _error(status: int, headers: Headers, body: Any, route: str) -> PmsError:
    """The typed error for a non-2xx answer."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    error = error if isinstance(error, dict) else {}
    message = f"{route}: {status} {error.get('message', '')}".strip()
    if status == 422:
        return Rejected(message, dict(error.get("params") or {}), body=body)
    if status == 404:
        return NotFound(message, status=status, body=body)
    if status == 429 or (
        status == 403
        and error.get("type") == "invalid_access_error"
        and "rate limit" in str(error.get("message", "")).lower()
    ):
        wait = retry_after_seconds(headers, time.time())
        return RateLimited(message, status=status, retry_after=wait if wait is not None else 1.0, body=body)
    if status == 403 and "User-Agent" in str(body):
        return Misconfigured(f"{route}: 403 the PMS refuses this User-Agent: {body}", status=status, body=body)
    if status in (401, 403):
        return Unauthorised(message, status=status, body=body)
    if status >= 500:
        return Unavailable(message, status=status, body=body)
    return PmsError(message, status=status, body=body)


def _parse(model: type[Any], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PmsError(f"unexpected {model.__name__} from the PMS: {exc}") from exc


class _AppointmentAnswer(BaseModel):
    """What GET, POST and PUT of one appointment answer: ``{"appointment": {...}}``."""

    appointment: PmsAppointment


def _appointment_answer(raw: bytes) -> PmsAppointment:
    """Decoded and validated in one pass (pydantic's JSON parser: no dict built first)."""
    try:
        return _AppointmentAnswer.model_validate_json(raw).appointment
    except ValidationError as exc:
        raise PmsError(f"unexpected PmsAppointment from the PMS: {exc}") from exc

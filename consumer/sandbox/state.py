"""The emulated PMS's memory: appointments, rate-limit budgets, and fault knobs.

Tests drive the knobs directly as Python methods; the same knobs are exposed
over HTTP under ``/_sandbox/`` for processes that can't share memory with it.
Every change, whether made through the API or a knob, goes through
``_apply`` so it is stamped, versioned and sent out as a webhook the same way.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from consumer.sandbox import rules
from consumer.sandbox.webhooks_out import Delivery, WebhookSender

FIRST_ID = 900_000_000
SEED_APPOINTMENT_ID = 757_579_675
HOUR = 3600


class Refused(Exception):
    """A write the PMS answers with 422 and these reasons."""

    def __init__(self, reasons: rules.Reasons) -> None:
        super().__init__(reasons)
        self.reasons = reasons


class Missing(Exception):
    """No appointment with that id (404)."""


@dataclass(frozen=True)
class Fault:
    """What the next matching request gets instead of its answer (``status`` None: a hang)."""

    status: int | None
    retry_after: float | None = None


@dataclass
class _BehindBack:
    fields: dict[str, Any]
    before: str | None  # the method ("PUT" / "DELETE") it runs just before
    reads_left: int | None  # or: after this many more GETs of the appointment


@dataclass(frozen=True)
class Budget:
    limit: int
    remaining: int
    reset: float  # epoch seconds of the next clock hour (or budget window)
    blocked: bool


DeleteMode = Literal["cancel", "remove"]
DELETE_MODES: tuple[DeleteMode, ...] = ("cancel", "remove")


class SandboxState:
    """``updated_after_honoured`` and ``delete_mode`` are the live behaviours nobody has
    confirmed: by default ``updated_after`` is ignored like any unknown parameter and a
    DELETE cancels (both as reported by integrators); tests run the other way too."""

    def __init__(
        self,
        *,
        token: str = "sandbox-token",
        rate_limit: int = 3600,
        updated_after_honoured: bool = False,
        delete_mode: DeleteMode = "cancel",
    ) -> None:
        self._defaults = (token, rate_limit, updated_after_honoured, delete_mode)
        self.webhooks = WebhookSender()
        self.reset()

    # ---- inspection -------------------------------------------------------

    def get(self, appointment_id: int) -> dict[str, Any] | None:
        found = self._appointments.get(appointment_id)
        return dict(found) if found is not None else None

    def all_appointments(self) -> list[dict[str, Any]]:
        return [dict(a) for a in sorted(self._appointments.values(), key=lambda a: a["id"])]

    def call_count(self, route: str) -> int:
        """How many requests named ``route`` (e.g. "POST /v1/appointments") arrived."""
        return sum(1 for call in self.calls if call == route)

    @property
    def deliveries(self) -> list[Delivery]:
        return self.webhooks.deliveries

    # ---- knobs ------------------------------------------------------------

    def reset(self) -> None:
        """Everything back to empty defaults (subscribers included)."""
        self._appointments: dict[int, dict[str, Any]] = {}
        self._next_id = FIRST_ID
        self._last_stamp = datetime.fromtimestamp(0, UTC)
        self._faults: dict[str, deque[Fault]] = {}
        self._behind_back: dict[int, list[_BehindBack]] = {}
        self._call_hooks: dict[int, list[Callable[[], None]]] = {}
        self._usage: dict[tuple[str, int], int] = {}
        self.calls: list[str] = []
        self.latency = 0.0
        self.token, self.rate_limit, self.updated_after_honoured, self.delete_mode = self._defaults
        self.budget_window: float = HOUR
        self.refusing_deletes = False
        self.refusing_cancel: set[int] = set()
        for url in list(self.webhooks.subscribers):
            self.webhooks.unsubscribe(url)
        self.webhooks.deliveries.clear()
        self.webhooks.dropped.clear()
        self.webhooks.drop = False
        self.webhooks.retry_delay = 1.0

    def clear_faults(self) -> None:
        """Every injected fault off (failures, hangs, latency, dropped webhooks, refusals); data kept.

        So an operator can watch a stuck workflow recover without ``reset``, which wipes everything.
        """
        self._faults.clear()
        self.latency = 0.0
        self.refusing_deletes = False
        self.refusing_cancel.clear()
        self.webhooks.drop = False

    def fail_next(self, route: str, count: int, status: int, retry_after: float | None = None) -> None:
        """The next ``count`` requests to ``route`` ("*" for any) answer ``status``.

        429 sends ``Retry-After``; 403 is the rate-limit block, whose
        ``x-ratelimit-reset`` is ``retry_after`` seconds away (default: next hour).
        """
        self._faults.setdefault(route, deque()).extend([Fault(status, retry_after)] * count)

    def timeout_next(self, route: str, count: int) -> None:
        """The next ``count`` requests hang (60 s) before being handled: the client times out."""
        self._faults.setdefault(route, deque()).extend([Fault(None)] * count)

    def set_latency(self, seconds: float) -> None:
        self.latency = seconds

    def drop_webhooks(self, enabled: bool) -> None:
        """While on, events are lost for good (never delivered, never retried)."""
        self.webhooks.drop = enabled

    def set_webhook_retry_delay(self, seconds: float) -> None:
        self.webhooks.retry_delay = seconds

    def subscribe(self, url: str, secret: str) -> None:
        self.webhooks.subscribe(url, secret)

    def unsubscribe(self, url: str) -> None:
        self.webhooks.unsubscribe(url)

    def set_rate_limit(self, budget: int, window: float | None = None) -> None:
        """``budget`` requests per token per clock hour; ``window`` seconds instead of the hour
        lets a test see the reset (the budget comes back at the next multiple of ``window``)."""
        self.rate_limit = budget
        if window is not None:
            self.budget_window = window

    def set_token(self, token: str) -> None:
        """Accept only ``token`` from now on: the old one gets 401, as an expired or revoked token."""
        self.token = token

    def honour_updated_after(self, honoured: bool) -> None:
        self.updated_after_honoured = honoured

    def set_delete_mode(self, mode: str) -> None:
        if mode not in DELETE_MODES:
            raise ValueError(f"delete mode must be one of {DELETE_MODES}")
        self.delete_mode = "cancel" if mode == "cancel" else "remove"

    def spend_elsewhere(self, count: int, now: float) -> None:
        """Requests made with the same token by the practice's other integrations."""
        for _ in range(count):
            self.spend_budget(self.token, now)

    def refuse_deletes(self, enabled: bool) -> None:
        self.refusing_deletes = enabled

    def refuse_cancel(self, appointment_id: int) -> None:
        """Moves of this appointment to Cancelled are refused (to exercise compensation)."""
        self.refusing_cancel.add(appointment_id)

    def change_now(self, appointment_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        """A change made by the PMS itself (SMS auto-confirm, another receptionist)."""
        appointment = self._require(appointment_id)
        unknown = set(fields) - rules.WRITABLE_FIELDS
        if unknown:
            raise ValueError(f"not appointment fields: {sorted(unknown)}")
        self._apply(appointment, rules.normalise(fields))
        return dict(appointment)

    def change_behind_back(
        self,
        appointment_id: int,
        fields: dict[str, Any],
        *,
        before_next: str | None = "PUT",
        after_reads: int | None = None,
    ) -> None:
        """Arrange ``change_now`` just before the next PUT/DELETE of the id, or after N GETs."""
        self._require(appointment_id)
        change = (
            _BehindBack(dict(fields), None, after_reads)
            if after_reads is not None
            else _BehindBack(dict(fields), before_next, None)
        )
        self._behind_back.setdefault(appointment_id, []).append(change)

    def before_call(self, number: int, action: Callable[[], None]) -> None:
        """Run ``action`` just before the ``number``-th API request from now is handled (1 = the next).

        Python only: how a test injects a change (or a fault, with ``fail_next``) at an exact
        step boundary of a client's protocol, whatever the request is.
        """
        self._call_hooks.setdefault(len(self.calls) + number, []).append(action)

    def clear_call_hooks(self) -> None:
        self._call_hooks.clear()

    def seed(self, appointments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store appointments as given (no rules checked), filling the fields left out."""
        created = []
        for given in appointments:
            appointment_id = int(given["id"]) if "id" in given else self._allocate_id()
            appointment = {**self._blank(appointment_id), **rules.normalise(given)}
            appointment["id"] = appointment_id
            self._derive_duration(appointment, given)
            self._appointments[appointment_id] = appointment
            self.webhooks.emit("appointment.created", dict(appointment))
            created.append(dict(appointment))
        return created

    def seed_fixture(self, name: str) -> list[dict[str, Any]]:
        """Named scenarios; "seed" is the support ticket: a Pending slot for patient
        1013 that the SMS service auto-confirms just before the client's next PUT."""
        if name != "seed":
            raise ValueError(f"unknown fixture {name!r}")
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date()
        start = datetime(tomorrow.year, tomorrow.month, tomorrow.day, 9, tzinfo=UTC)
        seeded = self.seed(
            [
                {
                    "id": SEED_APPOINTMENT_ID,
                    "patient_id": 1013,
                    "practitioner_id": 1,
                    "start_time": rules.format_time(start),
                    "finish_time": rules.format_time(start + timedelta(minutes=30)),
                    "reason": "Exam",
                    "state": rules.PENDING,
                }
            ]
        )
        self.change_behind_back(SEED_APPOINTMENT_ID, {"state": rules.CONFIRMED}, before_next="PUT")
        return seeded

    # ---- what the API handlers call ----------------------------------------

    def record_call(self, route: str) -> None:
        self.calls.append(route)
        for action in self._call_hooks.pop(len(self.calls), []):
            action()

    def take_fault(self, route: str) -> Fault | None:
        for key in (route, "*"):
            queue = self._faults.get(key)
            if queue:
                return queue.popleft()
        return None

    def spend_budget(self, token: str, now: float) -> Budget:
        """Count one request against the token's budget for the current clock hour."""
        hour = int(now // self.budget_window)
        used = self._usage.get((token, hour), 0)
        blocked = used >= self.rate_limit
        if not blocked:
            used += 1
            self._usage[(token, hour)] = used
        reset = (hour + 1) * self.budget_window
        return Budget(self.rate_limit, max(0, self.rate_limit - used), reset, blocked)

    def read(self, appointment_id: int) -> dict[str, Any]:
        """A GET of one appointment; may trigger an "after N reads" change after answering."""
        answer = dict(self._require(appointment_id))
        for change in list(self._behind_back.get(appointment_id, [])):
            if change.reads_left is None:
                continue
            change.reads_left -= 1
            if change.reads_left <= 0:
                self._behind_back[appointment_id].remove(change)
                self.change_now(appointment_id, change.fields)
        return answer

    def query(
        self,
        *,
        after: datetime | None,
        before: datetime | None,
        updated_after: datetime | None,
        patient_id: int | None,
        practitioner_id: int | None,
        include_cancelled: bool = False,
    ) -> list[dict[str, Any]]:
        """Appointments starting in [after, before), changed strictly after ``updated_after``
        (when honoured), Cancelled and Did not attend ones only if asked for."""
        if not self.updated_after_honoured:
            updated_after = None
        found = []
        for appointment in self._appointments.values():
            if appointment["state"] in rules.HIDDEN_UNLESS_CANCELLED and not include_cancelled:
                continue
            start = rules.parse_time(appointment["start_time"])
            if after is not None and (start is None or start < after):
                continue
            if before is not None and (start is None or start >= before):
                continue
            updated = rules.parse_time(appointment["updated_at"])
            if updated_after is not None and (updated is None or updated <= updated_after):
                continue
            if patient_id is not None and appointment["patient_id"] != patient_id:
                continue
            if practitioner_id is not None and appointment["practitioner_id"] != practitioner_id:
                continue
            found.append(dict(appointment))
        order = "updated_at" if updated_after is not None else "start_time"
        return sorted(found, key=lambda a: (rules.parse_time(a[order]) or self._last_stamp, a["id"]))

    def create(self, fields: dict[str, Any]) -> dict[str, Any]:
        reasons = rules.check_create(fields)
        if reasons:
            raise Refused(reasons)
        appointment = {**self._blank(self._allocate_id()), **rules.normalise(fields)}
        if appointment["state"] != rules.PENDING:
            appointment[rules.stamp_field(appointment["state"])] = appointment["created_at"]
        self._derive_duration(appointment, fields)
        self._appointments[appointment["id"]] = appointment
        self.webhooks.emit("appointment.created", dict(appointment))
        return dict(appointment)

    def update(self, appointment_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        self._run_behind_back(appointment_id, "PUT")
        appointment = self._require(appointment_id)
        reasons = rules.check_update(appointment, fields)
        if not reasons and fields.get("state") == rules.CANCELLED and appointment_id in self.refusing_cancel:
            reasons = {"state": [rules.status_message(appointment["state"])]}
        if reasons:
            raise Refused(reasons)
        self._apply(appointment, rules.normalise(fields))
        return dict(appointment)

    def delete(self, appointment_id: int) -> None:
        """Remove the appointment, or (``delete_mode`` "cancel") move it to Cancelled."""
        self._run_behind_back(appointment_id, "DELETE")
        appointment = self._require(appointment_id)
        state = appointment["state"]
        if self.refusing_deletes or state in rules.UNDELETABLE_STATES:
            raise Refused({"base": [rules.delete_refused_message(state)]})
        if self.delete_mode == "cancel":
            if state != rules.CANCELLED and rules.CANCELLED not in rules.LEGAL_MOVES[state]:
                raise Refused({"base": [rules.delete_refused_message(state)]})
            self._apply(appointment, {"state": rules.CANCELLED})
            return
        del self._appointments[appointment_id]
        self._behind_back.pop(appointment_id, None)
        self.webhooks.emit("appointment.deleted", dict(appointment))

    # ---- internals ----------------------------------------------------------

    def _require(self, appointment_id: int) -> dict[str, Any]:
        appointment = self._appointments.get(appointment_id)
        if appointment is None:
            raise Missing(appointment_id)
        return appointment

    def _allocate_id(self) -> int:
        """The next id no appointment holds: a seeded id is never handed out again."""
        while self._next_id in self._appointments:
            self._next_id += 1
        self._next_id += 1
        return self._next_id - 1

    def _stamp(self) -> str:
        """Strictly increasing times (to the millisecond, as the live PMS stamps them)."""
        now = rules.next_millisecond(datetime.now(UTC), self._last_stamp)
        self._last_stamp = now
        return rules.format_time(now)

    def _blank(self, appointment_id: int) -> dict[str, Any]:
        now = self._stamp()
        appointment: dict[str, Any] = {
            "id": appointment_id,
            "uuid": str(uuid.uuid4()),
            "patient_id": None,
            "practitioner_id": None,
            "start_time": None,
            "finish_time": None,
            "duration": None,
            "reason": None,
            "state": rules.PENDING,
            "notes": None,
            "metadata": {},
            "appointment_cancellation_reason_id": None,
            # Fields the live PMS also answers with; the service must carry them, not need them.
            "booked_via_api": False,
            "practitioner_site_id": str(uuid.uuid5(uuid.NAMESPACE_URL, "sandbox-site")),
            "user_id": None,
            "room_id": None,
            "patient_name": None,
            "treatment_description": None,
        }
        for state in rules.STATES:
            appointment[rules.stamp_field(state)] = None
        appointment.update(pending_at=now, created_at=now, updated_at=now, version=1)
        return appointment

    @staticmethod
    def _derive_duration(appointment: dict[str, Any], written: dict[str, Any]) -> None:
        """Duration (minutes) follows the times; a written duration alone moves the finish."""
        start = rules.parse_time(appointment.get("start_time"))
        if start is None:
            return
        if "duration" in written and "finish_time" not in written:
            appointment["finish_time"] = rules.format_time(start + timedelta(minutes=written["duration"]))
        finish = rules.parse_time(appointment.get("finish_time"))
        if finish is not None:
            appointment["duration"] = int((finish - start).total_seconds() // 60)

    def _apply(self, appointment: dict[str, Any], fields: dict[str, Any]) -> None:
        """Write the fields that differ; stamp, version and announce the change (if any)."""
        changed = {k: v for k, v in fields.items() if appointment.get(k) != v}
        if not changed:
            return
        appointment.update(changed)
        self._derive_duration(appointment, changed)
        now = self._stamp()
        if "state" in changed:
            appointment[rules.stamp_field(changed["state"])] = now
        appointment["updated_at"] = now
        appointment["version"] += 1
        self.webhooks.emit("appointment.updated", dict(appointment))

    def _run_behind_back(self, appointment_id: int, method: str) -> None:
        for change in list(self._behind_back.get(appointment_id, [])):
            if change.before == method:
                self._behind_back[appointment_id].remove(change)
                self.change_now(appointment_id, change.fields)

    async def close(self) -> None:
        await self.webhooks.close()

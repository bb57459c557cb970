"""Webhook silence: changes that polling found and no webhook delivered.

The live PMS switches a webhook subscription off after 50 consecutive
failures and tells nobody. Polling then carries every change, so nothing is
lost, but each one arrives a polling period late. Counting what only polling
found makes that visible (metric, one error log per episode, ``/readyz``'s
body, ``appt practices``) so an operator re-enables the subscription. Each
practice has its own subscription, so each has its own count.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from consumer import metrics
from consumer.logs import get_logger

DEFAULT_PRACTICE = "default"
DEFAULT_WINDOW = timedelta(hours=1)

log = get_logger(__name__)


class WebhookSilence:
    """Missed changes of one practice over a sliding window (default: the last hour)."""

    def __init__(self, practice: str = DEFAULT_PRACTICE, window: timedelta = DEFAULT_WINDOW) -> None:
        self.practice = practice
        self.window = window
        self._missed: deque[tuple[datetime, int]] = deque()  # (when found, appointment id)
        self._silent = False

    def missed(self, appointment_id: int, updated_at: datetime, now: datetime) -> None:
        """Polling found a change (made at ``updated_at``) that no webhook delivered in time."""
        metrics.WEBHOOK_MISSED.labels(self.practice).inc()
        self._missed.append((now, appointment_id))
        if not self.silent(now):
            self._silent = True
            log.error(
                "webhooks.silent: polling found changes no webhook delivered; check that the PMS"
                " webhook subscription is still enabled",
                practice=self.practice,
                appointment_id=appointment_id,
                changed_at=updated_at.isoformat(),
            )

    def silent(self, now: datetime) -> bool:
        while self._missed and self._missed[0][0] < now - self.window:
            self._missed.popleft()
        if not self._missed:
            self._silent = False
        return self._silent

    def report(self, now: datetime) -> dict[str, Any]:
        """What ``/readyz`` shows: informative only (an unready service would get no webhooks at all)."""
        silent = self.silent(now)
        report: dict[str, Any] = {
            "status": "silent" if silent else "ok",
            "missed_changes": len(self._missed),
            "window_seconds": int(self.window.total_seconds()),
        }
        if silent:
            report["last_missed_at"] = self._missed[-1][0].isoformat()
            report["hint"] = "re-enable the PMS webhook subscription"
        return report


class WebhookSilences:
    """Every practice's silence, by practice name (appointment ids are unique only inside one)."""

    def __init__(self, window: timedelta = DEFAULT_WINDOW) -> None:
        self.window = window
        self._by_practice: dict[str, WebhookSilence] = {}

    def of(self, practice: str) -> WebhookSilence:
        """The practice's silence, kept across reloads (a reload replaces the client, not the subscription)."""
        if practice not in self._by_practice:
            self._by_practice[practice] = WebhookSilence(practice, self.window)
        return self._by_practice[practice]

    def report(self, practices: Iterable[str], now: datetime) -> dict[str, Any]:
        """``/readyz``'s summary over the served practices: silent when any one is, naming it."""
        reports = {name: self.of(name).report(now) for name in practices}
        silent = sorted(name for name, report in reports.items() if report["status"] == "silent")
        summary: dict[str, Any] = {
            "status": "silent" if silent else "ok",
            "missed_changes": sum(r["missed_changes"] for r in reports.values()),
            "window_seconds": int(self.window.total_seconds()),
            "silent_practices": silent,
        }
        if silent:
            summary["last_missed_at"] = max(reports[name]["last_missed_at"] for name in silent)
            summary["hint"] = "re-enable the PMS webhook subscription of each silent practice"
        return summary

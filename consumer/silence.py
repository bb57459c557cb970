"""Webhook silence: changes that polling found and no webhook delivered.

The live PMS switches a webhook subscription off after 50 consecutive
failures and tells nobody. Polling then carries every change, so nothing is
lost, but each one arrives a polling period late. Counting what only polling
found makes that visible (metric, one error log per episode, ``/readyz``'s
body) so an operator re-enables the subscription.
"""

from __future__ import annotations

from collections import deque
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

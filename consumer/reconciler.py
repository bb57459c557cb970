"""Catch-up polling: what the webhooks missed is found in start-time windows and fed in.

The PMS switches webhooks off after 50 failures, and any single delivery can
be lost; polling makes that cost latency, never correctness. The live list
needs an ``after``/``before`` window and hides Cancelled and Did not attend
rows unless ``cancelled=true``, and may ignore ``updated_after``; so each
poll reads whole windows (all pages, until a short one), with cancelled rows,
and compares each row's ``updated_at`` as an instant with what is stored:
only newer rows go into the pipeline. ``updated_after`` is sent only when
configured, as an optimisation that is correct whether honoured or not.

Windows are prioritised: the next days are read every cycle, further out
less often, and the whole spend stays within a share of the hourly budget
(the rest is for commands). A row gone from a window is never a deletion:
it may have moved, or the window moved.

Changes enter the same pipeline as webhooks, with ids derived from
(appointment, updated_at), so a change seen twice is the same message and
the worker's inbox drops the repeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from consumer import metrics
from consumer.broker import Broker
from consumer.logs import get_logger
from consumer.messages import DEFAULT_PRACTICE, ObservedEvent
from consumer.pms import PmsAppointment, PmsClient
from consumer.pms.client import MAX_PER_PAGE, spending_for
from consumer.practices import Practice, Practices
from consumer.silence import WebhookSilence
from consumer.store.base import Store

# ``updated_after`` (when used) reaches back this far before the last poll: a change
# stamped just before it but committed after would otherwise be missed forever.
DEFAULT_OVERLAP = timedelta(seconds=2)
DEFAULT_SILENCE_GRACE = timedelta(minutes=2)
# The share is spread over the hour: by a given minute, polling may have spent the
# share of the time gone so far plus this much ahead (so one hour's share is never
# burnt in its first minutes, leaving the rest of it blind).
SPREAD_AHEAD_SECONDS = 600
HOUR = 3600

log = get_logger(__name__)


@dataclass(frozen=True)
class Window:
    """Appointments starting from ``first_day`` to ``last_day`` (days from today, UTC), read
    on every ``every``-th cycle."""

    name: str
    first_day: int
    last_day: int
    every: int


def windows_for(horizon_days: int) -> tuple[Window, ...]:
    """Yesterday to tomorrow every cycle, the rest of the week every 5th, the rest every 15th."""
    plan = (Window("near", -1, 2, 1), Window("week", 2, 8, 5), Window("far", 8, horizon_days + 1, 15))
    clipped = (Window(w.name, w.first_day, min(w.last_day, horizon_days + 1), w.every) for w in plan)
    return tuple(w for w in clipped if w.first_day < w.last_day)


def parse_time(value: str) -> datetime:
    """An instant from any ISO 8601 spelling the PMS uses (``Z``, a local offset, milliseconds)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def event_for(appointment: PmsAppointment, practice: str = DEFAULT_PRACTICE) -> ObservedEvent:
    return ObservedEvent(
        type="appointment.updated",
        event_id=f"reconcile:{appointment.id}:{appointment.updated_at}",
        source="reconcile",
        appointment=appointment.model_dump(mode="json"),
        practice=practice,
    )


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Reconciler:
    """Polls the windows on a budget; remembers what each window last showed, so an unchanged
    row costs one comparison, not a store read or a publish."""

    def __init__(
        self, pms: PmsClient, broker: Broker, store: Store, *, practice: str = DEFAULT_PRACTICE,
        horizon_days: int = 30,
        budget_share: float = 0.10, use_updated_after: bool = False, silence: WebhookSilence | None = None,
        silence_grace: timedelta = DEFAULT_SILENCE_GRACE, overlap: timedelta = DEFAULT_OVERLAP,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.pms, self._broker, self._store, self._practice = pms, broker, store, practice
        self.windows = windows_for(horizon_days)
        self._share = budget_share
        self._use_updated_after = use_updated_after
        self._silence = silence
        self._grace = silence_grace
        self._overlap = overlap
        self._clock = clock
        self._watching_since = clock()
        self._cycle = 0
        self._cost: dict[str, int] = {}  # requests each window took last time: its estimate
        self._seen: dict[str, dict[int, datetime]] = {w.name: {} for w in self.windows}
        self._spent_hour, self.spent = -1, 0  # requests spent in the current clock hour

    def allowance(self) -> int:
        """Requests polling may spend per clock hour: its share of the token's budget."""
        return int(self.pms.hourly_limit * self._share)

    def allowed_by(self, now: datetime) -> int:
        """How much of this clock hour's allowance may be spent by ``now`` (spread over the hour)."""
        into_hour = now.timestamp() % HOUR
        return int(self.allowance() * min(1.0, (into_hour + SPREAD_AHEAD_SECONDS) / HOUR))

    async def poll(self, *, since: datetime | None = None) -> int:
        """One cycle: each due window, nearest first, while the budget share lasts.

        Returns how many changes were published. ``since`` (``appt reconcile
        --since``) publishes only rows changed after it, whatever is stored.
        """
        now = self._clock()
        hour = int(now.timestamp() // HOUR)
        if hour != self._spent_hour:
            self._spent_hour, self.spent = hour, 0
        due = [w for w in self.windows if self._cycle % w.every == 0]
        self._cycle += 1
        published = 0
        for window in due:
            if self.spent + self._cost.get(window.name, 1) > self.allowed_by(now):
                log.info("reconcile.window_deferred", window=window.name, spent=self.spent,
                         allowed=self.allowed_by(now))
                continue
            published += await self._poll_window(window, now, since)
        return published

    async def _poll_window(self, window: Window, now: datetime, since: datetime | None) -> int:
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        updated_after = await self._updated_after(window)
        retries_before = self.pms.retries
        with spending_for("polling"):
            rows = await self.pms.list_appointments(
                after=_iso(today + timedelta(days=window.first_day)),
                before=_iso(today + timedelta(days=window.last_day)),
                cancelled=True, updated_after=updated_after, per_page=MAX_PER_PAGE,
            )
        cost = len(rows) // MAX_PER_PAGE + 1 + self.pms.retries - retries_before
        self.spent += cost
        self._cost[window.name] = cost
        metrics.RECONCILE_REQUESTS.labels(window.name).inc(cost)
        seen = self._seen[window.name] if updated_after else {}
        published = 0
        for row in rows:
            changed = parse_time(row.updated_at) if row.updated_at else now
            if await self._is_new(window, row, changed, since):
                await self._publish(row)
                self._note_missed(row, changed, now)
                published += 1
            seen[row.id] = changed
        self._seen[window.name] = seen  # a row gone from the window is forgotten, never deleted
        if self._use_updated_after:
            await self._store.set_watermark(self._watermark(window), _iso(now))
        log.info("reconcile.window", window=window.name, rows=len(rows), requests=cost, published=published)
        return published

    async def _updated_after(self, window: Window) -> str | None:
        if not self._use_updated_after:
            return None
        last = await self._store.get_watermark(self._watermark(window))
        return _iso(parse_time(last) - self._overlap) if last else None

    def _watermark(self, window: Window) -> str:
        """Each practice polls its own PMS, so each has its own watermarks (the default's keep their names)."""
        prefix = "" if self._practice == DEFAULT_PRACTICE else f"{self._practice}."
        return f"{prefix}reconcile.{window.name}"

    async def _is_new(self, window: Window, row: PmsAppointment, changed: datetime,
                      since: datetime | None) -> bool:
        """Newer than this window last showed, and than the stored record (compared as instants)."""
        if since is not None:
            return changed > since
        last_seen = self._seen[window.name].get(row.id)
        if last_seen is not None and changed <= last_seen:
            return False
        stored = await self._store.get_appointment(row.id, self._practice)
        stored_at = stored.upstream_updated_at if stored is not None else None
        return stored_at is None or changed > parse_time(stored_at)

    async def _publish(self, row: PmsAppointment) -> None:
        event = event_for(row, self._practice)
        await self._broker.publish_observed(
            event.model_dump_json().encode(), practice=self._practice, appointment_id=row.id,
            message_id=event.event_id,
        )

    def _note_missed(self, row: PmsAppointment, changed: datetime, now: datetime) -> None:
        """A change made while we were watching, older than a webhook's grace, that polling
        found first: no webhook delivered it."""
        if self._silence is not None and self._watching_since < changed < now - self._grace:
            self._silence.missed(row.id, changed, now)


async def reconcile_once(
    pms: PmsClient, broker: Broker, store: Store, *, practice: str = DEFAULT_PRACTICE,
    since: str | None = None, horizon_days: int = 30,
) -> int:
    """``appt reconcile``: read every window once now (within the budget share); return how many
    changes were published."""
    reconciler = Reconciler(pms, broker, store, practice=practice, horizon_days=horizon_days)
    published = await reconciler.poll(since=parse_time(since) if since else None)
    log.info("reconcile.done", practice=practice, published=published, requests=reconciler.spent)
    return published


async def run_reconciler(
    practices: Practices, reconciler_for: Callable[[Practice], Reconciler], interval: float,
    stop: asyncio.Event,
) -> None:
    """Poll every practice every ``interval`` seconds until ``stop`` is set.

    Nothing here may end the loop but ``stop``: a PMS or broker outage is
    exactly when catching up matters afterwards; one practice's failure
    never skips another. A waiting practice is not polled (its resumer tries
    it again); a practice whose client a reload replaced gets a new reconciler.
    """
    if interval <= 0:
        raise ValueError("the reconcile interval must be positive")
    reconcilers: dict[str, Reconciler] = {}
    while not stop.is_set():
        for practice in practices:
            if practice.waiting:
                continue
            reconciler = reconcilers.get(practice.name)
            if reconciler is None or reconciler.pms is not practice.pms:
                reconciler = reconcilers[practice.name] = reconciler_for(practice)
            try:
                await reconciler.poll()
            except Exception as exc:  # logged and retried: the loop must outlive every outage
                log.error("reconcile.failed", practice=practice.name, error=f"{type(exc).__name__}: {exc}")
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass

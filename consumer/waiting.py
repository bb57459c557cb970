"""A practice that can't be served now waits, in order, without holding up the others.

A spent hourly budget, a refused token, or a PMS still failing after the
in-process retries is no reason to fail or dead-letter a message: it is a
reason to wait. The worker then *parks* the message in the store and acks
it, so it holds no prefetch slot, task or partition order away from other
practices; from then on every later message of the same appointment parks
behind it, and while the practice waits all its commands park at once
(observed events, which need no PMS call, go on being applied).

The ``Resumer`` hands parked messages back to the pipeline (published to
``appointments.inbound`` with their routing key, id and ``reply_to``, plus
the ``x-appt-parked-seq`` header) when the practice can be served again: at
the budget reset, after a reload that replaced its token, or at the next
probe of a refused token or an unreachable PMS. Order per appointment holds because a handed
back message is processed only while it is its appointment's oldest parked
one, and a live message never overtakes a parked one. Durability: the park is
committed before the ack, and a parked message is forgotten only after it
was processed (committed, published) or dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from consumer.broker import REPLAY_HEADER, Broker, PublishFailed
from consumer.logs import get_logger
from consumer.periodic import every
from consumer.pms.errors import RateLimited, Unauthorised, Unavailable
from consumer.practices import Practice, Practices, Status
from consumer.store.base import ParkedMessage, Store

log = get_logger(__name__)

PARKED_SEQ_HEADER = "x-appt-parked-seq"
WAIT_ERRORS = (RateLimited, Unauthorised, Unavailable)


def waiting_status(error: BaseException, *, probe_interval: float) -> tuple[Status, float]:
    """What a PMS failure says about the practice, and when to try it again.

    A refused token is probed like an unreachable PMS, not only fixed by a reload: a token
    the PMS refused for a while (revoked, then restored on the PMS's side) is accepted
    again without anyone touching the service, and the practice's parked messages,
    a reassignment's saga among them, go on by themselves.
    """
    now = time.time()
    if isinstance(error, RateLimited):
        return "budget_spent", now + error.retry_after
    if isinstance(error, Unauthorised):
        return "token_refused", now + probe_interval
    return "unreachable", now + probe_interval


class Resumer:
    """Hands each servable practice's parked messages back to the pipeline, oldest first."""

    def __init__(
        self,
        *,
        practices: Practices,
        store: Store,
        broker: Broker,
        interval: float = 0.5,
        republish_after: float = 60.0,
        batch: int = 200,
    ) -> None:
        self._practices = practices
        self._store = store
        self._broker = broker
        self._interval = interval
        self._republish_after = republish_after  # a handed-back message still parked this long is sent again
        self._batch = batch

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``; a store or broker outage is tried again at the next tick."""
        await every(self._interval, stop, self.resume_once, "resumer")

    async def resume_once(self) -> None:
        for practice in self._practices:
            if not practice.served and not _try_again(practice):
                continue
            await self._hand_back(practice.name)
        await self._end_unanswerable_probes()

    async def _end_unanswerable_probes(self) -> None:
        """A probing practice whose parked messages were all processed without a PMS call (say a
        command the domain rejected from the record) gets no answer to end its wait: nothing of it
        waits any more, so it is served again, and the next command to fail makes it wait anew."""
        if not any(practice.probing for practice in self._practices):
            return
        parked = await self._store.parked_counts()
        for practice in self._practices:
            if practice.probing and not parked.get(practice.name):  # still probing: no failure since the read
                log.info("practice served again: nothing of it is left waiting", practice=practice.name)
                practice.resume()

    async def _hand_back(self, practice: str) -> None:
        not_since = datetime.now(UTC) - timedelta(seconds=self._republish_after)
        messages = await self._store.hand_back(practice, not_since=not_since, limit=self._batch)
        for index, message in enumerate(messages):
            try:
                await self._broker.publish_inbound(
                    message.body,
                    practice=message.practice,
                    appointment_id=message.appointment_id,
                    message_id=message.message_id,
                    reply_to=message.reply_to,
                    correlation_id=message.correlation_id,
                    headers=_headers(message),
                )
            except PublishFailed:
                for left in messages[index:]:
                    await self._store.keep_parked(left.seq)
                raise
        if messages:
            log.info("parked messages handed back", practice=practice, count=len(messages))


def _headers(message: ParkedMessage) -> dict[str, int]:
    """Its place in the park, and a replay's number (its own inbox key depends on it)."""
    headers = {PARKED_SEQ_HEADER: message.seq}
    if message.replay:
        headers[REPLAY_HEADER] = message.replay
    return headers


def _try_again(practice: Practice) -> bool:
    """A waiting practice whose reset or probe time has come is probed: its parked messages
    go to the PMS again, and it stays waiting until the PMS answers one (``Practice.answered``)."""
    if practice.retry_at is None or time.time() < practice.retry_at:
        return False
    log.info("practice tried again", practice=practice.name, status=practice.status)
    practice.probe()
    return True

"""Webhooks out of the emulated PMS, signed per Standard Webhooks.

Each subscriber has its own queue and delivery task, so events reach it in
order and a slow or failing subscriber never delays the API or the others.
A failed attempt is retried with the same ``webhook-id`` (so receivers can
deduplicate) and a growing delay; after ``MAX_CONSECUTIVE_FAILURES`` the
subscriber is switched off, as the real PMS does. The signer is written here
on purpose: the sandbox must not share code with the receiver it checks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

MAX_CONSECUTIVE_FAILURES = 50
DELAY_CAP_FACTOR = 30  # delays grow from the base up to 30 x base (30 s by default)
ATTEMPT_TIMEOUT = 5.0


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one attempt."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True)
class Message:
    webhook_id: str
    type: str
    appointment_id: int
    body: bytes


def make_message(event_type: str, appointment: dict[str, Any]) -> Message:
    payload = {
        "type": event_type,
        "timestamp": datetime.now(UTC).isoformat(),
        "data": {"appointment": appointment},
    }
    return Message(
        webhook_id=f"msg_{uuid.uuid4().hex}",
        type=event_type,
        appointment_id=int(appointment["id"]),
        body=json.dumps(payload).encode(),
    )


@dataclass(frozen=True)
class Delivery:
    """One attempt, for tests and operators to inspect (``status`` 0: no answer)."""

    url: str
    webhook_id: str
    type: str
    appointment_id: int
    attempt: int
    status: int
    error: str | None = None


@dataclass
class Subscriber:
    url: str
    secret: str
    enabled: bool = True
    consecutive_failures: int = 0
    outstanding: int = 0  # queued or being delivered
    queue: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class WebhookSender:
    """Owns the subscribers, their delivery tasks and the HTTP session they share."""

    def __init__(self) -> None:
        self.subscribers: dict[str, Subscriber] = {}
        self.deliveries: list[Delivery] = []
        self.dropped: list[Message] = []
        self.drop = False
        self.retry_delay = 1.0
        self._session: aiohttp.ClientSession | None = None

    def subscribe(self, url: str, secret: str) -> None:
        """Add (or re-enable) a subscriber; requires a running event loop."""
        self.unsubscribe(url)
        subscriber = Subscriber(url=url, secret=secret)
        subscriber.task = asyncio.get_running_loop().create_task(self._deliver_forever(subscriber))
        self.subscribers[url] = subscriber

    def unsubscribe(self, url: str) -> None:
        subscriber = self.subscribers.pop(url, None)
        if subscriber is not None and subscriber.task is not None:
            subscriber.task.cancel()

    def emit(self, event_type: str, appointment: dict[str, Any]) -> None:
        """Queue one event for every live subscriber; never waits."""
        message = make_message(event_type, appointment)
        if self.drop:
            self.dropped.append(message)
            return
        for subscriber in self.subscribers.values():
            if subscriber.enabled:
                subscriber.outstanding += 1
                subscriber.queue.put_nowait(message)

    def pending(self) -> int:
        """Messages not yet delivered to live subscribers (tests wait for 0)."""
        return sum(s.outstanding for s in self.subscribers.values() if s.enabled)

    async def close(self) -> None:
        tasks = [s.task for s in self.subscribers.values() if s.task is not None]
        for url in list(self.subscribers):
            self.unsubscribe(url)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _delay(self, attempt: int) -> float:
        return float(min(self.retry_delay * 2.0 ** (attempt - 1), self.retry_delay * DELAY_CAP_FACTOR))

    async def _deliver_forever(self, subscriber: Subscriber) -> None:
        while subscriber.enabled:
            message = await subscriber.queue.get()
            try:
                await self._deliver(subscriber, message)
            finally:
                subscriber.outstanding -= 1

    async def _deliver(self, subscriber: Subscriber, message: Message) -> None:
        attempt = 0
        while subscriber.enabled:
            attempt += 1
            if await self._attempt(subscriber, message, attempt):
                subscriber.consecutive_failures = 0
                return
            subscriber.consecutive_failures += 1
            if subscriber.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                subscriber.enabled = False
                return
            await asyncio.sleep(self._delay(attempt))

    async def _attempt(self, subscriber: Subscriber, message: Message, attempt: int) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT))
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "pms-sandbox-webhooks/1.0",
            "webhook-id": message.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(subscriber.secret, message.webhook_id, timestamp, message.body),
        }
        status, error = 0, None
        try:
            async with self._session.post(subscriber.url, data=message.body, headers=headers) as resp:
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            error = repr(exc)
        self.deliveries.append(
            Delivery(subscriber.url, message.webhook_id, message.type, message.appointment_id, attempt, status, error)
        )
        return 200 <= status < 300

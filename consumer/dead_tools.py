"""`appt dead list | show | replay | purge`: the operator's hands on dead letters.

They work on the store's dead-letter table, which the service fills from
``appointments.dead`` (consumer.deadletters): listing is a read, never a
take-and-requeue. A replay publishes the letter back to the inbound exchange
first and marks it replayed after the broker confirmed, so a replay killed at
any point leaves every letter either still listed or on its way; running it
again re-sends at most the one in flight, and the worker's inbox (a replay
has its own key, ``<id>#replay-<N>``) applies it once.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from collections import Counter
from typing import Any

from consumer.broker import (
    DEAD_QUEUE,
    DELIVERIES_HEADER,
    REASON_CLASS_HEADER,
    REASON_HEADER,
    REPLAY_HEADER,
    ROUTING_KEY_HEADER,
    Broker,
    PublishFailed,
    json_properties,
)
from consumer.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from consumer.failpoints import failpoint
from consumer.settings import Settings
from consumer.store.base import DeadLetter, DeadLetterQuery, Store
from consumer.tools import connected_broker, name_store, opened_store

# Headers describing one death (ours and RabbitMQ's): a replay starts without them.
DEATH_HEADERS = frozenset({
    REASON_HEADER, REASON_CLASS_HEADER, DELIVERIES_HEADER, ROUTING_KEY_HEADER, REPLAY_HEADER,
    "x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
    "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason",
})


def summary(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.dead_id, "dead_at": letter.dead_at.isoformat() if letter.dead_at else None,
        "type": letter.type, "practice": letter.practice, "appointment_id": letter.appointment_id,
        "command_id": letter.command_id, "message_id": letter.message_id, "reason_class": letter.reason_class,
        "reason": letter.reason, "deliveries": letter.deliveries, "replay": letter.replay,
        "status": letter.status,
    }


def detail(letter: DeadLetter) -> dict[str, Any]:
    shown = {**summary(letter), "key": letter.key, "routing_key": letter.routing_key,
             "correlation_id": letter.correlation_id, "reply_to": letter.reply_to, "headers": letter.headers}
    try:
        shown["body"] = letter.body.decode()
    except UnicodeDecodeError:
        shown["body_base64"] = base64.b64encode(letter.body).decode()
    return shown


async def dead_list(settings: Settings, query: DeadLetterQuery, *, as_json: bool) -> int:
    name_store(settings)
    async with opened_store(settings) as store:
        letters = await store.dead_letters(query)
    waiting = await _waiting_in_queue(settings)
    by_class = dict(Counter(letter.reason_class for letter in letters))
    by_reason = Counter(reason_group(letter.reason) for letter in letters)
    if as_json:
        print(json.dumps({"dead_letters": [summary(letter) for letter in letters], "by_reason_class": by_class,
                          "by_reason": dict(by_reason.most_common()), "waiting_in_queue": waiting}))
        return EXIT_OK
    if letters:
        print(f"{'ID':>6}  {'DEAD AT (UTC)':<19}  {'TYPE':<25}  {'PRACTICE':<10}  {'APPOINTMENT':>12}  "
              f"{'DELIV':>5}  {'REPLAY':>6}  {'COMMAND / MESSAGE ID':<36}  REASON")
    for letter in letters:
        when = letter.dead_at.strftime("%Y-%m-%d %H:%M:%S") if letter.dead_at else "-"
        print(f"{letter.dead_id:>6}  {when:<19}  {letter.type or '-':<25}  {letter.practice or '-':<10}  "
              f"{letter.appointment_id or '-':>12}  {letter.deliveries:>5}  {letter.replay:>6}  "
              f"{letter.command_id or letter.message_id or '-':<36}  {_one_line(letter.reason, 100)}")
    print(f"{len(letters)} dead letter(s)" + "".join(f"; {n} {c}" for c, n in sorted(by_class.items())))
    for group, count in by_reason.most_common():
        print(f"{count:>6}  {group}")
    if waiting:
        print(f"{waiting} more waiting in {DEAD_QUEUE}: listed once `appt serve` has collected them",
              file=sys.stderr)
    return EXIT_OK


async def dead_show(settings: Settings, dead_id: int, *, as_json: bool) -> int:
    name_store(settings)
    async with opened_store(settings) as store:
        found = await store.dead_letters(DeadLetterQuery(ids=(dead_id,), status=None))
    if not found:
        print(f"appt dead show: no dead letter {dead_id}", file=sys.stderr)
        return EXIT_USAGE
    shown = detail(found[0])
    if as_json:
        print(json.dumps(shown))
    else:
        body = shown.pop("body", None)
        for name, value in shown.items():
            print(f"{name + ':':<16}{json.dumps(value) if isinstance(value, (dict, list)) else value}")
        print("body:")
        print(body if body is not None else "(not UTF-8: see body_base64 above)")
    return EXIT_OK


async def dead_replay(settings: Settings, query: DeadLetterQuery, *, as_json: bool) -> int:
    """Back through the pipeline, in arrival order: publish (confirmed), then mark replayed."""
    async with opened_store(settings) as store, connected_broker(settings) as broker:
        letters = await store.dead_letters(query)
        if (missing := _missing(query, letters)):
            print(f"appt dead replay: not a dead letter now: {', '.join(map(str, missing))}", file=sys.stderr)
            return EXIT_USAGE
        for letter in letters:
            try:
                await replay_letter(store, broker, letter)
            except PublishFailed as exc:
                print(f"appt dead replay: {letter.dead_id} not replayed: {exc}", file=sys.stderr)
                return EXIT_FAILED
            _report({"replayed": letter.dead_id, "replay": letter.replay + 1, "type": letter.type,
                     "command_id": letter.command_id, "appointment_id": letter.appointment_id}, as_json)
    if not as_json:
        print(f"{len(letters)} replayed; each one's new result carries \"replay\": N")
    return EXIT_OK


async def dead_purge(settings: Settings, query: DeadLetterQuery, *, yes: bool, as_json: bool) -> int:
    async with opened_store(settings) as store:
        letters = await store.dead_letters(query)
        if (missing := _missing(query, letters)):
            print(f"appt dead purge: not a dead letter now: {', '.join(map(str, missing))}", file=sys.stderr)
            return EXIT_USAGE
        if not letters:
            print("appt dead purge: nothing to purge", file=sys.stderr)
            return EXIT_OK
        if not yes and not _confirmed(letters):
            print("appt dead purge: not confirmed, nothing purged", file=sys.stderr)
            return EXIT_FAILED
        for letter in letters:
            if await store.settle_dead_letter(letter.dead_id, "purged"):
                _report({"purged": letter.dead_id, "type": letter.type, "command_id": letter.command_id}, as_json)
    return EXIT_OK


async def replay_letter(store: Store, broker: Broker, letter: DeadLetter) -> None:
    """Publish (confirmed), then mark replayed: killed in between, the letter stays listed."""
    await _publish_replay(broker, letter)
    failpoint("after_replay_publish")
    await store.settle_dead_letter(letter.dead_id, "replayed")


async def _publish_replay(broker: Broker, letter: DeadLetter) -> None:
    headers = {k: v for k, v in letter.headers.items() if k not in DEATH_HEADERS}
    headers[REPLAY_HEADER] = letter.replay + 1
    properties = json_properties(message_id=letter.message_id, reply_to=letter.reply_to,
                                 correlation_id=letter.correlation_id, headers=headers)
    await broker.publish_raw_inbound(letter.body, letter.routing_key, properties,
                                     observed=(letter.type or "").startswith("appointment."))


def _missing(query: DeadLetterQuery, letters: list[DeadLetter]) -> list[int]:
    """Ids the operator named that are not (or no longer) dead letters."""
    found = {letter.dead_id for letter in letters}
    return [dead_id for dead_id in query.ids or () if dead_id not in found]


def _confirmed(letters: list[DeadLetter]) -> bool:
    ids = ", ".join(str(letter.dead_id) for letter in letters[:20]) + (" ..." if len(letters) > 20 else "")
    print(f"purge {len(letters)} dead letter(s) ({ids}) for good? [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _report(row: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(row) if as_json else " ".join(f"{k}={v}" for k, v in row.items() if v is not None),
          flush=True)


def reason_group(reason: str) -> str:
    """Reasons alike but for their numbers (ids, counts, statuses) count as one."""
    return _one_line(re.sub(r"\d+", "N", reason), 90)


def _one_line(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


async def _waiting_in_queue(settings: Settings) -> int | None:
    """Dead letters not yet collected into the store (no `appt serve` running?); None if unknown."""
    try:
        async with connected_broker(settings) as broker:
            channel = await broker.channel()
            queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
            count = queue.declaration_result.message_count
            return int(count) if count is not None else None
    except Exception:  # the listing itself comes from the store; the broker is optional here
        return None

"""The operator verbs of `appt` that talk to the broker and the store.

They use the same library objects as the service (Broker, Store, the
workflow runner), so what an operator sees and does is what the service does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aio_pika.exceptions import AMQPError
from pydantic import ValidationError

from consumer.broker import EVENTS_EXCHANGE, Broker, PublishFailed
from consumer.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, CliError
from consumer.messages import COMMAND, StateLogRecord
from consumer.pms.errors import PmsError
from consumer.practices import Practices, client_factory, load_configs
from consumer.settings import Settings
from consumer.store.base import (
    TERMINAL_WORKFLOW_STATES,
    NoStore,
    Store,
    StoreUnavailable,
    WorkflowRecord,
    iter_history,
)
from consumer.store.opening import open_store

# The flag each command type needs, by the message field it fills.
SEND_FLAGS = {
    "patient_id": "--patient",
    "reason": "--reason",
    "notes": "--notes",
    "appointment_id": "--appointment",
    "command_id": "--command-id",
}
NEEDED_FIELDS = {
    "confirm": (),
    "cancel": ("reason",),
    "set_patient": ("patient_id",),
    "reassign": ("patient_id",),
    "edit_notes": ("notes",),
}


def public_url(url: str) -> str:
    """A URL without its credentials, fit to print."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def name_store(settings: Settings) -> None:
    """Read-only verbs say which store they read (on stderr), so "no records" can't hide a wrong one."""
    print(f"store: {public_url(settings.store)}", file=sys.stderr)


@contextlib.asynccontextmanager
async def opened_store(settings: Settings, *, create: bool = False) -> AsyncIterator[Store]:
    """The store; read-only verbs (``create=False``) refuse to make an empty SQLite file."""
    store = open_store(settings.store, create=create)
    try:
        await store.open()
    except NoStore as exc:
        raise CliError(f"{exc}: run appt serve first, or set APPT_STORE", EXIT_USAGE) from None
    except StoreUnavailable as exc:
        raise CliError(f"store {public_url(settings.store)} unreachable: {exc} (start it, or set APPT_STORE)") from None
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def opened_practices(settings: Settings) -> AsyncIterator[Practices]:
    practices = Practices(load_configs(settings), client_factory(settings))
    try:
        yield practices
    finally:
        await practices.close()


@contextlib.asynccontextmanager
async def connected_broker(settings: Settings) -> AsyncIterator[Broker]:
    broker = Broker(settings.amqp_url, partitions=settings.partitions)
    try:
        await broker.connect(timeout=5.0)
    except (AMQPError, OSError, TimeoutError) as exc:
        raise CliError(
            f"RabbitMQ unreachable at {public_url(settings.amqp_url)}: {type(exc).__name__} "
            "(start it with scripts/services.sh, or set APPT_AMQP_URL)"
        ) from None
    try:
        yield broker
    finally:
        await broker.close()


def command_from_args(args: argparse.Namespace) -> Any:
    """The command the flags describe; a missing or misplaced flag is named as a flag, not a schema field."""
    given = {"patient_id": args.patient, "reason": args.reason, "notes": args.notes}
    needed = NEEDED_FIELDS[args.type]
    for field in needed:
        if given[field] is None:
            raise CliError(f"{args.type} needs {SEND_FLAGS[field]} (see appt send --help)", EXIT_USAGE)
    extra = [SEND_FLAGS[f] for f, value in given.items() if value is not None and f not in needed]
    if extra:
        raise CliError(f"{', '.join(extra)} does not apply to {args.type} (see appt send --help)", EXIT_USAGE)
    fields: dict[str, Any] = {
        "type": args.type,
        "command_id": args.command_id or str(uuid.uuid4()),
        "appointment_id": args.appointment,
        **{field: given[field] for field in needed},
        "practice": args.practice,
    }
    try:
        return COMMAND.validate_python(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{SEND_FLAGS.get(str(e['loc'][-1]), e['loc'][-1])}: {e['msg']}" for e in exc.errors())
        raise CliError(f"invalid {args.type}: {problems}", EXIT_USAGE) from None


async def send(settings: Settings, args: argparse.Namespace) -> int:
    command = command_from_args(args)
    body = command.model_dump_json().encode()
    async with connected_broker(settings) as broker:
        reply_queue = None
        if args.wait:
            channel = await broker.channel()
            reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        try:
            await broker.publish_inbound(
                body,
                practice=command.practice,
                appointment_id=command.appointment_id,
                message_id=command.command_id,
                reply_to=reply_queue.name if reply_queue else None,
                correlation_id=command.command_id,
            )
        except PublishFailed as exc:
            raise CliError(f"not published: {exc}") from None
        print(
            json.dumps(
                {
                    "published": command.command_id,
                    "type": command.type,
                    "practice": command.practice,
                    "appointment_id": command.appointment_id,
                }
            )
        )
        if reply_queue is None:
            return EXIT_OK
        return await _await_result(reply_queue, command.command_id, args.wait)


async def _await_result(queue: Any, command_id: str, timeout: float) -> int:
    try:
        async with asyncio.timeout(timeout), queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if message.correlation_id != command_id:
                    continue
                result = json.loads(message.body)
                print(json.dumps(result, indent=2))
                return EXIT_OK if result.get("outcome") == "succeeded" else EXIT_FAILED
    except TimeoutError:
        pass
    raise CliError(f"no result within {timeout} s (the command stays queued: is appt serve running?)", EXIT_TIMEOUT)


async def history(settings: Settings, appointment_id: int, *, practice: str, as_json: bool, follow: bool) -> int:
    printer = RecordPrinter(as_json=as_json, color=sys.stdout.isatty())
    name_store(settings)
    if not follow:
        await _print_stored(settings, appointment_id, practice, printer, after=0)
        if not printer.printed and not as_json:
            print(f"no records for appointment {appointment_id}", file=sys.stderr)
        return EXIT_OK
    async with connected_broker(settings) as broker:
        # Bind before reading the store: a record committed in between is then queued, not missed.
        channel = await broker.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(EVENTS_EXCHANGE, routing_key="state.#")
        after = await _print_stored(settings, appointment_id, practice, printer, after=0)
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                record = StateLogRecord.model_validate_json(message.body)
                if _names(record, appointment_id, practice) and (record.seq or 0) > after:
                    printer.print(record)
                    after = max(after, record.seq or 0)
    return EXIT_OK


async def _print_stored(
    settings: Settings, appointment_id: int, practice: str, printer: RecordPrinter, *, after: int
) -> int:
    """Print the stored records after ``after``; return the last seq printed."""
    async with opened_store(settings) as store:
        async for record in iter_history(store, appointment_id, practice=practice, after_seq=after):
            printer.print(record)
            after = record.seq or after
    return after


def _names(record: StateLogRecord, appointment_id: int, practice: str) -> bool:
    related = (record.detail.get("replacement_id"), record.detail.get("original_id"))
    return record.practice == practice and (record.appointment_id == appointment_id or appointment_id in related)


class RecordPrinter:
    """A readable table in a terminal (coloured on a TTY), or JSON lines."""

    COLORS = {
        "Confirmed": "32",
        "Cancelled": "31",
        "Pending": "33",
        "completed": "32",
        "compensated": "33",
        "compensation_failed": "41;97",
    }

    def __init__(self, *, as_json: bool, color: bool) -> None:
        self.as_json = as_json
        self.color = color
        self.printed = 0

    def print(self, record: StateLogRecord) -> None:
        if self.as_json:
            print(record.model_dump_json(), flush=True)
        else:
            if not self.printed:
                print(
                    f"{'SEQ':>6}  {'TIME':<23}  {'MACHINE':<12}  {'FROM':<20} -> {'TO':<20}  "
                    f"{'TRIGGER':<20}  {'SOURCE':<9}  ID / DETAIL"
                )
            print(self._row(record), flush=True)
        self.printed += 1

    def _row(self, r: StateLogRecord) -> str:
        when = r.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
        to_state = self._paint(f"{r.to_state:<20}", r.to_state)
        ident = r.command_id or r.webhook_id or r.workflow_id or ""
        detail = json.dumps(r.detail, separators=(",", ":")) if r.detail else ""
        return (
            f"{r.seq or 0:>6}  {when:<23}  {r.machine:<12}  {r.from_state or '-':<20} -> {to_state}  "
            f"{r.trigger:<20}  {r.source:<9}  {ident} {detail}"
        )

    def _paint(self, text: str, state: str) -> str:
        code = self.COLORS.get(state)
        return f"\033[{code}m{text}\033[0m" if self.color and code else text


async def sagas(settings: Settings, *, stuck: bool, as_json: bool) -> int:
    name_store(settings)
    async with opened_store(settings) as store:
        workflows = await store.list_workflows()
    if stuck:
        from consumer.workflow_watch import is_stuck

        workflows = [w for w in workflows if is_stuck(w, deadline=settings.workflow_deadline)]
    now = datetime.now(UTC)
    for w in workflows:
        age = (now - w.created_at).total_seconds() if w.created_at else 0.0
        row = {
            "workflow_id": w.workflow_id,
            "practice": w.practice,
            "appointment_id": w.appointment_id,
            "new_patient_id": w.new_patient_id,
            "replacement_id": w.replacement_id,
            "state": w.state,
            "age_s": round(age, 1),
            "attempts": w.attempts,
            "last_error": w.last_error,
        }
        if as_json:
            print(json.dumps(row))
        else:
            print(
                f"{w.workflow_id:<40} appt {w.appointment_id:<10} -> patient {w.new_patient_id:<8} "
                f"{w.state:<20} age {age:>8.1f}s  replacement {w.replacement_id or '-'}  "
                f"{w.last_error or ''}"
            )
    if not workflows and not as_json:
        print("no stuck workflows" if stuck else "no workflows", file=sys.stderr)
    return EXIT_OK


async def sagas_retry(settings: Settings, workflow_id: str) -> int:
    """A parked workflow is compensated again here; an unfinished one is handed back to the pipeline."""
    async with (
        opened_store(settings) as store,
        connected_broker(settings) as broker,
        opened_practices(settings) as practices,
    ):
        try:
            outcome = await retry_saga(settings, store, broker, practices, workflow_id)
        except LookupError:
            raise CliError(
                f"no workflow {workflow_id} in {public_url(settings.store)} (appt sagas lists them)", EXIT_USAGE
            ) from None
    print(json.dumps(outcome.report()))
    return EXIT_OK if outcome.finished or outcome.note else EXIT_FAILED


@dataclass(frozen=True)
class SagaRetry:
    """What `appt sagas retry` (or the console's retry button) did to one workflow."""

    workflow: WorkflowRecord
    note: str | None = None
    """Set when nothing was compensated here: already finished, or handed back to the pipeline."""

    @property
    def finished(self) -> bool:
        return self.workflow.state in TERMINAL_WORKFLOW_STATES

    def report(self) -> dict[str, Any]:
        w = self.workflow
        if self.note:
            return {"workflow_id": w.workflow_id, "state": w.state, "note": self.note}
        return {"workflow_id": w.workflow_id, "state": w.state, "last_error": w.last_error}


async def retry_saga(
    settings: Settings, store: Store, broker: Broker, practices: Practices, workflow_id: str
) -> SagaRetry:
    """Compensate a parked workflow again, or hand an unfinished one back; LookupError if unknown."""
    from consumer.workflow_watch import WorkflowWatcher
    from consumer.workflows import WorkflowRunner
    from statemachines.reassignment import COMPENSATION_FAILED

    workflow = await store.get_workflow(workflow_id)
    if workflow is None:
        raise LookupError(f"no workflow {workflow_id}")
    if workflow.state in TERMINAL_WORKFLOW_STATES:
        return SagaRetry(workflow, "already finished")
    if workflow.state != COMPENSATION_FAILED:
        watcher = WorkflowWatcher(store=store, broker=broker, deadline=settings.workflow_deadline)
        await watcher.requeue(workflow)
        return SagaRetry(workflow, "handed back to the pipeline: watch appt history")
    runner = WorkflowRunner(practices=practices, store=store, broker=broker)
    return SagaRetry(await runner.retry(workflow_id))


async def practices(settings: Settings, *, as_json: bool) -> int:
    """The running service's view (statuses and budgets live in the process that serves)."""
    import aiohttp

    url = f"http://{settings.http_host}:{settings.http_port}/practices"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(url) as answer:
                answer.raise_for_status()
                rows = (await answer.json())["practices"]
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"appt practices: the service at {url} did not answer: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for row in rows:
        if as_json:
            print(json.dumps(row))
            continue
        budget = row["budget"]
        print(
            f"{row['practice']:<20} {row['status']:<14} waiting {row['waiting_messages']:>6}  "
            f"budget {budget['remaining'] if budget['remaining'] is not None else '?'}"
            f"/{budget['limit'] if budget['limit'] is not None else '?'} reset {budget['reset'] or '-'}"
            + "  spent "
            + " ".join(f"{k} {v}" for k, v in budget.get("spent_this_hour", {}).items())
            + (f"  retry at {row['retry_at']}" if row["retry_at"] else "")
            + (
                f"  webhooks silent ({row['webhooks']['missed_changes']} changes only polling found)"
                if row["webhooks"]["status"] == "silent"
                else ""
            )
            + (f"  ({row['reason']})" if row["reason"] else "")
        )
    return EXIT_OK


async def reconcile(settings: Settings, *, since: str | None) -> int:
    """Every practice, one after the other; one line per practice."""
    from consumer.reconciler import reconcile_once

    if since is not None:
        check_time(since, "--since")
    async with opened_store(settings, create=True) as store, connected_broker(settings) as broker:
        async with opened_practices(settings) as practices:
            for practice in practices:
                try:
                    count = await reconcile_once(
                        practice.pms,
                        broker,
                        store,
                        practice=practice.name,
                        since=since,
                        horizon_days=settings.reconcile_horizon_days,
                    )
                except PmsError as exc:  # unreachable or refusing: one line, not a traceback
                    raise CliError(
                        f"PMS at {practice.config.pms_url} (practice {practice.name}): {exc} "
                        "(is it up? check its pms_url and token)"
                    ) from None
                print(json.dumps({"practice": practice.name, "published": count}))
    return EXIT_OK


async def prune(settings: Settings, *, dry_run: bool) -> int:
    """One JSON line per table: what went (or, dry, would go) and the oldest row kept."""
    from consumer.retention import prune_once, retentions

    async with opened_store(settings) as store:
        reports = await prune_once(store, retentions(settings), batch=settings.prune_batch, dry_run=dry_run)
    for report in reports:
        print(json.dumps({**report.as_json(), "dry_run": dry_run}))
    return EXIT_OK


def check_time(text: str, flag: str) -> None:
    """An ISO 8601 time with its zone, as the PMS's ``updated_after`` takes it."""
    example = "e.g. 2026-11-20T00:00:00Z"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{flag} {text!r} is not an ISO 8601 time ({example})", EXIT_USAGE) from None
    if parsed.tzinfo is None:
        raise CliError(f"{flag} {text!r} has no time zone ({example}, or +01:00)", EXIT_USAGE)

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
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from consumer.broker import EVENTS_EXCHANGE, Broker, PublishFailed
from consumer.messages import COMMAND, StateLogRecord
from consumer.settings import Settings
from consumer.store.base import TERMINAL_WORKFLOW_STATES, Store, iter_history, open_store

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 4


@contextlib.asynccontextmanager
async def opened_store(settings: Settings) -> AsyncIterator[Store]:
    store = open_store(settings.store)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def connected_broker(settings: Settings) -> AsyncIterator[Broker]:
    broker = Broker(settings.amqp_url, partitions=settings.partitions)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


def command_from_args(args: argparse.Namespace) -> Any:
    fields: dict[str, Any] = {
        "type": args.type,
        "command_id": args.command_id or str(uuid.uuid4()),
        "appointment_id": args.appointment,
    }
    if args.type in ("set_patient", "reassign"):
        fields["patient_id"] = args.patient
    if args.type == "cancel":
        fields["reason"] = args.reason
    if args.type == "edit_notes":
        fields["notes"] = args.notes
    return COMMAND.validate_python(fields)


async def send(settings: Settings, args: argparse.Namespace) -> int:
    try:
        command = command_from_args(args)
    except ValidationError as exc:
        missing = ", ".join(".".join(map(str, e["loc"][1:] or e["loc"])) + ": " + e["msg"] for e in exc.errors())
        print(f"appt send: invalid {args.type} command: {missing}", file=sys.stderr)
        return EXIT_USAGE
    body = command.model_dump_json().encode()
    async with connected_broker(settings) as broker:
        reply_queue = None
        if args.wait:
            channel = await broker.channel()
            reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        try:
            await broker.publish_inbound(
                body, appointment_id=command.appointment_id, message_id=command.command_id,
                reply_to=reply_queue.name if reply_queue else None, correlation_id=command.command_id,
            )
        except PublishFailed as exc:
            print(f"appt send: not published: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps({"published": command.command_id, "type": command.type,
                          "appointment_id": command.appointment_id}))
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
    print(f"appt send: no result within {timeout} s (the command stays queued)", file=sys.stderr)
    return EXIT_TIMEOUT


async def history(settings: Settings, appointment_id: int, *, as_json: bool, follow: bool) -> int:
    printer = RecordPrinter(as_json=as_json, color=sys.stdout.isatty())
    if not follow:
        await _print_stored(settings, appointment_id, printer, after=0)
        if not printer.printed and not as_json:
            print(f"no records for appointment {appointment_id}", file=sys.stderr)
        return EXIT_OK
    async with connected_broker(settings) as broker:
        # Bind before reading the store: a record committed in between is then queued, not missed.
        channel = await broker.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(EVENTS_EXCHANGE, routing_key="state.#")
        after = await _print_stored(settings, appointment_id, printer, after=0)
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                record = StateLogRecord.model_validate_json(message.body)
                if _names(record, appointment_id) and (record.seq or 0) > after:
                    printer.print(record)
                    after = max(after, record.seq or 0)
    return EXIT_OK


async def _print_stored(settings: Settings, appointment_id: int, printer: RecordPrinter, *, after: int) -> int:
    """Print the stored records after ``after``; return the last seq printed."""
    async with opened_store(settings) as store:
        async for record in iter_history(store, appointment_id, after_seq=after):
            printer.print(record)
            after = record.seq or after
    return after


def _names(record: StateLogRecord, appointment_id: int) -> bool:
    related = (record.detail.get("replacement_id"), record.detail.get("original_id"))
    return record.appointment_id == appointment_id or appointment_id in related


class RecordPrinter:
    """A readable table in a terminal (coloured on a TTY), or JSON lines."""

    COLORS = {"Confirmed": "32", "Cancelled": "31", "Pending": "33", "completed": "32",
              "compensated": "33", "compensation_failed": "41;97"}

    def __init__(self, *, as_json: bool, color: bool) -> None:
        self.as_json = as_json
        self.color = color
        self.printed = 0

    def print(self, record: StateLogRecord) -> None:
        if self.as_json:
            print(record.model_dump_json(), flush=True)
        else:
            if not self.printed:
                print(f"{'SEQ':>6}  {'TIME':<23}  {'MACHINE':<12}  {'FROM':<20} -> {'TO':<20}  "
                      f"{'TRIGGER':<20}  {'SOURCE':<9}  ID / DETAIL")
            print(self._row(record), flush=True)
        self.printed += 1

    def _row(self, r: StateLogRecord) -> str:
        when = r.time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
        to_state = self._paint(f"{r.to_state:<20}", r.to_state)
        ident = r.command_id or r.webhook_id or r.workflow_id or ""
        detail = json.dumps(r.detail, separators=(",", ":")) if r.detail else ""
        return (f"{r.seq or 0:>6}  {when:<23}  {r.machine:<12}  {r.from_state or '-':<20} -> {to_state}  "
                f"{r.trigger:<20}  {r.source:<9}  {ident} {detail}")

    def _paint(self, text: str, state: str) -> str:
        code = self.COLORS.get(state)
        return f"\033[{code}m{text}\033[0m" if self.color and code else text


async def sagas(settings: Settings, *, stuck: bool, as_json: bool) -> int:
    async with opened_store(settings) as store:
        workflows = await store.list_workflows()
    if stuck:
        from consumer.workflows import is_stuck

        workflows = [w for w in workflows if is_stuck(w, deadline=settings.workflow_deadline)]
    now = datetime.now(timezone.utc)
    for w in workflows:
        age = (now - w.created_at).total_seconds() if w.created_at else 0.0
        row = {"workflow_id": w.workflow_id, "appointment_id": w.appointment_id,
               "new_patient_id": w.new_patient_id, "replacement_id": w.replacement_id,
               "state": w.state, "age_s": round(age, 1), "attempts": w.attempts,
               "last_error": w.last_error}
        if as_json:
            print(json.dumps(row))
        else:
            print(f"{w.workflow_id:<40} appt {w.appointment_id:<10} -> patient {w.new_patient_id:<8} "
                  f"{w.state:<20} age {age:>8.1f}s  replacement {w.replacement_id or '-'}  "
                  f"{w.last_error or ''}")
    if not workflows and not as_json:
        print("no stuck workflows" if stuck else "no workflows", file=sys.stderr)
    return EXIT_OK


async def sagas_retry(settings: Settings, workflow_id: str) -> int:
    """A parked workflow is compensated again here; an unfinished one is handed back to the pipeline."""
    from consumer.pms.client import PmsClient
    from consumer.workflows import WorkflowRunner
    from statemachines.reassignment import COMPENSATION_FAILED

    async with opened_store(settings) as store, connected_broker(settings) as broker:
        async with PmsClient(settings.pms_url, settings.pms_token, timeout=settings.pms_timeout) as pms:
            runner = WorkflowRunner(pms=pms, store=store, broker=broker, deadline=settings.workflow_deadline)
            workflow = await store.get_workflow(workflow_id)
            if workflow is None:
                print(f"appt sagas retry: no workflow {workflow_id}", file=sys.stderr)
                return EXIT_USAGE
            if workflow.state in TERMINAL_WORKFLOW_STATES:
                print(json.dumps({"workflow_id": workflow_id, "state": workflow.state, "note": "already finished"}))
                return EXIT_OK
            if workflow.state != COMPENSATION_FAILED:
                await runner.requeue(workflow)
                print(json.dumps({"workflow_id": workflow_id, "state": workflow.state,
                                  "note": "handed back to the pipeline: watch appt history"}))
                return EXIT_OK
            workflow = await runner.retry(workflow_id)
    print(json.dumps({"workflow_id": workflow.workflow_id, "state": workflow.state,
                      "last_error": workflow.last_error}))
    return EXIT_OK if workflow.state in TERMINAL_WORKFLOW_STATES else EXIT_FAILED


async def reconcile(settings: Settings, *, since: str | None) -> int:
    from consumer.pms.client import PmsClient
    from consumer.reconciler import reconcile_once

    async with opened_store(settings) as store, connected_broker(settings) as broker:
        async with PmsClient(settings.pms_url, settings.pms_token, timeout=settings.pms_timeout) as pms:
            count = await reconcile_once(pms, broker, store, since=since,
                                         horizon_days=settings.reconcile_horizon_days)
    print(json.dumps({"published": count}))
    return EXIT_OK


async def prune(settings: Settings, *, dry_run: bool) -> int:
    """One JSON line per table: what went (or, dry, would go) and the oldest row kept."""
    from consumer.retention import prune_once, retentions

    async with opened_store(settings) as store:
        reports = await prune_once(store, retentions(settings), batch=settings.prune_batch, dry_run=dry_run)
    for report in reports:
        print(json.dumps({**report.as_json(), "dry_run": dry_run}))
    return EXIT_OK

"""`appt`: serve | send | history | sagas | dead | diagram | sandbox | schema | reconcile | prune.

Each verb is a thin shell over the library: parse arguments, load settings
(errors name the APPT_* variable), run one coroutine, map the outcome to an
exit code a script can rely on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from consumer.logs import configure
from consumer.settings import Settings, SettingsError, load_settings, redact_url

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appt",
        description="Keeps a partner system's appointments in step with a PMS, safely and durably.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    serve = verbs.add_parser("serve", help="run the service (webhooks, worker, workflows, reconciler)")
    serve.add_argument("--with-sandbox", action="store_true",
                       help="also run the PMS sandbox on :8700 and use it as the upstream")

    send = verbs.add_parser("send", help="publish a command to appointments.inbound")
    send.add_argument("type", choices=["confirm", "cancel", "set_patient", "reassign", "edit_notes"])
    send.add_argument("--appointment", type=int, required=True)
    send.add_argument("--patient", type=int, help="for set_patient and reassign")
    send.add_argument("--reason", help="for cancel, e.g. 'Patient cancelled'")
    send.add_argument("--notes", help="for edit_notes")
    send.add_argument("--command-id", help="idempotency key (default: a fresh uuid)")
    send.add_argument("--wait", type=float, metavar="SECONDS",
                      help="wait for the result; exit 0 only if it succeeded")

    history = verbs.add_parser("history", help="an appointment's state log, in order")
    history.add_argument("appointment", type=int)
    history.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    history.add_argument("--follow", action="store_true", help="then tail new records live")

    sagas = verbs.add_parser("sagas", help="reassignment workflows")
    sagas.add_argument("--stuck", action="store_true", help="only parked or overdue ones")
    sagas.add_argument("--json", action="store_true")
    sagas_verbs = sagas.add_subparsers(dest="sagas_verb", metavar="ACTION")
    retry = sagas_verbs.add_parser(
        "retry", help="compensate a parked workflow again; hand an unfinished one back to the pipeline")
    retry.add_argument("workflow_id")

    _add_dead(verbs)

    diagram = verbs.add_parser("diagram", help="print a machine as a Mermaid state diagram")
    diagram.add_argument("machine", choices=["appointment", "reassignment"])

    sandbox = verbs.add_parser("sandbox", help="run the PMS emulator")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8700)
    sandbox.add_argument("--token", default="sandbox-token",
                         help="the one bearer token accepted (default: sandbox-token); "
                              "POST /_sandbox/token changes it at run time, as a revoked or expired token")
    sandbox.add_argument("--updated-after", choices=["ignored", "honoured"], default="ignored",
                         help="whether the list honours updated_after (unconfirmed on the live PMS; default: ignored)")
    sandbox.add_argument("--delete", choices=["cancel", "remove"], default="cancel",
                         help="what DELETE does (unconfirmed on the live PMS; default: cancel)")

    verbs.add_parser("schema", help="print the message contract as JSON Schema")

    prune = verbs.add_parser(
        "prune", help="delete what is past its retention now (appt serve also does, every APPT_PRUNE_INTERVAL)")
    prune.add_argument("--dry-run", action="store_true", help="only count what would go, per table")

    reconcile = verbs.add_parser(
        "reconcile", help="catch up from the PMS now (reads every polling window once, cancelled rows included)")
    reconcile.add_argument("--since", help="ISO time: republish every row changed after it, whatever is stored")
    return parser


def _add_dead(verbs: Any) -> None:
    dead = verbs.add_parser("dead", help="dead letters: list, show, replay or purge them")
    actions = dead.add_subparsers(dest="dead_verb", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="dead letters in arrival order, and a count by reason class")
    show = actions.add_parser("show", help="one dead letter's body and headers")
    show.add_argument("id", type=int)
    replay = actions.add_parser("replay", help="put dead letters back through the pipeline")
    purge = actions.add_parser("purge", help="discard dead letters (asks first)")
    purge.add_argument("--yes", action="store_true", help="do not ask")
    for action in (replay, purge):
        action.add_argument("ids", type=int, nargs="*", metavar="ID")
        action.add_argument("--all", action="store_true", help="every dead letter the filters match")
    for action in (listing, replay, purge):
        action.add_argument("--reason", help="reason contains TEXT (case-insensitive)")
        action.add_argument("--type", help="command or event type, e.g. confirm, appointment.updated")
        action.add_argument("--practice", help="the practice the message names")
    for action in (listing, show, replay, purge):
        action.add_argument("--json", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb == "diagram":
        from statemachines.diagram import mermaid

        print(mermaid(args.machine))
        return EXIT_OK
    if args.verb == "schema":
        from consumer.messages import json_schemas

        print(json.dumps(json_schemas(), indent=2))
        return EXIT_OK
    if args.verb == "sandbox":
        from consumer.sandbox import serve_sandbox

        return _run(serve_sandbox(args.host, args.port, token=args.token,
                                  updated_after_honoured=args.updated_after == "honoured",
                                  delete_mode=args.delete))
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"appt: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.verb != "serve":
        # Operator verbs keep stdout for their output; their logs go to stderr, readable.
        configure("console", settings.log_level)
    return _run(_dispatch(args, settings))


def _run(coro: Any) -> int:
    try:
        return int(asyncio.run(coro) or EXIT_OK)
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:  # `appt history 42 | head`: the reader left, that's fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from consumer import tools

    if args.verb == "serve":
        from aio_pika.exceptions import AMQPError

        from consumer.service import serve
        from consumer.store.base import StoreUnavailable

        try:
            await serve(settings, with_sandbox=args.with_sandbox)
        except (AMQPError, StoreUnavailable, OSError) as exc:  # a dependency down, a port taken
            reason = str(exc)
            for url in (settings.amqp_url, settings.store):  # a driver may quote its URL back
                reason = reason.replace(url, redact_url(url))
            print(f"appt serve: could not start: {type(exc).__name__}: {reason}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    if args.verb == "send":
        return await tools.send(settings, args)
    if args.verb == "history":
        return await tools.history(settings, args.appointment, as_json=args.json, follow=args.follow)
    if args.verb == "sagas":
        if args.sagas_verb == "retry":
            return await tools.sagas_retry(settings, args.workflow_id)
        return await tools.sagas(settings, stuck=args.stuck, as_json=args.json)
    if args.verb == "reconcile":
        return await tools.reconcile(settings, since=args.since)
    if args.verb == "prune":
        return await tools.prune(settings, dry_run=args.dry_run)
    if args.verb == "dead":
        return await _dead(args, settings)
    raise AssertionError(args.verb)


async def _dead(args: argparse.Namespace, settings: Settings) -> int:
    from consumer import dead_tools
    from consumer.store.base import DeadLetterQuery

    if args.dead_verb == "show":
        return await dead_tools.dead_show(settings, args.id, as_json=args.json)
    ids = tuple(getattr(args, "ids", None) or ()) or None
    if args.dead_verb != "list" and (ids is None) == (not args.all):
        print(f"appt dead {args.dead_verb}: name dead letters by ID or use --all (not both)", file=sys.stderr)
        return EXIT_USAGE
    query = DeadLetterQuery(ids=ids, reason=args.reason, type=args.type, practice=args.practice)
    if args.dead_verb == "list":
        return await dead_tools.dead_list(settings, query, as_json=args.json)
    if args.dead_verb == "replay":
        return await dead_tools.dead_replay(settings, query, as_json=args.json)
    return await dead_tools.dead_purge(settings, query, yes=args.yes, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())

"""`appt`: serve | send | history | sagas | dead | practices | diagram | sandbox | schema | asyncapi | reconcile | prune.

Each verb is a thin shell over the library: parse arguments, load settings
(errors name the APPT_* variable), run one coroutine, map the outcome to an
exit code a script can rely on. An ordinary mistake (a bad flag, a service
down, a port taken) is one line on stderr, never a traceback: those are for
``--debug`` or ``APPT_LOG_LEVEL=DEBUG``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from consumer.exitcodes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError
from consumer.logs import configure
from consumer.settings import Settings, SettingsError, default_store, load_settings, redact_url

EXIT_CODES = """exit codes:
  0  done (send --wait: the command succeeded)
  1  failed: the command was rejected or failed, or RabbitMQ / the store / the PMS
     is unreachable, or a port is taken
  2  usage: a bad or missing flag or argument, an unknown id, no store at APPT_STORE
  3  configuration: a bad APPT_* variable (each one named)
  4  timeout: no result within send --wait SECONDS"""

MAIN_EPILOG = f"""configuration: APPT_* environment variables (all of them: README, "Configuration"):
  APPT_AMQP_URL     RabbitMQ          (default amqp://guest:guest@127.0.0.1:5672/)
  APPT_STORE        the store         (default {default_store()},
                                       i.e. under $XDG_DATA_HOME or ~/.local/share)
  APPT_PMS_URL      the PMS           (default http://127.0.0.1:8700, the sandbox)
  APPT_PMS_TOKEN    its bearer token  (default sandbox-token)
  APPT_HTTP_PORT    appt serve's HTTP port (default 8080); APPT_SANDBOX_PORT (default 8700)
  APPT_LOG_LEVEL    DEBUG also prints tracebacks (as --debug does)

{EXIT_CODES}

first steps: scripts/run (= appt serve --with-sandbox), then in another shell
  appt send confirm --appointment 757579675 --wait 10, appt history 757579675;
  appt VERB --help for each verb."""

SEND_EPILOG = f"""types (each needs --appointment ID):
  confirm      Pending -> Confirmed
  cancel       -> Cancelled; needs --reason, one of the PMS's cancellation reasons
               (the sandbox's: "Booked in error", "Patient cancelled",
               "Practice cancelled", "Other"; matched case-insensitively)
  set_patient  set the patient of an appointment that has none; needs --patient
  reassign     move the slot to another patient: book a replacement for --patient,
               cancel the original "Booked in error" (compensated if that fails)
  edit_notes   replace the notes; needs --notes

The command goes to exchange appointments.inbound (reads APPT_AMQP_URL, APPT_PARTITIONS);
appt serve applies it. Without --wait, exit 0 means "durably queued".

{EXIT_CODES}

example: appt send cancel --appointment 757579675 --reason "Patient cancelled" --wait 10"""

STORE_READER = "reads APPT_STORE (printed on stderr) and refuses a store that does not exist"


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line pointing at --help (not the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs keep their layout; an option with a real default shows it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="appt",
        formatter_class=Formatter,
        epilog=MAIN_EPILOG,
        description="Keeps a partner system's appointments in step with a PMS, safely and durably.",
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, epilog: str = EXIT_CODES, **more: Any) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=Formatter, **more)

    serve = verb(
        "serve",
        "run the service (webhooks, worker, workflows, reconciler)",
        "reads every APPT_* variable (appt --help). Checks its ports before starting anything.\n"
        "exit codes: 1 a dependency unreachable or a port taken (one line saying which);\n"
        "  3 a bad APPT_* variable; 0 after SIGTERM / Ctrl-C.",
    )
    serve.add_argument(
        "--with-sandbox",
        action="store_true",
        help="also run the PMS sandbox on APPT_SANDBOX_PORT (default 8700) and use it as the "
        "upstream; the webhook secret is APPT_WEBHOOK_SECRETS or the demo default",
    )

    send = verb("send", "publish a command to appointments.inbound", SEND_EPILOG)
    send.add_argument(
        "type", choices=["confirm", "cancel", "set_patient", "reassign", "edit_notes"], help="what to do (below)"
    )
    send.add_argument("--appointment", type=int, required=True, metavar="ID", help="the PMS appointment id")
    send.add_argument("--practice", default="default", help="the practice the appointment belongs to")
    send.add_argument("--patient", type=int, metavar="ID", help="the patient, for set_patient and reassign")
    send.add_argument("--reason", help="the cancellation reason, for cancel")
    send.add_argument("--notes", help="the new notes, for edit_notes")
    send.add_argument(
        "--command-id", metavar="ID", help="idempotency key: the same id twice is applied once (default: a fresh uuid)"
    )
    send.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait for the result, print it; exit 0 only if it succeeded"
    )

    history = verb(
        "history",
        "an appointment's state log, in order",
        f"{STORE_READER}; --follow also reads APPT_AMQP_URL.\n\n{EXIT_CODES}",
    )
    history.add_argument("appointment", type=int, metavar="ID", help="the PMS appointment id")
    history.add_argument("--practice", default="default", help="the practice the appointment belongs to")
    history.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    history.add_argument("--follow", action="store_true", help="then tail new records live")

    sagas = verb(
        "sagas",
        "list reassignment workflows (optionally: sagas retry ID)",
        f"{STORE_READER}.\n\n{EXIT_CODES}",
        usage="appt sagas [-h] [--stuck] [--json]\n       appt sagas retry ID",
    )
    sagas.add_argument(
        "--stuck", action="store_true", help="only parked ones, and unfinished ones older than APPT_WORKFLOW_DEADLINE"
    )
    sagas.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    sagas_verbs = sagas.add_subparsers(dest="sagas_verb", metavar="[retry ID]", required=False)
    retry = sagas_verbs.add_parser(
        "retry",
        formatter_class=Formatter,
        help="compensate a parked workflow again; hand an unfinished one back to the pipeline",
        epilog="reads APPT_STORE, APPT_AMQP_URL, APPT_PMS_URL, APPT_PMS_TOKEN.\n"
        "exit codes: 0 finished (completed or compensated) or handed back; 1 still parked, or a\n"
        "  dependency unreachable; 2 no such workflow; 3 a bad APPT_* variable",
    )
    retry.add_argument("workflow_id", metavar="ID", help="as listed by appt sagas, e.g. reassign-<command id>")

    _add_dead(verbs)

    diagram = verb("diagram", "print a machine as a Mermaid state diagram", "exit code 0.")
    diagram.add_argument("machine", choices=["appointment", "reassignment"], help="which machine")

    sandbox = verb(
        "sandbox",
        "run the PMS emulator (in memory, with fault knobs under /_sandbox/)",
        "prints one line once listening: URL, token, knobs; runs until Ctrl-C.\n"
        "exit codes: 1 the port is taken (or stopped by Ctrl-C).",
    )
    sandbox.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sandbox.add_argument("--port", type=int, default=8700, help="port to listen on")
    sandbox.add_argument(
        "--token",
        default="sandbox-token",
        help="the one bearer token accepted; "
        "POST /_sandbox/token changes it at run time, as a revoked or expired token",
    )
    sandbox.add_argument(
        "--updated-after",
        choices=["ignored", "honoured"],
        default="ignored",
        help="whether the list honours updated_after (unconfirmed on the live PMS)",
    )
    sandbox.add_argument(
        "--delete",
        choices=["cancel", "remove"],
        default="cancel",
        help="what DELETE does (unconfirmed on the live PMS)",
    )

    practices = verb(
        "practices",
        "each practice's status, budget and waiting messages (asks the running service)",
        "exit code 0, or 1 when the service does not answer.",
    )
    practices.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    verb("schema", "print the message contract as JSON Schema", "exit code 0.")
    verb("asyncapi", "print the AMQP contract as an AsyncAPI 3.0 document (JSON)", "exit code 0.")

    prune = verb(
        "prune",
        "delete what is past its retention now (appt serve also does, every APPT_PRUNE_INTERVAL)",
        f"reads APPT_STORE and the APPT_*_RETENTION settings; refuses a store that does not exist.\n\n{EXIT_CODES}",
    )
    prune.add_argument("--dry-run", action="store_true", help="only count what would go, per table")

    reconcile = verb(
        "reconcile",
        "catch up from the PMS now (reads every polling window once, cancelled rows included)",
        "reads APPT_STORE, APPT_AMQP_URL, APPT_PMS_URL, APPT_PMS_TOKEN.\n\n" + EXIT_CODES,
    )
    reconcile.add_argument(
        "--since",
        metavar="TIME",
        help="ISO 8601 time with a zone (e.g. 2026-11-20T00:00:00Z): republish every row "
        "changed after it, whatever is stored",
    )
    return parser


def _add_dead(verbs: Any) -> None:
    epilog = f"reads APPT_STORE (and APPT_AMQP_URL to replay).\n\n{EXIT_CODES}"
    dead = verbs.add_parser(
        "dead",
        help="dead letters: list, show, replay or purge them",
        description="dead letters: list, show, replay or purge them",
        epilog=epilog,
        formatter_class=Formatter,
    )
    actions = dead.add_subparsers(dest="dead_verb", required=True, metavar="ACTION")

    def subverb(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=Formatter
        )
        return parser

    listing = subverb("list", "dead letters in arrival order, and a count by reason class")
    show = subverb("show", "one dead letter's body and headers")
    show.add_argument("id", type=int)
    replay = subverb("replay", "put dead letters back through the pipeline")
    purge = subverb("purge", "discard dead letters (asks first)")
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
    debug = args.debug or os.environ.get("APPT_LOG_LEVEL", "").upper() == "DEBUG"
    try:
        return _main(args)
    except CliError as exc:
        print(f"appt {args.verb}: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:  # a bug, or a failure nobody foresaw: still one line unless debugging
        if debug:
            raise
        print(
            f"appt {args.verb}: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _main(args: argparse.Namespace) -> int:
    if args.verb == "diagram":
        from statemachines.diagram import mermaid

        print(mermaid(args.machine))
        return EXIT_OK
    if args.verb == "schema":
        from consumer.messages import json_schemas

        print(json.dumps(json_schemas(), indent=2))
        return EXIT_OK
    if args.verb == "asyncapi":
        from consumer.asyncapi import asyncapi_document

        print(json.dumps(asyncapi_document(), indent=2))
        return EXIT_OK
    if args.verb == "sandbox":
        from consumer.sandbox import serve_sandbox

        try:
            return _run(
                serve_sandbox(
                    args.host,
                    args.port,
                    token=args.token,
                    updated_after_honoured=args.updated_after == "honoured",
                    delete_mode=args.delete,
                )
            )
        except OSError as exc:
            raise CliError(
                f"cannot listen on {args.host}:{args.port} ({exc.strerror}): choose another --port"
            ) from None
    try:
        settings = load_settings()
    except SettingsError as exc:
        for line in str(exc).splitlines():
            print(f"appt: {line}", file=sys.stderr)
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

        from consumer.practices import PracticesError
        from consumer.service import serve
        from consumer.store.base import StoreUnavailable

        try:
            await serve(settings, with_sandbox=args.with_sandbox)
        except PracticesError as exc:
            print(f"appt: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except (AMQPError, StoreUnavailable, OSError) as exc:  # a dependency down, a port taken
            reason = str(exc)
            for url in (settings.amqp_url, settings.store):  # a driver may quote its URL back
                reason = reason.replace(url, redact_url(url))
            raise CliError(f"could not start: {type(exc).__name__}: {reason}") from None
        return EXIT_OK
    if args.verb == "send":
        return await tools.send(settings, args)
    if args.verb == "history":
        return await tools.history(
            settings, args.appointment, practice=args.practice, as_json=args.json, follow=args.follow
        )
    if args.verb == "sagas":
        if args.sagas_verb == "retry":
            return await tools.sagas_retry(settings, args.workflow_id)
        return await tools.sagas(settings, stuck=args.stuck, as_json=args.json)
    if args.verb == "practices":
        return await tools.practices(settings, as_json=args.json)
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
        raise CliError(f"{args.dead_verb}: name dead letters by ID or use --all (not both)", EXIT_USAGE)
    query = DeadLetterQuery(ids=ids, reason=args.reason, type=args.type, practice=args.practice)
    if args.dead_verb == "list":
        return await dead_tools.dead_list(settings, query, as_json=args.json)
    if args.dead_verb == "replay":
        return await dead_tools.dead_replay(settings, query, as_json=args.json)
    return await dead_tools.dead_purge(settings, query, yes=args.yes, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())

"""`appt` in a newcomer's first hour: ordinary mistakes are one line and their documented exit code.

Each row is a mistake (a service down, a bad flag, a bad time, an unknown id,
a port taken), run as the real `appt` process. None may print a traceback;
each must say what is wrong in its last stderr line, and exit with the code
`appt --help` documents (1 failed / unreachable, 2 usage, 3 configuration,
4 timeout).
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.cli import build_parser
from consumer.exitcodes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE
from consumer.store.opening import open_store
from tests.conftest import RABBIT_HOST, RABBIT_PORT, drop_vhost, make_vhost, require_service
from tests.e2e.processes import SandboxProcess
from tests.helpers import APPT, Ran, free_port, run_appt

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# (what goes wrong, argv, extra env, expected exit code, text the last stderr line contains).
# Every row runs with APPT_STORE an existing empty SQLite store. {dead} is a port nothing listens
# on; {tmp} the test's directory; {amqp} a live vhost; {taken} a port held by the test.
MISTAKES = [
    (
        "RabbitMQ down: send",
        ["send", "confirm", "--appointment", "1"],
        {"APPT_AMQP_URL": "amqp://guest:guest@127.0.0.1:{dead}/"},
        EXIT_FAILED,
        "RabbitMQ unreachable",
    ),
    (
        "RabbitMQ down: history --follow",
        ["history", "1", "--follow"],
        {"APPT_AMQP_URL": "amqp://guest:guest@127.0.0.1:{dead}/"},
        EXIT_FAILED,
        "RabbitMQ unreachable",
    ),
    (
        "RabbitMQ down: serve",
        ["serve"],
        {"APPT_AMQP_URL": "amqp://guest:guest@127.0.0.1:{dead}/"},
        EXIT_FAILED,
        "could not start",
    ),
    (
        "PostgreSQL down: sagas",
        ["sagas"],
        {"APPT_STORE": "postgresql://nobody@127.0.0.1:{dead}/x"},
        EXIT_FAILED,
        "unreachable",
    ),
    (
        "PMS down: reconcile",
        ["reconcile"],
        {"APPT_PMS_URL": "http://127.0.0.1:{dead}", "APPT_PMS_TIMEOUT": "0.5"},
        EXIT_FAILED,
        "PMS at",
    ),
    (
        "no store where APPT_STORE points: history",
        ["history", "42"],
        {"APPT_STORE": "sqlite:///{tmp}/elsewhere/appt.sqlite3"},
        EXIT_USAGE,
        "no store at",
    ),
    (
        "no store where APPT_STORE points: sagas",
        ["sagas", "--stuck"],
        {"APPT_STORE": "sqlite:///{tmp}/elsewhere/appt.sqlite3"},
        EXIT_USAGE,
        "no store at",
    ),
    ("cancel without --reason", ["send", "cancel", "--appointment", "1"], {}, EXIT_USAGE, "needs --reason"),
    ("reassign without --patient", ["send", "reassign", "--appointment", "1"], {}, EXIT_USAGE, "needs --patient"),
    (
        "a flag of another type",
        ["send", "confirm", "--appointment", "1", "--notes", "x"],
        {},
        EXIT_USAGE,
        "--notes does not apply to confirm",
    ),
    ("an id that is not a number", ["send", "confirm", "--appointment", "abc"], {}, EXIT_USAGE, "invalid int value"),
    ("an unknown type", ["send", "confrim", "--appointment", "1"], {}, EXIT_USAGE, "invalid choice"),
    ("an unknown verb", ["sned"], {}, EXIT_USAGE, "invalid choice"),
    ("--since yesterday", ["reconcile", "--since", "yesterday"], {}, EXIT_USAGE, "not an ISO 8601 time"),
    ("--since without a zone", ["reconcile", "--since", "2026-11-20T00:00:00"], {}, EXIT_USAGE, "no time zone"),
    (
        "an unknown workflow",
        ["sagas", "retry", "reassign-nope"],
        {"APPT_AMQP_URL": "{amqp}"},
        EXIT_USAGE,
        "no workflow reassign-nope",
    ),
    (
        "nobody serving: send --wait",
        ["send", "confirm", "--appointment", "1", "--wait", "0.5"],
        {"APPT_AMQP_URL": "{amqp}"},
        EXIT_TIMEOUT,
        "no result within 0.5 s",
    ),
    (
        "a worker partition past the last",
        ["sagas"],
        {"APPT_WORKER_PARTITIONS": "4"},
        EXIT_CONFIG,
        "APPT_WORKER_PARTITIONS",
    ),
    ("a bad number", ["history", "1"], {"APPT_PREFETCH": "lots"}, EXIT_CONFIG, "APPT_PREFETCH"),
    (
        "the HTTP port taken",
        ["serve"],
        {"APPT_HTTP_PORT": "{taken}", "APPT_AMQP_URL": "{amqp}"},
        EXIT_FAILED,
        "set APPT_HTTP_PORT",
    ),
    (
        "the sandbox port taken",
        ["serve", "--with-sandbox"],
        {"APPT_SANDBOX_PORT": "{taken}", "APPT_AMQP_URL": "{amqp}"},
        EXIT_FAILED,
        "set APPT_SANDBOX_PORT",
    ),
    ("appt sandbox on a taken port", ["sandbox", "--port", "{taken}"], {}, EXIT_FAILED, "cannot listen"),
]


@pytest.fixture(scope="module")
def module_amqp_url() -> Iterator[str]:
    """One vhost for the whole table (creating one per row cost seconds each)."""
    require_service("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    vhost = make_vhost()
    yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    drop_vhost(vhost)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield int(held.getsockname()[1])


async def make_store(url: str) -> None:
    store = open_store(url)
    await store.open()
    await store.close()


async def appt(argv: list[str], env: dict[str, str]) -> Ran:
    """`appt ARGV` with polling off and ports of its own, so no row collides with a running service."""
    return await run_appt(
        {
            "APPT_RECONCILE_INTERVAL": "0",
            "APPT_HTTP_PORT": str(free_port()),
            "APPT_SANDBOX_PORT": str(free_port()),
            **env,
        },
        *argv,
    )


@pytest.mark.parametrize(("mistake", "argv", "env", "code", "says"), MISTAKES, ids=[m[0] for m in MISTAKES])
async def test_an_ordinary_mistake_is_one_line_and_its_exit_code(
    mistake: str,
    argv: list[str],
    env: dict[str, str],
    code: int,
    says: str,
    tmp_path: Path,
    sqlite_url: str,
    module_amqp_url: str,
    taken_port: int,
) -> None:
    await make_store(sqlite_url)
    fill = {"dead": str(free_port()), "tmp": str(tmp_path), "amqp": module_amqp_url, "taken": str(taken_port)}
    finished = await appt(
        [a.format(**fill) for a in argv], {"APPT_STORE": sqlite_url, **{k: v.format(**fill) for k, v in env.items()}}
    )
    assert "Traceback" not in finished.stderr, finished.stderr
    last = finished.stderr.strip().splitlines()[-1]
    assert last.startswith("appt"), finished.stderr
    assert says in last, finished.stderr
    assert finished.returncode == code, finished.stderr


async def test_history_of_an_unknown_appointment_names_the_store_it_read(tmp_path: Path, sqlite_url: str) -> None:
    await make_store(sqlite_url)
    finished = await appt(["history", "404"], {"APPT_STORE": sqlite_url})
    assert finished.returncode == EXIT_OK
    assert finished.stderr.splitlines() == [f"store: {sqlite_url}", "no records for appointment 404"]


def test_the_default_store_is_absolute_so_every_directory_reads_the_same_one(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APPT_")}
    environment["XDG_DATA_HOME"] = str(tmp_path / "data")
    finished = subprocess.run(
        [str(APPT), "sagas"], env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == EXIT_USAGE
    assert f"no store at {tmp_path}/data/appt/appt.sqlite3" in finished.stderr
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob("*.sqlite3"))


async def test_an_unforeseen_error_is_one_line_and_a_traceback_only_when_debugging(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A damaged store (a table replaced by hand) is nobody's ordinary mistake: still no traceback by default."""
    await make_store(sqlite_url)
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        db.executescript("DROP TABLE workflows; CREATE TABLE workflows (x INTEGER);")
    env = {"APPT_STORE": sqlite_url}
    plain = await appt(["sagas"], env)
    assert plain.returncode == EXIT_FAILED
    assert "Traceback" not in plain.stderr
    assert plain.stderr.splitlines()[-1].startswith("appt sagas: unexpected StoreUnavailable")
    assert "--debug" in plain.stderr
    assert "Traceback" in (await appt(["--debug", "sagas"], env)).stderr
    assert "Traceback" in (await appt(["sagas"], {**env, "APPT_LOG_LEVEL": "DEBUG"})).stderr


def subparser(*words: str) -> argparse.ArgumentParser:
    """The parser of ``appt WORDS...`` (e.g. ``subparser("sagas", "retry")``)."""
    parser = build_parser()
    for word in words:
        verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = verbs.choices[word]
    return parser


@pytest.mark.parametrize(
    "verb",
    [
        "",
        "serve",
        "send",
        "history",
        "sagas",
        "sagas retry",
        "dead",
        "dead replay",
        "prune",
        "diagram",
        "sandbox",
        "schema",
        "reconcile",
    ],
)
def test_help_at_every_level_gives_the_exit_codes(verb: str) -> None:
    assert "exit code" in subparser(*verb.split()).format_help()


def test_help_names_the_settings_and_the_store() -> None:
    text = subparser().format_help()
    for needle in ("APPT_AMQP_URL", "APPT_STORE", "appt.sqlite3", "APPT_SANDBOX_PORT", "--debug"):
        assert needle in text


def test_send_help_says_what_each_type_does_and_needs() -> None:
    text = subparser("send").format_help()
    for needle in (
        "confirm      Pending -> Confirmed",
        "needs --reason",
        "needs --patient",
        "needs --notes",
        "Patient cancelled",
        "the PMS appointment id",
    ):
        assert needle in text


def test_help_shows_defaults_and_formats() -> None:
    assert "(default: 8700)" in subparser("sandbox").format_help()
    assert "(default: 127.0.0.1)" in subparser("sandbox").format_help()
    assert "2026-11-20T00:00:00Z" in subparser("reconcile").format_help()
    assert subparser("sagas").format_usage().startswith("usage: appt sagas [-h] [--stuck] [--json]\n")


async def test_appt_sandbox_says_where_it_listens_with_which_token(tmp_path: Path) -> None:
    sandbox = SandboxProcess(tmp_path).start()
    try:
        await sandbox.wait_ready()
        [line] = sandbox.log_text().splitlines()
        assert line.startswith(f"appt sandbox: PMS sandbox listening on {sandbox.url} ")
        assert "token 'sandbox-token'" in line and f"{sandbox.url}/_sandbox/<knob>" in line
    finally:
        await sandbox.terminate()

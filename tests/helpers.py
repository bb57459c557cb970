"""Small helpers for tests (import from tests.helpers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from consumer.store import Store
from consumer.store.postgres import PostgresStore
from consumer.store.sqlite import SqliteStore
from tests.conftest import PG_URL

APPT = Path(sys.executable).parent / "appt"


@contextlib.asynccontextmanager
async def served(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """``app`` over real HTTP on a free loopback port: its base URL; cleaned up however the test ends."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    check: Callable[[], Any | Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll an async or sync predicate until it returns a truthy value; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        await asyncio.sleep(interval)


def starts_in(days: float) -> dict[str, str]:
    """A 30-minute slot at 09:00 UTC ``days`` from today: inside the reconciler's windows."""
    start = datetime.now(UTC).replace(hour=9, minute=0, second=0, microsecond=0) + timedelta(days=days)
    return {"start_time": start.isoformat(), "finish_time": (start + timedelta(minutes=30)).isoformat()}


def seed_pending(sandbox: Any, appointment_id: int, **fields: Any) -> dict[str, Any]:
    """One Pending exam for patient 1013 in the sandbox (``fields`` override), as stored."""
    defaults = {
        "id": appointment_id,
        "patient_id": 1013,
        "practitioner_id": 1,
        "start_time": "2030-01-02T09:00:00Z",
        "finish_time": "2030-01-02T09:30:00Z",
        "reason": "Exam",
        "state": "Pending",
    }
    return sandbox.state.seed([{**defaults, **fields}])[0]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def run_appt(env: dict[str, str], *args: str, stdin: str = "", timeout: float = 60.0) -> Ran:
    """`appt ARGS` as a child process with ``env`` over this one's (async: the test's event loop
    may be running the sandbox or a stack the command talks to)."""
    process = await asyncio.create_subprocess_exec(
        str(APPT),
        *args,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin.encode()), timeout)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


class TcpRelay:
    """A loopback TCP relay to ``target_port``: a broker address that can die. ``close`` drops
    the listener and every connection through it at once, as a node that goes away does
    (the broker sees its clients vanish and requeues what they had not acked)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.connections = 0  # accepted so far
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        return self

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {client_writer, upstream_writer}
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()


class PostgresCluster:
    """A throwaway PostgreSQL cluster of the test's own (initdb in a temp dir, its own port), that a
    test may stop and restart; never the machine's shared PostgreSQL. Run as the ``postgres`` user
    when the tests run as root (PostgreSQL refuses root)."""

    BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/usr/bin"))

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="appt-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        command = [str(self.BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def _pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-o", options, "-w", *args)

    def init(self) -> PostgresCluster:
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self) -> None:
        """Fast shutdown: open sessions are cut (clients see their connections die)."""
        self._pg_ctl("-m", "fast", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitNode:
    """A throwaway RabbitMQ node of the test's own (``scripts/rabbitmq-node``), never the shared broker.

    Its own node name, ports, data directory and cookie, so a test may stop, restart or kill it.
    """

    SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rabbitmq-node"

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        self._run("start", str(self.directory), str(self.port), str(free_port()), self.name, timeout=180)

    def ctl(self, *args: str) -> None:
        """``rabbitmqctl`` against this node only (``stop_app``, ``start_app`` ...)."""
        self._run("ctl", str(self.directory), *args, timeout=120)

    def stop(self) -> None:
        self._run("stop", str(self.directory), timeout=120)

    def _run(self, *args: str, timeout: float) -> None:
        subprocess.run([str(self.SCRIPT), *args], check=True, capture_output=True, timeout=timeout)


async def fail_transactions_writing(store: Store, message_id: str) -> None:
    """Make a transaction that writes ``message_id`` to the inbox fail as a whole, by the
    database's own means: on PostgreSQL at its COMMIT (a deferred constraint trigger), on
    SQLite mid-transaction (a trigger's RAISE(ROLLBACK) ends the whole transaction)."""
    if isinstance(store, SqliteStore):
        db = sqlite3.connect(store._path)
        try:
            db.execute(
                f"CREATE TRIGGER fail_batch BEFORE INSERT ON inbox WHEN NEW.message_id = '{message_id}'"
                " BEGIN SELECT RAISE(ROLLBACK, 'injected failure of the whole transaction'); END"
            )
            db.commit()
        finally:
            db.close()
        return
    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(PG_URL, timeout=5, server_settings={"search_path": store._schema or "public"})
    try:
        await conn.execute(
            "CREATE FUNCTION fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF NEW.message_id = '{message_id}' THEN"
            " RAISE EXCEPTION 'injected COMMIT failure' USING ERRCODE = 'disk_full'; END IF;"
            " RETURN NEW; END $$"
        )
        await conn.execute(
            "CREATE CONSTRAINT TRIGGER fail_commit AFTER INSERT ON inbox"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_commit()"
        )
    finally:
        await conn.close()


async def stop_failing_transactions(store: Store) -> None:
    """Undo ``fail_transactions_writing``."""
    if isinstance(store, SqliteStore):
        db = sqlite3.connect(store._path)
        try:
            db.execute("DROP TRIGGER fail_batch")
            db.commit()
        finally:
            db.close()
        return
    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(PG_URL, timeout=5, server_settings={"search_path": store._schema or "public"})
    try:
        await conn.execute("DROP TRIGGER fail_commit ON inbox")
    finally:
        await conn.close()

"""A practice that can't be served waits: nothing dead-lettered or failed, order per appointment kept.

Real RabbitMQ (a vhost per test), real SQLite store, sandboxes over HTTP whose
budget window is seconds instead of the clock hour, so the reset is seen.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from consumer import metrics
from consumer.practices import load_configs
from consumer.sandbox import RunningSandbox, running_sandbox
from consumer.settings import Settings
from tests.helpers import eventually
from tests.stack import Stack, running_stack

PUT = "PUT /v1/appointments/{id}"


def seed(sandbox: RunningSandbox, count: int, first: int = 700000001) -> list[int]:
    rows = [
        {
            "id": first + n,
            "patient_id": 1013,
            "practitioner_id": 1,
            "reason": "Exam",
            "start_time": "2030-01-02T09:00:00Z",
            "finish_time": "2030-01-02T09:30:00Z",
            "state": "Pending",
        }
        for n in range(count)
    ]
    return [a["id"] for a in sandbox.state.seed(rows)]


def parked_total() -> float:
    return sum(
        metrics.MESSAGES.labels(kind, "parked")._value.get()  # noqa: SLF001 (a test reads the counter)
        for kind in ("confirm", "edit_notes")
    )


async def test_a_spent_budget_costs_latency_never_a_command(
    amqp_url: str, sqlite_url: str, sandbox: RunningSandbox
) -> None:
    """The issue's case: 40 confirms queued with 24 requests of budget left (2 requests each)."""
    ids = seed(sandbox, 40)
    sandbox.state.set_rate_limit(24, window=4.0)
    async with running_stack(amqp_url, sqlite_url, sandbox.url, pms_max_retry_after=0.5) as stack:
        sent = [await stack.send({"type": "confirm", "appointment_id": i}) for i in ids]
        results = [await stack.result(c, timeout=60) for c in sent]

        assert [r["outcome"] for r in results] == ["succeeded"] * 40
        assert all(sandbox.state.get(i)["state"] == "Confirmed" for i in ids)
        assert stack.observer.dead == []
        await eventually(lambda: _nothing_parked(stack))  # unparked right after the result
        assert not stack.practices.get("default").waiting


async def test_the_last_edit_sent_wins_when_the_first_fails_past_the_retries(
    amqp_url: str, sqlite_url: str, sandbox: RunningSandbox
) -> None:
    """20 trials at once: each appointment gets two edits, and the PMS fails every PUT until it has
    failed 120 (a try is 2 client x 3 worker attempts = 6 PUTs, so 20 first edits can't all get by
    with 5 failures each: at least one fails past the retries, usually many)."""
    ids = seed(sandbox, 20)
    parked_before = parked_total()
    async with running_stack(amqp_url, sqlite_url, sandbox.url, pms_retry_attempts=2) as stack:
        sandbox.state.fail_next(PUT, 120, 500)
        firsts = [await stack.send({"type": "edit_notes", "appointment_id": i, "notes": "first"}) for i in ids]
        seconds = [await stack.send({"type": "edit_notes", "appointment_id": i, "notes": "second"}) for i in ids]
        for command_id in firsts + seconds:
            assert (await stack.result(command_id, timeout=60))["outcome"] == "succeeded"

        assert [sandbox.state.get(i)["notes"] for i in ids] == ["second"] * 20
        assert stack.observer.dead == []
        await eventually(lambda: _nothing_parked(stack))  # unparked right after the result
    assert parked_total() > parked_before  # the failures did make messages wait


SECRET = "whsec_" + base64.b64encode(b"waiting-test-secret").decode()


@pytest.fixture
async def two_sandboxes() -> AsyncIterator[dict[str, RunningSandbox]]:
    async with running_sandbox(token="north-token") as north, running_sandbox(token="south-token") as south:
        yield {"north": north, "south": south}


def practices_settings(tmp_path: Path, sandboxes: dict[str, RunningSandbox], tokens: dict[str, str]) -> Settings:
    path = tmp_path / "practices.toml"
    path.write_text(
        "".join(
            f'[practices.{name}]\npms_url = "{sb.url}"\ntoken = "{tokens[name]}"\nwebhook_secrets = ["{SECRET}"]\n\n'
            for name, sb in sandboxes.items()
        )
    )
    return Settings(practices_file=str(path))


async def test_a_refused_token_makes_its_practice_wait_while_the_other_flows_and_a_reload_drains_it(
    amqp_url: str, sqlite_url: str, two_sandboxes: dict[str, RunningSandbox], tmp_path: Path
) -> None:
    north, south = two_sandboxes["north"], two_sandboxes["south"]
    settings = practices_settings(tmp_path, two_sandboxes, {"north": "revoked", "south": "south-token"})
    north_ids, south_ids = seed(north, 5), seed(south, 5)
    async with running_stack(amqp_url, sqlite_url, north.url, practices=load_configs(settings)) as stack:

        async def send(practice: str, appointment_id: int, notes: str) -> str:
            return await stack.send(
                {"type": "edit_notes", "practice": practice, "appointment_id": appointment_id, "notes": notes}
            )

        north_sent = [await send("north", i, f"n{k}") for k in range(3) for i in north_ids]
        south_sent = [await send("south", i, "s") for i in south_ids]

        for command_id in south_sent:  # south flows while north waits
            assert (await stack.result(command_id))["outcome"] == "succeeded"
        await eventually(lambda: _parked(stack, "north", 15))
        assert stack.practices.get("north").status == "token_refused"
        assert not any(c in stack.observer.results for c in north_sent)

        practices_settings(tmp_path, two_sandboxes, {"north": "north-token", "south": "south-token"})
        assert await stack.practices.reload(load_configs(settings)) == ["north"]

        for command_id in north_sent:
            assert (await stack.result(command_id, timeout=30))["outcome"] == "succeeded"
        assert [north.state.get(i)["notes"] for i in north_ids] == ["n2"] * 5  # in order: the last sent
        assert stack.observer.dead == []
        await eventually(lambda: _nothing_parked(stack))  # unparked right after the result


async def test_a_probe_keeps_the_waiting_status_until_the_pms_answers_it(
    amqp_url: str, sqlite_url: str, sandbox: RunningSandbox
) -> None:
    """The regression: a probe showed its practice ``ok`` (the metric, GET /practices, the alert's
    ``status!="ok"``) from the moment it handed the parked messages back, before the PMS answered,
    and ``unreachable`` again each time the probe failed."""
    [appointment] = seed(sandbox, 1)
    sandbox.state.fail_next("GET /v1/appointments/{id}", 1000, 503)
    async with running_stack(amqp_url, sqlite_url, sandbox.url, pms_retry_attempts=2) as stack:
        practice = stack.practices.get("default")
        statuses = ["ok"]

        async def watch() -> None:
            while True:
                if practice.status != statuses[-1]:
                    statuses.append(practice.status)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        command_id = await stack.send({"type": "confirm", "appointment_id": appointment})
        await eventually(lambda: practice.status == "unreachable")
        await eventually(lambda: len(sandbox.state.calls) > 20)  # probes (every 0.2 s) keep failing
        sandbox.state.clear_faults()
        sandbox.state.set_latency(1.0)  # the next probe is answered, a second after it is sent
        calls = len(sandbox.state.calls)
        await eventually(lambda: len(sandbox.state.calls) > calls)
        await asyncio.sleep(0.5)  # the probe in flight
        assert practice.status == "unreachable"
        assert metrics.PRACTICE_STATUS.labels("default", "ok")._value.get() == 0  # noqa: SLF001

        assert (await stack.result(command_id))["outcome"] == "succeeded"
        assert practice.status == "ok"
        watcher.cancel()
        assert statuses == ["ok", "unreachable", "ok"]


async def test_a_probe_with_nothing_left_parked_ends_the_wait(
    amqp_url: str, sqlite_url: str, sandbox: RunningSandbox
) -> None:
    """No parked message left to send means no answer to end the wait with: the wait ends (the
    alert would otherwise go on firing for a practice with nothing waiting)."""
    async with running_stack(amqp_url, sqlite_url, sandbox.url) as stack:
        practice = stack.practices.get("default")
        practice.wait("token_refused", time.time(), "Unauthorised: 401")
        await eventually(lambda: practice.status == "ok")
        assert (practice.retry_at, practice.probing) == (None, False)


async def _parked(stack: Stack, practice: str, count: int) -> Any:
    return (await stack.store.parked_counts()).get(practice) == count


async def test_a_spent_budget_makes_only_its_practice_wait_and_it_finishes_after_the_reset(
    amqp_url: str, sqlite_url: str, two_sandboxes: dict[str, RunningSandbox], tmp_path: Path
) -> None:
    north, south = two_sandboxes["north"], two_sandboxes["south"]
    settings = practices_settings(tmp_path, two_sandboxes, {"north": "north-token", "south": "south-token"})
    north_ids, south_ids = seed(north, 6), seed(south, 6)
    north.state.set_rate_limit(6, window=3.0)  # 3 commands' worth, then blocked until the window turns
    async with running_stack(
        amqp_url, sqlite_url, north.url, practices=load_configs(settings), pms_max_retry_after=0.5
    ) as stack:
        north_sent = [
            await stack.send({"type": "confirm", "practice": "north", "appointment_id": i}) for i in north_ids
        ]
        south_sent = [
            await stack.send({"type": "confirm", "practice": "south", "appointment_id": i}) for i in south_ids
        ]

        for command_id in south_sent:
            assert (await stack.result(command_id))["outcome"] == "succeeded"
        for command_id in north_sent:
            assert (await stack.result(command_id, timeout=60))["outcome"] == "succeeded"
        assert all(north.state.get(i)["state"] == "Confirmed" for i in north_ids)
        assert stack.observer.dead == []
        await eventually(lambda: _nothing_parked(stack))  # unparked right after the result


async def _nothing_parked(stack: Stack) -> bool:
    return await stack.store.parked_counts() == {}

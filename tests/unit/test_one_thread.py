"""The store's thread: calls run one at a time in the order handed in, each caller gets its own
answer (or its own exception), a cancelled caller leaves the others alone, and stopping runs
what was already handed in."""

from __future__ import annotations

import asyncio
import threading

import pytest

from consumer.store.one_thread import OneThread


async def test_calls_run_on_one_other_thread_in_the_order_handed_in() -> None:
    thread = OneThread("test-store")
    ran: list[tuple[int, str]] = []

    def job(number: int) -> int:
        ran.append((number, threading.current_thread().name))
        return number * 10

    answers = await asyncio.gather(*(thread.call(lambda n=n: job(n)) for n in range(200)))
    await thread.stop()

    assert answers == [n * 10 for n in range(200)]
    assert [number for number, _ in ran] == list(range(200))
    assert {name for _, name in ran} == {"test-store"}


async def test_an_exception_goes_to_its_own_caller_only() -> None:
    thread = OneThread("test-store")

    def refuse() -> int:
        raise LookupError("no such row")

    answers = await asyncio.gather(
        thread.call(lambda: 1), thread.call(refuse), thread.call(lambda: 3), return_exceptions=True
    )
    await thread.stop()

    assert answers[0] == 1 and answers[2] == 3
    assert isinstance(answers[1], LookupError) and str(answers[1]) == "no such row"


async def test_a_cancelled_caller_lets_its_call_finish_and_the_others_get_their_answers() -> None:
    thread = OneThread("test-store")
    release = threading.Event()
    finished: list[str] = []

    def slow() -> str:
        release.wait(5)
        finished.append("slow")
        return "slow"

    cancelled = asyncio.ensure_future(thread.call(slow))
    after = asyncio.ensure_future(thread.call(lambda: "after"))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    release.set()

    assert await after == "after"
    assert finished == ["slow"]
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await thread.stop()


async def test_stop_runs_the_calls_already_handed_in_then_ends_the_thread() -> None:
    thread = OneThread("test-store")
    pending = [asyncio.ensure_future(thread.call(lambda n=n: n)) for n in range(5)]
    await asyncio.sleep(0)  # each call is handed in

    await thread.stop()

    assert [await answer for answer in pending] == list(range(5))
    assert not any(t.name == "test-store" for t in threading.enumerate())

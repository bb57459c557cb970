"""One thread that runs the calls handed to it, one at a time, in the order handed in.

Why not ``loop.run_in_executor`` on a one-worker ``ThreadPoolExecutor``: there,
every call builds a ``concurrent.futures.Future``, chains it to an asyncio future
through callbacks on both threads, and wakes the event loop once per call (a
self-pipe write and an epoll wake-up). Here a call is an asyncio future and a
queue entry, and the answers of calls that finish before the event loop has
taken the previous ones go back with the same wake-up: on 2 cores, a lone
round trip cost ~116 us of CPU through the executor against ~75 us here
(bench/README.md, issue 18).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Job = tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]
# (future, raised, the result or the exception)
_Answer = tuple[asyncio.Future[Any], bool, Any]


class OneThread:
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._answers: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def call(self, function: Callable[[], T]) -> T:
        """``function()`` on the thread. A caller cancelled while waiting does not stop it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((function, future, loop))
        return await future

    async def stop(self) -> None:
        """Let the calls already handed in run, then end the thread."""
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, future, loop = job
            try:
                answer: _Answer = (future, False, function())
            except BaseException as exc:  # handed to the caller, whatever it is
                answer = (future, True, exc)
            self._hand_back(loop, answer)

    def _hand_back(self, loop: asyncio.AbstractEventLoop, answer: _Answer) -> None:
        """Wake ``loop`` only if no wake-up is already on its way there."""
        with self._lock:
            waiting = self._answers.get(loop)
            if waiting is not None:
                waiting.append(answer)
                return
            self._answers[loop] = [answer]
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(self._settle, loop)

    def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            answers = self._answers.pop(loop)
        for future, raised, value in answers:
            if future.cancelled():
                continue
            if raised:
                future.set_exception(value)
            else:
                future.set_result(value)

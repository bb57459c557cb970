"""Start, kill -9 and stop a real `appt serve` process (minimal; tests/e2e had no helper yet).

The process writes its log to a file that survives restarts, so a failing
chaos run can show what the service said around each kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

APPT = str(Path(sys.executable).with_name("appt"))


class ServiceProcess:
    """One `appt serve` at a time, restartable, configured by APPT_* variables."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{env['APPT_HTTP_PORT']}"
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start and wait until /readyz answers 200 (store open, broker connected, consuming)."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen([APPT, "serve"], env=self.env, stdout=log, stderr=log)
        await self._wait_ready(timeout)

    async def _wait_ready(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while asyncio.get_running_loop().time() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(f"appt serve exited with {self._process.returncode}:\n{self.tail()}")
                try:
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"appt serve not ready after {timeout} s:\n{self.tail()}")

    def kill9(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a graceful drain), then SIGKILL if it hangs."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + timeout
        while process.poll() is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.kill9()

    def tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


async def run_appt(env: dict[str, str], *args: str, timeout: float = 60.0) -> tuple[int, str]:
    """Run a one-shot `appt` verb without blocking the loop (the sandbox may live in it)."""
    process = await asyncio.create_subprocess_exec(
        APPT, *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    return int(process.returncode or 0), output.decode(errors="replace")

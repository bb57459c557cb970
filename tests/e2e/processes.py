"""The real `appt` processes for end-to-end tests: start, probe, kill -9, stop.

Each start writes the process's stdout and stderr to a log file of its own in
the test's directory (``service.1.log``, ``service.2.log`` ...), so a failed
trial can be read afterwards. Waits are async: a test often runs the sandbox
or a broker client on its own event loop, which a blocking wait would freeze.

    service = ServiceProcess(service_env(pms_url=..., store=..., amqp_url=...), tmp_path)
    service.start()
    await service.wait_ready()
    service.kill()                      # SIGKILL: no shutdown code runs
    await service.terminate()           # SIGTERM: a graceful stop, SIGKILL if it hangs
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

import aiohttp

from tests.helpers import free_port

APPT = Path(sys.executable).parent / "appt"
SECRET = "whsec_ZTJlLXRlc3Qtc2VjcmV0LWUyZS10ZXN0"
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=1.0)


def service_env(
    *, pms_url: str, store: str, amqp_url: str, http_port: int | None = None, **extra: str
) -> dict[str, str]:
    """The environment of an `appt serve` for tests: JSON logs, no polling, quick redelivery.

    ``extra`` adds or overrides APPT_* variables, e.g. ``APPT_FAILPOINTS="after_create_replacement"``.
    """
    return {
        "APPT_PMS_URL": pms_url,
        "APPT_STORE": store,
        "APPT_AMQP_URL": amqp_url,
        "APPT_HTTP_PORT": str(http_port or free_port()),
        "APPT_WEBHOOK_SECRETS": SECRET,
        "APPT_RECONCILE_INTERVAL": "0",
        "APPT_LOG_FORMAT": "json",
        "APPT_RETRY_DELAY": "0.2",
        **extra,
    }


def write_practices(path: Path, sandbox_url: str, token: str) -> None:
    """A practices file with one practice, ``north``, on the sandbox at ``sandbox_url``."""
    path.write_text(
        f'[practices.north]\npms_url = "{sandbox_url}"\ntoken = "{token}"\nwebhook_secrets = ["{SECRET}"]\n'
    )


async def get_json(url: str) -> tuple[int, Any]:
    """A GET's status and JSON body (the service's /practices, /readyz ...)."""
    async with aiohttp.ClientSession() as http, http.get(url) as answer:
        return answer.status, await answer.json()


class ProcessFailed(AssertionError):
    """The process died or never became ready; the message ends with its log's tail."""


class AppProcess:
    """One `appt` verb as a child process, restartable, with a log file per start."""

    def __init__(self, args: list[str], env: dict[str, str], log_dir: Path, name: str, ready_url: str) -> None:
        self.args = args
        self.env = env
        self.log_dir = log_dir
        self.name = name
        self.ready_url = ready_url
        self.starts = 0
        self.log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, **env_overrides: str) -> Self:
        """Start (again); ``env_overrides`` apply to this start only (e.g. a failpoint)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        self.log_path = self.log_dir / f"{self.name}.{self.starts}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **env_overrides}
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [str(APPT), *self.args],
                env=env,
                cwd=self.log_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    async def wait_ready(self, timeout: float = 20.0) -> Self:
        """Poll the readiness URL until it answers 200; fail at once if the process dies."""
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession(timeout=PROBE_TIMEOUT) as http:
            while True:
                if not self.running:
                    raise ProcessFailed(f"{self.name} exited with {self.returncode} before ready{self.tail()}")
                try:
                    async with http.get(self.ready_url) as response:
                        if response.status == 200:
                            return self
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise ProcessFailed(f"{self.name} not ready within {timeout} s{self.tail()}")
                await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code once the process ends by itself (a failpoint's SIGKILL: -9)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (code := self.returncode) is None and self._process is not None:
            if asyncio.get_running_loop().time() > deadline:
                raise ProcessFailed(f"{self.name} still running after {timeout} s{self.tail()}")
            await asyncio.sleep(0.02)
        assert code is not None, f"{self.name} was never started"
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown code runs, unacked messages go back to the queue."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()

    async def terminate(self, timeout: float = 10.0) -> int | None:
        """A graceful stop (SIGTERM), escalating to SIGKILL if it takes longer than ``timeout``."""
        if self._process is None or not self.running:
            return self.returncode
        self._process.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout)
        except ProcessFailed:
            self.kill()
            return self.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        text = self.log_text()
        if not text:
            return ""
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])


class ServiceProcess(AppProcess):
    """`appt serve`, ready when ``/readyz`` answers (store and broker connected, workflows resumed)."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "service") -> None:
        port = env["APPT_HTTP_PORT"]
        super().__init__(["serve"], env, log_dir, name, f"http://127.0.0.1:{port}/readyz")
        self.url = f"http://127.0.0.1:{port}"


class SandboxProcess(AppProcess):
    """`appt sandbox`, the PMS emulator, as a process that outlives the service it serves.

    Its knobs are driven over HTTP (``/_sandbox/...``), as by any other process.
    """

    def __init__(self, log_dir: Path, port: int | None = None, name: str = "sandbox", *options: str) -> None:
        """``options``: more ``appt sandbox`` flags, e.g. ``"--delete", "remove"``."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            ["sandbox", "--port", str(self.port), *options], {}, log_dir, name, f"{self.url}/_sandbox/appointments"
        )

    async def knob(self, name: str, **body: Any) -> Any:
        """``POST /_sandbox/<name>``, e.g. ``knob("refuse_cancel", appointment_id=7)``; its result."""
        async with aiohttp.ClientSession(timeout=PROBE_TIMEOUT) as http:
            async with http.post(f"{self.url}/_sandbox/{name}", json=body) as response:
                answer = await response.json()
        if not answer.get("ok"):
            raise ValueError(f"sandbox knob {name} refused {body}: {answer.get('error')}")
        return answer.get("result")

    async def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        """A request to the PMS API itself (``/v1...``), as another integration makes it; its status."""
        headers = {"Authorization": "Bearer sandbox-token", "User-Agent": "e2e-test"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http:
            async with http.request(method, f"{self.url}{path}", json=body, headers=headers) as response:
                return response.status

    async def appointments(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http:
            async with http.get(f"{self.url}/_sandbox/appointments") as response:
                return list((await response.json())["appointments"])

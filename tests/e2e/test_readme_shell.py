"""The README's shell blocks run, as written, against a fresh `scripts/run`: a README that drifts fails.

The rule (also in the README's "Tests" section), for README.md and bench/README.md:

- fenced blocks tagged ``sh``, ``bash`` or ``console`` are run, in document order, in ONE bash
  shell started in the repository root (a variable set in one block is seen by the next), as a
  newcomer pasting them into one terminal would;
- a block right after a line ``<!-- not run: REASON -->`` is skipped (production or docker
  set-ups, the blocks that start scripts/run or the test suite themselves, long benchmarks);
- each block runs under ``set -e -o pipefail``: every command must exit 0, unless its line ends
  with ``# exit N``, which asserts exit code N;
- a comment line ``# => TEXT`` right under a command asserts TEXT appears in that command's output
  (stdout and stderr). A checked command runs in a subshell, so keep assignments unchecked;
- ``8080`` and ``8700`` are replaced with the ports this run's `scripts/run` was given
  (``APPT_HTTP_PORT`` / ``APPT_SANDBOX_PORT``), which also gets a fresh ``XDG_DATA_HOME`` (so the
  default store is new) and a RabbitMQ vhost of its own; the shell gets the same variables plus
  ``APPT_PMS_URL`` for the moved sandbox, ``APPT_API_TOKEN`` and ``APPT_DENTALLY_SIGNING_SECRET``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from consumer.service import DEMO_WEBHOOK_SECRET
from tests.helpers import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", ROOT / "bench" / "README.md"]
RUN_TAGS = {"sh", "bash", "console"}
NOT_RUN = re.compile(r"^<!--\s*not run:.+-->\s*$")
EXIT = re.compile(r"\s#\s*exit\s+(\d+)\b.*$")
EXPECT = "# => "


@dataclass(frozen=True)
class Block:
    document: Path
    line: int
    text: str


def runnable_blocks(document: Path) -> list[Block]:
    """The blocks the rule runs, with the line each starts on (for the failure message)."""
    blocks, lines = [], document.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = lines[index].strip()
        if fence.startswith("```") and fence[3:].strip():
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
            skipped = index > 0 and NOT_RUN.match(_previous_nonblank(lines, index))
            if fence[3:].strip() in RUN_TAGS and not skipped:
                blocks.append(Block(document, index + 1, "\n".join(lines[index + 1 : end])))
            index = end
        index += 1
    return blocks


def _previous_nonblank(lines: list[str], index: int) -> str:
    return next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# ...`` comment (quotes respected)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def to_script(block: Block) -> str:
    """The block as bash, with the rule's checks (``# exit N``, ``# => TEXT``) made into assertions."""
    logical: list[str] = []
    for raw in block.text.splitlines():
        if logical and logical[-1].endswith("\\"):
            logical[-1] = logical[-1][:-1] + " " + raw.strip()
        else:
            logical.append(raw)
    out = [f"echo '=== {block.document.name} line {block.line}'"]
    for i, line in enumerate(logical):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        code = EXIT.search(line)
        expected = []
        for follower in logical[i + 1 :]:
            if not follower.strip().startswith(EXPECT):
                break
            expected.append(follower.strip()[len(EXPECT) :])
        if not code and not expected:
            out.append(line)
            continue
        command = strip_comment(line)
        where = f"{block.document.name}:{block.line}: {command}".replace("'", "'\\''")
        out.append(f"__out=$( {{ {command} ; }} 2>&1 ) && __rc=0 || __rc=$?")
        out.append('printf "%s\\n" "$__out"')
        out.append(
            f'[ "$__rc" = {code.group(1) if code else 0} ] || '
            f"{{ echo \"README CHECK: exit $__rc, documented {code.group(1) if code else 0}: \"'{where}'; "
            "exit 97; }"
        )
        for text in expected:
            quoted = text.replace("'", "'\\''")
            out.append(
                f"grep -qF -- '{quoted}' <<<\"$__out\" || "
                f"{{ echo 'README CHECK: no \"{quoted}\" in the output of: {where}'; exit 98; }}"
            )
    return "\n".join(out)


def readme_script(http_port: int, sandbox_port: int) -> str:
    blocks = [b for document in DOCUMENTS for b in runnable_blocks(document)]
    body = "\n".join(to_script(b) for b in blocks)
    return "set -e -o pipefail\n" + body.replace("8080", str(http_port)).replace("8700", str(sandbox_port))


def run_bash(script: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"scripts/run never printed {text!r}:\n{log.read_text(errors='replace')[-3000:]}")


def test_the_rule_catches_a_wrong_exit_code_and_a_missing_line(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "```sh\nfalse   # exit 1\necho hello\n# => hello\n```\n\n<!-- not run: demo -->\n"
        "```sh\nexit 5\n```\n```python\nraise SystemExit\n```\n"
    )
    [block] = runnable_blocks(readme)
    assert run_bash(to_script(block), dict(os.environ), 10).returncode == 0
    wrong_code = Block(readme, 1, "true   # exit 1")
    assert run_bash(to_script(wrong_code), dict(os.environ), 10).returncode == 97
    missing = Block(readme, 1, "echo hello\n# => goodbye")
    assert run_bash(to_script(missing), dict(os.environ), 10).returncode == 98
    assert strip_comment('curl -d \'{"a": "#1"}\'   # note') == 'curl -d \'{"a": "#1"}\''


def test_the_readme_shell_blocks_run_against_a_fresh_scripts_run(amqp_url: str, tmp_path: Path) -> None:
    http_port, sandbox_port = free_port(), free_port()
    data_home = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPT_")}
    env.update(
        {
            "XDG_DATA_HOME": str(data_home),
            "APPT_AMQP_URL": amqp_url,
            "APPT_HTTP_PORT": str(http_port),
            "APPT_SANDBOX_PORT": str(sandbox_port),
            "APPT_API_TOKEN": "readme-api-token",
            "APPT_DENTALLY_SIGNING_SECRET": "readme-dentally-secret",
        }
    )
    log = tmp_path / "scripts-run.log"
    with log.open("wb") as out:
        service = subprocess.Popen(
            [str(ROOT / "scripts" / "run")], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        banner = wait_for_line(log, "appt serve --with-sandbox: ready", service, timeout=120)
        for line in (
            f"service  http://127.0.0.1:{http_port}",
            f"sandbox  http://127.0.0.1:{sandbox_port}",
            f"store    sqlite:///{data_home}/appt/appt.sqlite3",
            f"secret   {DEMO_WEBHOOK_SECRET}  (the documented demo default",
            "try      curl",
        ):
            assert line in banner, banner
        shell_env = {**env, "APPT_PMS_URL": f"http://127.0.0.1:{sandbox_port}"}
        finished = run_bash(readme_script(http_port, sandbox_port), shell_env, timeout=300)
        assert finished.returncode == 0, (
            f"{finished.stdout[-4000:]}\n--- stderr ---\n{finished.stderr[-3000:]}\n"
            f"--- scripts/run ---\n{log.read_text(errors='replace')[-3000:]}"
        )
        assert "Traceback" not in log.read_text(errors="replace")
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()

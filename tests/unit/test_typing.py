"""Type hints are checked, not decorative: mypy --strict over the service and the domain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_consumer_and_statemachines_pass_mypy_strict() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "consumer", "statemachines"],  # strict: see [tool.mypy]
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

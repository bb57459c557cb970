"""ruff over the whole tree, with the configuration in pyproject.toml: lint, and the format check.

A finding fails the suite, so CI keeps the tree as clean as it is now
(`ruff check --fix . && ruff format .` repairs most of what this reports).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_tree_passes_ruff_check() -> None:
    result = ruff("check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_tree_is_formatted_as_ruff_format_leaves_it() -> None:
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_can_fail(tmp_path: Path) -> None:
    """The same command finds an unused import and an unformatted line in a file of its own."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=( 1,2 )\n")
    assert ruff("check", "--config", str(ROOT / "pyproject.toml"), str(bad)).returncode != 0
    assert ruff("format", "--check", "--config", str(ROOT / "pyproject.toml"), str(bad)).returncode != 0

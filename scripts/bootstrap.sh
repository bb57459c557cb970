#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Idempotent: a
# stamp of pyproject.toml skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1  # the browser tests use Debian's chromium
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,postgres]"
  rm -f .venv/.installed-*; touch "$stamp"
fi

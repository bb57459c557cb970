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
# The AsyncAPI specification's own JSON Schema, which tests/unit/test_asyncapi.py
# validates `appt asyncapi` against (the npm package the AsyncAPI tools use).
specs=.tools/npm/node_modules/@asyncapi/specs
if ! grep -qs '"version": "6.11.1"' "$specs/package.json"; then
  if command -v npm >/dev/null; then
    npm install --silent --no-audit --no-fund --prefix .tools/npm @asyncapi/specs@6.11.1
  else
    echo "bootstrap: npm not found; tests/unit/test_asyncapi.py needs it (apt-get install npm)" >&2
  fi
fi

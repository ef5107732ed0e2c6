#!/usr/bin/env bash
# The checks CI runs, after scripts/setup.sh: lint, format, types (package and tests), then the tests.
# Arguments go to pytest, e.g. `bash scripts/check.sh -m "not integration"`.
set -euo pipefail
cd "$(dirname "$0")/.."

.venv/bin/ruff check node tests
.venv/bin/ruff format --check node tests
.venv/bin/mypy --strict  # the packages [tool.mypy] lists: node and tests
.venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# The formatter and linter CI runs (ruff, pinned in the dev extra; configured in pyproject.toml).
#   bash scripts/lint.sh        check, exit non-zero on a lint error or an unformatted file
#   bash scripts/lint.sh --fix  format the tree and apply ruff's safe fixes
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = --fix ]; then
  .venv/bin/ruff format .
  .venv/bin/ruff check --fix .
else
  .venv/bin/ruff format --check --diff .
  .venv/bin/ruff check .
fi

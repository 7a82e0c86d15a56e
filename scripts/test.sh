#!/usr/bin/env bash
# The test command: set up .venv if needed, then run every test tier (unit, Ray, vLLM, e2e).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not e2e"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
exec .venv/bin/python -m pytest -ra --durations=15 "$@"

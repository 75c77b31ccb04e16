#!/usr/bin/env bash
# GPU check, about 2-3 minutes on one H100/H200: the CUDA tests, then dense vs compressed weight
# bytes, peak memory and prefill tokens/s for the reference model and a ~320M-parameter random
# DeepSeek-V3-shaped model (layer-by-layer compression).
#   bash benchmarks/gpu_check.sh [REFERENCE_MODEL_DIR]   (default: the bundled deepseek-v3-tiny)
# Needs torch + transformers (+ pytest); no Hydra, W&B or lm-eval. Runs from a checkout without
# installing: the repo root goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
ref="${1:-ciuic_lab/models/bundled/deepseek-v3-tiny}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_gpu.py
status=$?
args=(--big)
[ -f "$ref/config.json" ] && args+=(--reference "$ref")
python3 benchmarks/gpu_memory_speed.py "${args[@]}" || status=1
exit $status

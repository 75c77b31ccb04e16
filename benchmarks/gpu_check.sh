#!/usr/bin/env bash
# GPU check, about 8 minutes on one H100/H200 (prepared for a session with a GPU):
#   1. the CUDA tests (packed layers on CUDA, int4/int8/2:4 kernel layouts, mask codecs);
#   2. dense vs compressed speed and memory on CUDA: a ~1B DeepSeek-V3-shaped model, bf16 vs
#      4-bit g128 on the int4 kernel, the default recipe and the recipe with its serving
#      constraints (kernel widths, fused siblings) (benchmarks/speed.py; goal: the recipe
#      decodes >= 1.5x dense at batch 1);
#   3. a DeepSeek-V2-Lite-shaped random checkpoint (its real config; the first N_LAYERS of its 27)
#      compressed streamed with the default ciuic recipe on the GPU: peak GPU memory, host RSS,
#      wall time and per-block times (the full depth follows from them).
#   bash benchmarks/gpu_check.sh [N_LAYERS=4]
# Every step has its own time limit (a slow step cannot eat the others' time) and everything it
# prints goes to $OUT/gpu_check.log (and the terminal).
# Needs torch + transformers + safetensors, and hydra-core / omegaconf / antlr4 (carried as wheels,
# see the device tool's README); no W&B, lm-eval or datasets. Runs from a checkout without
# installing: the repo root goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
n="${1:-4}"
out="${OUT:-/tmp}"
mkdir -p "$out"
log="$out/gpu_check.log"
status=0
step() {  # step SECONDS NAME CMD...: run CMD under a time limit, log it, remember a failure
  local limit="$1" name="$2"; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED rc=$rc" | tee -a "$log"; status=1; }
}
step 30 gpu nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step 60 versions python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step 120 cuda-tests python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_coding.py
step 150 speed python3 benchmarks/speed.py --device cuda --models deepseek-v3-1b --windows 16
cp benchmarks/results/speed_cuda.md "$out/" 2>/dev/null
step 60 checkpoint python3 benchmarks/random_checkpoint.py /tmp/v2lite --shape deepseek-v2-lite --layers "$n"
step 100 v2lite-streamed python3 - "$out/v2lite_run" <<'PY'
import json, resource, subprocess, sys, time
run = sys.argv[1]
t0 = time.perf_counter()
subprocess.run([sys.executable, "-m", "ciuic_lab.run", "model=hub", "model.name_or_path=/tmp/v2lite",
                "compress.stream=true", "device=cuda", "eval.max_windows=8",
                "eval.lm_eval.enabled=false", "eval.generate.enabled=false", "tracker=none",
                "progress=false", f"hydra.run.dir={run}"], check=True)
print(f"wall {time.perf_counter() - t0:.0f} s, process peak RSS "
      f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GiB")
r = json.load(open(f"{run}/result.json"))
m = r["metrics"]
print({k: m[k] for k in ("mem/compress_peak_device_bytes", "mem/compress_peak_host_bytes",
                         "time/compress_s", "time/profile_s", "size/bits_per_param",
                         "ppl/wikitext2_dense", "ppl/wikitext2") if k in m})
blocks = {}
for row in r["layers"]:
    blocks[row["name"].split(".")[2]] = row["block_s"]
print("per-block compress seconds:", blocks)
PY
exit $status

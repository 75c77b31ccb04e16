#!/bin/bash
# The default run and five other ways of holding a model (streamed, streamed + rotated, walked
# evaluation, offload, tune=full), run with the code in CODE_DIR into OUT/<name>: for checking that
# a refactor changes no result (same seed), with benchmarks/compare_runs.py.
#   git worktree add --detach /tmp/before <old commit>
#   benchmarks/identity_runs.sh /tmp/before /tmp/runs_before
#   benchmarks/identity_runs.sh "$PWD" /tmp/runs_after
#   python benchmarks/compare_runs.py /tmp/runs_before /tmp/runs_after default stream stream_rot \
#       evalstream offload tune
# Each run gets its own empty CIUIC_LAB_CACHE, so dense baselines are measured, not read.
# usage: identity_runs.sh CODE_DIR OUT
CODE=$1; OUT=$2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1 PYTHONPATH=$CODE
cd /tmp
run() { name=$1; shift; export CIUIC_LAB_CACHE=$OUT/cache_$name; echo "== $name $(date +%T)"; 
  /usr/bin/time -f "%e s" nice -n 10 python -m ciuic_lab.run hydra.run.dir=$OUT/$name tracker=none progress=false "$@" > $OUT/$name.log 2>&1; echo "rc=$? $(tail -1 $OUT/$name.log)"; }
mkdir -p $OUT
run default eval.lm_eval.limit=20
run stream compress.stream=true eval.max_windows=8 eval.lm_eval.limit=20
run stream_rot compress.stream=true rotate=hadamard eval.stream=true eval.max_windows=8 eval.lm_eval.limit=20
run evalstream model=tiny-random-deepseek-v3 eval.stream=true save=true eval.max_windows=8 eval.lm_eval.limit=20
run offload model=tiny-random-deepseek-v3 compress.offload=true save=true eval.max_windows=8 eval.lm_eval.limit=20
run tune model=tiny-random-deepseek-v3 tune=full eval.max_windows=8 eval.lm_eval.limit=20

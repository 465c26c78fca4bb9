#!/usr/bin/env bash
# A short prepared check for a lent GPU (one H200, ~15 minutes, no network): issue 15's "When a GPU is lent".
# Tiny random Qwen3 models are made on the spot (the smoke preset's micro world, trained in seconds; no downloads).
#   1. env          versions; which of vLLM / DeepSpeed are installed (a missing one: its steps are skipped)
#   2. online       3 OPD steps of standard-opd (teacher scoring in the trainer)
#   3. offline      3 steps of lightning-opd (rollouts + chunked teacher precompute, parquet shards)
#   4. fsdp2        the online run under accelerate launch, 1 process, FSDP2 (world size 1 still shards)
#   5. zero3        the same under DeepSpeed ZeRO-3
#   6. vllm-lifecycle   an evaluation on vLLM (child process), then an HF load in this process: memory returned
#   7. vllm-held    an engine held in-process (as the trainer's colocated one) is reused by an evaluation
#   8. vllm-train   3 steps of standard-opd with TRL's colocated vLLM engine (student with head_dim 64)
# Each step prints RESULT {json} lines (tokens/s, peak memory) and has its own time limit; a failed step does not
# stop the others. Usage: bash benchmarks/gpu_check.sh   (OUT=dir keeps the JSON results; PYTHON=python to choose)
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export GPU_CHECK_WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OPD_BENCH_QUIET=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$GPU_CHECK_WORK"
LOG="$GPU_CHECK_WORK/log"
mkdir -p "$LOG"
ACC=opd_bench/accelerate_configs
SUMMARY=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$LOG/$name.txt" 2>&1
  local rc=$?
  grep '^RESULT ' "$LOG/$name.txt" || true
  if [ $rc -ne 0 ]; then
    echo "--- $name failed (rc $rc); last lines:"; tail -n 25 "$LOG/$name.txt"
  fi
  SUMMARY+=("$name rc=$rc $((SECONDS - start))s")
}

skip() { echo "=== $1 skipped: $2"; SUMMARY+=("$1 skipped ($2)"); }

has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

step env 60 "$PY" benchmarks/gpu_check.py env
"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || echo "warning: no CUDA device visible"
step online 240 "$PY" benchmarks/gpu_check.py run --method standard-opd --tag online
step offline 150 "$PY" benchmarks/gpu_check.py run --method lightning-opd --tag offline
step fsdp2 150 accelerate launch --config_file $ACC/fsdp2.yaml --num_processes 1 \
  benchmarks/gpu_check.py run --method standard-opd --tag fsdp2
if has deepspeed; then
  step zero3 180 accelerate launch --config_file $ACC/zero3.yaml --num_processes 1 \
    benchmarks/gpu_check.py run --method standard-opd --tag zero3
else
  skip zero3 "DeepSpeed is not installed (pip install 'opd-bench[deepspeed]')"
fi
if has vllm; then
  step vllm-lifecycle 180 "$PY" benchmarks/gpu_check.py vllm-lifecycle
  step vllm-held 150 "$PY" benchmarks/gpu_check.py vllm-held
  step vllm-train 240 "$PY" benchmarks/gpu_check.py run --method standard-opd --tag vllm-train \
    --set train.vllm=true --set vllm.gpu_memory_utilization=0.3 --set vllm.enforce_eager=true \
    --set world.student.hidden=128 --set world.student.heads=2 --set world.student.intermediate=256
else
  skip vllm "vLLM is not installed (pip install 'opd-bench[vllm]')"
fi
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -r "$LOG" "$OUT/gpu_check_logs"; fi

#!/bin/bash
# Issue 3 on the GPU machine: bf16 correctness of the influence kernel and the flash path,
# then the profiling time / memory table (scripts/gpu_profiler_bench.py).
# Usage (repository root, on the device machine): bash scripts/gpu_profiler.sh [LENGTHS] [BENCH_EXTRA...]
# Logs go to $OUT (or ./gpu_out).
LENGTHS=${1:-8192,16384,32768}; shift || true
source scripts/gpu_setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-60} python3 -m pytest -q -x -p no:cacheprovider --rootdir "$R" -m gpu "$R/tests/test_profiler.py" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
echo "tests: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-160} python3 "$R/scripts/gpu_profiler_bench.py" --lengths "$LENGTHS" --out "$OUT/profiler_bench.json" "$@" 2>&1 \
  | tee "$OUT/bench.log" | grep -v Warning | tail -30
echo "bench: $(( $(date +%s) - t0 )) s"

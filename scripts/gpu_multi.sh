#!/bin/bash
# Issue 8 on a multi-GPU machine: the 2-GPU tests (NCCL ranks, layers on two GPUs), then the
# profiling throughput table (scripts/multi_gpu_bench.py).
# Usage (repository root, on the device machine): bash scripts/gpu_multi.sh [LENGTH] [SAMPLES]
source scripts/gpu_setup.sh
export NCCL_NVLS_ENABLE=0   # the GPU machine's notes: keep NVLink multicast off
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider --rootdir "$R" -m gpu \
  "$R/tests/test_profiler.py" "$R/tests/test_calibrate.py" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "tests: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-420} python3 "$R/scripts/multi_gpu_bench.py" --length "${1:-8192}" --samples "${2:-32}" \
  --out "$OUT/multi_gpu.json" 2>&1 | tee "$OUT/bench.log" | grep -v Warning | tail -20
echo "bench: $(( $(date +%s) - t0 )) s"

#!/bin/bash
# Issue 6 on the GPU machine: bf16 checks of the decode kernel and the compressed cache, then
# `moa bench decode` (Llama-7B shape, random weights, 16k prompt, 50% KV density).
# Usage (repository root, on the device machine): bash scripts/gpu_decode.sh [BENCH_EXTRA...]
# Logs go to $OUT (or ./gpu_out).
source scripts/gpu_setup.sh
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -x -m gpu tests/test_decode_kernel.py tests/test_cache.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "tests: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-180} python3 -m moa_search.cli bench decode --model-shape llama-7b --density 0.5 \
  --prompt-len 16384 --new-tokens 256 --json "$OUT/bench_decode.json" "$@" 2> >(tee "$OUT/bench_stderr.log" >&2) | tee "$OUT/bench_decode.txt"
echo "bench: $(( $(date +%s) - t0 )) s"

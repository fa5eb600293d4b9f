#!/bin/bash
# The compiled decode step on the GPU machine: CUDA tests of moa_search.generate, the tokens and
# cache rows of the compiled step against the uncompiled one (scripts/gpu_compile_check.py), and
# `moa bench e2e` rows moa-graph (uncompiled step) vs moa-compiled at batch 1.
# Usage (repository root, on the device machine): bash scripts/gpu_compile.sh [SHAPES...]
# (default: llama-7b llama3-8b). Logs and JSON go to $OUT (or ./gpu_out).
source scripts/gpu_setup.sh
shapes=${*:-llama-7b llama3-8b}
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -x -m gpu tests/test_generation.py -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -8 || { echo "GPU tests failed"; exit 1; }
echo "tests: $(( $(date +%s) - t0 )) s"
for shape in $shapes; do
  t0=$(date +%s)
  timeout ${BENCH_TIMEOUT:-200} python3 -m moa_search.cli bench e2e --model-shape $shape --plans 0.5 \
    --paths moa-graph,moa-compiled --batches ${BATCHES:-1} --repeats ${REPEATS:-3} --prompt-len 16384 --new-tokens 32 \
    --json "$OUT/e2e_compiled_$shape.json" 2>&1 | tee "$OUT/e2e_compiled_$shape.log"
  echo "bench $shape: $(( $(date +%s) - t0 )) s"
done
t0=$(date +%s)
timeout ${CHECK_TIMEOUT:-120} python3 scripts/gpu_compile_check.py --model-shape llama-7b --layers ${CHECK_LAYERS:-8} \
  --batches 1,8 --json "$OUT/compile_check.json" 2>&1 | tee "$OUT/compile_check.log" | tail -4
echo "check: $(( $(date +%s) - t0 )) s"

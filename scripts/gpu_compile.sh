#!/bin/bash
# The compiled decode step on the GPU machine: the tokens and cache rows of the compiled step
# against the uncompiled one (scripts/gpu_compile_check.py, 2 layers of the Llama-7B shape,
# batch 1 and 8), then `moa bench e2e` rows moa-graph (uncompiled step) vs moa-compiled at
# batch 1 for each shape, then (RUN_TESTS=1) the CUDA tests of moa_search.generate.
# Usage (repository root, on the device machine): bash scripts/gpu_compile.sh [SHAPES...]
# (default: llama-7b llama3-8b). Logs and JSON go to $OUT (or ./gpu_out).
source scripts/gpu_setup.sh
shapes=${*:-llama-7b llama3-8b}
t0=$(date +%s)
timeout ${CHECK_TIMEOUT:-90} python3 scripts/gpu_compile_check.py --model-shape llama-7b --layers ${CHECK_LAYERS:-2} \
  --batches 1,8 --json "$OUT/compile_check.json" 2>&1 | tee "$OUT/compile_check.log" | tail -6
echo "check: $(( $(date +%s) - t0 )) s"
for shape in $shapes; do
  t0=$(date +%s)
  timeout ${BENCH_TIMEOUT:-170} python3 -m moa_search.cli bench e2e --model-shape $shape --plans 0.5 \
    --paths moa-graph,moa-compiled --batches ${BATCHES:-1} --repeats ${REPEATS:-3} --prompt-len 16384 --new-tokens 32 \
    --json "$OUT/e2e_compiled_$shape.json" 2>&1 | tee "$OUT/e2e_compiled_$shape.log" | tail -12
  echo "bench $shape: $(( $(date +%s) - t0 )) s"
done
if [ -n "${RUN_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -x -m gpu tests/test_generation.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -8
fi

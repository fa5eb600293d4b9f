#!/bin/bash
# Issue 5 on the GPU machine: bf16 correctness of the prefill kernel, then the timing table.
# Usage (repository root, on the device machine): bash scripts/gpu_prefill.sh [LENGTHS] [BENCH_EXTRA...]
# Logs go to $OUT (or ./gpu_out).
LENGTHS=${1:-8192,16384,32768}; shift || true
source scripts/gpu_setup.sh
export TRITON_PRINT_AUTOTUNING=1
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-110} python3 -m pytest -q -x -p no:cacheprovider --rootdir "$R" -m gpu ${TESTS:+-k "$TESTS"} \
  "$R/tests/test_prefill_kernel.py" 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "^Triton autotuning\|^best config\|^Autotuning kernel" | tail -25
echo "tests: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
# faulthandler prints every thread's stack shortly before the timeout: a stall says where it is
BT=$(( ${BENCH_TIMEOUT:-170} - 8 ))
timeout ${BENCH_TIMEOUT:-170} python3 -c "import faulthandler, sys; faulthandler.dump_traceback_later($BT, exit=False)
from moa_search.cli import main; sys.exit(main(sys.argv[1:]))" bench prefill --model-shape llama3-8b --density 0.5,0.25 \
  --lengths "$LENGTHS" --json "$OUT/bench_prefill.json" "$@" 2>"$OUT/bench_stderr.log" | tee "$OUT/bench_prefill.txt"
echo "bench: $(( $(date +%s) - t0 )) s"
grep -h "finished after\|kernel config\|flex unavailable\|failed at\|refused\|Error\|sdpa-flash" "$OUT/bench_stderr.log" | cut -c1-220 | tail -14

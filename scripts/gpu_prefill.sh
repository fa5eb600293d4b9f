#!/bin/bash
# Issue 5 on the GPU machine: bf16 correctness of the prefill kernel, then the timing table.
# Usage (repository root, on the device machine): bash scripts/gpu_prefill.sh [LENGTHS] [BENCH_EXTRA...]
# Logs go to $OUT (or ./gpu_out). Everything runs from /tmp so that the repository's own
# moa_search/ folder (which lacks the kernels/ mapping) cannot shadow the installed package.
set -o pipefail
R=$PWD
OUT=${OUT:-$R/gpu_out}; mkdir -p "$OUT"
LENGTHS=${1:-8192,16384,32768}; shift || true
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
[ -n "$SKIP_INSTALL" ] || python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
cd /tmp
if ! python3 -c "import moa_search.kernels.reference" 2>>"$OUT/pip.log"; then
  # fallback: the package-dir mapping by symlinks (moa_search.kernels -> kernels/, ...)
  echo "editable install not importable: using a symlinked moa_search on PYTHONPATH"
  P=/tmp/moa_pkg/moa_search; mkdir -p $P
  ln -sf "$R"/moa_search/* $P/
  for d in kernels profiler calibration_data; do ln -sfn "$R/$d" $P/$d; done
  export PYTHONPATH=/tmp/moa_pkg${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import moa_search.kernels.reference" || exit 1
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$OUT/env.txt"
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

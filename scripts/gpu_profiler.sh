#!/bin/bash
# Issue 3 on the GPU machine: bf16 correctness of the influence kernel and the flash path,
# then the profiling time / memory table (scripts/gpu_profiler_bench.py).
# Usage (repository root, on the device machine): bash scripts/gpu_profiler.sh [LENGTHS] [BENCH_EXTRA...]
# Logs go to $OUT (or ./gpu_out). Runs from /tmp so that the repository's own moa_search/
# folder (which lacks the kernels/ and profiler/ mapping) cannot shadow the installed package.
set -o pipefail
R=$PWD
OUT=${OUT:-$R/gpu_out}; mkdir -p "$OUT"
LENGTHS=${1:-8192,16384,32768}; shift || true
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -n "$SKIP_INSTALL" ] || python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
cd /tmp
if ! python3 -c "import moa_search.profiler.capture" 2>>"$OUT/pip.log"; then
  echo "editable install not importable: using a symlinked moa_search on PYTHONPATH"
  P=/tmp/moa_pkg/moa_search; mkdir -p $P
  ln -sf "$R"/moa_search/* $P/
  for d in kernels profiler calibration_data; do ln -sfn "$R/$d" $P/$d; done
  export PYTHONPATH=/tmp/moa_pkg${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import moa_search.profiler.capture" || exit 1
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$OUT/env.txt"
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-60} python3 -m pytest -q -x -p no:cacheprovider --rootdir "$R" -m gpu "$R/tests/test_profiler.py" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
echo "tests: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-160} python3 "$R/scripts/gpu_profiler_bench.py" --lengths "$LENGTHS" --out "$OUT/profiler_bench.json" "$@" 2>&1 \
  | tee "$OUT/bench.log" | grep -v Warning | tail -30
echo "bench: $(( $(date +%s) - t0 )) s"

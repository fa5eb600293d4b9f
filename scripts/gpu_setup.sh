# Sourced by scripts/gpu_*.sh on the GPU machine, from the repository root: installs the
# package, makes carried wheels importable, and records the GPU and versions in $OUT/env.txt.
# That machine has no datasets/optuna/pulp and no network: carry them as wheels in .whl/
# (the device notes show how); they are installed into /tmp/site when present.
set -o pipefail
R=$PWD
OUT=${OUT:-$R/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# `python3 -m pip`: the machine's bare `pip` belongs to another interpreter
[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/pip.log" 2>&1 \
  || echo "pip install failed (see $OUT/pip.log)"
python3 -c "import moa_search.kernels, moa_search.profiler" || { echo "moa_search does not import"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$OUT/env.txt"

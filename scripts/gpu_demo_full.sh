#!/usr/bin/env bash
# The README's quality claim, measured: `moa demo` on one GPU with larger sample counts.
#
# dense vs the searched MoA plan vs the uniform StreamingLLM plan, all at 50% KV density:
# calibrate (default recipe, 4 items per task and length) -> profile at 1024/2048/4096 ->
# search (budget also held at 8192; plan chosen by held-out loss at 8192) -> eval at
# 1024/2048/4096/8192 with greedy generation through the sparse kernels.
#
# Run on the GPU machine from the repository root (OUT: where the few result files go;
# the device tool returns at most 8 files, so the full run folder stays in $WORK):
#
#     bash scripts/gpu_demo_full.sh            # ~3-5 min on one H100
#     EVAL_PER_LENGTH=16 LENGTHS=2048,4096,8192 bash scripts/gpu_demo_full.sh
set -euo pipefail
source scripts/gpu_setup.sh
WORK=${WORK:-/tmp/moa_demo_gpu}
EVAL_PER_LENGTH=${EVAL_PER_LENGTH:-16}
LENGTHS=${LENGTHS:-1024,2048,4096}
python3 -m moa_search.cli demo -o "$WORK" --lengths "$LENGTHS" --eval-per-length "$EVAL_PER_LENGTH" 2>&1 \
    | grep -v -E "it/s\]|s/it\]" | tee "$OUT/demo_gpu.log"
cp "$WORK/summary.md" "$WORK/eval/results.csv" "$WORK/search/plan.json" "$WORK/eval/accuracy_vs_length.png" \
   "$WORK/eval/depth_heatmaps.png" "$OUT/"

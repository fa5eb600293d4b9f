#!/bin/bash
# The whole-model rows issue 18 lacked after session 9, one device call each (each fits the
# 600 s limit of a call; measured in session 10: BENCHMARKS.md "Session 10" has the results):
#   PART=hf7   transformers' compiled static cache (its best dense path), Llama-7B shape, at its
#              largest batch (the 1.7x comparison's baseline), then at batch 1 (largest first: the
#              batch-1 CUDA graphs must not hold memory the largest batch needs)
#   PART=hf8   the same on the Llama-3-8B shape
#   PART=max8  moa-compiled on Llama-3-8B at the plan's own largest batch (no cap; about 80 at KV
#              density 0.5), uniform 0.5
#   PART=q7    moa-compiled, the 0.25 plan, Llama-7B, batch 1 and its largest batch
# Usage (repository root, on the device machine): PART=hf7 bash scripts/gpu_e2e_rest.sh
# Results: $OUT/e2e_<part>.json (or ./gpu_out).
source scripts/gpu_setup.sh
common="--prompt-len 16384 --new-tokens 32 --repeats 3"
case "${PART:?set PART to hf7, hf8, max8 or q7}" in
  hf7)   args="--model-shape llama-7b --paths hf-compiled --batches max,1" ;;
  hf8)   args="--model-shape llama3-8b --paths hf-compiled --batches max" ;;
  max8)  args="--model-shape llama3-8b --plans 0.5 --paths moa-compiled --batches max --max-batch 128" ;;
  q7)    args="--model-shape llama-7b --plans 0.25 --paths moa-compiled --batches 1,max --max-batch 64" ;;
  *)     echo "unknown PART=$PART"; exit 2 ;;
esac
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-560} python3 -m moa_search.cli bench e2e $args $common --json "$OUT/e2e_$PART.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/e2e_$PART.log" | tail -12
echo "part $PART: $(( $(date +%s) - t0 )) s"

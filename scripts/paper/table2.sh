#!/usr/bin/env bash
# Table 2 of the paper: (a) LLaVA-1.5-13B and (b) LLaVA-NeXT-7B on TextVQA (OCR prompt), SQA-IMG, MME, POPE.
# LLaVA-NeXT: keep counts tokens per 576-token crop, as the paper's "Rem. Tok." does.
source "$(dirname "$0")/common.sh"
TASKS=textvqa_val_ocr,scienceqa_img,mme,pope
run_table table2a "${MODEL_13B:-llava-hf/llava-1.5-13b-hf}" "$TASKS"
run_table table2b "${MODEL_NEXT:-llava-hf/llava-v1.6-vicuna-7b-hf}" "$TASKS"
[ "${DRY_RUN:-0}" = 1 ] || { "$PYTHON" "$HERE/summarize.py" "$OUT/table2a"; "$PYTHON" "$HERE/summarize.py" "$OUT/table2b"; }

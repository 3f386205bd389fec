#!/usr/bin/env bash
# Table 1 of the paper: LLaVA-1.5-7B on VQAv2, GQA, VizWiz, TextVQA (OCR prompt), SQA-IMG, MME, POPE.
# VQAv2 and VizWiz run on their public validation splits: the paper's test-dev/test need the evaluation servers.
source "$(dirname "$0")/common.sh"
run_table table1 "${MODEL:-llava-hf/llava-1.5-7b-hf}" vqav2_val,gqa,vizwiz_vqa_val,textvqa_val_ocr,scienceqa_img,mme,pope
[ "${DRY_RUN:-0}" = 1 ] || "$PYTHON" "$HERE/summarize.py" "$OUT/table1"

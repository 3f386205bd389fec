#!/usr/bin/env bash
# Table 3 of the paper: FLOPs, peak GPU memory, latency and throughput of LLaVA-1.5-7B on MME, one image per
# request (batch size 1, one GPU: the paper timed a single RTX 4090). FLOPs are the decoder's prefill FLOPs
# by the paper's formula, from each sample's log; latency is the whole generate() call per request.
source "$(dirname "$0")/common.sh"
GPUS=1 BATCH=1
LAUNCH=("$PYTHON" -m star.integrations.lmms_eval)
run_table table3 "${MODEL:-llava-hf/llava-1.5-7b-hf}" mme
[ "${DRY_RUN:-0}" = 1 ] || "$PYTHON" "$HERE/summarize.py" "$OUT/table3"

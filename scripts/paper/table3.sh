#!/usr/bin/env bash
# Table 3 of the paper on one GPU, without the checkpoint: LLaVA-1.5-7B's architecture with random weights
# (`star bench --config llava-1.5-7b --random-init`), a random 336 px image and 79 text tokens, float16, SDPA.
# Timing depends on shapes and kernels, not on weight values: answers are meaningless, times are real.
#   1. the paper's rows at batch 1: unpruned, FastV, FasterVLM, SparseVLM, STAR at 288 / 58 / 29 tokens;
#   2. STAR and FasterVLM at batch 8 and 32: does time still follow FLOPs as batches grow?
# Then scripts/paper/table3.py prints the paper's figures beside ours, with the ratios, into OUT/table3.md.
# About 4 minutes on one H200 (two model builds, 13 + 14 settings); sized to stay under 8.
# Environment: OUT (default docs/results/table3), DEVICE (cuda), DTYPE (float16), ATTN (sdpa), REPEATS (5),
# WARMUP (2), NEW_TOKENS (16), BATCHES (8,32), and for a test at a tiny shape: SOURCE (default "--config llava-1.5-7b"; e.g.
# "--model DIR" of a config.json), KEEPS (288,58,29), PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-docs/results/table3}
SOURCE=${SOURCE:---config llava-1.5-7b}
KEEPS=${KEEPS:-288,58,29}
COMMON=(--random-init --device "${DEVICE:-cuda}" --dtype "${DTYPE:-float16}" --attn "${ATTN:-sdpa}"
        --repeats "${REPEATS:-5}" --warmup "${WARMUP:-2}" --new-tokens "${NEW_TOKENS:-16}" --keep "$KEEPS")
mkdir -p "$OUT"
# shellcheck disable=SC2086  # SOURCE is two words
"$PYTHON" -m star.cli bench $SOURCE "${COMMON[@]}" --batch 1 --methods fastv,fastervlm,sparsevlm,star \
    --out "$OUT/batch1.json" | tee "$OUT/batch1.md"
# shellcheck disable=SC2086
"$PYTHON" -m star.cli bench $SOURCE "${COMMON[@]}" --batch "${BATCHES:-8,32}" --methods star,fastervlm \
    --out "$OUT/batches.json" | tee "$OUT/batches.md"
"$PYTHON" scripts/paper/table3.py "$OUT/batch1.json" "$OUT/batches.json" | tee "$OUT/table3.md"

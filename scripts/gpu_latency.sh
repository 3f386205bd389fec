#!/usr/bin/env bash
# Batch-1 latency on one GPU (issue: a pruned prefill with no host syncs): LLaVA-1.5-7B's architecture with random
# weights, batch 1 and 8, unpruned / STAR 288, 58, 29 / FasterVLM 58 / FastV 58, eager and compiled (CUDA graphs):
# prefill ms, a 16-token request's latency, and the host syncs of one prefill, into docs/results/gpu/.
# Sized for about 5 minutes on one H200. Any argument goes to scripts/gpu_latency.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" scripts/gpu_latency.py --out docs/results/gpu "$@"

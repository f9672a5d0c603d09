#!/usr/bin/env bash
# The GPU rows of issue 8's table, on one CUDA machine (H100 80 GB for the published targets):
#   bash bench/gpu.sh            from the repository root, after `pip install -e '.[gpu]'`
# Each row runs both paths in one invocation; results are appended to bench/train-results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
FAST=(--fast optimizer=adamw_fused)
$PY bench/train.py --shape llama-8b --method lora --seq 4096 --batch 2 --steps 10 --warmup 3 "${FAST[@]}"
$PY bench/train.py --shape llama-1b --method full --seq 2048 --batch 8 --steps 10 --warmup 3 --checkpointing "${FAST[@]}"
$PY bench/train.py --shape llama-8b --method qlora --seq 4096 --batch 2 --steps 10 --warmup 3 --checkpointing
$PY bench/train.py --shape llama-8b --method qlora --find-max-seq --checkpointing --fast offload_activations=true

#!/usr/bin/env bash
# POPE ablation: sweep the number of kept visual tokens (plus the baseline), then read report.md and the plots.
#
#   MODEL=/models/llava-1.5-7b-hf DATA=/data/pope bash examples/ablation_pope.sh
#   GPUS=4 MODEL=... DATA=... bash examples/ablation_pope.sh        # data-parallel over 4 GPUs
#
# An interrupted run resumes: run the same command again. Without MODEL/DATA it runs on the embedded demo.
set -euo pipefail

if [[ -n "${MODEL:-}" ]]; then
    SWEEP=${SWEEP:-"cls-prune:keep=64,128,192,288"}    # of LLaVA-1.5's 576 visual tokens
else
    SWEEP=${SWEEP:-"cls-prune:keep=9,18,36,72"}        # of the demo model's 144
fi
OUT=${OUT:-attnkit_runs/ablation_pope}
LIMIT=${LIMIT:-100}                          # questions per POPE split
GPUS=${GPUS:-1}

args=(ablate --bench pope --sweep "$SWEEP" --out "$OUT" --limit "$LIMIT")
if [[ -n "${MODEL:-}" ]]; then
    args+=(--model "$MODEL" --data "${DATA:?set DATA to the POPE folder}")
fi

if [[ "$GPUS" -gt 1 ]]; then
    accelerate launch --num_processes "$GPUS" -m attnkit.cli "${args[@]}"
else
    attnkit "${args[@]}"
fi
echo "report: $OUT/report.md"

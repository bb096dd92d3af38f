#!/usr/bin/env bash
# The longer run of issue 28 (docs/results.md): LoRA, MoLA and DynMoLE, 3 seeds, 1200 steps, leak-free split, cloze.
# Resumable: finished runs are skipped, an interrupted run resumes from its last checkpoint (every 100 steps).
# Run it in the background with nice, and beside it commit each run as it lands:
#   nice bash scripts/cpu-long.sh > cpu-long.log 2>&1 &  nice bash scripts/commit-runs.sh docs/results/cpu-long cpu-long &
set -uo pipefail
cd "$(dirname "$0")/.."
R="${DYNMOLE:-.venv/bin/python -m dynmole} reproduce --profile cpu-long --output-dir ${OUT:-docs/results/cpu-long}"
$R --seeds 0   # seed 0 of all three first, so that a cut-short grid still pairs them
$R --seeds 1
$R             # seed 2, then the report with the seed-aware tests

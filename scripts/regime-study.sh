#!/usr/bin/env bash
# The routing-regime study of docs/regime.md: every run of it, in the order they were run.
# Resumable: a finished run (its result.json exists) is skipped, so rerunning continues.
# Each run: SmolLM2-135M, profile `regime` (200 steps of batch 8, bf16 autocast, routing probe
# on 32 held-out examples every 20 steps); 7-12 minutes on the 2-core CPU.
set -uo pipefail  # a failed run is reported in its error.txt; the next one still runs
cd "$(dirname "$0")/.."
R="${DYNMOLE:-.venv/bin/python -m dynmole} reproduce --profile regime"
OUT=docs/regime/runs

# 1. The router learning rate at the probe's lr 1e-3 (DynMoLE).
$R --ablation router_lr_scale --values 1,10 --output-dir $OUT/lr1e-3
# 2. The papers' lr 2e-4, with and without a faster router.
$R --ablation router_lr_scale --values 1,10 --set lr=2e-4 --output-dir $OUT/lr2e-4
# 3. The other routers: LD-MoLE's experts per token and MoLA's load, at 10x and 1x.
$R --methods ldmole,mola --set router_lr_scale=10 --output-dir $OUT/methods-rs10
$R --methods ldmole,mola --output-dir $OUT/methods-rs1
# 4. The entropy-loss coefficient: 10x the paper's at the paper's router lr; none at 10x router lr.
$R --ablation entropy_coef --values 0.1 --output-dir $OUT/lr1e-3-entropy
$R --ablation entropy_coef --values 0 --set router_lr_scale=10 --output-dir $OUT/lr1e-3-rs10-entropy
# 5. The router initialisation (std 0.02 in the reference code).
$R --ablation router_init_std --values 0.1 --output-dir $OUT/lr1e-3-init
# 6. A larger router-lr multiple at the papers' lr.
$R --ablation router_lr_scale --values 50 --set lr=2e-4 --output-dir $OUT/lr2e-4

#!/usr/bin/env bash
# The whole offrl pipeline on the embedded default (a local Ray cluster, CPU ManiSkill PickCube-v1):
#   1. collect scripted-expert demonstrations      (offrl collect)
#   2. pretrain a BC actor + IQL critics           (offrl pretrain)
#   3. a tiny advantage x update finetuning sweep  (offrl sweep, Ray Tune)
#   4. the statistics report                       (offrl stats compare)
# Every run of this script writes into a fresh folder runs/quickstart/<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/quickstart/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "=== [offrl quickstart $(( $(date +%s) - start ))s] $*"; }

step "1/4 collect 50 scripted PickCube-v1 demos -> $OUT/demos.h5"
$PY -m offrl collect tune_configs/collect_pickcube.yaml collect.episodes=50 "collect.output=$OUT/demos.h5"

step "2/4 pretrain BC actor + IQL critics -> $OUT/pretrain/bc_iql"
$PY -m offrl pretrain tune_configs/pretrain_bc_iql.yaml "pretrain.dataset=$OUT/demos.h5" pretrain.epochs=10 \
    pretrain.eval_episodes=20 pretrain.checkpoint_every=5 "run.root=$OUT" run.experiment=pretrain run.trial=bc_iql

step "3/4 finetuning sweep {gae, iql} x {ppo, awr} -> $OUT/quickstart"
$PY -m offrl sweep tune_configs/quickstart.yaml "finetune.checkpoint=$OUT/pretrain/bc_iql" --storage "$OUT"

step "4/4 statistics"
$PY -m offrl stats compare "$OUT/quickstart" --metric eval/success_rate \
    --by finetune.advantage finetune.update --out "$OUT/stats"

echo
echo "=== offrl quickstart done in $(( $(date +%s) - start ))s. Outputs:"
echo "  demonstrations      $OUT/demos.h5 (+ .json)"
echo "  pretrained policy   $OUT/pretrain/bc_iql   (eval.json, checkpoints/, metrics.csv)"
echo "  finetuning sweep    $OUT/quickstart  (one run directory per trial)"
echo "  report              $OUT/stats/            (markdown, CSV, learning curves and interval PNGs)"
echo "  TensorBoard         .venv/bin/tensorboard --logdir $OUT"

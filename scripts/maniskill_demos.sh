#!/usr/bin/env bash
# Make ManiSkill motion-planning demonstrations here and convert them for offrl.
#
#   scripts/maniskill_demos.sh ENV N OUT        e.g. scripts/maniskill_demos.sh PickCube-v1 100 datasets/mp
#
# Writes OUT/<ENV>_mp<N>.pd_ee_delta_pos.h5 and OUT/<ENV>_mp<N>.pd_joint_delta_pos.h5 (state observations,
# each with its JSON sidecar). Where the network is reachable, ManiSkill's own download is the usual way:
#   python -m mani_skill.utils.download_demo PickCube-v1
#
# ManiSkill's planner needs mplib, which segfaults with numpy 2, so the planner runs in its own small
# virtualenv (MPLIB_VENV, default .venv-mplib) with numpy 1.26.4; the conversion to the controllers offrl
# trains on runs ManiSkill's replay_trajectory in the project's .venv.
#
# Options (environment variables):
#   MPLIB_VENV=.venv-mplib        the planner's virtualenv (created on first use, ~2 minutes)
#   CONTROL_MODES="pd_ee_delta_pos pd_joint_delta_pos"   controllers to convert to
#   RECORD_REWARDS=0              1: also record rewards (REWARD_MODE, default normalized_dense)
#   SEED=0                        first planner seed
set -euo pipefail

usage() { echo "usage: scripts/maniskill_demos.sh ENV N OUT   (e.g. PickCube-v1 100 datasets/mp)" >&2; exit 2; }
[ $# -eq 3 ] || usage
ENV_ID=$1; N=$2; OUT=$3
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "maniskill_demos: N must be a positive integer, got '$N'" >&2; exit 2; }

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VPY=$ROOT/.venv/bin/python
[ -x "$VPY" ] || { echo "maniskill_demos: the project venv is missing; run 'make install' first" >&2; exit 2; }
MPVENV=${MPLIB_VENV:-$ROOT/.venv-mplib}
CONTROL_MODES=${CONTROL_MODES:-"pd_ee_delta_pos pd_joint_delta_pos"}
RECORD_REWARDS=${RECORD_REWARDS:-0}
REWARD_MODE=${REWARD_MODE:-normalized_dense}
SEED=${SEED:-0}

MS_VERSION=$("$VPY" -c "import importlib.metadata as m; print(m.version('mani_skill'))")
TORCH_VERSION=$("$VPY" -c "import importlib.metadata as m; print(m.version('torch'))")
if ! "$MPVENV/bin/python" -c "import mplib, numpy, mani_skill; assert numpy.__version__.startswith('1.')" 2>/dev/null; then
    echo "[maniskill_demos] building the planner venv $MPVENV (numpy 1.26.4, mani_skill $MS_VERSION, mplib)"
    python3 -m venv "$MPVENV"
    "$MPVENV/bin/python" -m pip install -q --upgrade pip
    # torch's CPU wheel (as the project installs it) keeps the planner venv small
    "$MPVENV/bin/python" -m pip install -q "torch==${TORCH_VERSION%%+*}" || true
    "$MPVENV/bin/python" -m pip install -q "numpy==1.26.4" "mani_skill==$MS_VERSION" "mplib==0.1.1"
fi

export SAPIEN_NO_DISPLAY=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
NAME="${ENV_ID}_mp${N}"
echo "[maniskill_demos] planning $N successful $ENV_ID demos (seeds from $SEED)"
# run.py draws seeds from start_seed upwards; its --only-count-success keeps only solved episodes
"$MPVENV/bin/python" - "$ENV_ID" "$N" "$WORK" "$SEED" <<'PY'
import sys
from mani_skill.examples.motionplanning.panda import run

env_id, n, out, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sys.argv = ["run", "-e", env_id, "-n", str(n), "--only-count-success", "-b", "physx_cpu",
            "--record-dir", out, "--traj-name", "trajectory", "--render-mode", "rgb_array"]
args = run.parse_args()
run._main(args, proc_id=0, start_seed=seed)
PY
SRC="$WORK/$ENV_ID/motionplanning/trajectory.h5"
[ -f "$SRC" ] || { echo "maniskill_demos: the planner wrote no $SRC" >&2; exit 1; }

mkdir -p "$OUT"
for MODE in $CONTROL_MODES; do
    echo "[maniskill_demos] converting to $MODE, state observations"
    EXTRA=()
    if [ "$RECORD_REWARDS" = 1 ]; then EXTRA=(--record-rewards --reward-mode "$REWARD_MODE"); fi
    "$VPY" -m mani_skill.trajectory.replay_trajectory --traj-path "$SRC" -c "$MODE" -o state \
        --save-traj -b physx_cpu -n 2 "${EXTRA[@]}" > "$WORK/replay_$MODE.log" 2>&1 \
        || { tail -5 "$WORK/replay_$MODE.log" >&2; echo "maniskill_demos: replay_trajectory failed for $MODE" >&2; exit 1; }
    CONV="$WORK/$ENV_ID/motionplanning/trajectory.state.$MODE.physx_cpu"
    DST="$OUT/$NAME.$MODE"
    mv "$CONV.h5" "$DST.h5.tmp"
    mv "$CONV.json" "$DST.json"
    mv "$DST.h5.tmp" "$DST.h5"
    "$VPY" -m offrl data validate "$DST.h5"
done
echo "[maniskill_demos] wrote $OUT/$NAME.{$(echo $CONTROL_MODES | tr ' ' ',')}.h5"

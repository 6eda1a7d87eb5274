#!/usr/bin/env bash
# Train the toy-world base from seed 0 in two stages and save it to OUT (default
# models/toyworld-base); docs/toyworld.md "Training" has the measured times.
#   stage 1: every component from scratch, uniform timesteps (BaseConfig defaults);
#   stage 2: continue UNet and text encoder with half of each batch at t >= 900,
#            where the caption alone must place the object (position words).
# Usage: bash scripts/train_toyworld_base.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-models/toyworld-base}"
STAGE1="${OUT%/}.stage1"
export HF_HUB_OFFLINE=1
PYTHON=.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python
RECIPE=$(mktemp)
trap 'rm -f "$RECIPE"' EXIT
# the fine-tuning settings the base carries are written by hand, not trained: keep them
cp models/toyworld-base/tuneqdm_recipe.json "$RECIPE"
"$PYTHON" -m toyworld.train_base --out "$STAGE1" --seed 0
rm -rf "$OUT"
"$PYTHON" -m toyworld.train_base --out "$OUT" --seed 0 --resume-from "$STAGE1" \
    --steps 5000 --lr 5e-4 --high-noise-fraction 0.5 --high-noise-from 900
cp "$RECIPE" "$OUT/tuneqdm_recipe.json"
cp "$STAGE1/toyworld.json" "$OUT/toyworld_stage1.json"  # stage 1's settings and numbers
echo "saved $OUT (stage 1 kept in $STAGE1)"

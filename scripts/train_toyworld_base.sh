#!/usr/bin/env bash
# Train the toy-world base from seed 0 in three stages and save it to OUT (default
# models/toyworld-base); docs/toyworld.md "Training" has the measured times.
#   stage 1: every component from scratch, uniform timesteps (BaseConfig defaults);
#   stage 2: continue UNet and text encoder with half of each batch at t >= 900,
#            where the caption alone must place the object (position words);
#   stage 3: 1,000 steps of uniform timesteps at lr 1e-3, a fresh warm-up and decay:
#            the low-noise end, where 1-px edges and 4-px checks are decided, gets
#            every step (held-out pattern 0.906 -> 0.930).
# Usage: bash scripts/train_toyworld_base.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-models/toyworld-base}"
STAGE1="${OUT%/}.stage1"
STAGE2="${OUT%/}.stage2"
export HF_HUB_OFFLINE=1
PYTHON=.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python
RECIPE=$(mktemp)
trap 'rm -f "$RECIPE"' EXIT
# the fine-tuning settings the base carries are written by hand, not trained: keep them
cp models/toyworld-base/tuneqdm_recipe.json "$RECIPE"
LATE=(--lr 5e-4 --high-noise-fraction 0.5 --high-noise-from 900)
"$PYTHON" -m toyworld.train_base --out "$STAGE1" --seed 0
"$PYTHON" -m toyworld.train_base --out "$STAGE2" --seed 0 --resume-from "$STAGE1" \
    --steps 5000 "${LATE[@]}"
rm -rf "$OUT"
"$PYTHON" -m toyworld.train_base --out "$OUT" --seed 0 --resume-from "$STAGE2" \
    --steps 1000 --lr 1e-3 --high-noise-fraction 0
cp "$RECIPE" "$OUT/tuneqdm_recipe.json"
# the earlier stages' settings and numbers
cp "$STAGE1/toyworld.json" "$OUT/toyworld_stage1.json"
cp "$STAGE2/toyworld.json" "$OUT/toyworld_stage2.json"
echo "saved $OUT (stages 1 and 2 kept in $STAGE1 and $STAGE2)"

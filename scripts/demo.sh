#!/usr/bin/env bash
# The main job on embedded defaults: set up .venv, then `tuneqdm-pipeline submit` the
# example subjects on a local Ray with a local output folder (CPU, offline).
# Extra arguments go to `submit`, e.g. `bash scripts/demo.sh --steps 400`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Base: the bundled toy-world model (models/toyworld-base). Its training settings come
# from its recipe, models/toyworld-base/tuneqdm_recipe.json: those of the comparison in
# docs/toyworld.md (120 steps of batch 4 on stratified timesteps, lr_scale_out = 1e-2 x
# mean s0, guidance 2);
# each photo trains on its caption (examples/subjects/<id>/<n>.txt beside it).
.venv/bin/tuneqdm-pipeline submit examples/subjects.csv --output outputs/demo "$@"
.venv/bin/tuneqdm-pipeline status outputs/demo
# Training photos beside samples, one row per subject (the README's montage)
.venv/bin/python scripts/demo_montage.py outputs/demo --out outputs/demo-montage.png

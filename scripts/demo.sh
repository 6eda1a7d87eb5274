#!/usr/bin/env bash
# The main job on embedded defaults: set up .venv, then `tuneqdm-pipeline submit` the
# example subjects on a local Ray with a local output folder (CPU, offline).
# Extra arguments go to `submit`, e.g. `bash scripts/demo.sh --steps 400`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Base: the bundled toy-world model (models/toyworld-base). Its settings are those of
# the comparison in docs/toyworld.md: 120 steps of batch 4, lr_scale_out = 1e-2 x mean
# s0 (0.0234 at 4 bits), guidance 4 for the samples.
.venv/bin/tuneqdm-pipeline submit examples/subjects.csv --output outputs/demo \
    --steps 120 --batch-size 4 --lr-scale-out 2.3e-4 --guidance-scale 4 "$@"
.venv/bin/tuneqdm-pipeline status outputs/demo

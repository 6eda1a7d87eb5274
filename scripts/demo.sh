#!/usr/bin/env bash
# The main job on embedded defaults: set up .venv, then `tuneqdm-pipeline submit` the
# example subjects on a local Ray with a local output folder (CPU, offline).
# Extra arguments go to `submit`, e.g. `bash scripts/demo.sh --steps 400`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
.venv/bin/tuneqdm-pipeline submit examples/subjects.csv --output outputs/demo --steps 200 "$@"
.venv/bin/tuneqdm-pipeline status outputs/demo

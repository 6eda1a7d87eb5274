#!/usr/bin/env bash
# The main job on embedded defaults: set up .venv, then run end to end on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python scripts/quickstart.py "$@"

#!/usr/bin/env bash
# One prepared GPU check: CUDA tests, the SD v1.5 training table in bf16, generation
# latency float vs 4-bit vs 8-bit at 512 px, a mixed-subject batch. Results go to
# OUTDIR/results.json and OUTDIR/results.md (benchmarks/gpu_check.py says what each is).
#   bash scripts/gpu_check.sh OUTDIR                # one CUDA GPU, at most ~8 minutes
#   bash scripts/gpu_check.sh OUTDIR --cpu-reduced  # CPU, CI sizes, about a minute
# (GPU_CHECK_CPU_REDUCED=1 does the same as --cpu-reduced.) PYTHON overrides the
# interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: scripts/gpu_check.sh OUTDIR [--cpu-reduced]" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the sections keep to a budget (420 s on a GPU); this is the hard stop
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"

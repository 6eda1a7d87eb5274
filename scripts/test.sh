#!/usr/bin/env bash
# Set up .venv, check lint, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-browser.sh  # Debian chromium + chromedriver for the playground test
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
.venv/bin/ruff check .
# two workers, one per core; conftest.py groups the tests that share fixtures
exec .venv/bin/pytest -q -n 2 --dist loadgroup "$@"

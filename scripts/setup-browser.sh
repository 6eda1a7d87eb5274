#!/usr/bin/env bash
# Headless Chromium + chromedriver (Debian packages) and selenium in .venv, for the
# playground test (tests/deploy/test_deploy_serve.py). Idempotent; needs root or sudo
# for apt. Run after scripts/setup.sh (which creates .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver
fi
.venv/bin/python -c "import selenium" 2>/dev/null || .venv/bin/pip install -q "selenium>=4.20,<5"
chromium --version

#!/usr/bin/env bash
# Sets up the test environment (idempotent, cached under ~/.cache/kosmosg) and runs every test:
# the fast unit suite in parallel, then the real-ComfyUI server and browser suites (the `cuda` tests
# need a GPU: scripts/device_checks.sh).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="$(bash .ci/setup_env.sh | tail -n 1)"
if [ -f tests/browser/install.sh ]; then
  bash tests/browser/install.sh
fi
export OMP_NUM_THREADS=1
echo "== unit tests =="
"$PY" -m pytest -q -n 2 -m "not integration and not browser and not cuda" "$@"
echo "== integration tests (real ComfyUI server, headless browser) =="
"$PY" -m pytest -q -m "integration or browser" "$@"

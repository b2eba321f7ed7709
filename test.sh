#!/usr/bin/env bash
# Test suite: set up (first time only), then run pytest headless.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/bootstrap.sh
export QT_QPA_PLATFORM=offscreen
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Main job: set up (first time only) and start the desktop viewer with the bundled
# server and sample study. Extra arguments go to `medview`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/bootstrap.sh
exec .venv/bin/medview "$@"

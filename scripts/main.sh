#!/usr/bin/env bash
# Set up (if needed) and run the main job on the built-in small model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m eval.demo "$@"

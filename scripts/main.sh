#!/usr/bin/env bash
# Set up (if needed) and run the main job on the built-in small model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m eval.run --target tiny-random --suite gsm8k,mt_bench --limit 2 --max-new-tokens 16 --method ar,mtp,dflash,hyperdflash --block-size 8 --prompt-buckets 512 --out runs/main --overwrite "$@"

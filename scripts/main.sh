#!/usr/bin/env bash
# Set up (if needed) and run the main job: the built-in small model (models/small: a pretrained small DeepSeek-V4,
# its MTP layer, trained HyperDFlash and vanilla DFlash drafters) on the five suites, greedy, τ/speedup table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m eval.run --target small --suite all --limit 2 --max-new-tokens 96 \
    --method ar,mtp3,mtp7,dflash,hyperdflash --prompt-buckets 512 --out runs/main --overwrite "$@"

#!/usr/bin/env bash
# Set up (if needed) and run the main job: the built-in small model (models/small: a pretrained small DeepSeek-V4,
# its MTP layer, trained HyperDFlash, DFlash and DSpark drafters) on the five suites, greedy. The table has 95%
# bootstrap intervals over prompts (eval.bootstrap) for every speedup and τ, and a second table with the decode
# speedup (prefill taken out) and decode speedup / τ. 8 samples per suite keep the run near 2-3 minutes on 2 cores
# (the intervals of the drafters' avg τ overlap at that size: docs/results.md has the larger runs); buckets 256,512
# fit the prompts (the longest, MT-Bench turn 2, fit 512).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m eval.run --target small --suite all --limit 8 --max-new-tokens 96 \
    --method ar,mtp3,mtp7,dflash,hyperdflash,replay --prompt-buckets 256,512 --out runs/main --overwrite "$@"

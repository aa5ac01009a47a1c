#!/usr/bin/env bash
# Create .venv (Python 3.11) and install hdflash_jax with the converter/parity extras, pinned by constraints.txt.
# Idempotent: an existing .venv is reused unless HDFLASH_FRESH_VENV=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ "${HDFLASH_FRESH_VENV:-0}" = "1" ]; then rm -rf .venv; fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torch==2.13.0 resolves to the local CPU build here; any other torch request pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[torch,dev,refs]"
# z-lab's reference DFlash drafter for the export/import parity tests: its pinned runtime deps (datasets, requests,
# an older tqdm) are not needed for the model code and would fight constraints.txt, so it installs without them.
.venv/bin/python -m pip install -q --no-deps "dflash==0.1.0"
# NVIDIA NeMo Automodel (DeepSeek-V4 target, its MTP block, DSpark on V4) and Red Hat's speculators (the DFlash /
# DSpark / MTP formats vLLM loads), the second set of references for the parity tests (tests/test_ref_*.py). Their
# declared deps (megatron-fsdp, torchao, an older transformers, ...) are not needed to import the model code and
# would fight constraints.txt; what the imports do need is the `refs` extra above.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt "nemo-automodel==0.7.0" "speculators==0.9.0" \
  "hs-connectors==0.9.0"
# bubblewrap isolates the model-written programs that eval scoring runs (eval/sandbox.py; without it the sandbox
# uses unshare, or refuses to score unless --allow-unisolated). Installed only as root with apt-get; skipped otherwise.
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } >/dev/null 2>&1; then
    echo "setup: could not install bubblewrap with apt-get; eval.sandbox will try unshare" >&2
  fi
fi

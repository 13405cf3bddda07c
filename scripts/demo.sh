#!/usr/bin/env bash
# Set up, then fine-tune the offline MiniLM on bundled SST-2 with AdamW and with GaLore; print memory and accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 python -m hf_memopt.tools.demo "$@"

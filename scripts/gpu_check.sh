#!/usr/bin/env bash
# One-shot CUDA check of hf_memopt (docs/gpu_check.md): writes gpu_check.json + gpu_check.md to $1 / $OUT /
# out/gpu_check. Runs offline: packages missing on the GPU machine (bitsandbytes, galore-torch) are taken from
# .gpu_site/ in the repository root when it exists (stage it beforehand with `scripts/gpu_check.sh --stage`).
#
#   scripts/gpu_check.sh [OUT_DIR] [gpu_check.py options, e.g. --only zo2,composed | --cpu-dry-run]
#   scripts/gpu_check.sh --stage      # copy this machine's bitsandbytes + galore_torch into .gpu_site/
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$(command -v python3 || command -v python)}"
if [[ "${1:-}" == "--stage" ]]; then
    exec "$py" "$repo/scripts/gpu_check.py" --stage-packages "$repo/.gpu_site" "${@:2}"
fi
out="${OUT:-$repo/out/gpu_check}"
if [[ $# -gt 0 && "$1" != -* ]]; then out="$1"; shift; fi
if [[ -d "$repo/.gpu_site" ]]; then export PYTHONPATH="$repo/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# 8-minute hard stop around the 450 s of section budgets (a hung report writer must not eat the GPU lease)
timeout 480 "$py" "$repo/scripts/gpu_check.py" --out "$out" "$@"
exit $?

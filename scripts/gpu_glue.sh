#!/bin/bash
# The GLUE table of docs/results.md again on a CUDA device, in bf16 (issue #15): the cells of
#   python benchmarks/results_table.py run --schedule gpu --tasks TASKS --rows ROWS
# within a time budget (GPU_GLUE_SECONDS, default 420). Cells already done are skipped, so running the script again
# continues where the budget stopped it; a cell cut by the budget leaves no record and runs again.
# Afterwards: python benchmarks/results_table.py render (writes the GPU section of docs/results.md).
#   scripts/gpu_glue.sh                                  # defaults below
#   TASKS=rte,mrpc,stsb ROWS=adamw,galore scripts/gpu_glue.sh
# With $OUT set (the device tool), the cells' JSON and logs are copied to $OUT/results_gpu.
#   scripts/gpu_glue.sh --stage   # on a machine that has them: the GLUE run's packages and MiniLM in float16 into
#                                 # .gpu_glue/ (site/ 4 MiB, model/ 45 MiB), for a GPU machine that cannot install
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" == "--stage" ]; then
  exec python scripts/gpu_check.py --stage-glue .gpu_glue
fi
budget=${GPU_GLUE_SECONDS:-420}
tasks=${TASKS:-rte,mrpc}
rows=${ROWS:-adamw,galore,blockllm,loqt,velora,galore_8bit_layerwise,velora+galore,lora}
[ -d .gpu_site ] && export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"  # see docs/gpu_check.md
for staged in .gpu_glue/site .gpu_glue/model; do
  [ -d "$staged" ] && export PYTHONPATH="$PWD/$staged${PYTHONPATH:+:$PYTHONPATH}"
done
# hf_memopt from this checkout (a GPU machine may not have it installed), here and in every cell's process
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout --kill-after=15 "$budget" python benchmarks/results_table.py run --schedule gpu --tasks "$tasks" --rows "$rows"
status=$?
[ $status -eq 124 ] && echo "gpu_glue: stopped by the ${budget} s budget; run again to continue"
if [ -n "${OUT:-}" ] && [ -d out/results_gpu ]; then
  (cd out && find results_gpu -maxdepth 2 -type f \( -name '*.json' -o -name '*.log' \) -exec cp --parents {} "$OUT/" \;)
fi
exit $status

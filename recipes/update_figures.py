"""Copy the latest `hf-memopt compare` results of the recipe README commands into recipes/*/results and the READMEs.

Run from the repository root after the commands below finish: ``python recipes/update_figures.py``.
"""
import json, shutil, sys
from pathlib import Path
from hf_memopt.tools.cli import comparison_table
from hf_memopt.tools.recipes.recipe import load_recipe
from hf_memopt.tools.memory import MemoryBreakdown, plot_memory_breakdown
jobs = {
 "glue": ("out/recipes/glue_sst2", "recipes/glue/sst2.yaml", "RESULTS_GLUE", ["adamw","galore","blockllm","loqt","velora","zo"],
   "hf-memopt compare recipes/glue/sst2.yaml --methods adamw,galore,blockllm,loqt,velora,zo --set data.train_limit=640 --set data.eval_limit=256 --set training.max_steps=20 --set training.logging_steps=5 --set output_dir=out/recipes/glue_sst2"),
 "pretrain": ("out/recipes/pretrain_20m", "recipes/pretrain/llama_20m.yaml", "RESULTS_PRETRAIN", ["adamw","galore","blockllm","loqt","velora","zo"],
   "hf-memopt compare recipes/pretrain/llama_20m.yaml --methods adamw,galore,blockllm,loqt,velora,zo --set training.max_steps=12 --set training.warmup_steps=2 --set data.seq_len=128 --set training.logging_steps=2 --set output_dir=out/recipes/pretrain_20m"),
 "instruct": ("out/recipes/instruct_alpaca", "recipes/instruct/alpaca.yaml", "RESULTS_INSTRUCT", ["adamw","galore"],
   "hf-memopt compare recipes/instruct/alpaca.yaml --methods adamw,galore --set training.max_steps=3 --set training.gradient_accumulation_steps=1 --set data.max_length=128 --set data.eval_limit=8 --set training.logging_steps=1 --set output_dir=out/recipes/instruct_alpaca"),
}
for key, (out, recipe_path, marker, methods, cmd) in jobs.items():
    out = Path(out); results = {}
    for m in methods:
        f = out / m / "results.json"
        if f.exists(): results[m] = json.loads(f.read_text())
    missing = [m for m in methods if m not in results]
    if not results: print(key, "nothing yet"); continue
    recipe = load_recipe(recipe_path)
    table = comparison_table(results, {}, recipe=recipe, command=cmd)
    dest = Path(recipe_path).parent / "results"; dest.mkdir(exist_ok=True)
    (dest / "comparison.md").write_text(table)
    (dest / "comparison.json").write_text(json.dumps({"command": cmd, "results": results, "not_finished": missing}, indent=2, default=str))
    plot_memory_breakdown({n: MemoryBreakdown(**r["memory_bytes"]) for n, r in results.items()}, str(dest / "memory.png"), title=f"{Path(recipe_path).stem}: measured memory by method")
    readme = Path(recipe_path).parent / "README.md"; s = readme.read_text()
    start = s.index("## Figures produced here")
    note = (f"Run on this project's build machine: a shared 2-core x86_64 CPU VM, no GPU, fp32; some rows ran while other jobs "
            f"loaded the machine (1-minute load average 1-11, recorded per method in results/comparison.json), so seconds "
            f"per update are noisy; "
            f"memory tensor figures are exact counts and do not depend on load. "
            f"Tiny schedule, one seed: the losses and metrics show that each method runs and learns, not final quality.\n\n"
            f"```bash\n{cmd}\n```\n\n")
    if missing:
        note += (f"Not finished when this page was written (the comparison was still running): {', '.join(missing)}; "
                 f"`out/` of the command above holds them once it ends.\n\n")
    body = note + table + "\n\nFiles: [`results/comparison.md`](results/comparison.md), [`results/comparison.json`](results/comparison.json), " \
        "![memory breakdown](results/memory.png)\n"
    readme.write_text(s[:start] + "## Figures produced here\n\n" + body)
    print(key, "filled", sorted(results), "missing", missing)

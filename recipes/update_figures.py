"""Copy the latest `hf-memopt compare` results of the recipe README commands into recipes/*/results and the READMEs.

Run from the repository root after the commands below finish: ``python recipes/update_figures.py``.
"""

import json
from pathlib import Path

from hf_memopt.tools.cli import comparison_table
from hf_memopt.tools.memory import MemoryBreakdown, plot_memory_breakdown
from hf_memopt.tools.recipes.recipe import load_recipe

# recipe -> (the comparison's output folder, its methods, the command that produced it)
COMPARISONS = {
    "recipes/glue/sst2.yaml": (
        "out/recipes/glue_sst2",
        ["adamw", "galore", "blockllm", "loqt", "velora", "zo"],
        "hf-memopt compare recipes/glue/sst2.yaml --methods adamw,galore,blockllm,loqt,velora,zo "
        "--set data.train_limit=640 --set data.eval_limit=256 --set training.max_steps=20 "
        "--set training.logging_steps=5 --set output_dir=out/recipes/glue_sst2",
    ),
    "recipes/pretrain/llama_20m.yaml": (
        "out/recipes/pretrain_20m",
        ["adamw", "galore", "blockllm", "loqt", "velora", "zo"],
        "hf-memopt compare recipes/pretrain/llama_20m.yaml --methods adamw,galore,blockllm,loqt,velora,zo "
        "--set training.max_steps=12 --set training.warmup_steps=2 --set data.seq_len=128 "
        "--set training.logging_steps=2 --set output_dir=out/recipes/pretrain_20m",
    ),
    "recipes/instruct/alpaca.yaml": (
        "out/recipes/instruct_alpaca",
        ["adamw", "galore"],
        "hf-memopt compare recipes/instruct/alpaca.yaml --methods adamw,galore --set training.max_steps=3 "
        "--set training.gradient_accumulation_steps=1 --set data.max_length=128 --set data.eval_limit=8 "
        "--set training.logging_steps=1 --set output_dir=out/recipes/instruct_alpaca",
    ),
}

MACHINE_NOTE = (
    "Run on this project's build machine: a shared 2-core x86_64 CPU VM, no GPU, fp32; some rows ran while other jobs "
    "loaded the machine (1-minute load average 1-11, recorded per method in results/comparison.json), so seconds "
    "per update are noisy; memory tensor figures are exact counts and do not depend on load. "
    "Tiny schedule, one seed: the losses and metrics show that each method runs and learns, not final quality."
)


def update(recipe_path: str, out: str, methods: list[str], command: str) -> None:
    """Write results/comparison.{md,json} and memory.png beside the recipe and its README's figures section."""
    results = {}
    for method in methods:
        path = Path(out) / method / "results.json"
        if path.exists():
            results[method] = json.loads(path.read_text())
    missing = [m for m in methods if m not in results]
    if not results:
        print(recipe_path, "nothing yet")
        return
    table = comparison_table(results, {}, recipe=load_recipe(recipe_path), command=command)
    dest = Path(recipe_path).parent / "results"
    dest.mkdir(exist_ok=True)
    (dest / "comparison.md").write_text(table)
    record = {"command": command, "results": results, "not_finished": missing}
    (dest / "comparison.json").write_text(json.dumps(record, indent=2, default=str))
    breakdowns = {name: MemoryBreakdown(**r["memory_bytes"]) for name, r in results.items()}
    plot_memory_breakdown(breakdowns, str(dest / "memory.png"),
                          title=f"{Path(recipe_path).stem}: measured memory by method")  # fmt: skip

    note = f"{MACHINE_NOTE}\n\n```bash\n{command}\n```\n\n"
    if missing:
        note += (f"Not finished when this page was written (the comparison was still running): {', '.join(missing)}; "
                 f"`out/` of the command above holds them once it ends.\n\n")  # fmt: skip
    files = ("Files: [`results/comparison.md`](results/comparison.md), "
             "[`results/comparison.json`](results/comparison.json), ![memory breakdown](results/memory.png)\n")  # fmt: skip
    readme = Path(recipe_path).parent / "README.md"
    text = readme.read_text()
    start = text.index("## Figures produced here")
    readme.write_text(text[:start] + "## Figures produced here\n\n" + note + table + "\n\n" + files)
    print(recipe_path, "filled", sorted(results), "missing", missing)


if __name__ == "__main__":
    for recipe_path, (out, methods, command) in COMPARISONS.items():
        update(recipe_path, out, methods, command)

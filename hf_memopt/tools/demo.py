"""The README demo: GaLore fine-tuning of the offline MiniLM on bundled SST-2, against AdamW, in a few minutes.

Run: ``python -m hf_memopt.tools.demo`` (``bash scripts/demo.sh`` sets up the environment first).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from hf_memopt.galore import GaLoreConfig
from hf_memopt.tools.memory import MB, MemoryBreakdown, format_breakdown_table
from hf_memopt.tools.recipes.glue import run_glue

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=872)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--output-dir", default="out/demo")
    args = parser.parse_args(argv)

    common = dict(
        train_limit=args.train_examples, eval_limit=args.eval_examples, max_length=args.max_length,
        epochs=1.0, batch_size=32, learning_rate=1e-4, print_table=False,
    )
    galore = GaLoreConfig(rank=32, update_proj_gap=50, scale=1.0, target_modules=BERT_TARGETS + ["word_embeddings"],
                          optimizer="adamw_8bit", layerwise=True)
    plan = {"AdamW": None, "GaLore 8-bit layer-wise (rank 32)": galore}
    summary = {}
    for i, (name, method) in enumerate(plan.items()):
        # one fresh process per run, so each peak RSS is that run's own
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            summary[name] = pool.submit(_run, method, f"{args.output_dir}/run{i}", common).result()
    memory = {name: MemoryBreakdown(**s["memory_bytes"]) for name, s in summary.items()}
    print("\nMemory breakdown, MiniLM on SST-2 (MB):")
    print(format_breakdown_table(memory))
    base = memory["AdamW"]
    print("\n| run | SST-2 dev accuracy | optimizer state + gradients vs AdamW | s / step |")
    print("|---|---:|---:|---:|")
    for name, s in summary.items():
        m = memory[name]
        held = m.optimizer_state + m.gradients
        ratio = held / max(1, base.optimizer_state + base.gradients)
        print(f"| {name} | {s['metrics']['accuracy']:.3f} | {ratio:.2f}x ({held / MB:.1f} MB) | "
              f"{s['median_step_seconds']:.2f} |")
    with open(f"{args.output_dir}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _run(method, output_dir: str, common: dict) -> dict:
    return run_glue("sst2", method, output_dir=output_dir, **common).summary()


if __name__ == "__main__":
    main()

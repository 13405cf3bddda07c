"""MeZO / ZO2 evidence: peak memory of ZO training vs inference vs AdamW, and GLUE quality on MiniLM.

Memory: every (model, mode) runs in a fresh interpreter (clean peak RSS, or CUDA peak allocation on a GPU) through the
stock Trainer on random tokens: ``inference`` is ``Trainer.evaluate`` (no_grad loss, prediction_loss_only);
``zo`` is MeZO (offload="none"); ``zo2`` and ``zo2_bf16`` offload the blocks (fp32 / bf16 storage; on a CPU-only
machine "offload" means the blocks stay in host memory, so only the bf16 storage changes the footprint);
``adamw`` is the stock Trainer's AdamW fine-tuning.

Quality: MiniLM (BERT, 22.7M) on SST-2 and RTE dev, accuracy at the start (random head, "zero-shot"), after ZO
steps, and after AdamW steps, all from the same seed and head initialisation.

    python benchmarks/bench_zo.py --part memory
    python benchmarks/bench_zo.py --part quality --zo-steps 600 --adamw-steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import RESULTS, load_average, machine, run_isolated  # noqa: E402

MODES = ("inference", "zo", "zo2", "zo2_bf16", "adamw")


def _memory_one(model_name: str, mode: str, batch: int, seq: int, steps: int) -> dict[str, object]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments

    from hf_memopt import attach
    from hf_memopt.tools.memory import peak_process_bytes, reset_peak_process
    from hf_memopt.tools.recipes.models import minilm_path, smollm2_path
    from hf_memopt.zo import ZOConfig

    torch.manual_seed(0)
    if model_name == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        vocab = model.config.vocab_size
        labels = lambda ids: torch.tensor(0)  # noqa: E731
    else:
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        vocab = model.config.vocab_size
        labels = lambda ids: ids  # noqa: E731
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (seq,), generator=g) for _ in range(batch * steps)]
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": labels(r)} for r in rows]
    args = TrainingArguments(
        output_dir=f"/tmp/bench_zo_{os.getpid()}", per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        learning_rate=1e-5, max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, dataloader_num_workers=0, disable_tqdm=True, prediction_loss_only=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    if mode.startswith("zo"):
        offload = "none" if mode == "zo" else "cpu"
        attach(trainer, ZOConfig(eps=1e-3, offload=offload, offload_dtype="bfloat16" if mode == "zo2_bf16" else None))
    device = args.device
    reset_peak_process(device)
    start_rss = peak_process_bytes(device)[0]
    t0 = time.perf_counter()
    if mode == "inference":
        trainer.evaluate()
    else:
        trainer.train()
    seconds = time.perf_counter() - t0
    peak, source = peak_process_bytes(device)
    return {
        "model": model_name, "mode": mode, "batch": batch, "seq": seq, "steps": steps,
        "peak_bytes": peak, "peak_source": source, "start_bytes": start_rss, "seconds": seconds,
        "params": sum(p.numel() for p in model.parameters()),
    }


def memory(args: argparse.Namespace) -> None:
    # peak memory does not depend on outside load: do not wait for idle cores (the load is still recorded)
    common.wait_for_idle = lambda *a, **k: load_average()
    rows = []
    shapes = {"minilm": (args.batch, args.seq), "smollm2": (args.smol_batch, args.smol_seq)}
    for model_name in args.models:
        batch, seq = shapes[model_name]
        for mode in MODES:
            extra = ["--model", model_name, "--mode", mode, "--batch", str(batch), "--seq", str(seq),
                     "--steps", str(args.steps)]
            row = run_isolated(__file__, f"{model_name}-{mode}", extra)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for row in rows:
        ref = next(r for r in rows if r["model"] == row["model"] and r["mode"] == "inference")
        adamw = next(r for r in rows if r["model"] == row["model"] and r["mode"] == "adamw")
        row["vs_inference"] = row["peak_bytes"] / ref["peak_bytes"]
        row["vs_adamw"] = row["peak_bytes"] / adamw["peak_bytes"]
    out = {"machine": machine(), "command": " ".join(sys.argv), "seed": 0, "dtype": "float32", "rows": rows}
    (RESULTS / "zo_memory.json").write_text(json.dumps(out, indent=2))
    print("| model | mode | batch x seq | peak MB | vs inference | vs AdamW | seconds |")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['batch']}x{r['seq']} | {r['peak_bytes'] / 2**20:.0f} | "
              f"{r['vs_inference']:.3f} | {r['vs_adamw']:.3f} | {r['seconds']:.1f} |")
    _plot(rows)


def _plot(rows: list[dict[str, object]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5))
    for ax, name in zip(axes if len(models) > 1 else [axes], models):
        sub = [r for r in rows if r["model"] == name]
        ax.bar([r["mode"] for r in sub], [r["peak_bytes"] / 2**20 for r in sub], color="tab:blue")
        ax.set_title(f"{name}: peak RSS (MB)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(RESULTS / "zo_memory.png", dpi=120)


def _zero_shot(task: str, eval_limit: int | None, max_length: int, seed: int) -> float:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_memopt.tools.recipes.glue import tokenized_glue
    from hf_memopt.tools.recipes.metrics import glue_compute_metrics
    from hf_memopt.tools.recipes.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)  # as run_glue: the same random head
    net = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    dev = tokenized_glue(task, tokenizer, "dev", eval_limit, max_length)
    args = TrainingArguments(output_dir="/tmp/bench_zo_eval", per_device_eval_batch_size=64, report_to=[],
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=net, args=args, eval_dataset=dev, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=glue_compute_metrics(task))
    return trainer.evaluate()["eval_accuracy"]


def quality(args: argparse.Namespace) -> None:
    from hf_memopt.tools.recipes.glue import run_glue
    from hf_memopt.zo import ZOConfig

    rows = []
    for task in args.tasks:
        t0 = time.perf_counter()
        start = _zero_shot(task, args.eval_limit, args.max_length, 0)
        rows.append({"task": task, "method": "start (random head)", "steps": 0, "accuracy": start,
                     "seconds": time.perf_counter() - t0, "load": load_average()})
        print(json.dumps(rows[-1]), flush=True)
        for name, method, steps, lr in (
            ("zo", ZOConfig(eps=1e-3), args.zo_steps, args.zo_lr),
            ("adamw", None, args.adamw_steps, args.adamw_lr),
        ):
            t0 = time.perf_counter()
            result = run_glue(task, method, output_dir=f"/tmp/bench_zo_{task}_{name}", train_limit=args.train_limit,
                              eval_limit=args.eval_limit, max_length=args.max_length, max_steps=steps,
                              learning_rate=lr, batch_size=args.batch, seed=0, print_table=False,
                              training_overrides={"use_cpu": True, "disable_tqdm": True,
                                                  "lr_scheduler_type": "constant"})
            rows.append({"task": task, "method": name, "steps": steps, "lr": lr,
                         "accuracy": result.metrics.get("accuracy"), "seconds": time.perf_counter() - t0,
                         "median_step_seconds": result.median_step_seconds, "first_loss": result.losses[0],
                         "last_loss": result.losses[-1], "load": load_average()})
            print(json.dumps(rows[-1]), flush=True)
        _save_quality(args, [r for r in rows if r["task"] == task])


def _save_quality(args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    """Write one task's rows into zo_quality.json (tasks run in separate invocations keep their own settings)."""
    path = RESULTS / "zo_quality.json"
    out = json.loads(path.read_text()) if path.exists() else {"machine": machine(), "seed": 0, "dtype": "float32"}
    out.setdefault("tasks", {})[rows[0]["task"]] = {
        "command": "python " + " ".join(sys.argv), "batch": args.batch, "max_length": args.max_length,
        "train_limit": args.train_limit, "eval_limit": args.eval_limit, "rows": rows,
    }
    path.write_text(json.dumps(out, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("memory", "quality"), default="memory")
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--smol-batch", type=int, default=4)
    p.add_argument("--smol-seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=["sst2", "rte"])
    p.add_argument("--zo-steps", type=int, default=600)
    p.add_argument("--zo-lr", type=float, default=1e-5)
    p.add_argument("--adamw-steps", type=int, default=150)
    p.add_argument("--adamw-lr", type=float, default=1e-4)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--max-length", type=int, default=64)
    # one isolated run
    p.add_argument("--one")
    p.add_argument("--one-output")
    p.add_argument("--model")
    p.add_argument("--mode")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.one:
        row = _memory_one(args.model, args.mode, args.batch, args.seq, args.steps)
        Path(args.one_output).write_text(json.dumps(row))
        return
    RESULTS.mkdir(exist_ok=True)
    memory(args) if args.part == "memory" else quality(args)


if __name__ == "__main__":
    main()

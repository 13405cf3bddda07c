"""Issue 16's loss check: the composed minimum-memory recipe against AdamW after the same updates.

Reads the ``results.json`` of the two runs of docs/min_memory.md ("Loss after 300 updates") and writes
``benchmarks/results/min_memory_loss.json`` and ``docs/figures/min_memory_loss.png`` (training loss of both runs by
update, held-out loss marked at the end). The target: held-out loss of the composed recipe within 3% of AdamW's,
after equal updates, at least 300. The two runs::

    hf-memopt train recipes/instruct/smollm2_min_memory.yaml            # composed (LoQT NF4 layer-wise + ...)
    hf-memopt train recipes/instruct/smollm2_min_memory.yaml --method adamw --set 'memory={}' \\
        --set training.learning_rate=2.0e-5 --set training.max_grad_norm=1.0 --set training.gradient_checkpointing=false
    python benchmarks/min_memory_loss.py

With ``--composed-start`` / ``--adamw-start`` (run folders of the same commands with ``--set training.max_steps=1
--set training.learning_rate=0.0 --set output_dir=...``: one update that changes nothing, then the held-out loss) the
held-out loss each run started from is recorded and plotted at update 0: for the composed recipe that is the
quantized model's, so the gap it starts with is told apart from what training adds to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TENSOR_CATEGORIES = ("parameters", "buffers", "gradients", "optimizer_state", "activations")
TARGET_PERCENT = 3.0
MIN_UPDATES = 300


def summarise(
    runs: dict[str, dict[str, Any]],
    *,
    reference: str = "adamw",
    min_updates: int = MIN_UPDATES,
    starts: dict[str, float] | None = None,
) -> dict:
    """Held-out loss, its gap to ``reference`` in per cent, tensor bytes and time per update of each run.

    Refuses runs that did not finish (no held-out loss) or that stopped at different update counts or below
    ``min_updates``: the target is a comparison after equal updates. ``starts``: held-out loss before training, by
    run name (optional).
    """
    starts = starts or {}
    if reference not in runs:
        raise ValueError(f"runs must include the reference run {reference!r}; got {sorted(runs)}")
    for name, r in runs.items():
        if "loss" not in r.get("metrics", {}):
            raise ValueError(f"run {name!r} has no held-out loss in its results.json (did it finish?)")
    steps = {name: r["steps"] for name, r in runs.items()}
    if len(set(steps.values())) != 1 or min(steps.values()) < min_updates:
        raise ValueError(f"the runs must stop at the same number of updates, at least {min_updates}; got {steps}")
    base = runs[reference]["metrics"]["loss"]
    rows = {}
    for name, r in runs.items():
        held_out = r["metrics"]["loss"]
        memory = r["memory_bytes"]
        rows[name] = {
            "held_out_loss": held_out,
            "gap_percent": 100.0 * (held_out - base) / base,
            "held_out_loss_before_training": starts.get(name),
            "tensor_bytes": {k: memory.get(k, 0) for k in TENSOR_CATEGORIES},
            "tensor_total_bytes": sum(memory.get(k, 0) for k in TENSOR_CATEGORIES),
            "peak_process_bytes": memory.get("peak_process"),
            "median_step_seconds": r.get("median_step_seconds"),
            "median_step_cpu_seconds": r.get("median_step_cpu_seconds"),
            "final_train_loss": r.get("final_loss"),
            "resumed_from": r.get("resumed_from"),
            "command": r.get("command"),
        }
    gaps = {name: row["gap_percent"] for name, row in rows.items() if name != reference}
    return {
        "updates": steps[reference],
        "reference": reference,
        "target_percent": TARGET_PERCENT,
        "meets_target": {name: gap <= TARGET_PERCENT for name, gap in gaps.items()},
        "rows": rows,
        "curves": {name: {"steps": r["loss_steps"], "losses": r["losses"]} for name, r in runs.items()},
    }


def markdown(summary: dict) -> str:
    """The table docs/min_memory.md quotes."""
    lines = [
        "| run | held-out loss | gap to AdamW | tensors MiB (peak, summed) | peak RSS MiB | s / update | CPU s / update |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["rows"].items():
        gap = "-" if name == summary["reference"] else f"{row['gap_percent']:+.2f}%"
        rss = row["peak_process_bytes"]
        lines.append(
            f"| {name} | {row['held_out_loss']:.4f} | {gap} | {row['tensor_total_bytes'] / 2**20:.1f} | "
            f"{rss / 2**20:.0f} | {row['median_step_seconds']:.1f} | {row['median_step_cpu_seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in summary["curves"].items():
        (line,) = ax.plot(curve["steps"], curve["losses"], label=f"{name} (training loss)", linewidth=1)
        row = summary["rows"][name]
        steps, losses = [summary["updates"]], [row["held_out_loss"]]
        label = f"{name} held-out: {row['held_out_loss']:.3f}"
        if row.get("held_out_loss_before_training") is not None:
            steps, losses = [0, *steps], [row["held_out_loss_before_training"], *losses]
            label = f"{name} held-out: {losses[0]:.3f} before, {losses[1]:.3f} after"
        ax.scatter(steps, losses, color=line.get_color(), zorder=3, label=label)
    ax.set_xlabel("update (4 sequences of up to 512 tokens)")
    ax.set_ylabel("loss")
    ax.set_title("SmolLM2-135M on the bundled Alpaca data: composed recipe vs AdamW")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    base = "out/instruct/smollm2_min_memory"
    parser.add_argument("--composed", default=f"{base}/loqt", help="run folder of the composed recipe")
    parser.add_argument("--adamw", default=f"{base}/adamw", help="run folder of the AdamW run")
    parser.add_argument("--composed-start", help="run folder of the composed command at lr 0 for one update")
    parser.add_argument("--adamw-start", help="run folder of the AdamW command at lr 0 for one update")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/min_memory_loss.json"))
    parser.add_argument("--figure", default=str(ROOT / "docs/figures/min_memory_loss.png"))
    args = parser.parse_args(argv)
    runs = {}
    for name, folder in (("composed", args.composed), ("adamw", args.adamw)):
        path = Path(folder) / "results.json"
        if not path.exists():
            raise SystemExit(f"--{name}: {path} does not exist; run the command in this script's docstring first")
        runs[name] = json.loads(path.read_text())
    starts = {}
    for name, folder in (("composed", args.composed_start), ("adamw", args.adamw_start)):
        if folder is not None:
            path = Path(folder) / "results.json"
            if not path.exists():
                raise SystemExit(f"--{name}-start: {path} does not exist")
            starts[name] = json.loads(path.read_text())["metrics"]["loss"]
    try:
        summary = summarise(runs, starts=starts)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2))
    plot(summary, Path(args.figure))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()

"""Training in less tensor memory than fp16 inference: the composed recipe against what users run today.

One command (about 10 minutes on 2 busy CPU cores)::

    python benchmarks/bench_min_memory.py                     # all shapes
    python benchmarks/bench_min_memory.py --shapes llama-60m   # one

For each shape (SmolLM2-135M, batch 4 x 128; LLaMA 60M and 130M of recipes/pretrain, batch 4 x 256; random tokens,
seed 0) it measures the peak tensor bytes, by category, of

* ``fp16 inference``: the weights in fp16 plus the peak of the bytes allocated during one no-grad forward of the same
  batch (CPU allocations recorded by ``torch.profiler(profile_memory=True)``; reported as ``activations``);
* ``adamw fp32``: the Trainer's AdamW on the fp32 model, the model's own loss;
* ``careful user``: bf16 weights, bitsandbytes ``AdamW8bit`` (runs on CPU in bitsandbytes 0.50), gradient
  checkpointing, the model's own loss;
* ``composed``: ``recipes/instruct/smollm2_min_memory.yaml``'s setting: LoQT NF4 (rank 64, layer-wise updates,
  ``init_weight="quantized"``), frozen token embeddings / head, bitsandbytes ``AdamW8bit``, gradient checkpointing,
  the chunked LM loss, SwiGLU MLPs that recompute SiLU in backward (``memory.recompute_swiglu``);
* ``composed int8``: the same with LoQT's weights in bitsandbytes' block-wise int8 (``--set method.quant=int8``), which
  starts training at the fp32 model's loss where NF4 starts 13% above it (docs/min_memory.md);
* ``galore path``: the recipe's switch for users who cannot quantize: GaLore 8-bit layer-wise (rank 64) + VeLoRA on
  its automatic targets (down_proj) + the same frozen embeddings, checkpointing, chunked loss and SwiGLU recomputation.

Training figures are hf_memopt's ``MemoryReportCallback`` categories (parameters, buffers, gradients, optimizer
state, saved activations), the peak of each over the whole run (``whole_run``: update 0, which initialises LoQT,
included); the peaks of update 0 alone (``first_update``) and of updates 1-2 (``steady``) are written beside it.
The categories leave out transients and add peaks that need not coincide, so every run also records
``allocator_peak_bytes``: the CPU allocator's one peak over the run, transients included (``AllocatorPeak``), which
is what ``torch.cuda.max_memory_allocated`` reads on a GPU and what fp16 inference's figure already is. Writes
``benchmarks/results/min_memory.json`` and ``docs/figures/min_memory.png``. Bytes are exact; times are not on a
loaded machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import allocator_peak_above_start  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_memopt import GaLoreConfig, LoQTConfig, MemoryReportCallback, VeLoRAConfig, attach  # noqa: E402
from hf_memopt.shared.chunked_loss import use_chunked_lm_loss  # noqa: E402
from hf_memopt.shared.frozen import freeze_modules  # noqa: E402
from hf_memopt.shared.swiglu import use_recomputed_swiglu  # noqa: E402
from hf_memopt.tools.memory import MB, MemoryBreakdown, plot_memory_breakdown  # noqa: E402
from hf_memopt.tools.recipes.run import environment  # noqa: E402

SHAPES = {  # name: (batch, sequence length)
    "smollm2": (4, 128),
    "llama-60m": (4, 256),
    "llama-130m": (4, 256),
}
SETTINGS = ("fp16 inference", "adamw fp32", "careful user", "composed", "composed int8", "galore path")
STEPS = 3  # update 0 (LoQT's initialisation), then the steady updates 1 and 2 are measured
LOSS_CHUNK = 64  # tokens: one chunk's logits (64 x 49152 x 4 bytes = 12 MiB at SmolLM2) stay far below inference's
RANK = 64
LOQT_QUANT = {"composed": "nf4", "composed int8": "int8"}  # the LoQT settings and their weight format
# the settings with frozen bf16 embeddings, checkpointing, chunked loss and SwiGLU MLPs recomputing SiLU
CHUNKED_LOSS = (*LOQT_QUANT, "galore path")


def make_model(shape: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from hf_memopt.tools.recipes.models import llama_config, smollm2_path

    torch.manual_seed(0)
    if shape == "smollm2":
        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    return LlamaForCausalLM(llama_config(shape.removeprefix("llama-"), vocab_size=32000))


def random_rows(vocab: int, batch: int, seq: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def inference_breakdown(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> MemoryBreakdown:
    """fp16 weights + the CPU allocator's peak above its start during one no-grad forward: on CUDA, what
    ``torch.cuda.max_memory_allocated`` reads for fp16 inference."""
    from hf_memopt.tools.memory import buffer_bytes, parameter_bytes

    model = model.to(torch.float16).eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        model(input_ids=ids[:, :8], use_cache=False)  # warm-up: lazily built tables (rotary) are not activations
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        model(input_ids=ids, use_cache=False)
    peak = allocator_peak_above_start(prof)
    return MemoryBreakdown(parameters=parameter_bytes(model), buffers=buffer_bytes(model), activations=peak)


class AllocatorPeak(TrainerCallback):
    """The CPU counterpart of ``torch.cuda.max_memory_allocated`` over a whole training run, update 0 (LoQT's
    initialisation) included: the weights and buffers the model holds when training begins plus the CPU
    allocator's peak above what was allocated then (``benchmarks/common.allocator_peak_above_start``). Unlike the
    memory report's categories it counts the transients no category holds (a loss chunk's logits and softmax, a
    dequantized weight, the recomputed layer's intermediates), and it is one simultaneous peak, not a sum of peaks:
    the figure fp16 inference's is compared with."""

    def __init__(self):
        self.peak: int | None = None
        self._profiler = None
        self._held_at_begin = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from hf_memopt.tools.memory import buffer_bytes, parameter_bytes

        self._held_at_begin = parameter_bytes(model) + buffer_bytes(model)
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()

    def on_train_end(self, args, state, control, **kwargs):
        self._profiler.__exit__(None, None, None)
        self.peak = self._held_at_begin + allocator_peak_above_start(self._profiler)
        self._profiler = None


class SteadyMemoryReport(MemoryReportCallback):
    """The memory report restarted at update ``start`` (its peaks before it are kept in ``first_updates``)."""

    def __init__(self, start: int):
        super().__init__(print_table=False)
        self.start = start
        self.first_updates = MemoryBreakdown()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            self._record()
            self.first_updates = self.breakdown
            self.breakdown = MemoryBreakdown()
            if self._activations is not None:
                self._activations.peak = 0
            if self._gradients is not None:
                self._gradients.peak = 0


def train_breakdown(shape: str, setting: str, rows, out_dir: Path, loss_chunk: int = LOSS_CHUNK) -> dict:
    import bitsandbytes as bnb
    from transformers import Trainer, TrainingArguments

    # NOTE: bitsandbytes keeps per-parameter overrides (the Trainer's 32-bit states for nn.Embedding) in a process-wide
    # manager keyed by (group, index) positions: a second Trainer in this process would inherit the first's. Reset it.
    bnb.optim.GlobalOptimManager.get_instance().initialize()
    model = make_model(shape)
    batch = len(rows) // STEPS
    args = dict(
        output_dir=str(out_dir), per_device_train_batch_size=batch, max_steps=STEPS, learning_rate=1e-4,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, lr_scheduler_type="constant",
    )  # fmt: skip
    configs = []
    if setting == "careful user":
        model = model.to(torch.bfloat16)
        args.update(optim="adamw_bnb_8bit", gradient_checkpointing=True)
    elif setting in CHUNKED_LOSS:
        freeze_modules(
            model, ["embed_tokens"] + ([] if model.config.tie_word_embeddings else ["lm_head"]), dtype=torch.bfloat16
        )
        use_chunked_lm_loss(model, loss_chunk)
        use_recomputed_swiglu(model)
        args.update(gradient_checkpointing=True, max_grad_norm=0.0)
        if setting in LOQT_QUANT:
            args.update(optim="adamw_bnb_8bit")
            quant = LOQT_QUANT[setting]
            configs = [LoQTConfig(rank=RANK, quant=quant, merge_every=50, layerwise=True, init_weight="quantized")]
        else:
            configs = [
                VeLoRAConfig(target_modules="auto", num_groups=32),
                GaLoreConfig(rank=RANK, optimizer="adamw_8bit", layerwise=True, target_modules="all-linear"),
            ]
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=rows)
    for config in configs:
        attach(trainer, config)
    report = SteadyMemoryReport(start=1)
    trainer.add_callback(report)
    allocator = AllocatorPeak()
    trainer.add_callback(allocator)
    started = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - started) / STEPS
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    whole_run = MemoryBreakdown(**report.first_updates.to_dict())
    whole_run.merge_peak(report.breakdown)
    return {
        "whole_run": whole_run.to_dict(),
        "steady": report.breakdown.to_dict(),
        "allocator_peak_bytes": allocator.peak,  # whole run, transients included (AllocatorPeak)
        "loss_chunk_size": loss_chunk if setting in CHUNKED_LOSS else None,
        "first_update": report.first_updates.to_dict(),
        "losses": losses,
        "seconds_per_update": seconds,
        "configs": [repr(c) for c in configs],
        "training_arguments": {k: v for k, v in args.items() if k not in ("output_dir",)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK,
                        help="tokens per chunk of the chunked LM loss (composed, galore path)")  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "min_memory.json"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "min_memory.png"))
    options = parser.parse_args(argv)
    import tempfile

    results = {"environment": environment(), "command": " ".join(sys.argv), "shapes": {}}
    out = Path(options.out)
    if out.exists():  # settings measured before (other shapes, other settings) are kept
        results["shapes"] = json.loads(out.read_text()).get("shapes", {})
    for shape in options.shapes.split(","):
        batch, seq = SHAPES[shape]
        entry = results["shapes"].get(shape) or {"batch": batch, "seq_len": seq, "settings": {}}
        if (entry["batch"], entry["seq_len"]) != (batch, seq):  # measured at another shape: start over
            entry = {"batch": batch, "seq_len": seq, "settings": {}}
        for setting in options.settings.split(","):
            print(f"[{shape}] {setting} ...", flush=True)
            if setting == "fp16 inference":
                model = make_model(shape)
                rows = random_rows(model.config.vocab_size, batch, seq, batch)
                b = inference_breakdown(model, {"input_ids": torch.stack([r["input_ids"] for r in rows])})
                entry["settings"][setting] = {"whole_run": b.to_dict(), "steady": b.to_dict(),
                                              "allocator_peak_bytes": b.tensors_total}  # fmt: skip
            else:
                vocab = 49152 if shape == "smollm2" else 32000
                rows = random_rows(vocab, batch, seq, batch * STEPS)
                with tempfile.TemporaryDirectory() as tmp:
                    entry["settings"][setting] = train_breakdown(shape, setting, rows, Path(tmp), options.loss_chunk)
            total = MemoryBreakdown(**entry["settings"][setting]["whole_run"]).tensors_total
            entry["settings"][setting]["tensors_total_bytes"] = total
            allocator = entry["settings"][setting].get("allocator_peak_bytes")
            print(
                f"[{shape}] {setting}: tensors {total / MB:.1f} MiB, allocator peak {allocator / MB:.1f} MiB",
                flush=True,
            )
        entry["settings"] = {k: entry["settings"][k] for k in sorted(entry["settings"], key=_setting_order)}
        results["shapes"][shape] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    figure = Path(options.figure)
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_all(results["shapes"], figure)
    print(format_table(results["shapes"]))
    return 0


def _setting_order(setting: str) -> int:
    """Position in SETTINGS (the table's and the figure's row order); settings no longer measured go last."""
    return SETTINGS.index(setting) if setting in SETTINGS else len(SETTINGS)


def format_table(shapes: dict) -> str:
    lines = [
        "| shape (batch x length) | setting | parameters | buffers | gradients | optimizer state | activations | total |"
        " vs fp16 inference | allocator peak | vs fp16 inference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, entry in shapes.items():
        base = entry["settings"].get("fp16 inference", {}).get("tensors_total_bytes")
        for setting, r in entry["settings"].items():
            b = MemoryBreakdown(**r["whole_run"])
            cells = [getattr(b, p) / MB for p in MemoryBreakdown.TENSOR_PARTS] + [b.tensors_total / MB]
            ratio = f"x{b.tensors_total / base:.2f}" if base else ""
            peak = r.get("allocator_peak_bytes")
            peak_cells = f"{peak / MB:.1f} | x{peak / base:.2f}" if peak is not None and base else " | "
            lines.append(
                f"| {shape} ({entry['batch']} x {entry['seq_len']}) | {setting} | "
                + " | ".join(f"{c:.1f}" for c in cells)
                + f" | {ratio} | {peak_cells} |"
            )
    return "\n".join(lines)


def plot_all(shapes: dict, path: Path) -> None:
    runs = {
        f"{shape}\n{setting}": MemoryBreakdown(**r["whole_run"])
        for shape, entry in shapes.items()
        for setting, r in entry["settings"].items()
    }
    plot_memory_breakdown(runs, str(path), title="Peak tensor memory (MiB): training vs fp16 inference")


if __name__ == "__main__":
    raise SystemExit(main())

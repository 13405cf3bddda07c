"""LoQT ``layerwise=True`` vs whole-model updates: peak bytes of live gradients, measured with hf_memopt.tools.memory.

    python benchmarks/bench_loqt_layerwise.py [--size 20m] [--steps 4] [--batch 2] [--seq 128]
        -> results/loqt_layerwise_memory.json

LLaMA of GaLore's shapes (``hf_memopt.tools.recipes.models.llama_config``, vocab 32000, untied head), random tokens, CPU,
float32, seed 0, LoQT NF4 rank 64 on every attention and MLP projection (official defaults otherwise: quantized P,
5 error-compensation steps), merges at updates 0 and 2, ``max_grad_norm=0``. The gradient peak is
:class:`hf_memopt.tools.memory.GradientMeter`'s (live ``.grad`` storages, sampled as each gradient arrives and before the
optimizer step); the same runs also report how many trainable parameters still hold a ``.grad`` at the step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_average, machine  # noqa: E402

from hf_memopt import attach  # noqa: E402
from hf_memopt.loqt import LoQTConfig  # noqa: E402
from hf_memopt.tools.memory import MemoryReportCallback  # noqa: E402
from hf_memopt.tools.recipes.models import llama_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 2**20


class HeldAtStep(TrainerCallback):
    """Most trainable parameters holding a ``.grad`` at any ``on_pre_optimizer_step``, and their bytes."""

    def __init__(self):
        self.count, self.bytes = 0, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        held = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        self.count = max(self.count, len(held))
        self.bytes = max(self.bytes, sum(p.grad.numel() * p.grad.element_size() for p in held))


def run(size: str, layerwise: bool, accumulation: int, steps: int, batch: int, seq: int) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size))
    ids = torch.randint(
        0, model.config.vocab_size, (steps * batch * accumulation, seq), generator=torch.Generator().manual_seed(0)
    )
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=f"/tmp/loqt_layerwise_{layerwise}", report_to=[], use_cpu=True, seed=0, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, logging_steps=1, max_steps=steps, learning_rate=1e-3,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_grad_norm=0.0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    attach(trainer, LoQTConfig(rank=64, merge_every=2, target_modules=TARGETS, layerwise=layerwise))
    memory, held = MemoryReportCallback(track_activations=False, print_table=False), HeldAtStep()
    trainer.add_callback(memory)
    trainer.add_callback(held)
    trainer.train()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "layerwise": layerwise,
        "gradient_accumulation_steps": accumulation,
        "peak_gradient_mb": memory.breakdown.gradients / MB,
        "gradients_held_at_optimizer_step": held.count,
        "gradient_mb_held_at_optimizer_step": held.bytes / MB,
        "trainable_parameter_mb": trainable / MB,
        "final_loss": trainer.state.log_history[-2]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    a = parser.parse_args()
    rows = [run(a.size, lw, acc, a.steps, a.batch, a.seq) for acc in (1, 2) for lw in (False, True)]
    out = {"machine": machine(), "load_1min": load_average(), "size": a.size, "batch": a.batch, "seq": a.seq,
           "steps": a.steps, "rows": rows}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loqt_layerwise_memory.json").write_text(json.dumps(out, indent=1))
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()

"""Pretrain a LLaMA-architecture model from a config on bundled text (or C4 streaming for users).

Text is tokenized once and cut into fixed ``seq_len`` blocks (labels = inputs), as GaLore's C4 pretraining does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hf_memopt.integration import attach
from hf_memopt.memory import MemoryBreakdown, MemoryReportCallback
from hf_memopt.recipes.data import load_text
from hf_memopt.recipes.models import llama_config, minilm_path
from hf_memopt.timing import StepTimerCallback

__all__ = ["PretrainResult", "lm_blocks", "run_pretrain"]


class LMBlocks(torch.utils.data.Dataset):
    """Fixed-length token blocks for causal-LM training."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        usable = (len(ids) // seq_len) * seq_len
        self.blocks = ids[:usable].view(-1, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def lm_blocks(tokenizer, seq_len: int, sources: tuple[str, ...] = ("wikitext2_valid", "c4_demo")) -> LMBlocks:
    """Tokenize the text sources (bundled names or file paths) into ``seq_len`` blocks."""
    ids: list[int] = []
    for source in sources:
        text = load_text(source)
        for start in range(0, len(text), 200_000):  # chunked: tokenizers are slow on one huge string
            ids.extend(tokenizer(text[start : start + 200_000], add_special_tokens=False)["input_ids"])
    return LMBlocks(torch.tensor(ids, dtype=torch.long), seq_len)


@dataclass
class PretrainResult:
    method: str
    memory: MemoryBreakdown
    median_step_seconds: float
    losses: list[float] = field(default_factory=list)
    trainer: Any = None

    def summary(self) -> dict[str, Any]:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "method": self.method,
            "memory_bytes": self.memory.to_dict(),
            "median_step_seconds": self.median_step_seconds,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "losses": self.losses,
        }


def run_pretrain(
    method: Any = None,
    *,
    size: str = "20m",
    steps: int = 100,
    seq_len: int = 256,
    batch_size: int = 4,
    learning_rate: float = 1e-3,
    warmup_steps: int = 0,
    seed: int = 0,
    output_dir: str = "out/pretrain",
    tokenizer_path: str | None = None,
    extra_methods: tuple[Any, ...] = (),
    optimizers: tuple[Any, Any] | None = None,
    training_overrides: dict[str, Any] | None = None,
    dataset: LMBlocks | None = None,
) -> PretrainResult:
    """Train a ``size`` LLaMA from scratch for ``steps`` updates with ``method`` (None = the Trainer's AdamW).

    ``optimizers`` passes a ready optimizer (peer libraries in benchmarks); logs every step.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_memopt.registry import method_name_of

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or minilm_path())
    dataset = dataset if dataset is not None else lm_blocks(tokenizer, seq_len)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, vocab_size=len(tokenizer), max_position_embeddings=seq_len))
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        max_steps=steps,
        warmup_steps=warmup_steps,
        lr_scheduler_type="constant_with_warmup" if warmup_steps else "constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **(training_overrides or {}),
    )
    memory = MemoryReportCallback(print_table=False)
    timer = StepTimerCallback()
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, callbacks=[memory, timer],
        optimizers=optimizers(model) if callable(optimizers) else (optimizers or (None, None)),
    )
    for extra in extra_methods:
        attach(trainer, extra)
    if method is not None:
        attach(trainer, method)
    trainer.train()
    names = [method_name_of(m) for m in (*extra_methods, method) if m is not None] or ["adamw"]
    return PretrainResult(
        method="+".join(names),
        memory=memory.breakdown,
        median_step_seconds=timer.median_step_seconds,
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        trainer=trainer,
    )

"""Pretrain a LLaMA-architecture model from a config on bundled text (or C4 streaming for users).

Text is tokenized once and cut into fixed ``seq_len`` blocks (labels = inputs), as GaLore's C4 pretraining does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_memopt.tools.recipes.data import load_text, stream_c4_text
from hf_memopt.tools.recipes.models import llama_config, resolve_model
from hf_memopt.tools.recipes.result import RunResult, held_out_loss, measured_run_arguments, train_and_measure

__all__ = ["SOURCE_DATASETS", "lm_blocks", "run_pretrain"]

# The Hub datasets the text sources are (copies of parts of), for the model card's ``datasets``.
SOURCE_DATASETS = {"wikitext2_valid": "Salesforce/wikitext", "wikitext2_test": "Salesforce/wikitext",
                   "wiki_demo": "wikimedia/wikipedia", "c4_demo": "allenai/c4", "c4": "allenai/c4"}


class LMBlocks(torch.utils.data.Dataset):
    """Fixed-length token blocks for causal-LM training."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        usable = (len(ids) // seq_len) * seq_len
        self.blocks = ids[:usable].view(-1, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def lm_blocks(
    tokenizer,
    seq_len: int,
    sources: tuple[str, ...] = ("wikitext2_valid", "c4_demo"),
    max_tokens: int | None = None,
) -> LMBlocks:
    """Tokenize the text sources into ``seq_len`` blocks.

    A source is a bundled name (``wikitext2_valid``, ``wikitext2_test``, ``wiki_demo``, ``c4_demo``), a text/JSONL
    file, or ``c4``: C4's train split streamed through ``datasets`` (needs the Hub) until ``max_tokens`` tokens are
    collected. ``max_tokens`` also stops the bundled sources early.
    """
    ids: list[int] = []

    def full() -> bool:
        return max_tokens is not None and len(ids) >= max_tokens

    for source in sources:
        if source == "c4":
            if max_tokens is None:
                raise ValueError("the streamed 'c4' source needs max_tokens (it is unbounded)")
            # ~4 characters per token for English text; the stream stops at twice that to be safe.
            for text in stream_c4_text(max_chars=8 * max_tokens):
                ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                if tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
                if full():
                    break
            continue
        text = load_text(source)
        # chunked: tokenizers are slow on one huge string. verbose=False: no warning that a chunk is longer than the
        # tokenizer's model_max_length; chunks are cut into seq_len blocks, never fed to a model whole
        for start in range(0, len(text), 200_000):
            ids.extend(tokenizer(text[start : start + 200_000], add_special_tokens=False, verbose=False)["input_ids"])
            if full():
                break
        if full():
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    return LMBlocks(torch.tensor(ids, dtype=torch.long), seq_len)


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
    optimizers: tuple[Any, Any] | Callable[[torch.nn.Module, Any], tuple[Any, Any]] | None = None,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    training_overrides: dict[str, Any] | None = None,
    dataset: LMBlocks | None = None,
    sources: tuple[str, ...] = ("wikitext2_valid", "c4_demo"),
    eval_blocks: int = 0,
    resume_from_checkpoint: str | None = None,
) -> RunResult:
    """Train a ``size`` LLaMA from scratch for ``steps`` updates with ``method`` (None = the Trainer's AdamW).

    ``optimizers`` passes the Trainer's ``(optimizer, scheduler)`` pair, or ``optimizers(model, args)`` builds it
    (peer libraries in benchmarks); ``prepare_model(model)`` wraps the fresh model (a LoRA baseline); logs every
    step.
    ``training_overrides`` are ``TrainingArguments`` fields that take precedence over the arguments above.
    ``sources``: see :func:`lm_blocks`. ``eval_blocks`` > 0 holds out that many blocks (the last ones) and reports
    their ``eval_loss`` and ``perplexity`` after training. ``resume_from_checkpoint``: a checkpoint folder to continue
    from (``Trainer.train``'s argument).
    """

    from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

    arguments = measured_run_arguments(
        seed,
        training_overrides,
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        max_steps=steps,
        warmup_steps=warmup_steps,
        lr_scheduler_type="constant_with_warmup" if warmup_steps else "constant",
        logging_steps=1,
        disable_tqdm=True,
    )
    args = TrainingArguments(**arguments)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_path or "minilm"))
    from_sources = dataset is None  # else the caller's blocks: the card cannot name their datasets
    if dataset is None:
        # blocks the run will read (streamed sources stop there): updates x batch x accumulation, plus eval
        if "c4" in sources and args.max_steps <= 0:
            raise ValueError("the streamed 'c4' source needs max_steps > 0 (it decides how much text to stream)")
        needed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps + eval_blocks
        dataset = lm_blocks(
            tokenizer, seq_len, tuple(sources), max_tokens=needed * seq_len if "c4" in sources else None
        )
    eval_dataset = None
    if eval_blocks:
        if eval_blocks >= len(dataset):
            raise ValueError(f"eval_blocks={eval_blocks} leaves no training data ({len(dataset)} blocks of {seq_len})")
        eval_dataset = torch.utils.data.Subset(dataset, range(len(dataset) - eval_blocks, len(dataset)))
        dataset = torch.utils.data.Subset(dataset, range(len(dataset) - eval_blocks))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, vocab_size=len(tokenizer), max_position_embeddings=seq_len))
    if prepare_model is not None:
        model = prepare_model(model)
    # processing_class: save_model and checkpoints write the tokenizer next to the weights, so the folder loads alone;
    # the collator stays the plain stacking one (the Trainer's default for a tokenizer would pad and add a mask).
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        optimizers=optimizers(model, args) if callable(optimizers) else (optimizers or (None, None)),
    )
    datasets = list(dict.fromkeys(SOURCE_DATASETS[s] for s in sources if s in SOURCE_DATASETS)) if from_sources else []
    card = {
        "datasets": datasets or None,
        # the held-out blocks are the last ones: the end of the last source
        "eval_dataset": SOURCE_DATASETS.get(sources[-1], sources[-1]) if from_sources and sources else None,
        "model_description": f"A LLaMA-architecture causal language model ({size}: GaLore's pretraining shapes) "
        f"pretrained from scratch for {args.max_steps} updates of {seq_len}-token blocks",
    }
    evaluate = held_out_loss if eval_dataset is not None else None
    return train_and_measure(
        trainer, method, extra_methods, evaluate, card=card, resume_from_checkpoint=resume_from_checkpoint
    )

"""Instruction-tune a causal LM on Alpaca-format data with TRL's ``SFTTrainer`` and any hf_memopt method.

Each Alpaca record becomes a conversational prompt-completion pair (user: instruction [+ input], assistant: output);
``SFTTrainer`` renders both with the tokenizer's chat template and computes the loss on the completion only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from hf_memopt.shared.validation import check_int
from hf_memopt.tools.recipes.data import load_alpaca
from hf_memopt.tools.recipes.models import BASE_LICENSES, hub_id, resolve_model
from hf_memopt.tools.recipes.result import RunResult, held_out_loss, measured_run_arguments, train_and_measure

__all__ = [
    "CHATML_TEMPLATE",
    "alpaca_to_prompt_completion",
    "answer_instructions",
    "fused_head_token_tile",
    "run_instruct",
]

# Used only when the tokenizer has no chat template of its own (base checkpoints); SmolLM2-Instruct ships this
# ChatML format, so the offline default and the fallback agree.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def alpaca_to_prompt_completion(record: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """An Alpaca record as TRL's conversational prompt-completion example."""
    user = record["instruction"].strip()
    if record.get("input", "").strip():
        user = f"{user}\n\n{record['input'].strip()}"
    return {
        "prompt": [{"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": record["output"].strip()}],
    }


@contextlib.contextmanager
def fused_head_token_tile(tokens: int | None) -> Iterator[None]:
    """Score at most ``tokens`` tokens per tile in TRL's fused LM head for the duration (None: TRL's own tiling).

    ``SFTTrainer`` computes its loss with TRL's fused head (``trl.trainer.utils.add_fused_lm_head``), which never
    builds the whole ``tokens x vocab`` logits but scores up to ``trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE``
    tokens (4096 in TRL 1.16) x 32768 vocabulary entries per tile: at SmolLM2's head and 4 x 512 tokens that tile
    and its float32 temporaries peaked 2,235 MiB above the start of one forward + backward on CPU, against 193 MiB
    with 64-token tiles and the same loss (docs/min_memory.md). The module constant is read at every call, so it is
    set here and restored afterwards; a TRL without it is refused, naming the setting, rather than ignored.
    """
    if tokens is None:
        yield
        return
    check_int("loss_chunk_size", tokens, 1)
    chunked_logprob = _trl_fused_head_kernels()
    before = chunked_logprob.TOKEN_CHUNK_SIZE
    chunked_logprob.TOKEN_CHUNK_SIZE = tokens
    try:
        yield
    finally:
        chunked_logprob.TOKEN_CHUNK_SIZE = before


def _trl_fused_head_kernels() -> Any:
    """TRL's fused-head kernel module, refused (naming the setting) if it has no token tile to set."""
    import trl

    try:
        from trl.kernels import chunked_logprob
    except ImportError:  # TRL releases before the fused head
        chunked_logprob = None
    if not isinstance(getattr(chunked_logprob, "TOKEN_CHUNK_SIZE", None), int):
        raise ValueError(
            f"memory.loss_chunk_size: TRL {trl.__version__} has no fused-head token tile "
            "(trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE) to set; remove memory.loss_chunk_size"
        )
    return chunked_logprob


def run_instruct(
    method: Any = None,
    *,
    model: str = "smollm2",
    data_path: str | None = None,
    train_limit: int | None = None,
    eval_limit: int = 32,
    max_length: int = 512,
    epochs: float = 1.0,
    max_steps: int = -1,
    learning_rate: float = 2e-5,
    batch_size: int = 4,
    seed: int = 0,
    output_dir: str = "out/instruct",
    extra_methods: tuple[Any, ...] = (),
    training_overrides: dict[str, Any] | None = None,
    resume_from_checkpoint: str | None = None,
    prepare_model: Any = None,
    sample_answers: int = 0,
    sample_answer_tokens: int = 96,
    loss_chunk_size: int | None = None,
) -> RunResult:
    """Fine-tune ``model`` (``smollm2`` offline, a Hub id, or a folder) on Alpaca-format ``data_path``.

    ``data_path``: ``None`` for the bundled demo set, a JSON/JSONL file or a Hub dataset id (see ``load_alpaca``).
    The last ``eval_limit`` records are held out for the final ``eval_loss`` / ``perplexity``; ``train_limit`` caps
    the rest. ``training_overrides`` are ``SFTConfig`` fields that take precedence over the arguments above.
    ``resume_from_checkpoint``: a checkpoint folder to continue from (``Trainer.train``'s argument).
    ``prepare_model(model)``: applied to the loaded model before the trainer is built (a recipe's ``memory:``).
    ``sample_answers``: after training, greedy answers (up to ``sample_answer_tokens`` new tokens) to the first N
    held-out instructions, in ``RunResult.samples`` beside the reference answers. ``loss_chunk_size``: tokens per
    tile of TRL's fused LM head (:func:`fused_head_token_tile`; a recipe's ``memory.loss_chunk_size``).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if loss_chunk_size is not None:  # refused before minutes of loading
        check_int("loss_chunk_size", loss_chunk_size, 1)
        _trl_fused_head_kernels()
    records = load_alpaca(data_path)
    if eval_limit < 0 or eval_limit >= len(records):
        raise ValueError(f"eval_limit must be in [0, {len(records) - 1}] for {len(records)} records; got {eval_limit}")
    held_out = records[len(records) - eval_limit :] if eval_limit else []
    train_records = records[: len(records) - eval_limit]
    if train_limit is not None:
        train_records = train_records[:train_limit]
    train = Dataset.from_list([alpaca_to_prompt_completion(r) for r in train_records])
    dev = Dataset.from_list([alpaca_to_prompt_completion(r) for r in held_out]) if held_out else None

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if prepare_model is not None:
        net = prepare_model(net)

    arguments = measured_run_arguments(
        seed,
        training_overrides,
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps,
        max_length=max_length,
        logging_steps=max(1, (max_steps if max_steps > 0 else 50) // 10),
        eval_strategy="no",
        bf16=False,
        fp16=False,
    )
    args = SFTConfig(**arguments)
    trainer = SFTTrainer(
        model=net,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        processing_class=tokenizer,
    )
    card = {
        "base_model": hub_id(model),
        "license": BASE_LICENSES.get(model),
        "datasets": data_path if data_path and not os.path.exists(data_path) else None,  # a Hub dataset id
    }
    evaluate = held_out_loss if dev is not None else None
    with fused_head_token_tile(loss_chunk_size):
        result = train_and_measure(
            trainer, method, extra_methods, evaluate, card=card, resume_from_checkpoint=resume_from_checkpoint
        )
    result.samples = answer_instructions(trainer.model, tokenizer, held_out[:sample_answers], sample_answer_tokens)
    return result


@torch.no_grad()
def answer_instructions(model, tokenizer, records: list[dict[str, str]], max_new_tokens: int) -> list[dict[str, str]]:
    """The trained model's greedy answer to each record's prompt (the chat template, as in training), with the
    record's own answer as ``reference``: a few answers a reader can judge beside the held-out loss."""
    samples = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for record in records:
        prompt = alpaca_to_prompt_completion(record)["prompt"]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: ids[k].to(device) for k in ("input_ids", "attention_mask")}  # not e.g. BERT's token_type_ids
        output = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        answer = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"instruction": prompt[0]["content"], "reference": record["output"], "answer": answer.strip()})
    model.train(was_training)
    return samples

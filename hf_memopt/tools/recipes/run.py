"""Run a validated :class:`~hf_memopt.tools.recipes.recipe.Recipe` through the task's runner and write ``results.json``.

The runners (``run_glue``, ``run_instruct``, ``run_pretrain``) are the same functions the benchmarks and the demo
use; a recipe's ``training:`` section is passed to them whole as ``TrainingArguments`` overrides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_memopt.tools.recipes.recipe import Recipe, check_runnable, method_configs

__all__ = ["environment", "run_recipe"]


def environment() -> dict[str, Any]:
    """Versions and hardware, written with every result (figures are only comparable on the same machine)."""
    import torch
    import transformers

    import hf_memopt

    env: dict[str, Any] = {
        "hf_memopt": hf_memopt.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        env["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    for name in ("trl", "datasets", "bitsandbytes"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = getattr(module, "__version__", "?")
    return env


def run_recipe(
    recipe: Recipe,
    *,
    progress: bool = True,
    command: str | None = None,
    prepare_model: Callable[[Any], Any] | None = None,
    optimizers: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    resume_from_checkpoint: str | None = None,
) -> dict[str, Any]:
    """Train (and evaluate) ``recipe``; returns the results dictionary, also written to ``<run_dir>/results.json``.

    ``resume_from_checkpoint``: a ``checkpoint-<step>`` folder of this run to continue from (the CLI's ``--resume``
    finds the last complete one with :func:`hf_memopt.last_complete_checkpoint`). The Trainer restores the step, the
    logged losses, optimizer, scheduler and RNG states, so ``steps`` and ``losses`` cover the whole run; memory and
    time per update are measured on the resumed part (``resumed_from`` says where it began).

    ``progress=False`` turns off the Trainer's progress bar unless the recipe sets ``disable_tqdm`` itself;
    ``command`` is recorded with the results (the CLI passes its own command line). ``prepare_model`` and
    ``optimizers`` reach the GLUE and pretraining runners (rows that are not hf_memopt methods: a peft LoRA model,
    a peer library's optimizer); the instruct runner refuses them.
    """
    configs = method_configs(recipe)
    check_runnable(recipe)
    if recipe.memory.malloc_mmap_threshold is not None:  # before the model and data are loaded
        from hf_memopt.tools.host_memory import set_malloc_mmap_threshold

        set_malloc_mmap_threshold(recipe.memory.malloc_mmap_threshold)
    user_prepare = prepare_model
    memory = recipe.memory
    if recipe.task == "instruct":  # SFTTrainer's fused LM head takes the loss chunk (run_instruct), not the model
        memory = dataclasses.replace(memory, loss_chunk_size=None)
    if memory != type(memory)():  # the recipe's memory: section, applied before any user wrapping

        def prepare_model(model):
            model = memory.prepare(model)
            return user_prepare(model) if user_prepare is not None else model

    # writable run folder, reachable models: before minutes of loading
    run_dir = recipe.run_dir
    training = dict(recipe.training)
    training.setdefault("disable_tqdm", not progress)
    data = recipe.data
    started = time.perf_counter()
    if recipe.task == "glue":
        from hf_memopt.tools.recipes.glue import run_glue

        result = run_glue(
            data.name,
            None,
            model=recipe.model,
            output_dir=run_dir,
            train_limit=data.train_limit,
            eval_limit=data.eval_limit,
            max_length=data.max_length,
            extra_methods=tuple(configs),
            training_overrides=training,
            print_table=False,
            source=data.source,
            data_dir=data.data_dir,
            prepare_model=prepare_model,
            optimizers=optimizers,
            resume_from_checkpoint=resume_from_checkpoint,
        )
    elif recipe.task == "instruct":
        from hf_memopt.tools.recipes.instruct import run_instruct

        if user_prepare is not None or optimizers is not None:
            raise NotImplementedError("prepare_model / optimizers are not supported by the instruct runner")

        result = run_instruct(
            None,
            model=recipe.model,
            data_path=data.path,
            train_limit=data.train_limit,
            eval_limit=data.eval_limit,
            max_length=data.max_length,
            output_dir=run_dir,
            extra_methods=tuple(configs),
            training_overrides=training,
            resume_from_checkpoint=resume_from_checkpoint,
            prepare_model=prepare_model,
            sample_answers=data.sample_answers,
            sample_answer_tokens=data.sample_answer_tokens,
            loss_chunk_size=recipe.memory.loss_chunk_size,
        )
    else:
        from hf_memopt.tools.recipes.pretrain import run_pretrain

        result = run_pretrain(
            None,
            size=recipe.model.removeprefix("llama-"),
            seq_len=data.seq_len,
            output_dir=run_dir,
            tokenizer_path=data.tokenizer,
            extra_methods=tuple(configs),
            training_overrides=training,
            sources=tuple(data.sources),
            eval_blocks=data.eval_blocks,
            prepare_model=prepare_model,
            optimizers=optimizers,
            resume_from_checkpoint=resume_from_checkpoint,
        )
    wall = time.perf_counter() - started
    summary = result.summary()
    losses = result.losses
    tail = losses[-max(1, len(losses) // 10) :]
    if not tail:  # fewer updates than logging_steps: the Trainer's mean training loss is all there is
        tail = [h["train_loss"] for h in result.trainer.state.log_history if "train_loss" in h][-1:]
    if recipe.save_model:
        result.trainer.save_model(run_dir)
    results = {
        "recipe": recipe.path,
        "task": recipe.task,
        "model": recipe.model,
        "method": recipe.method,
        "method_configs": {type(c).__name__: dataclasses.asdict(c) for c in configs},
        "memory_settings": dataclasses.asdict(recipe.memory),
        "metrics": summary.get("metrics", {}),
        "memory_bytes": summary["memory_bytes"],
        "median_step_seconds": result.median_step_seconds,
        "median_step_cpu_seconds": result.median_step_cpu_seconds,
        "steps": result.trainer.state.global_step,
        "resumed_from": resume_from_checkpoint,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "losses": losses,
        "loss_steps": [h["step"] for h in result.trainer.state.log_history if "loss" in h],
        "eval_history": list(  # one entry per step: the final held-out evaluation may repeat the last periodic one
            {
                h["step"]: {"step": h["step"], "eval_loss": h["eval_loss"]}
                for h in result.trainer.state.log_history
                if "eval_loss" in h
            }.values()
        ),
        "samples": result.samples,
        "wall_seconds": wall,
        "resolved_recipe": recipe.raw,
        "environment": environment(),
        "command": command,
    }
    with open(Path(run_dir) / "results.json", "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results

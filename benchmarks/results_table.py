"""The results table (docs/results.md): every method and baseline on MiniLM GLUE and LLaMA pretraining, measured here.

    python benchmarks/results_table.py run      # trains every missing cell, one fresh process each (resumable)
    python benchmarks/results_table.py render   # writes docs/results.md and the README summary from the cells
    python benchmarks/results_table.py run --schedule full --seeds 0,1,2 --tasks rte,mrpc --rows adamw,galore

``--schedule short`` (the default) runs 20-40 updates per cell: memory exact, quality indicative only.
``--schedule full`` runs the recipes' own schedules (GLUE: 3 epochs, SST-2 one epoch over the bundled 20,000 rows, the
full dev sets; LLaMA 20M 2,000 and 60M 1,000 updates with held-out perplexity every 100 updates), into
``out/results_full``; a seed other than 0 is the cell ``<row>@seed<N>``. ``--lrs 5e-5,2e-4`` adds learning-rate
sweep cells ``<row>@lr<value>`` (seed 0); the page shows each row's metric per learning rate next to the recipe's own.
``--schedule timing --rounds 3`` measures time per update side by side: 12 updates of each row in turn (6 for
instruction tuning), AdamW's included, repeated in rounds (cells ``<row>@round<k>``, ``out/results_timing``); the
full-schedule tables take each row's time against AdamW from it, since cells that ran hours apart beside other jobs
do not compare.

A cell is one (task, row): the task's recipe (recipes/glue/<task>.yaml, recipes/pretrain/llama_<size>.yaml) with the
short schedule in ``SCHEDULES``, and a row that is either an hf_memopt method run exactly as ``hf-memopt train
--method NAME`` runs it, or a baseline / peer library built in ``ROWS`` below. Each cell runs in its own interpreter
(peak RSS is that run's own) and writes ``out/results_table/<task>/<row>.json``; ``run`` skips cells already done,
so an interrupted run continues where it stopped (``--force`` reruns). ``render`` commits each schedule's cells to its
record (``benchmarks/results/results_table.json``, ``results_full.json``, ``results_gpu.json``), and ``run`` and
``render`` first restore from it the cells ``out/`` lacks, so a fresh clone continues where the record stops; a
full-schedule cell also checkpoints every 100 updates (20 for instruct; ``out/results_full/<task>/runs/<cell>/``) and,
run again, continues from its last complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "results_table"
RESULTS_JSON = ROOT / "benchmarks" / "results" / "results_table.json"
DOC = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
MB = 2**20

GLUE_TASKS = ("rte", "mrpc", "cola", "stsb", "sst2")
PRETRAIN_TASKS = ("llama-20m", "llama-60m")
TASKS = GLUE_TASKS + PRETRAIN_TASKS
INSTRUCT_TASKS = ("instruct",)  # SmolLM2-135M on 2,000 Code Alpaca records through TRL: full schedule only
FULL_TASKS = TASKS + INSTRUCT_TASKS
RUN_ORDER = ("llama-20m", "sst2", "llama-60m", "rte", "mrpc", "stsb", "cola")  # most informative first

# Short schedules: the whole table (~80 cells) must fit a few hours of a 2-core CPU. They show memory exactly and
# time per update faithfully; quality after so few updates is only indicative (RTE / MRPC / CoLA barely move).
SCHEDULES: dict[str, list[str]] = {
    "glue": ["data.train_limit=640", "data.eval_limit=256", "training.max_steps=20", "training.logging_steps=5"],
    "llama-20m": ["training.max_steps=40", "training.warmup_steps=4", "data.seq_len=128", "training.logging_steps=5"],
    "llama-60m": ["training.max_steps=20", "training.warmup_steps=2", "data.seq_len=128", "training.logging_steps=2"],
}

# The papers' own figures for the nearest setting (never the same setting: RoBERTa-base / full schedules / C4).
# Full schedules: the recipes' own GLUE schedules; pretraining long enough for held-out perplexity to settle.
FULL_SCHEDULES: dict[str, list[str]] = {
    "glue": ["training.logging_steps=10"],
    # batch 4 x 256 tokens: 2,000 updates are 2.2 passes over the bundled text (3,624 training blocks), 1,000 are 1.1;
    # at the recipes' batch 8 the 20M model memorised the text (held-out perplexity rose after its third pass)
    "llama-20m": ["training.max_steps=2000", "training.warmup_steps=200", "training.per_device_train_batch_size=4",
                  "training.logging_steps=20", "training.eval_strategy=steps", "training.eval_steps=100"],
    "llama-60m": ["training.max_steps=1000", "training.warmup_steps=100", "training.per_device_train_batch_size=4",
                  "training.logging_steps=20", "training.eval_strategy=steps", "training.eval_steps=100"],
    "instruct": ["training.logging_steps=5"],  # recipes/instruct/code_alpaca_2k.yaml: one epoch, 125 updates
}
# Side-by-side timing: every row runs the same updates (same seed, same batches) in turn, AdamW's in every round;
# time per update is compared within a round. The cells of the full schedules ran in different sessions beside other
# jobs, and there AdamW's own MRPC cells spread from 1.81 to 2.86 CPU s per update.
TIMING_SCHEDULES: dict[str, list[str]] = {
    "glue": ["data.train_limit=640", "data.eval_limit=32", "training.max_steps=12", "training.logging_steps=4"],
    **{size: ["training.max_steps=12", "training.warmup_steps=2", "training.per_device_train_batch_size=4",
              "training.logging_steps=4", "data.eval_blocks=4"] for size in PRETRAIN_TASKS},  # the full batch shape
    # SmolLM2's updates take 20-40 CPU s at the full batch shape (4 x 4 sequences of up to 512 tokens): 6 of them
    "instruct": ["training.max_steps=6", "training.logging_steps=2", "data.eval_limit=4", "data.sample_answers=0"],
}
# On a CUDA device (scripts/gpu_glue.sh): the full GLUE schedules again in bf16, where the memory report's process
# peak is torch.cuda.max_memory_allocated and time per update is wall time.
GPU_SCHEDULES: dict[str, list[str]] = {"glue": [*FULL_SCHEDULES["glue"], "training.bf16=true"]}
SAVE_EVERY = 100  # updates between the checkpoints of a full-schedule cell
SAVE_EVERY_INSTRUCT = 20  # SmolLM2's updates take 20-40 s each: an interruption loses at most ~15 min of a cell
SCHEDULE_PROFILES = {"short": (SCHEDULES, OUT), "full": (FULL_SCHEDULES, OUT.with_name("results_full")),
                     "gpu": (GPU_SCHEDULES, OUT.with_name("results_gpu")),
                     "timing": (TIMING_SCHEDULES, OUT.with_name("results_timing"))}  # fmt: skip
SCHEDULE_TASKS = {"short": TASKS, "full": FULL_TASKS, "gpu": GLUE_TASKS, "timing": FULL_TASKS}  # the tasks of each
# The committed record of each schedule's finished cells, written by ``render``; ``out/`` is only a working folder.
RECORDS = {"short": RESULTS_JSON, "full": RESULTS_JSON.with_name("results_full.json"),
           "gpu": RESULTS_JSON.with_name("results_gpu.json"), "timing": RESULTS_JSON.with_name("results_timing.json")}

PAPER = {
    "source_glue": "GaLore (arXiv 2403.03507) Table 4: RoBERTa-base, rank 4, full GLUE schedules; metric x 100",
    "glue": {
        "adamw": {"cola": 62.24, "stsb": 90.92, "mrpc": 91.30, "rte": 79.42, "sst2": 94.57},
        "galore": {"cola": 60.35, "stsb": 90.73, "mrpc": 92.25, "rte": 79.42, "sst2": 94.04},
        "lora": {"cola": 61.38, "stsb": 90.57, "mrpc": 91.07, "rte": 78.70, "sst2": 92.89},
    },
    "source_pretrain": "GaLore (arXiv 2403.03507) Table 2: LLaMA 60M on C4, 1.1B tokens, validation perplexity",
    "pretrain": {"adamw": {"llama-60m": 34.06}, "galore": {"llama-60m": 34.88}, "lora": {"llama-60m": 34.99}},
}


@dataclass(frozen=True)
class Row:
    """One row of the table: an hf_memopt method (``method``) or a baseline built by ``prepare`` / ``optimizers``."""

    name: str
    method: str = "adamw"
    sets: tuple[str, ...] = ()
    glue_sets: tuple[str, ...] = ()
    glue_epochs_factor: int = 1  # full and GPU GLUE schedules: this many times each recipe's epochs (a longer one)
    lm_sets: tuple[str, ...] = ()  # for the LLaMA-family tasks only (pretraining, instruct)
    lr_of: str | None = None  # the recipe method whose learning rate a baseline borrows
    prepare: Callable[[Any, Any], Any] | None = None  # (model, recipe) -> model
    optimizers: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None  # (model, args, recipe) -> (opt, sched)
    kind: str = "hf_memopt"


def _galore_settings(recipe) -> dict[str, Any]:
    return recipe.method_fields.get("galore", {})


def _targeted_weights(model, recipe) -> list:
    """Exactly the weights hf_memopt's galore row projects (same resolution of ``all-linear``: head excluded)."""
    from hf_memopt.galore import GaLoreConfig
    from hf_memopt.galore.builder import galore_target_parameters

    settings = {k: v for k, v in _galore_settings(recipe).items() if k in ("target_modules", "rank")}
    return list(galore_target_parameters(model, GaLoreConfig(**settings)).values())


def _projected_groups(model, recipe, **extra) -> list[dict[str, Any]]:
    """galore-torch / apollo-torch parameter groups: the recipe's GaLore targets projected, everything else plain."""
    settings = _galore_settings(recipe)
    targets = [p for p in _targeted_weights(model, recipe) if p.requires_grad]
    ids = {id(p) for p in targets}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    projected = {"params": targets, "rank": settings.get("rank", 128),
                 "update_proj_gap": settings.get("update_proj_gap", 200), "scale": settings.get("scale", 0.25),
                 "proj_type": "std", **extra}
    return [{"params": rest}, projected]


def _peer(module: str, distribution: str):
    """The peer library's module, or an error naming the package and the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"the {distribution} row needs {distribution}: pip install -e '.[bench]'") from None


def galore_torch_optimizer(model, args, recipe):
    GaLoreAdamW = _peer("galore_torch", "galore-torch").GaLoreAdamW

    return GaLoreAdamW(_projected_groups(model, recipe), lr=args.learning_rate, eps=args.adam_epsilon,
                       weight_decay=args.weight_decay, no_deprecation_warning=True), None


def apollo_optimizer(model, args, recipe):
    APOLLOAdamW = _peer("apollo_torch", "apollo-torch").APOLLOAdamW

    # APOLLO's defaults (README): random projection, channel-wise scaling, scale 1.
    groups = _projected_groups(model, recipe, proj="random", scale_type="channel", scale=1.0)
    return APOLLOAdamW(groups, lr=args.learning_rate, eps=args.adam_epsilon, weight_decay=args.weight_decay), None


def planned_updates(args, recipe) -> int:
    """The run's number of updates: ``max_steps`` where set, else its epochs over the GLUE training split.

    The optimizers are built before the Trainer counts its updates, and an epoch-based schedule leaves
    ``args.max_steps`` at -1 (the full GLUE schedules).
    """
    if args.max_steps > 0:
        return args.max_steps
    if recipe.task != "glue":
        raise ValueError(f"an epoch-based {recipe.task} schedule: set training.max_steps for this row")
    from hf_memopt.tools.recipes.data import load_glue

    data = recipe.data
    examples = len(load_glue(data.name, "train", data.train_limit, data_dir=data.data_dir, source=data.source))
    batches = math.ceil(examples / (args.per_device_train_batch_size * max(1, args.world_size)))
    return math.ceil(batches / args.gradient_accumulation_steps) * math.ceil(args.num_train_epochs)


def badam_optimizer(model, args, recipe):
    import torch

    BlockOptimizer = _peer("badam", "badam").BlockOptimizer

    prefix = "bert.encoder.layer" if hasattr(model, "bert") else "model.layers"
    layers = sorted({int(n.split(".")[len(prefix.split("."))]) for n, _ in model.named_parameters()
                     if n.startswith(prefix + ".")})
    blocks = [[f"{prefix}.{i}."] for i in layers]
    base = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, eps=args.adam_epsilon,
                             weight_decay=args.weight_decay)
    # every block visited once in the run (BAdam's default 50 would leave most blocks untouched at these lengths)
    switch_every = max(1, planned_updates(args, recipe) // len(blocks))
    active = ["classifier"] if hasattr(model, "classifier") else ["lm_head"]
    return BlockOptimizer(base, list(model.named_parameters()), block_prefix_list=blocks,
                          switch_block_every=switch_every, switch_mode="ascending", active_modules=active,
                          verbose=0), None


def lora_model(model, recipe):
    from peft import LoraConfig, get_peft_model

    if recipe.task == "glue":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                            modules_to_save=["classifier"], task_type="SEQ_CLS")
        return get_peft_model(model, config)
    rank = _galore_settings(recipe).get("rank", 128)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():  # as GaLore's LoRA baseline: embeddings and norms train fully
        if "lora_" not in name and "proj" not in name:
            param.requires_grad_(True)
    return peft_model


ROWS: dict[str, Row] = {r.name: r for r in [
    Row("adamw"),
    Row("adamw_8bit", sets=("training.optim=adamw_bnb_8bit",), kind="baseline"),
    # AdamW without the embeddings, which BlockLLM never trains (frozen, as in its paper): is that BlockLLM's GLUE gap?
    Row("adamw_frozen_embeddings", glue_sets=(
        "memory.freeze_modules=[word_embeddings, position_embeddings, token_type_embeddings]",), kind="baseline"),
    Row("lora", prepare=lora_model, glue_sets=("training.learning_rate=5e-4",), kind="baseline"),
    Row("galore", method="galore"),
    Row("galore_8bit_layerwise", method="galore", sets=("methods.galore.optimizer=adamw_8bit",
                                                        "methods.galore.layerwise=true")),
    Row("blockllm", method="blockllm"),
    # BlockLLM with four times its selection budget (20% of the selectable parameters, not 5%): is the budget its gap?
    Row("blockllm_sparsity_0.8", method="blockllm", sets=("methods.blockllm.sparsity=0.8",)),
    Row("loqt", method="loqt"),
    # LoQT with int8 weights instead of NF4: NF4 alone moves a small pretrained model (SmolLM2 starts 13% above its
    # fp32 loss, int8 at it: docs/min_memory.md); this row tells the quantization's share of LoQT's GLUE gap
    Row("loqt_int8", method="loqt", sets=("methods.loqt.quant=int8",)),
    # LoQT fine-tuned as the official GLUE scripts do (scripts/finetuning_deberta/*.sh, run_glue.py): the model frozen
    # but for the B factors and the classifier, scale (lora_alpha) 2, lr 1e-4 as their MRPC script; rank, NF4 weights
    # and merge interval stay the recipe's
    Row("loqt_official_ft", method="loqt", glue_sets=(
        "methods.loqt.train_only_factors=true", "methods.loqt.scale=2.0", "method_training.loqt.learning_rate=1e-4")),
    # LoQT with the token embeddings frozen: does training them at LoQT's 5e-4 (5x AdamW's rate) cost accuracy?
    Row("loqt_frozen_embeddings", method="loqt", glue_sets=(
        "memory.freeze_modules=[word_embeddings, position_embeddings, token_type_embeddings]",)),
    # LoQT-nq (the paper's unquantized variant): the same low-rank factors and merges on full-precision weights, so
    # what it loses against AdamW is the low-rank, merged update alone, without any quantization error
    Row("loqt_nq", method="loqt", sets=("methods.loqt.quant=null", "methods.loqt.quantize_projection=false")),
    Row("velora", method="velora"),
    # VeLoRA's automatic targets until 2026-12-05: the whole MLP (gate, up and down; BERT's intermediate and output
    # dense), 37% more activation memory freed than down_proj alone at LLaMA 20M, at +10.8% held-out perplexity there
    Row("velora_mlp", method="velora", glue_sets=(
        r"methods.velora.target_modules=.*layer\.\d+\.(intermediate\.dense|output\.dense)",),
        lm_sets=("methods.velora.target_modules=[gate_proj, up_proj, down_proj]",)),
    # VeLoRA on the paper's targets (v_proj + down_proj; in BERT value and the FFN's output projection): the automatic
    # targets (down_proj / output.dense) plus v_proj / value, whose input stays saved for q and k (it frees nothing)
    Row("velora_paper_targets", method="velora", glue_sets=(
        r"methods.velora.target_modules=.*layer\.\d+\.(attention\.self\.value|output\.dense)",),
        lm_sets=("methods.velora.target_modules=[v_proj, down_proj]",)),
    Row("velora+galore", method="velora+galore"),
    # MeZO needs far more, cheaper updates (the paper: 100k steps on RoBERTa-large): 10x each recipe's updates
    Row("zo", method="zo", glue_epochs_factor=10),
    Row("galore-torch", optimizers=galore_torch_optimizer, kind="peer", lr_of="galore"),
    Row("apollo-torch", optimizers=apollo_optimizer, kind="peer", lr_of="galore"),
    Row("badam", optimizers=badam_optimizer, kind="peer"),
]}


def recipe_path(task: str) -> Path:
    if task in GLUE_TASKS:
        return ROOT / "recipes" / "glue" / f"{task}.yaml"
    if task in INSTRUCT_TASKS:
        return ROOT / "recipes" / "instruct" / "code_alpaca_2k.yaml"
    return ROOT / "recipes" / "pretrain" / f"{task.replace('-', '_')}.yaml"


def cell_name(row: str, seed: int = 0, lr: str | None = None, timing_round: int = 0) -> str:
    """``row``, ``row@seed<N>`` for another seed, ``row@lr<value>`` for a learning-rate sweep cell, ``row@round<k>``
    for round k of the side-by-side timing."""
    return (row + (f"@seed{seed}" if seed else "") + (f"@lr{lr}" if lr is not None else "")
            + (f"@round{timing_round}" if timing_round else ""))


def cell_path(task: str, row: str, out: Path = OUT, seed: int = 0, lr: str | None = None, timing_round: int = 0) -> Path:
    return out / task / f"{cell_name(row, seed, lr, timing_round)}.json"


def run_cell(task: str, row_name: str, out: Path = OUT, extra_sets: tuple[str, ...] = (), *,
             schedule_name: str = "short", seed: int = 0, lr: str | None = None, timing_round: int = 0) -> None:
    """Train one cell in this process and write its JSON (called by ``run`` in a fresh interpreter)."""
    from hf_memopt import last_complete_checkpoint
    from hf_memopt.tools.recipes.recipe import load_recipe
    from hf_memopt.tools.recipes.run import run_recipe

    row = ROWS[row_name]
    schedule = SCHEDULE_PROFILES[schedule_name][0]["glue" if task in GLUE_TASKS else task]
    seeds = [f"training.seed={seed}"] if seed else []
    # Full-schedule cells run for up to hours: they checkpoint every 100 updates (20 for instruct) into their own
    # folder and continue from the last complete checkpoint when run again (resume is exact for every method); short
    # cells do not save.
    resumable = schedule_name == "full" and not extra_sets
    every = SAVE_EVERY_INSTRUCT if task in INSTRUCT_TASKS else SAVE_EVERY
    saving = (["training.save_strategy=steps", f"training.save_steps={every}", "training.save_total_limit=2"]
              if resumable else ["training.save_strategy=no"])  # fmt: skip
    longer = ()
    if row.glue_epochs_factor > 1 and task in GLUE_TASKS and schedule_name in ("full", "gpu"):
        epochs = load_recipe(recipe_path(task), [], row.method).training["num_train_epochs"]
        longer = (f"training.num_train_epochs={row.glue_epochs_factor * epochs:g}",)
    sets = [*schedule, *row.sets, *(row.glue_sets if task in GLUE_TASKS else row.lm_sets), *longer, *seeds, *extra_sets,
            f"output_dir={out / task / 'runs' / cell_name(row_name, seed, lr, timing_round)}", "training.disable_tqdm=true", *saving]
    if lr is not None:  # a sweep cell: this learning rate instead of the recipe's (the rest of the recipe unchanged)
        sets.append(f"training.learning_rate={lr}")
    elif row.lr_of is not None:  # peers of a method run at that method's learning rate from the recipe
        borrowed = load_recipe(recipe_path(task), sets, row.lr_of).training["learning_rate"]
        sets.append(f"training.learning_rate={borrowed}")
    recipe = load_recipe(recipe_path(task), sets, row.method)  # a set learning rate wins over method_training's
    prepare = (lambda model: row.prepare(model, recipe)) if row.prepare else None
    optimizers = (lambda model, args: row.optimizers(model, args, recipe)) if row.optimizers else None
    command = f"python benchmarks/results_table.py cell {task} {row_name} --schedule {schedule_name} --seed {seed}"
    command += f" --lr {lr}" if lr is not None else ""
    resume = last_complete_checkpoint(recipe.run_dir) if resumable else None
    results = run_recipe(recipe, progress=False, command=command, prepare_model=prepare, optimizers=optimizers,
                         resume_from_checkpoint=resume)
    if resumable:  # the cell's JSON holds the results; its checkpoints were only for an interruption
        for checkpoint in Path(recipe.run_dir).glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    results.pop("resolved_recipe", None)
    results["row"], results["kind"], results["seed"] = row_name, row.kind, seed
    results["learning_rate"] = recipe.training["learning_rate"]
    cell_path(task, row_name, out, seed, lr, timing_round).write_text(json.dumps(results, indent=1, default=str))


def failed_cell(path: Path) -> bool:
    """Whether the cell's JSON is a failure record (``run`` tries such a cell again) rather than its results."""
    return "failed" in json.loads(path.read_text())


def restore_recorded_cells(schedule_name: str) -> int:
    """Write back under the schedule's ``out`` folder every cell of its committed record that the folder lacks.

    A fresh clone has no ``out/``: without this, ``run`` would train again cells that took hours and ``render`` would
    drop them from the page. A cell already under ``out`` wins (it may be newer than the record). So a cell leaves
    the page only when it leaves the record too (delete it from the record's JSON); ``--force`` reruns it. Returns
    how many cells were restored."""
    record, out = RECORDS[schedule_name], SCHEDULE_PROFILES[schedule_name][1]
    if not record.exists():
        return 0
    restored = 0
    for task, cells in json.loads(record.read_text()).items():
        for name, results in cells.items():
            path = out / task / f"{name}.json"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=1, default=str))
                restored += 1
    return restored


def run_all(tasks: list[str], rows: list[str], force: bool, smoke: bool, schedule_name: str = "short",
            seeds: tuple[int, ...] = (0,), lrs: tuple[str | None, ...] = (None,), rounds: int = 0) -> None:
    """Run every missing cell; ``rounds`` (timing only) runs all the rows, then all again, ``rounds`` times."""
    out = SCHEDULE_PROFILES[schedule_name][1]
    out = out.with_name(out.name + "_smoke") if smoke else out
    if not smoke:
        restore_recorded_cells(schedule_name)
    timing_rounds = range(1, rounds + 1) if rounds else (0,)
    order = [(t, r, s, lr, k) for t in tasks for s in seeds for lr in lrs for k in timing_rounds for r in rows]
    for task, row, seed, lr, timing_round in order:
        if task in INSTRUCT_TASKS and (ROWS[row].prepare or ROWS[row].optimizers):
            print(f"{task} / {row}: skipped (TRL's SFTTrainer runs only AdamW and hf_memopt's methods here)")
            continue
        (out / task).mkdir(parents=True, exist_ok=True)
        path = cell_path(task, row, out, seed, lr, timing_round)
        if path.exists() and not force and not failed_cell(path):
            continue
        log = path.with_suffix(".log")
        started = time.perf_counter()
        print(f"{task} / {cell_name(row, seed, lr, timing_round)} ...", end=" ", flush=True)
        command = [sys.executable, __file__, "cell", task, row, "--schedule", schedule_name, "--seed", str(seed)]
        command += ["--smoke"] if smoke else []
        command += ["--lr", lr] if lr is not None else []
        command += ["--round", str(timing_round)] if timing_round else []
        with open(log, "w") as f:
            proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        wall = time.perf_counter() - started
        if proc.returncode == 0:
            print(f"{wall:.0f} s", flush=True)
        elif proc.returncode < 0:  # killed (a session's end): no failure record, the next run continues the cell
            raise SystemExit(f"interrupted by signal {-proc.returncode}; run the same command again to continue")
        else:
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
            failure = {"row": row, "failed": tail[0] if tail else f"exit status {proc.returncode}"}
            path.write_text(json.dumps(failure))
            print(f"failed: {failure['failed']}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# rendering


def load_cells(out: Path = OUT) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {cell name: results}}`` for every cell written under ``out`` (seed and sweep cells included)."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for task in FULL_TASKS:
        for row in ROWS:
            for path in sorted((out / task).glob(f"{row}*.json")):
                if path.stem == row or path.stem.startswith(f"{row}@"):
                    cells.setdefault(task, {})[path.stem] = json.loads(path.read_text())
    return cells


def _metric(task: str, cell: dict[str, Any]) -> float | None:
    metrics = cell.get("metrics", {})
    if task in PRETRAIN_TASKS:
        return metrics.get("perplexity")
    if task in INSTRUCT_TASKS:
        return metrics.get("loss")
    key = {"cola": "matthews_correlation", "stsb": "pearson"}.get(task, "accuracy")
    value = metrics.get(key)
    return None if value is None else 100 * value


METRIC_NAMES = {"cola": "MCC", "stsb": "Pearson", "llama-20m": "held-out ppl", "llama-60m": "held-out ppl",
                "instruct": "held-out loss"}


def task_table(task: str, cells: dict[str, dict[str, Any]], side: dict[str, tuple[float, int]] | None = None) -> str:
    """One short-schedule task: per row the metric, the paper's, memory, CPU time per update and final loss; time
    against AdamW from ``side`` (the side-by-side timing) where it has the row, else the two cells' ratio, starred."""
    from hf_memopt.tools.memory import MemoryBreakdown

    base = cells.get("adamw")
    base_total = MemoryBreakdown(**base["memory_bytes"]).tensors_total if base and "memory_bytes" in base else None
    metric = METRIC_NAMES.get(task, "accuracy")
    paper_kind = "glue" if task in GLUE_TASKS else "pretrain"
    header = ["row", metric, "paper", "weights MB", "grads MB", "optimizer MB", "activations MB", "tensors vs AdamW",
              "peak RSS MB", "CPU s / update", "vs AdamW", "final loss"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, cell in cells.items():
        if "failed" in cell:
            lines.append(f"| {name} | failed: {cell['failed'].replace('|', '/')[:140]} |" + " |" * (len(header) - 2))
            continue
        b = MemoryBreakdown(**cell["memory_bytes"])
        value = _metric(task, cell)
        paper = PAPER[paper_kind].get(name, {}).get(task)
        step = cell.get("median_step_cpu_seconds")
        cells_out = [
            name,
            "-" if value is None else f"{value:.1f}" if task in GLUE_TASKS else f"{value:.0f}",
            "-" if paper is None else f"{paper:.2f}",
            f"{(b.parameters + b.buffers) / MB:.1f}", f"{b.gradients / MB:.1f}", f"{b.optimizer_state / MB:.1f}",
            f"{b.activations / MB:.1f}",
            f"{b.tensors_total / base_total:.2f}x" if base_total else "-",
            f"{b.peak_process / MB:.0f}",
            "-" if step is None else f"{step:.2f}",
            _time_text(*_time_vs_adamw(cells, name, side)),
            "-" if cell.get("final_loss") is None else f"{cell['final_loss']:.3f}",
        ]
        lines.append("| " + " | ".join(cells_out) + " |")
    return "\n".join(lines)


def machine_line(cells: dict[str, dict[str, dict[str, Any]]], precision: str = "fp32") -> str:
    for task_cells in cells.values():
        for cell in task_cells.values():
            env = cell.get("environment")
            if env:
                return (f"{env.get('device')}, {env.get('cpu_count')} CPUs ({env.get('processor')}, {env.get('platform')}),"
                        f" {env.get('torch_threads')} torch threads; torch {env.get('torch')}, transformers "
                        f"{env.get('transformers')}, bitsandbytes {env.get('bitsandbytes', '?')}; {precision}, seed 0")
    return "?"


FIGURES = ROOT / "docs" / "figures"
FULL_START, FULL_END = "<!-- full-schedule -->", "<!-- /full-schedule -->"
GPU_START, GPU_END = "<!-- gpu-schedule -->", "<!-- /gpu-schedule -->"


def _row_values(task: str, cells: dict[str, dict[str, Any]], row: str):
    """``(cell name, learning rate or None, metric)`` for each finished cell of the row on the task: its seeds and
    sweep points (``<row>``, ``<row>@seed<N>``, ``<row>@lr<v>``, ``<row>@seed<N>@lr<v>``), not timing rounds."""
    for name, cell in cells.items():
        if name.split("@")[0] != row or "@round" in name or "failed" in cell:
            continue
        value = _metric(task, cell)
        if value is not None:
            yield name, cell.get("learning_rate"), value


def _seed_values(task: str, cells: dict[str, dict[str, Any]], row: str) -> list[float]:
    """The row's metric over its seeds at the recipe's learning rate: its own cells (``<row>``, ``<row>@seed<N>``) and
    a seed run through ``--lrs`` at that same rate (``<row>@seed<N>@lr<v>``); sweep cells at other rates are not seeds."""
    own = cells.get(row, {}).get("learning_rate")
    return [value for name, rate, value in _row_values(task, cells, row)
            if "@lr" not in name
            or ("@seed" in name and own is not None and rate is not None and float(rate) == float(own))]


def _best(task: str):
    """``max`` for GLUE metrics (higher is better), ``min`` for held-out perplexity and loss."""
    return max if task in GLUE_TASKS else min


def best_over_learning_rates(task: str, cells: dict[str, dict[str, Any]], row: str) -> tuple[float | None, float | None]:
    """``(metric, learning rate)``: the row's best learning rate among those run (the recipe's, with the mean over its
    seeds, and each sweep cell's), so that rows swept over the same grid are compared each at its best (higher is
    better for GLUE metrics, lower for held-out perplexity and loss)."""
    recipe_value = _mean(_seed_values(task, cells, row))
    own = cells.get(row, {}).get("learning_rate")
    points = {} if recipe_value is None else {float(own) if own is not None else None: recipe_value}
    for lr, value in row_sweep(task, cells, row).items():
        points.setdefault(lr, value)  # the recipe's own learning rate keeps its seed mean
    if not points:
        return None, None
    lr, value = _best(task)(points.items(), key=lambda item: item[1])
    return value, lr


def standing_cell(task: str, cells: dict[str, dict[str, Any]], row: str) -> str | None:
    """The name of the cell a row's memory, time and update count are read from on the task: its recipe cell, or, for
    a row run only at swept rates (zo's GLUE column runs at 1e-4, not its recipe's 1e-6: docs/results.md), its seed-0
    sweep cell at its best rate; where every sweep cell failed (zo diverged on STS-B at 1e-4), a failure record, so that
    the task table says so instead of leaving the row out. None where the row has no cell."""
    if row in cells:
        return row
    _, lr = best_over_learning_rates(task, cells, row)
    if lr is not None:
        return next(name for name, rate, _ in _row_values(task, cells, row)
                    if "@seed" not in name and rate is not None and float(rate) == lr)
    return next((name for name in _failed_cells(cells, row) if "@seed" not in name), None)


def cell_label(row: str, name: str) -> str:
    """How tables and curves name a row's standing cell: the row, or ``row (lr <rate>)`` for a sweep cell."""
    return row if name == row else f"{row} (lr {_cell_rate(name):g})"


def _cell_rate(name: str) -> float:
    """The learning rate in a sweep cell's name (``<row>@lr1e-4``, ``<row>@seed1@lr1e-4``)."""
    return float(name.split("@lr")[1])


def _failed_cells(cells: dict[str, dict[str, Any]], row: str) -> list[str]:
    """The names of the row's failure records on the task (seeds and sweep points; not timing rounds)."""
    return [name for name, cell in cells.items()
            if name.split("@")[0] == row and "@round" not in name and "failed" in cell]


def row_sweep(task: str, cells: dict[str, dict[str, Any]], row: str) -> dict[float, float]:
    """``{learning rate: metric}`` for a row with sweep cells (empty without): at each rate the mean over the seeds run
    there (``<row>@lr<value>``, ``<row>@seed<N>@lr<value>``; the recipe's own cells at its rate)."""
    if not any(n.startswith(f"{row}@") and "@lr" in n for n in cells):
        return {}
    values: dict[float, list[float]] = {}
    for _, rate, value in _row_values(task, cells, row):
        if rate is not None:
            values.setdefault(float(rate), []).append(value)
    return {lr: sum(v) / len(v) for lr, v in values.items()}


def rates_run(task: str, cells: dict[str, dict[str, Any]], row: str) -> int:
    """How many learning rates the row has run on the task: its sweep's points, or 1 for its recipe cell alone."""
    return len(row_sweep(task, cells, row)) or int(row in cells)


def lr_sweep(task: str, cells: dict[str, dict[str, Any]]) -> dict[str, dict[float, float]]:
    """``{row: {learning rate: metric}}`` for every row with sweep cells (see :func:`row_sweep`)."""
    return {row: points for row in ROWS if (points := row_sweep(task, cells, row))}


def lr_sweep_table(task: str, cells: dict[str, dict[str, Any]]) -> str:
    """The sweep as a table: one line per row, one column per learning rate, the recipe's own marked, the best bold,
    and a rate whose cells all failed (a run that diverged) marked failed."""
    failed = {row: rates for row in ROWS
              if (rates := {_cell_rate(n) for n in _failed_cells(cells, row) if "@lr" in n})}
    sweep = lr_sweep(task, cells) | {row: {} for row in failed if not row_sweep(task, cells, row)}
    if not sweep:
        return ""
    lrs = sorted({lr for row, points in sweep.items() for lr in (*points, *failed.get(row, ()))})
    digits = 3 if task in INSTRUCT_TASKS else 1
    lines = ["| row | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for row, points in sweep.items():
        own = cells.get(row, {}).get("learning_rate")
        best = _best(task)(points.values(), default=None)
        marks = []
        for lr in lrs:
            if lr not in points:
                marks.append("failed" if lr in failed.get(row, ()) else "-")
                continue
            text = f"{points[lr]:.{digits}f}" + (" (recipe)" if own is not None and float(own) == lr else "")
            marks.append(f"**{text}**" if points[lr] == best else text)
        lines.append(f"| {row} | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def _mean_spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f} ({len(values)} seeds)"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _tensor_ratio(task_cells: dict[str, dict[str, Any]], row: str) -> float | None:
    from hf_memopt.tools.memory import MemoryBreakdown

    cell, base = task_cells.get(row, {}), task_cells.get("adamw", {})
    if "memory_bytes" not in cell or "memory_bytes" not in base:
        return None
    return MemoryBreakdown(**cell["memory_bytes"]).tensors_total / MemoryBreakdown(**base["memory_bytes"]).tensors_total


def _time_ratio(task_cells: dict[str, dict[str, Any]], row: str, key: str = "median_step_cpu_seconds") -> float | None:
    step = task_cells.get(row, {}).get(key)
    base = task_cells.get("adamw", {}).get(key)
    return step / base if step and base else None


SideBySide = dict[str, dict[str, tuple[float, int]]]  # {task: {row: (time per update vs AdamW, rounds)}}


def side_by_side_time_ratios(timing_cells: dict[str, dict[str, dict[str, Any]]],
                             key: str = "median_step_cpu_seconds") -> SideBySide:
    """Per task and row of the timing schedule: the median over rounds of the row's time per update over AdamW's in
    the same round (the rounds run the rows in turn, so a slow spell of the machine weighs on both sides of each
    ratio), and how many rounds it covers."""
    ratios: dict[str, dict[str, list[float]]] = {}
    for task, task_cells in timing_cells.items():
        for name, cell in task_cells.items():
            row, _, k = name.partition("@round")
            base = task_cells.get(f"adamw@round{k}", {})
            if row == "adamw" or not k or not cell.get(key) or not base.get(key):
                continue
            ratios.setdefault(task, {}).setdefault(row, []).append(cell[key] / base[key])
    return {task: {row: (statistics.median(r), len(r)) for row, r in rows.items()} for task, rows in ratios.items()}


def _time_vs_adamw(task_cells: dict[str, dict[str, Any]], row: str,
                   side: dict[str, tuple[float, int]] | None, name: str | None = None) -> tuple[float | None, bool]:
    """The row's time per update against AdamW's and whether it was measured side by side: from the timing rounds
    where they ran the row, else from the two full-schedule cells (which may have run in different sessions; the row's
    cell ``name``, by default its recipe cell)."""
    if row == "adamw":
        return 1.0, True
    if side and row in side:
        return side[row][0], True
    return _time_ratio(task_cells, name or row), False


def _time_text(ratio: float | None, side_by_side: bool) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x" + ("" if side_by_side else "*")


def timing_table(timing_cells: dict[str, dict[str, dict[str, Any]]], ratios: SideBySide) -> str:
    """Per row and timing task: CPU time per update against AdamW's, side by side (``ratios``, from
    :func:`side_by_side_time_ratios` of ``timing_cells``), and AdamW's own CPU seconds per update (median over its
    rounds) for scale."""
    tasks = [t for t in FULL_TASKS if t in ratios]
    if not tasks:
        return ""
    header = ["row", *[f"{t} (vs AdamW)" for t in tasks]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(tasks)]
    adamw = [[c["median_step_cpu_seconds"] for n, c in timing_cells[t].items() if n.startswith("adamw@round")]
             for t in tasks]  # fmt: skip
    lines.append("| adamw (CPU s / update) | " + " | ".join(f"{statistics.median(a):.2f} s" for a in adamw) + " |")
    for row in ROWS:
        if any(row in ratios[t] for t in tasks):
            lines.append(f"| {row} | " + " | ".join(
                f"{ratios[t][row][0]:.2f}x ({ratios[t][row][1]} rounds)" if row in ratios[t] else "-" for t in tasks
            ) + " |")
    return "\n".join(lines)


TIME_FOOTNOTE = (
    "Time against AdamW is CPU time per update (median update; GaLore's subspace refreshes and BlockLLM's reselections "
    "fall outside it) from the side-by-side timing: `python benchmarks/results_table.py run --schedule timing "
    "--rounds 3`, 12 updates of each row (6 for instruction tuning) on the same batches, AdamW's in every round, the "
    "median of the per-round ratios. Ratios marked * are not from it: they divide two full-schedule cells, which ran "
    "hours or sessions apart beside other jobs (AdamW's own MRPC cells spread from 1.81 to 2.86 CPU s per update), so "
    "they can be off by a third.")


SHORT_TIME_FOOTNOTE = (
    "Time against AdamW: where unstarred, from the side-by-side timing (docs/results.md, \"Time per update, side by "
    "side\"; LLaMA at batch 4 x 256, the same 1,024 tokens per update as these cells' 8 x 128); a * ratio divides two "
    "of these cells, which did not run side by side (off by up to a third).")


def full_task_table(task: str, cells: dict[str, dict[str, Any]], device: bool = False,
                    side: dict[str, tuple[float, int]] | None = None) -> str:
    """Per row: the metric (mean and half-range over seeds), its gap to AdamW, memory, CPU time per update (against
    AdamW's from ``side``, the side-by-side timing, where it has the row); with ``device`` (the GPU cells) also the
    device peak (``torch.cuda.max_memory_allocated``) and wall time per update."""
    from hf_memopt.tools.memory import MemoryBreakdown

    time_key, time_name = ("median_step_seconds", "s / update") if device else ("median_step_cpu_seconds",
                                                                                 "CPU s / update")  # fmt: skip

    digits = 1 if task in GLUE_TASKS else 3 if task in INSTRUCT_TASKS else 2
    base_values = _seed_values(task, cells, "adamw")
    base_mean = _mean(base_values)
    metric = METRIC_NAMES.get(task, "accuracy")
    gap_name = "gap to AdamW (points)" if task in GLUE_TASKS else "vs AdamW"
    header = ["row", metric, gap_name, "updates", "weights MB", "grads MB", "optimizer MB", "activations MB",
              "tensors vs AdamW", *(["device peak MB"] if device else []), time_name, "time vs AdamW"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in ROWS:
        name = standing_cell(task, cells, row)
        if name is None:
            continue
        cell = cells[name]
        if "failed" in cell:
            lines.append(f"| {cell_label(row, name)} | failed: {cell['failed'].replace('|', '/')[:140]} |" + " |" * (len(header) - 2))
            continue
        # A row run only at swept rates shows its best one, named, where the others show their recipe's rate.
        values = _seed_values(task, cells, row) if name == row else [_metric(task, cell)]
        mean = _mean(values)
        if mean is None or base_mean is None:
            gap = "-"
        elif task in GLUE_TASKS:
            gap = f"{mean - base_mean:+.1f}"
        else:
            gap = f"{100 * (mean / base_mean - 1):+.1f}%"
        b = MemoryBreakdown(**cell["memory_bytes"])
        step = cell.get(time_key)
        tensors = _tensor_ratio(cells, name)
        if device:  # the GPU cells ran one after another in one session: their wall times compare
            time_text = _time_text(_time_ratio(cells, name, time_key), True)
        else:
            time_text = _time_text(*_time_vs_adamw(cells, row, side, name))
        lines.append("| " + " | ".join([
            cell_label(row, name), _mean_spread(values, digits), gap, str(cell.get("steps", "-")),
            f"{(b.parameters + b.buffers) / MB:.1f}", f"{b.gradients / MB:.1f}", f"{b.optimizer_state / MB:.1f}",
            f"{b.activations / MB:.1f}", "-" if tensors is None else f"{tensors:.2f}x",
            *([f"{b.peak_process / MB:.1f}"] if device else []),
            "-" if step is None else f"{step:.2f}", time_text,
        ]) + " |")
    return "\n".join(lines)


def plot_curves(task: str, cells: dict[str, dict[str, Any]]) -> Path:
    """Training loss (and, for pretraining, held-out perplexity) against updates, one line per row from its standing
    cell (:func:`standing_cell`: the recipe cell, or the best sweep cell of a row run only at swept rates, labelled
    with its rate). Rows on a longer GLUE schedule (zo's 10x updates) get their own panel, beside AdamW's curve, so
    that they do not squeeze the others into a tenth of the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pretrain = task in PRETRAIN_TASKS
    standing = {row: name for row in ROWS if (name := standing_cell(task, cells, row))
                and cells[name].get("losses") and "failed" not in cells[name]}
    longer = [row for row in standing if task in GLUE_TASKS and ROWS[row].glue_epochs_factor > 1]
    panels = 1 + (pretrain or bool(longer))
    fig, axes = plt.subplots(1, panels, figsize=(11 if panels == 2 else 6, 4), squeeze=False)
    tab20 = plt.get_cmap("tab20").colors  # pairs of a dark and a light shade: the ten dark ones come first
    colours = dict(zip(standing, tab20[0::2] + tab20[1::2]))  # one colour per row, the same in both panels

    def draw(ax, row: str) -> None:
        name = standing[row]
        cell = cells[name]
        steps = cell.get("loss_steps") or list(range(1, len(cell["losses"]) + 1))
        ax.plot(steps, cell["losses"], label=cell_label(row, name), linewidth=1, color=colours[row])

    for row in standing:
        if row not in longer:
            draw(axes[0][0], row)
        if pretrain and cells[standing[row]].get("eval_history"):
            history = cells[standing[row]]["eval_history"]
            axes[0][1].plot([h["step"] for h in history], [math.exp(min(h["eval_loss"], 50)) for h in history],
                            label=row, marker=".", linewidth=1, color=colours[row])
    axes[0][0].set(xlabel="update", ylabel="training loss", title=f"{task}: training loss")
    if pretrain:
        axes[0][1].set(xlabel="update", ylabel="held-out perplexity", title=f"{task}: held-out perplexity",
                       yscale="log")
    elif longer:
        for row in (["adamw"] if "adamw" in standing else []) + longer:
            draw(axes[0][1], row)
        axes[0][1].set(xlabel="update", ylabel="training loss", title=f"{task}: longer schedules, AdamW for scale")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"results_full_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# Issue #15's targets, each against AdamW on the same schedule, data and seed: GLUE average gap in points (GaLore,
# BlockLLM, VeLoRA 1.0; LoQT 1.5) and held-out perplexity within 5% for pretraining.
# A row that runs one of these methods (a variant row: loqt_int8, velora_mlp, ...) is held to its method's target.
GLUE_GAP_TARGET = {"galore": 1.0, "blockllm": 1.0, "velora": 1.0, "loqt": 1.5}
PRETRAIN_PPL_TARGET = {"galore": 0.05, "loqt": 0.05, "velora": 0.05}
INSTRUCT_LOSS_TARGET = {"galore": 0.02, "loqt": 0.02, "blockllm": 0.02, "velora": 0.02}
LR_SWEEP_SIZE = 3  # issue #15: a row that misses is swept over three learning rates, and AdamW over three alike


def glue_summary(cells: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Per row: the GLUE metric of every task run, the average over the tasks AdamW also ran, its gap to AdamW's
    average over the same tasks, the target and whether it is met (``incomplete`` until all five tasks are in,
    ``so far`` while a sweep it rests on is short of three rates: :func:`unfinished_sweeps`). Each row counts at its
    best learning rate among those run on the task (:func:`best_over_learning_rates`)."""
    tasks = [t for t in GLUE_TASKS if t in cells]
    summary: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        best = {t: best_over_learning_rates(t, cells[t], row) for t in tasks}
        per_task = {t: v for t, (v, _) in best.items() if v is not None}
        if not per_task:
            continue
        chosen = {t: lr for t, (v, lr) in best.items() if v is not None}
        base = {t: best_over_learning_rates(t, cells[t], "adamw")[0] for t in per_task}
        common = [t for t in per_task if base[t] is not None]
        avg = _mean([per_task[t] for t in common])
        gap = None if avg is None else avg - _mean([base[t] for t in common])
        target = GLUE_GAP_TARGET.get(ROWS[row].method)
        if target is None or gap is None:
            verdict = "-"
        else:
            within = -gap <= target
            short = unfinished_sweeps(cells, row, common, [] if within else common)
            verdict = verdict_text(within, len(common), len(GLUE_TASKS), short, " tasks")
        summary[row] = {"per_task": per_task, "tasks": common, "average": avg, "gap": gap, "target": target,
                        "verdict": verdict, "learning_rates": chosen,
                        "swept": any(row_sweep(t, cells[t], row) for t in tasks)}
    header = ["row", *[f"{t} ({METRIC_NAMES.get(t, 'acc')})" for t in tasks], "average", "gap to AdamW", "target",
              "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row, s in summary.items():
        lines.append("| " + " | ".join([
            row, *[(f"{s['per_task'][t]:.1f}" + (f" (lr {s['learning_rates'][t]:g})" if s["swept"] else ""))
                   if t in s["per_task"] else "failed" if _failed_cells(cells[t], row) else "-" for t in tasks],
            "-" if s["average"] is None else f"{s['average']:.1f}",
            "-" if s["gap"] is None or row == "adamw" else f"{s['gap']:+.1f}",
            "-" if s["target"] is None else f">= -{s['target']:.1f}", s["verdict"],
        ]) + " |")
    return "\n".join(lines), summary


def which_method_when(cells: dict[str, dict[str, dict[str, Any]]], summary: dict[str, dict[str, Any]],
                      timing: SideBySide | None = None) -> str:
    """A short guide written from the measured figures only: for every row with a GLUE average, its accuracy gap,
    tensor memory and CPU time against AdamW (medians over the tasks it ran; time from the side-by-side ``timing``
    where it has the row), sorted by memory, and the least-memory rows that keep accuracy within 1 point. Claims
    from the papers are not used here."""
    rows = []
    for row, s in summary.items():
        if row == "adamw" or s["gap"] is None:
            continue
        names = {t: standing_cell(t, cells[t], row) for t in s["tasks"]}
        mem = [r for r in (_tensor_ratio(cells[t], names[t]) for t in s["tasks"]) if r is not None]
        times = [_time_vs_adamw(cells[t], row, (timing or {}).get(t), names[t]) for t in s["tasks"]]
        side = [r for r, measured in times if measured and r is not None]
        time_ = side or [r for r, _ in times if r is not None]
        updates = [cells[t][names[t]].get("steps", 0) / cells[t]["adamw"]["steps"] for t in s["tasks"]
                   if cells[t].get("adamw", {}).get("steps")]  # fmt: skip
        rows.append((row, s, statistics.median(mem) if mem else None,
                     (statistics.median(time_) if time_ else None, bool(side)), max(updates, default=1.0)))
    if not rows:
        return ""  # no row beside AdamW on any GLUE task yet
    rows.sort(key=lambda r: (r[2] is None, r[2] or 0))
    lines = []
    for row, s, mem, time_, longer in rows:
        lines.append(f"- **{row}**: GLUE average {s['gap']:+.1f} points vs AdamW over {len(s['tasks'])} task(s)"
                     + (f", with {longer:.0f}x AdamW's updates" if longer > 1.01 else "") + "; "
                     f"tensor memory {'-' if mem is None else f'{mem:.2f}x'}, CPU time per update "
                     f"{_time_text(*time_)} (medians over those tasks).")
    kept = [r for r in rows if r[1]["gap"] >= -1.0 and r[2] is not None]
    every_task = [r for r in kept if len(r[1]["tasks"]) == len(GLUE_TASKS)]
    best = min(every_task, key=lambda r: r[2], default=None)
    lead = min((r for r in kept if r not in every_task), key=lambda r: r[2], default=None)
    if best:
        lines.append(f"- Least tensor memory with accuracy within 1 point of AdamW: **{best[0]}** "
                     f"({best[2]:.2f}x AdamW, {best[1]['gap']:+.1f} points).")
    # A row measured on fewer tasks is named apart, and only where it would beat the pick: a two-task figure is a
    # lead to follow, not a recommendation.
    if lead and (best is None or lead[2] < best[2]):
        lines.append(f"- {'Less' if best else 'Least'} tensor memory within 1 point on the tasks run so far: "
                     f"**{lead[0]}** ({lead[2]:.2f}x AdamW, {lead[1]['gap']:+.1f} points; "
                     f"{len(lead[1]['tasks'])} of {len(GLUE_TASKS)} tasks).")
    lost = [r[0] for r in rows if r[1]["gap"] < -1.0]
    if lost:
        lines.append(f"- Lose more than 1 point at these schedules: {', '.join(lost)} (see each task's table).")
    return "\n".join(lines) + "\n"


def unfinished_sweeps(cells: dict[str, dict[str, dict[str, Any]]], row: str, tasks: list[str],
                      missing_on: list[str]) -> dict[str, dict[str, int]]:
    """``{whose sweep: {task: rates run}}`` for the learning-rate sweeps that must finish before the row's verdict is
    final (empty when none): AdamW's on each task where the row was swept and AdamW has not run its three rates (it
    may still improve); the row's own on each task of ``missing_on`` (where it misses) that it compares with an AdamW
    taken at its best of several rates (issue #15: sweep that method and AdamW alike)."""
    short: dict[str, dict[str, int]] = {}
    for t in tasks:
        if row_sweep(t, cells[t], row) and (n := rates_run(t, cells[t], "adamw")) < LR_SWEEP_SIZE:
            short.setdefault("adamw", {})[t] = n
    for t in missing_on:
        if (n := rates_run(t, cells[t], row)) < LR_SWEEP_SIZE and rates_run(t, cells[t], "adamw") > 1:
            short.setdefault(row, {})[t] = n
    return short


def verdict_text(within: bool, ran: int, of: int, short: dict[str, dict[str, int]], unit: str = "") -> str:
    """A summary's verdict: ``incomplete (1 of 2): misses so far`` until the row has run every task (``ran`` of
    ``of``), then ``... so far`` naming each unfinished sweep of ``short`` (:func:`unfinished_sweeps`), e.g. ``misses
    so far (velora's learning-rate sweep on instruct: 1 of 3 rates run)``, then ``met`` or ``**missed**``."""
    so_far = f"{'within' if within else 'misses'} so far"
    if ran < of:
        return f"incomplete ({ran} of {of}{unit}): {so_far}"
    if short:
        parts = [f"{'AdamW' if who == 'adamw' else who}'s learning-rate sweep{'s' if len(runs) > 1 else ''} on "
                 + ", ".join(f"{t}: {n}" for t, n in runs.items()) + f" of {LR_SWEEP_SIZE} rates run"
                 for who, runs in short.items()]
        return f"{so_far} ({'; '.join(parts)})"
    return "met" if within else "**missed**"


def lm_summary(cells: dict[str, dict[str, dict[str, Any]]], all_tasks: tuple[str, ...] = PRETRAIN_TASKS,
               targets: dict[str, float] = PRETRAIN_PPL_TARGET) -> str:
    """Per row: the held-out figure (pretraining: perplexity; instruct: loss) at the end of each task run, its change
    against AdamW's, issue #15's target for the row's method and whether it is met (``incomplete`` until every task of ``all_tasks`` is
    in). Each row, AdamW included, counts at its best learning rate among those run on the task (the recipe's with
    the mean over its seeds, and each sweep cell's: :func:`best_over_learning_rates`), shown where it was swept."""
    tasks = [t for t in all_tasks if t in cells]
    if not tasks:
        return ""
    digits = 3 if all_tasks == INSTRUCT_TASKS else 1
    header = ["row", *[f"{t} {METRIC_NAMES[t]} (vs AdamW)" for t in tasks], "target", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    bases = {t: best_over_learning_rates(t, cells[t], "adamw")[0] for t in tasks}
    for row in ROWS:
        best = {t: best_over_learning_rates(t, cells[t], row) for t in tasks}
        if all(v is None for v, _ in best.values()):
            continue
        changes = {}
        marks = []
        for t in tasks:
            value, lr = best[t]
            base = bases[t]
            if value is None:
                marks.append("-")
                continue
            if base is not None and row != "adamw":
                changes[t] = value / base - 1
            swept = f" (lr {lr:g})" if row_sweep(t, cells[t], row) and lr is not None else ""
            marks.append(f"{value:.{digits}f}" + (f" ({100 * changes[t]:+.1f}%)" if t in changes else "") + swept)
        target = targets.get(ROWS[row].method)  # a variant row is held to its method's target, as on GLUE
        if target is None or not changes:
            verdict = "-"
        else:
            short = unfinished_sweeps(cells, row, tasks, [t for t, c in changes.items() if c > target])
            verdict = verdict_text(all(c <= target for c in changes.values()), len(changes), len(all_tasks), short)
        lines.append(f"| {row} | " + " | ".join(marks) + f" | {'-' if target is None else f'<= +{100 * target:.0f}%'} | "
                     f"{verdict} |")
    return "\n".join(lines)


def lm_guide(cells: dict[str, dict[str, dict[str, Any]]], all_tasks: tuple[str, ...], what: str,
             timing: SideBySide | None = None) -> list[str]:
    """Guide lines for pretraining or instruction tuning, from the measured figures only: per row that ran a task
    beside AdamW, its held-out change (perplexity or loss, per cent; each at its best learning rate run) with its
    tensor memory and CPU time per update against AdamW on that task (side by side from ``timing`` where it has the
    row)."""
    tasks = [t for t in all_tasks if t in cells]
    lines = []
    for row in ROWS:
        parts = []
        for t in tasks:
            value, base = best_over_learning_rates(t, cells[t], row)[0], best_over_learning_rates(t, cells[t], "adamw")[0]
            if row == "adamw" or value is None or base is None:
                continue
            name = standing_cell(t, cells[t], row)
            mem, time_ = _tensor_ratio(cells[t], name), _time_vs_adamw(cells[t], row, (timing or {}).get(t), name)
            parts.append(f"{t} {100 * (value / base - 1):+.1f}% (tensor memory "
                         f"{'-' if mem is None else f'{mem:.2f}x'}, CPU time per update {_time_text(*time_)})")
        if parts:
            lines.append(f"- **{row}**, {what} vs AdamW: " + "; ".join(parts) + ".")
    return lines


def full_summary(cells: dict[str, dict[str, dict[str, Any]]], timing: SideBySide | None = None) -> str:
    """The GLUE and pretraining summaries and the guide (time from the side-by-side ``timing`` where it has the row):
    the head of the full-schedule section and the README's."""
    parts = []
    glue_cells = {t: cells[t] for t in GLUE_TASKS if t in cells}
    if glue_cells:
        table, summary = glue_summary(glue_cells)
        parts.append("GLUE: metric x 100 per task (mean over seeds where several ran), each row at its best learning "
                     "rate among those run on the task (shown where a row was swept), the average over the tasks both "
                     "the row and AdamW ran, and issue #15's target for the gap. In every summary a verdict reads "
                     "\"so far\" until the sweeps it rests on have run three rates each: AdamW's on every task where "
                     "the row was swept, and the row's own on every task where it misses against an AdamW taken at "
                     "its best of several rates (issue #15: sweep the method and AdamW alike).\n\n" + table + "\n")
    pretraining = lm_summary(cells)
    if pretraining:
        parts.append("\nPretraining from scratch: held-out perplexity after the full schedule, and issue #15's target."
                     "\n\n" + pretraining + "\n")
    instruct = lm_summary(cells, INSTRUCT_TASKS, INSTRUCT_LOSS_TARGET)
    if instruct:
        parts.append("\nInstruction tuning (SmolLM2-135M, TRL SFTTrainer, one epoch of 2,000 Code Alpaca records): "
                     "held-out loss on 17 records, and issue #15's target.\n\n" + instruct + "\n")
    guide = which_method_when(glue_cells, summary, timing) if glue_cells else ""
    lm_lines = [*lm_guide(cells, PRETRAIN_TASKS, "pretraining held-out perplexity", timing),
                *lm_guide(cells, INSTRUCT_TASKS, "instruction held-out loss", timing)]  # fmt: skip
    if lm_lines:
        guide += "\n".join(lm_lines) + "\n"
    if guide:
        parts.append("\nWhich method when (from these numbers):\n\n" + guide + "\n" + TIME_FOOTNOTE + "\n")
    return "".join(parts)


def write_readme_full_summary(cells: dict[str, dict[str, dict[str, Any]]], timing: SideBySide | None = None) -> None:
    text = README.read_text()
    start, end = "<!-- full-summary -->", "<!-- /full-summary -->"
    if start in text:
        before, rest = text.split(start, 1)
        README.write_text(before + start + "\n" + full_summary(cells, timing) + end + rest.split(end, 1)[1])


def sample_answers(cells: dict[str, dict[str, Any]], chars: int = 400) -> str:
    """Each row's greedy answer to the held-out instructions its cell answered, beside the reference answer."""
    rows = {row: cells[row]["samples"] for row in ROWS if cells.get(row, {}).get("samples")}
    if not rows:
        return ""

    def quote(text: str) -> str:
        text = text if len(text) <= chars else text[:chars] + " [...]"
        return "\n".join("    " + line for line in text.splitlines()) or "    (empty)"

    parts = ["\nAnswers to held-out instructions (greedy, after training):\n"]
    for i, first in enumerate(next(iter(rows.values()))):
        parts.append(f"\n**Instruction {i + 1}.** {first['instruction'][:chars]}\n\nReference:\n\n"
                     f"{quote(first['reference'])}\n")
        for row, samples in rows.items():
            if i < len(samples):
                parts.append(f"\n{row}:\n\n{quote(samples[i]['answer'])}\n")
    return "".join(parts)


def render_full(timing_cells: dict[str, dict[str, dict[str, Any]]], timing: SideBySide) -> str:
    """The full-schedule section of docs/results.md (tables and curves), from ``out/results_full``, with time against
    AdamW from the side-by-side ``timing`` (of ``timing_cells``)."""
    cells = load_cells(SCHEDULE_PROFILES["full"][1])
    parts = [FULL_START, "\n"]
    if cells:
        RECORDS["full"].write_text(json.dumps(cells, indent=1, default=str))
        parts.append(f"Machine: {machine_line(cells)}.\n")
        parts.append("\n### Summary (full schedules)\n\n" + full_summary(cells, timing))
        write_readme_full_summary(cells, timing)
    if timing:
        parts.append("\n### Time per update, side by side\n\nCPU time per update against AdamW's in the same round "
                     f"(`run --schedule timing`: {', '.join(TIMING_SCHEDULES['glue'])} for GLUE; the full schedules' "
                     "batch shape, 12 updates, for pretraining, and 6 for instruction tuning), median over the rounds; "
                     "machine: "
                     f"{machine_line(timing_cells)}.\n\n{timing_table(timing_cells, timing)}\n")
    for task in FULL_TASKS:
        if task not in cells:
            parts.append(f"\n### {task} (full schedule)\n\nNot run yet (`python benchmarks/results_table.py run "
                         f"--schedule full --tasks {task}`).\n")
            continue
        schedule = ", ".join(FULL_SCHEDULES["glue" if task in GLUE_TASKS else task])
        figure = os.path.relpath(plot_curves(task, cells[task]), DOC.parent)
        parts.append(f"\n### {task} (full schedule)\n\nThe recipe `{recipe_path(task).relative_to(ROOT)}` with "
                     f"`{schedule}`.\n\n{full_task_table(task, cells[task], side=timing.get(task))}\n\n![{task} curves]({figure})\n")
        sweep = lr_sweep_table(task, cells[task])
        if sweep:
            parts.append(f"\nLearning-rate sweep on {task} (at each rate the mean over the seeds run there; everything "
                         f"else as the recipe; best per row in bold; \"(recipe)\" marks the rate of the row's own cell, the "
                         f"recipe's when that cell ran):\n\n{sweep}\n")
        if task in INSTRUCT_TASKS:
            parts.append(sample_answers(cells[task]))
    parts.append(FULL_END)
    return "".join(parts)


def render_gpu() -> str:
    """The GPU section of docs/results.md: the GLUE cells of ``--schedule gpu`` (bf16 on a CUDA device)."""
    cells = load_cells(SCHEDULE_PROFILES["gpu"][1])
    parts = [GPU_START, "\n"]
    if not cells:
        parts.append("Not run yet: no lent GPU has had time for these cells (the H200 runs of [gpu_check.md](gpu_check.md) "
                     "checked memory and CUDA paths, not GLUE accuracy). On one, `scripts/gpu_glue.sh` "
                     "runs these cells (`python benchmarks/results_table.py run --schedule gpu`) and `render` fills "
                     "this section.\n")
    else:
        RECORDS["gpu"].write_text(json.dumps(cells, indent=1, default=str))
        parts.append(f"Machine: {machine_line(cells, 'bf16 autocast')}.\n\n{glue_summary(cells)[0]}\n")
        for task in GLUE_TASKS:
            if task in cells:
                parts.append(f"\n### {task} (GPU, bf16)\n\n{full_task_table(task, cells[task], device=True)}\n")
    parts.append(GPU_END)
    return "".join(parts)


def render() -> None:
    for schedule_name in RECORDS:
        restore_recorded_cells(schedule_name)
    timing_cells = load_cells(SCHEDULE_PROFILES["timing"][1])
    if timing_cells:
        RECORDS["timing"].write_text(json.dumps(timing_cells, indent=1, default=str))
    timing = side_by_side_time_ratios(timing_cells)  # read once: the full and the short sections both use it
    text = DOC.read_text()
    for start, end, section in ((FULL_START, FULL_END, lambda: render_full(timing_cells, timing)),
                                (GPU_START, GPU_END, render_gpu)):
        if start in text:
            before, rest = text.split(start, 1)
            text = before + section() + rest.split(end, 1)[1]
    DOC.write_text(text)
    cells = load_cells()
    if not cells:
        raise SystemExit("no cells yet: run `python benchmarks/results_table.py run` first")
    RECORDS["short"].write_text(json.dumps(cells, indent=1, default=str))
    loads = [c["environment"].get("load_average_1m") for t in cells.values() for c in t.values() if "environment" in c]
    loads = [x for x in loads if x is not None]
    parts = [DOC.read_text().split("<!-- tables -->")[0].rstrip() + "\n\n<!-- tables -->\n",
             f"Machine: {machine_line(cells)}. 1-minute load average at the end of each cell: "
             f"{min(loads):.1f} to {max(loads):.1f}.\n" if loads else ""]
    for task in TASKS:
        if task not in cells:
            parts.append(f"\n### {task}\n\nNot run: the session that wrote this page ran out of machine time before this "
                         f"task (`python benchmarks/results_table.py run --tasks {task}` fills it in).\n")
            continue
        schedule = ", ".join(SCHEDULES["glue" if task in GLUE_TASKS else task])
        what = "MiniLM-L6 (22.7M) fine-tuning" if task in GLUE_TASKS else f"LLaMA {task[6:].upper()} from scratch"
        parts.append(f"\n### {task}: {what}\n\nSchedule: `{schedule}` on top of `{recipe_path(task).relative_to(ROOT)}`."
                     f"\n\n{task_table(task, cells[task], timing.get(task))}\n")
    parts.append(
        f"\nPaper columns: {PAPER['source_glue']}; {PAPER['source_pretrain']}. They are the nearest published setting, "
        "not this one: compare rows within a table, not against the paper column.\n\n" + SHORT_TIME_FOOTNOTE + "\n")
    DOC.write_text("".join(parts))
    write_readme_summary(cells, timing)
    print(f"wrote {DOC.relative_to(ROOT)} and {RESULTS_JSON.relative_to(ROOT)}")


def write_readme_summary(cells: dict[str, dict[str, dict[str, Any]]], timing: SideBySide | None = None) -> None:
    """The README's short table: per row, tensor memory and CPU time vs AdamW (side by side from ``timing`` where it
    has the row, else the two cells' ratio, starred), SST-2 accuracy, LLaMA perplexities."""
    from hf_memopt.tools.memory import MemoryBreakdown

    text = README.read_text()
    start, end = "<!-- results-summary -->", "<!-- /results-summary -->"
    if start not in text:
        return

    def ratio(task: str, name: str, of) -> str:
        cell, base = cells.get(task, {}).get(name, {}), cells.get(task, {}).get("adamw", {})
        if "memory_bytes" not in cell or "memory_bytes" not in base:
            return "-"
        return f"{of(cell) / of(base):.2f}x"

    def tensors(cell: dict[str, Any]) -> float:
        return MemoryBreakdown(**cell["memory_bytes"]).tensors_total

    def time_vs_adamw(task: str, name: str) -> str:
        if name not in cells.get(task, {}):
            return "-"
        return _time_text(*_time_vs_adamw(cells[task], name, (timing or {}).get(task)))

    def metric(task: str, name: str) -> str:
        cell = cells.get(task, {}).get(name)
        value = _metric(task, cell) if cell and "failed" not in cell else None
        return "-" if value is None else f"{value:.1f}" if task in GLUE_TASKS else f"{value:.0f}"

    lines = ["| row | tensors vs AdamW, LLaMA 20M / 60M | CPU time per update vs AdamW, 20M / 60M | SST-2 acc | "
             "LLaMA 20M / 60M held-out ppl |", "|---|---:|---:|---:|---:|"]
    for name in ROWS:
        if not any(name in cells.get(task, {}) for task in ("llama-20m", "llama-60m", "sst2")):
            continue  # a row run only at full schedules (loqt_int8)
        lines.append(
            f"| {name} | {ratio('llama-20m', name, tensors)} / {ratio('llama-60m', name, tensors)} | "
            f"{time_vs_adamw('llama-20m', name)} / {time_vs_adamw('llama-60m', name)} | {metric('sst2', name)} | "
            f"{metric('llama-20m', name)} / {metric('llama-60m', name)} |"
        )
    lines += ["", SHORT_TIME_FOOTNOTE]
    block = start + "\n" + "\n".join(lines) + "\n" + end
    before, rest = text.split(start, 1)
    README.write_text(before + block + rest.split(end, 1)[1])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _positive_float(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every missing cell")
    run.add_argument("--tasks", default=",".join(RUN_ORDER))
    run.add_argument("--rows", default=",".join(ROWS))
    run.add_argument("--force", action="store_true", help="rerun cells that already have results")
    run.add_argument("--smoke", action="store_true", help="3 updates per cell, into out/results_<schedule>_smoke")
    run.add_argument("--schedule", choices=sorted(SCHEDULE_PROFILES), default="short")
    run.add_argument("--seeds", default="0", help="comma-separated training seeds (cells <row>@seed<N> for N > 0)")
    run.add_argument("--lrs", default=None, help="comma-separated learning rates to sweep (cells <row>@lr<value>)")
    run.add_argument("--rounds", type=int, default=None,
                     help="--schedule timing only: rounds of all the rows in turn (default 3)")
    sub.add_parser("render", help="write docs/results.md and the README summary")
    cell = sub.add_parser("cell", help="train one cell in this process")
    cell.add_argument("task", choices=FULL_TASKS)
    cell.add_argument("row", choices=list(ROWS))
    cell.add_argument("--smoke", action="store_true")
    cell.add_argument("--schedule", choices=sorted(SCHEDULE_PROFILES), default="short")
    cell.add_argument("--seed", type=int, default=0)
    cell.add_argument("--lr", default=None, help="a learning rate instead of the recipe's (a sweep cell)")
    cell.add_argument("--round", type=int, default=0, help="--schedule timing: the round this cell belongs to")
    a = parser.parse_args()
    if a.command == "cell":
        if a.task not in SCHEDULE_TASKS[a.schedule]:
            raise SystemExit(f"task {a.task!r} is not in --schedule {a.schedule}: {SCHEDULE_TASKS[a.schedule]}")
        smoke = ("training.max_steps=3", "training.logging_steps=1", "training.warmup_steps=0", *{
            "glue": ["data.eval_limit=16"], "pretrain": ["data.eval_blocks=4"],
            "instruct": ["data.eval_limit=4", "data.sample_answers=1", "data.sample_answer_tokens=8",
                         "data.max_length=128", "training.gradient_accumulation_steps=1"],
        }["glue" if a.task in GLUE_TASKS else "instruct" if a.task in INSTRUCT_TASKS else "pretrain"])
        if a.schedule == "gpu" and not _cuda():  # a smoke run of the GPU cells' logic: bf16 autocast on the CPU
            smoke = (*smoke, "training.use_cpu=true")
        out = SCHEDULE_PROFILES[a.schedule][1]
        out = out.with_name(out.name + "_smoke") if a.smoke else out
        run_cell(a.task, a.row, out, smoke if a.smoke else (), schedule_name=a.schedule, seed=a.seed, lr=a.lr,
                 timing_round=a.round)
    elif a.command == "run":
        tasks, rows = a.tasks.split(","), a.rows.split(",")
        known = SCHEDULE_TASKS[a.schedule]
        if a.schedule == "gpu" and not a.smoke and not _cuda():
            raise SystemExit("--schedule gpu runs the GLUE cells in bf16 on a CUDA device and there is none here "
                             "(--smoke checks its logic on the CPU)")
        unknown = [t for t in tasks if t not in known] + [r for r in rows if r not in ROWS]
        if unknown:
            raise SystemExit(f"unknown task or row at --schedule {a.schedule}: {unknown}; tasks {known}, "
                             f"rows {list(ROWS)}")
        lrs = (None,) if a.lrs is None else tuple(a.lrs.split(","))
        bad = [lr for lr in lrs if lr is not None and not _positive_float(lr)]
        if bad:
            raise SystemExit(f"--lrs: {bad} are not positive numbers (e.g. --lrs 5e-5,2e-4)")
        if a.rounds is not None and a.schedule != "timing":
            raise SystemExit(f"--rounds belongs to --schedule timing (got --schedule {a.schedule})")
        rounds = 3 if a.rounds is None else a.rounds
        if a.schedule == "timing" and ("adamw" not in rows or rounds < 1):
            raise SystemExit(f"--schedule timing compares each row with AdamW in the same round: --rows must include "
                             f"adamw (got {a.rows}) and --rounds must be at least 1 (got {rounds})")
        run_all(tasks, rows, a.force, a.smoke, a.schedule, tuple(int(x) for x in a.seeds.split(",")), lrs,
                rounds if a.schedule == "timing" else 0)
    else:
        render()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

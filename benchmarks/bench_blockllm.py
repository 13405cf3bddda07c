"""BlockLLM evidence: memory vs AdamW (also at a re-selection step), GLUE quality vs full fine-tuning, and LLaMA
pretraining loss vs AdamW and GaLore at equal steps.

Each part runs in well under 15 minutes on 2 shared CPU cores and writes ``benchmarks/results/blockllm_<part>.json``:

    python benchmarks/bench_blockllm.py memory
    python benchmarks/bench_blockllm.py glue --task sst2     # also mrpc, stsb, rte
    python benchmarks/bench_blockllm.py llama
    python benchmarks/bench_blockllm.py report                # table + plot from the JSON files

``--methods blockllm`` (glue, llama) re-runs only the listed rows and copies the others from the existing JSON
(marked ``"copied_from_previous_run"``), for changes that move BlockLLM's figures alone.

Methods are compared within one run (same data order, seed, dtype float32), as ratios where it matters; the machine is
shared, so the outside load (``/proc/loadavg``) is recorded with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_memopt import attach  # noqa: E402
from hf_memopt.blockllm import BlockLLMConfig  # noqa: E402
from hf_memopt.blockllm.optimizer import unwrap_blockllm_optimizer  # noqa: E402
from hf_memopt.galore import GaLoreConfig  # noqa: E402
from hf_memopt.tools.memory import (  # noqa: E402
    MB,
    GradientMeter,
    MemoryReportCallback,
    SavedActivationMeter,
    gradient_bytes,
    optimizer_state_bytes,
)
from hf_memopt.tools.recipes.data import GLUE_TASKS, load_glue, load_text  # noqa: E402
from hf_memopt.tools.recipes.models import llama_config, minilm_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _env() -> dict:
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared, noisy)",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "seed": SEED,
        "command": "python " + " ".join(sys.argv),
    }


def _args(out: str, **kw) -> TrainingArguments:
    base = dict(
        output_dir=out, per_device_train_batch_size=8, learning_rate=1e-3, max_steps=10, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=SEED, data_seed=SEED, dataloader_num_workers=0,
        disable_tqdm=True, lr_scheduler_type="constant", weight_decay=0.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


class StepMemory(TrainerCallback):
    """Per optimizer step: gradient bytes alive before the update (and their peak inside backward), bytes saved for
    backward (``activations``: gradient accumulation 1, so one forward per step), optimizer state after the update,
    whether the step's backward served a BlockLLM re-selection, and the step time.

    ``force_reselect_at``: after that step, re-select: a scoring step next (``selection="full_backward"``: the next
    step is the re-selection step) or a selection from the stored norms now (``"stored_norms"``: this step's norms were
    the last ones it read, so this step is the re-selection step)."""

    def __init__(self, force_reselect_at: int | None = None, activations: bool = False):
        self.rows: list[dict] = []
        self.force_reselect_at = force_reselect_at
        self.activations = activations
        self._scoring = False
        self._t = 0.0
        self._meter: GradientMeter | None = None
        self._saved: SavedActivationMeter | None = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        opt = unwrap_blockllm_optimizer(optimizer)
        self._scoring = bool(opt is not None and opt.scoring)
        self._meter = GradientMeter(model)  # hooks on what requires grad now: every block during a scoring step
        if self.activations:
            self._saved = SavedActivationMeter(model).__enter__()
        self._t = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self._grad = gradient_bytes(model)
        self._meter.sample(model)
        self._grad_peak = self._meter.peak
        self._meter.remove()
        if self._saved is not None:
            self._saved.__exit__(None, None, None)

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        opt = unwrap_blockllm_optimizer(optimizer)
        reselected = self._scoring
        if opt is not None and state.global_step == self.force_reselect_at and not opt.scoring:
            if opt.selection == "stored_norms":
                opt.select_from_stored_norms()
                reselected = True
            else:
                opt.begin_scoring()
        self.rows.append({
            "step": state.global_step, "scoring_step": self._scoring, "reselection_step": reselected,
            "gradient_bytes": self._grad, "gradient_peak_in_backward_bytes": self._grad_peak,
            "saved_activation_bytes": self._saved.peak if self._saved is not None else None,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer), "seconds": time.perf_counter() - self._t,
            "load": _load(),
        })


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


class LMChunks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, seq: int):
        n = ids.numel() // seq
        self.ids = ids[: n * seq].view(n, seq)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _lm_data(seq: int, source: str = "wikitext2_valid"):
    tok = _tokenizer()
    ids = torch.tensor(tok(load_text(source), add_special_tokens=False)["input_ids"], dtype=torch.long)
    return LMChunks(ids, seq), len(tok)


def _llama(vocab: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    return LlamaForCausalLM(llama_config("20m", vocab_size=vocab, max_position_embeddings=256))


def _method(trainer: Trainer, name: str, sparsity: float, patience: int) -> None:
    if name.startswith("blockllm"):
        attach(trainer, BlockLLMConfig(sparsity=sparsity, patience=patience,
                                       optimizer="adamw_8bit" if name.endswith("8bit") else "adamw",
                                       selection="stored_norms" if name.endswith("stored_norms") else "full_backward"))
    elif name == "galore":
        attach(trainer, GaLoreConfig(rank=64, update_proj_gap=50, scale=0.25))


# ---- memory ----------------------------------------------------------------------------------------------------------
def run_memory(a) -> dict:
    data, vocab = _lm_data(a.seq)
    rows = {}
    blockllm_runs = ("blockllm", "blockllm_8bit", "blockllm_stored_norms")
    for name in ("adamw", *blockllm_runs):
        trainer = Trainer(model=_llama(vocab), args=_args(f"/tmp/bl_mem_{name}", max_steps=a.steps,
                                                         per_device_train_batch_size=a.batch), train_dataset=data)
        _method(trainer, name, a.sparsity, patience=1)  # plus a forced re-selection after step 3 (StepMemory)
        # activations are measured per step by StepMemory (saved-tensor hooks do not nest: only the inner one counts)
        mem = MemoryReportCallback(print_table=False, track_activations=False)
        steps = StepMemory(force_reselect_at=3, activations=True)
        trainer.add_callback(mem)  # after BlockLLM's callback, so its step-end runs after the selection's
        trainer.add_callback(steps)
        trainer.train()
        opt = unwrap_blockllm_optimizer(trainer.optimizer)
        mem.breakdown.activations = max(s["saved_activation_bytes"] for s in steps.rows)
        rows[name] = {"breakdown": mem.breakdown.to_dict(), "steps": steps.rows,
                      "trainable_params": sum(p.numel() for p in _llama(vocab).parameters())}
        if opt is not None:
            rows[name].update(selectable_params=opt.selectable_numel, selected_params=opt.selected_numel,
                              budget=opt.budget, selected_of_selectable=opt.selected_fraction,
                              selected_of_trainable=opt.selected_fraction_of_trainable)
        print(name, {k: v for k, v in mem.breakdown.to_dict().items()}, flush=True)
    adam = rows["adamw"]["breakdown"]
    adam_saved = max(s["saved_activation_bytes"] for s in rows["adamw"]["steps"])
    for name in blockllm_runs:
        r = rows[name]
        # re-selections after the first (step 1 is the first selection's scoring step in full_backward)
        again = [s for s in r["steps"] if s["reselection_step"] and s["step"] > 1]
        normal = [s for s in r["steps"] if not s["reselection_step"] and s["step"] > 1]
        r["ratio_optimizer_state_vs_adamw"] = r["breakdown"]["optimizer_state"] / adam["optimizer_state"]
        r["ratio_gradients_peak_vs_adamw"] = r["breakdown"]["gradients"] / adam["gradients"]
        r["gradient_peak_at_reselection_bytes"] = max(s["gradient_peak_in_backward_bytes"] for s in again)
        r["ratio_gradient_peak_at_reselection_vs_adamw"] = r["gradient_peak_at_reselection_bytes"] / adam["gradients"]
        r["ratio_optimizer_state_at_reselection_vs_adamw"] = max(
            s["optimizer_state_bytes"] for s in again) / adam["optimizer_state"]
        r["saved_activations_at_reselection_bytes"] = max(s["saved_activation_bytes"] for s in again)
        r["saved_activations_normal_step_bytes"] = max(s["saved_activation_bytes"] for s in normal)
        r["ratio_saved_activations_at_reselection_vs_adamw"] = r["saved_activations_at_reselection_bytes"] / adam_saved
        r["reselection_steps"] = [s["step"] for s in again]
    return {"part": "memory", "env": _env(), "model": "llama 20m (hidden 256, 4 layers, vocab 30522)",
            "batch": a.batch, "seq": a.seq, "steps": a.steps, "sparsity": a.sparsity, "runs": rows}


# ---- GLUE ------------------------------------------------------------------------------------------------------------
def _glue_dataset(task, split, tok, max_len, limit=None):
    spec = GLUE_TASKS[task]
    ds = load_glue(task, split, limit)

    def enc(batch):
        texts = (batch["text_a"],) + ((batch["text_b"],) if "text_b" in batch else ())
        out = tok(*texts, truncation=True, max_length=max_len)
        out["labels"] = [float(x) for x in batch["label"]] if spec.num_labels == 1 else batch["label"]
        return out

    return ds.map(enc, batched=True, remove_columns=ds.column_names)


def _metrics(task, preds, labels) -> dict:
    preds, labels = torch.tensor(preds), torch.tensor(labels)
    if GLUE_TASKS[task].num_labels == 1:
        p = preds.flatten().double()
        y = labels.double()

        def pearson(u, v):
            u, v = u - u.mean(), v - v.mean()
            return float((u * v).sum() / (u.norm() * v.norm()))

        def ranks(x):
            return torch.argsort(torch.argsort(x)).double()

        return {"pearson": pearson(p, y), "spearmanr": pearson(ranks(p), ranks(y))}
    yhat = preds.argmax(-1)
    out = {"accuracy": float((yhat == labels).double().mean())}
    if task == "mrpc":
        tp = int(((yhat == 1) & (labels == 1)).sum())
        fp, fn = int(((yhat == 1) & (labels == 0)).sum()), int(((yhat == 0) & (labels == 1)).sum())
        out["f1"] = 2 * tp / max(1, 2 * tp + fp + fn)
    return out


def run_glue(a) -> dict:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    tok = _tokenizer()
    spec = GLUE_TASKS[a.task]
    train = _glue_dataset(a.task, "train", tok, a.max_len)
    dev = _glue_dataset(a.task, "dev", tok, a.max_len)
    runs = {}
    for name, lr in (("full_ft", a.lr_full), ("blockllm", a.lr_blockllm)):
        if _copied(runs, f"glue_{a.task}", name, a.methods):
            continue
        torch.manual_seed(SEED)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=spec.num_labels)
        args = _args(f"/tmp/bl_glue_{name}", max_steps=a.steps, per_device_train_batch_size=a.batch,
                     per_device_eval_batch_size=64, learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0.06,
                     logging_steps=10)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
        _method(trainer, name, a.sparsity, a.patience)
        steps = StepMemory()
        trainer.add_callback(steps)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        pred = trainer.predict(dev)
        metrics = _metrics(a.task, pred.predictions, pred.label_ids)
        opt = unwrap_blockllm_optimizer(trainer.optimizer)
        runs[name] = {
            "lr": lr, "metrics": metrics, "train_seconds": train_s,
            "median_step_s": sorted(s["seconds"] for s in steps.rows)[len(steps.rows) // 2],
            "optimizer_state_mb": max(s["optimizer_state_bytes"] for s in steps.rows) / MB,
            "final_train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-3:],
            "selections": opt.num_selections if opt else None,
            "selected_params": opt.selected_numel if opt else None,
            "selected_of_selectable": opt.selected_fraction if opt else None,
            "selected_of_trainable": opt.selected_fraction_of_trainable if opt else None,
            "load_end": _load(),
        }
        print(a.task, name, runs[name], flush=True)
    main = spec.metrics[0]
    delta = 100 * (runs["blockllm"]["metrics"][main] - runs["full_ft"]["metrics"][main])
    return {"part": f"glue_{a.task}", "env": _env(), "model": "all-MiniLM-L6-v2 (offline)", "task": a.task,
            "batch": a.batch, "max_len": a.max_len, "steps": a.steps, "sparsity": a.sparsity, "patience": a.patience,
            "train_examples": len(train), "dev_examples": len(dev), "runs": runs,
            f"blockllm_minus_full_{main}_points": delta}


# ---- LLaMA pretraining -------------------------------------------------------------------------------------------------
def run_llama(a) -> dict:
    data, vocab = _lm_data(a.seq, "c4_demo")
    runs = {}
    for name in ("adamw", "galore", "blockllm"):
        if _copied(runs, "llama", name, a.methods):
            continue
        trainer = Trainer(model=_llama(vocab), args=_args(f"/tmp/bl_llama_{name}", max_steps=a.steps,
                                                         per_device_train_batch_size=a.batch, learning_rate=a.lr,
                                                         logging_steps=10, lr_scheduler_type="cosine",
                                                         warmup_steps=0.1), train_dataset=data)
        _method(trainer, name, a.sparsity, a.patience)
        steps = StepMemory()
        trainer.add_callback(steps)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        opt = unwrap_blockllm_optimizer(trainer.optimizer)
        runs[name] = {"losses_every_10": losses, "final_loss_mean_last_3": sum(losses[-3:]) / 3,
                      "median_step_s": sorted(s["seconds"] for s in steps.rows)[len(steps.rows) // 2],
                      "optimizer_state_mb": max(s["optimizer_state_bytes"] for s in steps.rows) / MB,
                      "selections": opt.num_selections if opt else None,
                      "selected_params": opt.selected_numel if opt else None,
                      "selected_of_selectable": opt.selected_fraction if opt else None,
                      "selected_of_trainable": opt.selected_fraction_of_trainable if opt else None,
                      "load_end": _load()}
        print(name, runs[name]["final_loss_mean_last_3"], flush=True)
    return {"part": "llama", "env": _env(), "model": f"llama 20m (vocab {vocab}, MiniLM tokenizer), from scratch",
            "data": "c4_demo (bundled)", "batch": a.batch, "seq": a.seq, "steps": a.steps, "lr": a.lr,
            "sparsity": a.sparsity, "patience": a.patience, "galore": "rank 64, gap 50, scale 0.25, all-linear",
            "runs": runs}


def _copied(runs: dict, part: str, name: str, methods: str | None) -> bool:
    """``--methods`` leaves ``name`` out: copy its row from the existing ``blockllm_<part>.json`` into ``runs``."""
    if methods is None or name in methods.split(","):
        return False
    previous = json.loads((RESULTS / f"blockllm_{part}.json").read_text())
    runs[name] = {**previous["runs"][name], "copied_from_previous_run": previous["env"]["command"]}
    return True


# ---- report ----------------------------------------------------------------------------------------------------------
def run_report(a) -> None:
    from hf_memopt.tools.memory import MemoryBreakdown, plot_memory_breakdown

    mem = json.loads((RESULTS / "blockllm_memory.json").read_text())
    runs = {n: MemoryBreakdown(**r["breakdown"]) for n, r in mem["runs"].items()}
    plot_memory_breakdown(runs, str(RESULTS / "blockllm_memory.png"), "BlockLLM vs AdamW, LLaMA 20m, CPU fp32")
    print("wrote", RESULTS / "blockllm_memory.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("memory", "glue", "llama", "report"))
    p.add_argument("--task", default="sst2", choices=tuple(GLUE_TASKS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--lr-blockllm", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default=None, help="glue / llama: comma-separated rows to run; others are copied")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    defaults = {"memory": (6, 4), "glue": (60, 16), "llama": (60, 4), "report": (0, 0)}[a.part]
    a.steps = a.steps if a.steps is not None else defaults[0]
    a.batch = a.batch if a.batch is not None else defaults[1]
    if a.part == "report":
        return run_report(a)
    result = {"memory": run_memory, "glue": run_glue, "llama": run_llama}[a.part](a)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"blockllm_{result['part']}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print("wrote", out)


if __name__ == "__main__":
    main()

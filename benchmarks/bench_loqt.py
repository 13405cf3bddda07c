"""LoQT benchmark: memory (measured vs AdamW, GaLore and the paper's model), LLaMA pretraining loss, GLUE fine-tuning.

    python benchmarks/bench_loqt.py memory   [--size 20m]            -> results/loqt_memory.json
    python benchmarks/bench_loqt.py pretrain [--steps 200]           -> results/loqt_pretrain.json (+ .png)
    python benchmarks/bench_loqt.py glue --task mrpc [--steps 100]   -> results/loqt_glue_mrpc.json

All runs: CPU, float32, seed 0, the stock transformers Trainer; methods compared inside one invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_average, machine  # noqa: E402

from hf_memopt import attach  # noqa: E402
from hf_memopt.galore import GaLoreConfig  # noqa: E402
from hf_memopt.loqt import LoQTConfig, loqt_layers  # noqa: E402
from hf_memopt.tools.memory import GradientMeter, optimizer_state_bytes, tensor_bytes  # noqa: E402
from hf_memopt.tools.recipes.data import GLUE_TASKS, load_glue, load_text  # noqa: E402
from hf_memopt.tools.recipes.models import llama_config, minilm_path  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
MB = 2**20


def args_for(out: str, **kw) -> TrainingArguments:
    base = dict(
        output_dir=out, report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, logging_steps=10, lr_scheduler_type="cosine", warmup_steps=10,
    )
    base.update(kw)
    return TrainingArguments(**base)


def weight_bytes(model) -> int:
    """Parameters and buffers (LoQT keeps quantized weights and P as buffers), each storage once."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


class MeterCallback(TrainerCallback):
    """Peak live .grad bytes per update, split into merge updates and regular ones, plus the gradient LoQT collects
    for P inside backward (its running sums; at most one m x n matrix per layer while it is being reduced)."""

    def __init__(self, merge_steps: set[int]):
        self.merge_steps = merge_steps
        self.peaks = {"regular": 0, "merge": 0}
        self.collected_peak = 0
        self.meter = None
        self.step_time: list[float] = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = model
        self.meter = GradientMeter(model)
        layers = list(loqt_layers(model).values())
        callback = self

        for layer in layers:
            original = layer._add_weight_gradient

            def wrapped(grad_w, _orig=original):
                live = sum(x._grad_sum.untyped_storage().nbytes() for x in layers if x._grad_sum is not None)
                callback.collected_peak = max(callback.collected_peak, live + grad_w.untyped_storage().nbytes())
                return _orig(grad_w)

            layer._add_weight_gradient = wrapped

    def on_step_begin(self, args, state, control, **kw):
        self.meter.peak = 0
        self._t = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.meter.sample(self.model)
        kind = "merge" if state.global_step in self.merge_steps else "regular"
        self.peaks[kind] = max(self.peaks[kind], self.meter.peak)

    def on_step_end(self, args, state, control, **kw):
        self.step_time.append(time.perf_counter() - self._t)


def paper_memory_model(model, quant: str | None, quantize_projection: bool) -> dict[str, float]:
    """Paper's accounting for the targeted layers (fp32 here): W mn/2 bytes (NF4), P and B; Adam 2 states of B;
    gradient of B. Non-targeted parameters (embeddings, head, norms) get full AdamW in every method."""
    w = opt = grad = 0.0
    for layer in loqt_layers(model).values():
        m, n, r = layer.out_features, layer.in_features, layer.rank
        bits = {"nf4": 4, "fp4": 4, "int8": 8, None: 32}[quant]
        w += m * n * bits / 8 + layer.proj.numel() * 4 if not quantize_projection else m * n * bits / 8
        if quantize_projection:
            w += (m * r if layer.side == "left" else r * n) * bits / 8
        w += layer.B.numel() * 4
        opt += 2 * layer.B.numel() * 4
        grad += layer.B.numel() * 4
    return {"target_weights_mb": w / MB, "target_optimizer_mb": opt / MB, "target_gradients_mb": grad / MB}


def lm_blocks(tokenizer, seq: int, text: str = "wikitext2_valid") -> tuple[list[dict], list[dict]]:
    ids = tokenizer(load_text(text), add_special_tokens=False)["input_ids"]
    blocks = [torch.tensor(ids[i : i + seq]) for i in range(0, len(ids) - seq, seq)]
    data = [{"input_ids": b, "labels": b} for b in blocks]
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def make_llama(size: str, vocab: int):
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(size, vocab_size=vocab, max_position_embeddings=512))


def attach_method(trainer, method: str, rank: int, merge_every: int):
    if method == "adamw":
        return None
    if method == "galore":
        cfg = GaLoreConfig(rank=rank, update_proj_gap=merge_every, scale=0.25, target_modules=LLAMA_TARGETS)
    elif method == "loqt_defaults":  # LoQTConfig's defaults: the official scripts' settings (NF4 P, 5 EC steps, schedule)
        cfg = LoQTConfig(rank=rank, merge_every=merge_every, merge_growth=1.2, scale=0.5, target_modules=LLAMA_TARGETS)
    else:
        quant = {"loqt_nf4": "nf4", "loqt_nf4_ec": "nf4", "loqt_nf4_qp": "nf4", "loqt_nq": None}[method]
        cfg = LoQTConfig(
            rank=rank, quant=quant, merge_every=merge_every, merge_growth=1.2, scale=0.5,
            error_compensation_steps=5 if method in ("loqt_nf4_ec", "loqt_nf4_qp") else 0,
            quantize_projection=method == "loqt_nf4_qp", target_modules=LLAMA_TARGETS,
        )
    attach(trainer, cfg)
    return cfg


def run_memory(a) -> dict:
    tok = AutoTokenizer.from_pretrained(minilm_path())
    train, _ = lm_blocks(tok, a.seq)
    rows = {}
    for method in ["adamw", "galore", "loqt_nf4", "loqt_nf4_qp", "loqt_nq"]:
        model = make_llama(a.size, tok.vocab_size)
        trainer = Trainer(model=model, args=args_for(f"/tmp/loqt_mem_{method}", max_steps=4, logging_steps=1,
                          per_device_train_batch_size=a.batch, learning_rate=1e-3), train_dataset=train[:64])
        cfg = attach_method(trainer, method, a.rank, merge_every=2)
        merge_steps = {0, 2} if isinstance(cfg, LoQTConfig) else set()
        meter = MeterCallback(merge_steps)
        trainer.add_callback(meter)
        trainer.train()
        row = {
            "weights_mb": weight_bytes(model) / MB,
            "optimizer_state_mb": optimizer_state_bytes(trainer.optimizer) / MB,
            "gradients_regular_step_mb": meter.peaks["regular"] / MB,
            "gradients_merge_step_mb": meter.peaks["merge"] / MB if merge_steps else None,
            "collected_weight_gradient_peak_mb": meter.collected_peak / MB if merge_steps else None,
            "load": load_average(),
        }
        if isinstance(cfg, LoQTConfig):
            row["paper_model"] = paper_memory_model(model, cfg.quant, cfg.quantize_projection)
        targets = [m for n, m in model.named_modules() if n.split(".")[-1] in LLAMA_TARGETS]
        row["targeted_params_m"] = sum(m.in_features * m.out_features for m in targets) / 1e6
        rows[method] = row
        print(method, json.dumps(row), flush=True)
    return {"rows": rows, "size": a.size, "rank": a.rank, "batch": a.batch, "seq": a.seq}


@torch.no_grad()
def eval_loss(model, data, batch: int = 8) -> float:
    model.eval()
    losses = []
    for i in range(0, len(data), batch):
        ids = torch.stack([d["input_ids"] for d in data[i : i + batch]])
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    model.train()
    return sum(losses) / len(losses)


def run_pretrain(a) -> dict:
    tok = AutoTokenizer.from_pretrained(minilm_path())
    train, held = lm_blocks(tok, a.seq)
    held = held[:64]
    rows = {}
    lrs = {"adamw": 1e-3, "galore": 1e-2, "loqt_nf4": 1e-2, "loqt_nf4_ec": 1e-2, "loqt_nq": 1e-2, "loqt_defaults": 1e-2}
    for method in a.methods.split(","):
        lr = lrs[method]
        model = make_llama(a.size, tok.vocab_size)
        trainer = Trainer(model=model, args=args_for(f"/tmp/loqt_pt_{method}", max_steps=a.steps, learning_rate=lr,
                          per_device_train_batch_size=a.batch, max_grad_norm=1.0), train_dataset=train)
        attach_method(trainer, method, a.rank, merge_every=a.merge_every)
        t0 = time.perf_counter()
        load0 = load_average()
        trainer.train()
        curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
        rows[method] = {
            "lr": lr, "train_loss_curve": curve, "final_train_loss": curve[-1][1], "eval_loss": eval_loss(model, held),
            "wall_s": time.perf_counter() - t0, "load_before": load0, "load_after": load_average(),
        }
        rows[method]["eval_ppl"] = math.exp(rows[method]["eval_loss"])
        rows[method]["command"] = " ".join(["python"] + sys.argv)
        print(method, rows[method]["eval_loss"], rows[method]["wall_s"], flush=True)
        _save_partial(f"loqt_pretrain_{a.size}", method, rows[method], a)
    return {"rows": rows, "size": a.size, "rank": a.rank, "batch": a.batch, "seq": a.seq, "steps": a.steps,
            "merge_every": a.merge_every, "merge_growth": 1.2, "data": "wikitext2_valid (90% train / 64 held-out blocks)",
            "tokenizer": "all-MiniLM-L6-v2 WordPiece"}


def _save_partial(name: str, method: str, row: dict, a) -> None:
    """Merge one method's row into results/<name>.json as soon as it is measured (methods may run in separate
    invocations to keep each run short; every row records its own command and load)."""
    path = RESULTS / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.setdefault("rows", {})[method] = row
    result.update(size=a.size, rank=a.rank, batch=a.batch, seq=a.seq, steps=a.steps, merge_every=a.merge_every,
                  merge_growth=1.2, data="wikitext2_valid (90% train / 64 held-out blocks)",
                  tokenizer="all-MiniLM-L6-v2 WordPiece", machine=machine(), dtype="float32", seed=0,
                  note="2-core CPU shared with other jobs: timings are noisy")
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def run_glue(a) -> dict:
    def pearson(x, y) -> float:
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        x, y = x - x.mean(), y - y.mean()
        return float((x @ y) / (x.norm() * y.norm()))

    def rank(x):
        return torch.as_tensor(x).argsort().argsort().double()

    task = GLUE_TASKS[a.task]
    tok = AutoTokenizer.from_pretrained(minilm_path())

    def encode(split, limit):
        ds = load_glue(a.task, split, limit)
        cols = ("text_a", "text_b") if "text_b" in ds.column_names else ("text_a",)
        # list(...): datasets 4 returns a lazy Column, which the tokenizer rejects
        enc = tok(*[list(ds[c]) for c in cols], truncation=True, max_length=a.seq, padding="max_length")
        labels = list(ds["label"])
        return [{"input_ids": torch.tensor(enc["input_ids"][i]), "attention_mask": torch.tensor(enc["attention_mask"][i]),
                 "token_type_ids": torch.tensor(enc["token_type_ids"][i]),
                 "labels": torch.tensor(labels[i], dtype=torch.float32 if task.num_labels == 1 else torch.long)}
                for i in range(len(labels))]

    train, dev = encode("train", None), encode("dev", a.eval_limit)

    def metrics(pred):
        logits, labels = pred.predictions, pred.label_ids
        if task.num_labels == 1:
            p = logits.reshape(-1)
            return {"pearson": pearson(p, labels), "spearmanr": pearson(rank(p), rank(labels))}
        acc = float((logits.argmax(-1) == labels).mean())
        out = {"accuracy": acc}
        if "f1" in task.metrics:
            pr = logits.argmax(-1)
            tp = float(((pr == 1) & (labels == 1)).sum())
            out["f1"] = 2 * tp / max(1.0, float((pr == 1).sum() + (labels == 1).sum()))
        return out

    rows = {}
    for method, lr in [("full", a.lr_full), ("loqt_nf4", a.lr_loqt)]:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=task.num_labels)
        trainer = Trainer(model=model, args=args_for(f"/tmp/loqt_glue_{method}", max_steps=a.steps, learning_rate=lr,
                          per_device_train_batch_size=a.batch, per_device_eval_batch_size=64, warmup_steps=a.steps // 10,
                          lr_scheduler_type="linear"), train_dataset=train, eval_dataset=dev, compute_metrics=metrics)
        if method != "full":
            model.bert.embeddings.requires_grad_(False)
            attach(trainer, LoQTConfig(rank=a.rank, quant="nf4", merge_every=a.merge_every, merge_growth=1.2,
                                       error_compensation_steps=5, scale=0.5, target_modules=BERT_TARGETS))
        t0, load0 = time.perf_counter(), load_average()
        trainer.train()
        result = trainer.evaluate()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows[method] = {"lr": lr, "metrics": {k: v for k, v in result.items() if k.startswith("eval_") and "runtime" not in k
                                               and "per_second" not in k},
                        "optimizer_state_mb": optimizer_state_bytes(trainer.optimizer) / MB,
                        "weights_mb": weight_bytes(model) / MB, "trainable_params_m": trainable / 1e6,
                        "wall_s": time.perf_counter() - t0, "load_before": load0, "load_after": load_average()}
        print(method, json.dumps(rows[method]), flush=True)
    return {"rows": rows, "task": a.task, "steps": a.steps, "batch": a.batch, "seq": a.seq, "rank": a.rank,
            "merge_every": a.merge_every, "eval_limit": a.eval_limit, "model": "all-MiniLM-L6-v2"}


def plot_pretrain(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in result["rows"].items():
        steps, losses = zip(*row["train_loss_curve"])
        ax.plot(steps, losses, label=f"{name} (eval {row['eval_loss']:.2f})")
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("train loss")
    ax.set_title(f"LLaMA {result['size']} pretraining, CPU fp32 (noisy shared machine)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["memory", "pretrain", "glue"])
    p.add_argument("--size", default="20m")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--merge-every", type=int, default=50)
    p.add_argument("--task", default="mrpc")
    p.add_argument("--methods", default="adamw,galore,loqt_nf4,loqt_nf4_ec,loqt_nq")
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--lr-loqt", type=float, default=5e-4)
    a = p.parse_args()
    torch.set_num_threads(2)
    a.rank = a.rank or (32 if a.mode == "glue" else 64)
    t0 = time.time()
    result = {"memory": run_memory, "pretrain": run_pretrain, "glue": run_glue}[a.mode](a)
    result.update(machine=machine(), dtype="float32", seed=0, command=" ".join(["python"] + sys.argv),
                  wall_s=time.time() - t0, note="2-core CPU shared with other jobs: timings are noisy")
    name = {"memory": f"loqt_memory_{a.size}", "pretrain": f"loqt_pretrain_{a.size}", "glue": f"loqt_glue_{a.task}"}[a.mode]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    if a.mode == "pretrain" and path.exists():  # keep rows of methods measured by earlier invocations
        rows = json.loads(path.read_text()).get("rows", {})
        rows.update(result["rows"])
        result["rows"] = rows
    path.write_text(json.dumps(result, indent=1))
    if a.mode == "pretrain":
        plot_pretrain(result, RESULTS / f"{name}.png")
    print("wrote", RESULTS / f"{name}.json")


if __name__ == "__main__":
    main()

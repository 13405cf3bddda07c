"""VeLoRA evidence: saved activations (unique storages), step time, gradient fidelity and loss, measured here.

Parts (``--part``; default all):

* ``memory``: per model (LLaMA 20M / 60M pretraining shapes, MiniLM), the unique bytes saved for backward in one
  training step and the median step time (forward + backward + AdamW) for: plain, VeLoRA on the paper's targets
  (v_proj + down_proj; BERT: value + output.dense), VeLoRA on attention q/k/v + MLP, VeLoRA ``target_modules="auto"``
  (the MLP layers), gradient checkpointing, and
  checkpointing + VeLoRA auto (the paper's Table 7 comparison). MiniLM also gets LoRA vs LoRA + peft's VeLoRA.
* ``cosine``: per-layer cosine similarity of VeLoRA's grad_W to the exact grad_W (same weights, same batch), for
  num_groups 16/32/64 and each coefficient dtype.
* ``loss``: LLaMA 20M trained on the bundled WikiText-2 text with and without VeLoRA (auto, paper and attention + MLP
  targets), equal steps.

Run: ``python benchmarks/bench_velora.py`` (writes ``benchmarks/results/velora.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from hf_memopt.tools.recipes.data import load_glue, load_text  # noqa: E402
from hf_memopt.tools.recipes.models import llama_config, minilm_path  # noqa: E402
from hf_memopt.velora import VeLoRAConfig, apply_velora, remove_velora  # noqa: E402
from hf_memopt.velora.layer import is_velora_linear  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20
SEED = 0
PAPER_TARGETS = {"llama": ["v_proj", "down_proj"], "bert": r".*layer\.\d+\.(attention\.self\.value|output\.dense)"}
# the auto set from 2026-11-25 to 2026-12-05: the whole MLP / feed-forward (its two inputs freed)
MLP = {"llama": ["gate_proj", "up_proj", "down_proj"], "bert": r".*layer\.\d+\.(intermediate\.dense|output\.dense)"}
# the auto set until 2026-11-25: every Linear input that compressing really frees under SDPA
ATTENTION_AND_MLP = {
    "llama": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": r".*layer\.\d+\.(attention\.self\.(query|key|value)|intermediate\.dense|output\.dense)",
}


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def machine() -> dict:
    import peft
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "note": "shared 2-core CPU machine (other engineers' jobs run at the same time): times are noisy",
    }


def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def text_batches(tok, batch: int, seq: int, n: int, offset: int = 0) -> list[torch.Tensor]:
    ids = tok(load_text("wikitext2_valid"), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    blocks = ids[: (len(ids) // seq) * seq].view(-1, seq)
    return [blocks[offset + i * batch : offset + (i + 1) * batch] for i in range(n)]


def make_llama(size: str, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    return LlamaForCausalLM(llama_config(size, vocab_size=vocab))


def make_minilm():
    torch.manual_seed(SEED)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


class LiveSavedBytes:
    """Unique saved storages of one step: peak of the running total during forward, and the same total measured at
    layer boundaries so that with gradient checkpointing the recompute of one block in backward is included."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}
        self.forward_bytes = 0
        self.recompute_peak = 0
        self.in_backward = False
        self._recompute: dict[int, int] = {}

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.params:
            target = self._recompute if self.in_backward else self.seen
            target.setdefault(key, t.untyped_storage().nbytes())
            if self.in_backward:
                self.recompute_peak = max(self.recompute_peak, sum(self._recompute.values()))
        return t

    def block_boundary(self):
        self._recompute.clear()


def step_measure(model, batch_fn, optimizer, checkpointing: bool, steps: int = 4) -> dict:
    """Median step time over ``steps`` (after one warm-up) and the unique saved bytes of a step."""
    meter = LiveSavedBytes(model)
    layers = next(m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n.endswith(("layers", "layer")))
    handles = [layer.register_forward_pre_hook(lambda *a: meter.block_boundary()) for layer in layers]
    marks: dict[str, int] = {}

    def mark(name):
        def hook(*args):
            if not meter.in_backward:
                marks.setdefault(name, sum(meter.seen.values()))

        return hook

    handles.append(layers[0].register_forward_pre_hook(mark("blocks_start")))
    handles.append(layers[-1].register_forward_hook(mark("blocks_end")))
    times = []
    for i in range(steps + 1):
        batch = batch_fn(i)
        start = time.perf_counter()
        if i == 1:
            meter.seen.clear()
            meter.recompute_peak = 0
            marks.clear()
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                loss = model(**batch).loss
                meter.forward_bytes = sum(meter.seen.values())
                meter.in_backward = True
                loss.backward()
                meter.in_backward = False
        else:
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    for h in handles:
        h.remove()
    peak = meter.forward_bytes + (meter.recompute_peak if checkpointing else 0)
    return {
        "saved_forward_mb": round(meter.forward_bytes / MB, 2),
        "saved_in_blocks_mb": round((marks.get("blocks_end", 0) - marks.get("blocks_start", 0)) / MB, 2),
        "saved_peak_mb": round(peak / MB, 2),
        "step_s_median": round(statistics.median(times), 3),
        "step_s_all": [round(t, 3) for t in times],
    }


def memory_part(quick: bool, models: list[str] | None = None) -> list[dict]:
    tok = tokenizer()
    rows = []
    glue = load_glue("sst2", "train", limit=64)
    setups = [
        ("llama-20m", 16, 4, 256),  # 688 = 16 x 43: 32 does not divide the 20M MLP width
        ("llama-60m", 32, 2 if quick else 4, 256),
        ("minilm", 32, 16, 128),
    ]
    for model_name, groups, batch, seq in setups:
        if models and model_name not in models:
            continue
        if model_name.startswith("llama"):
            blocks = text_batches(tok, batch, seq, 6)

            def batch_fn(i, blocks=blocks):
                return {"input_ids": blocks[i], "labels": blocks[i]}

            make = lambda name=model_name: make_llama(name.split("-")[1], tok.vocab_size)  # noqa: E731
            family = "llama"
        else:

            def batch_fn(i, batch=batch, seq=seq):
                rows_i = glue[(i * batch) % 64 : (i * batch) % 64 + batch]
                enc = tok(rows_i["text_a"], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
                return {**enc, "labels": torch.tensor(rows_i["label"])}

            make = make_minilm
            family = "bert"
        variants = [
            ("plain", None, False),
            ("velora paper targets", PAPER_TARGETS[family], False),
            ("velora attention q/k/v + mlp", ATTENTION_AND_MLP[family], False),
            ("velora mlp", MLP[family], False),
            ("velora auto", "auto", False),
            ("gradient checkpointing", None, True),
            ("checkpointing + velora auto", "auto", True),
        ]
        if family == "bert":
            variants += [("lora r=8", "lora", False), ("lora r=8 + peft velora (32 groups)", "lora+velora", False)]
        for label, targets, checkpointing in variants:
            model = make()
            model.train()
            if targets in ("lora", "lora+velora"):
                from peft import LoraConfig, get_peft_model
                from peft.tuners.lora.config import VeloraConfig

                velora = VeloraConfig(num_groups=groups, init_type="batch_average_once") if targets != "lora" else None
                model = get_peft_model(
                    model,
                    LoraConfig(r=8, target_modules=["query", "key", "value", "dense"], lora_dropout=0.0,
                               velora_config=velora, task_type="SEQ_CLS"),
                )
            elif targets is not None:
                apply_velora(model, VeLoRAConfig(target_modules=targets, num_groups=groups))
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            load = load_average()
            result = step_measure(model, batch_fn, optimizer, checkpointing, steps=1 if quick else 4)
            n_velora = sum(is_velora_linear(m) for m in model.modules())
            row = {"model": model_name, "variant": label, "num_groups": groups, "batch": batch, "seq": seq,
                   "velora_layers": n_velora, "load_1min": load, **result}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model, optimizer
    for model_name in {r["model"] for r in rows}:
        base = next(r for r in rows if r["model"] == model_name and r["variant"] == "plain")
        for r in rows:
            if r["model"] == model_name:
                r["saved_vs_plain"] = round(r["saved_peak_mb"] / base["saved_peak_mb"], 3)
                r["blocks_vs_plain"] = round(r["saved_in_blocks_mb"] / base["saved_in_blocks_mb"], 3)
                r["time_vs_plain"] = round(r["step_s_median"] / base["step_s_median"], 3)
    return rows


def cosine_part(quick: bool, sizes: list[str] | None = None, dtypes: list[str] | None = None) -> list[dict]:
    tok = tokenizer()
    rows = []
    blocks = text_batches(tok, 4, 256, 2)
    for size, group_list in (("20m", (16,)), ("60m", (32,) if quick else (16, 32))):
        if sizes and size not in sizes:
            continue
        exact_model = make_llama(size, tok.vocab_size)
        ids = blocks[1]
        exact_model(input_ids=ids, labels=ids).loss.backward()
        exact = {n: p.grad.clone() for n, p in exact_model.named_parameters()}
        for groups in group_list:
            for dtype in dtypes or (("bfloat16",) if quick else ("bfloat16", "float16", "float32")):
                inits = (("batch_average_once", 0), ("batch_average_once, v from this batch", 1), ("svd", 0))
                for init, first in inits[::2] if quick else inits:
                    model = make_llama(size, tok.vocab_size)
                    targets = apply_velora(
                        model,
                        VeLoRAConfig(target_modules="all-linear", num_groups=groups, coefficient_dtype=dtype,
                                     init="svd" if init == "svd" else "batch_average_once"),
                    )
                    # v is fixed by the first training batch (blocks[first]); the gradient is measured on ``ids``
                    model(input_ids=blocks[first], labels=blocks[first]).loss.backward()
                    model.zero_grad(set_to_none=True)
                    model(input_ids=ids, labels=ids).loss.backward()
                    per_layer = {}
                    for name in targets:
                        g, e = model.get_parameter(f"{name}.weight").grad, exact[f"{name}.weight"]
                        per_layer[name] = round(torch.nn.functional.cosine_similarity(g.flatten(), e.flatten(), 0).item(), 4)
                    by_kind: dict[str, list[float]] = {}
                    for name, c in per_layer.items():
                        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(c)
                    row = {"model": f"llama-{size}", "num_groups": groups, "coefficient_dtype": dtype, "init": init,
                           "mean_by_layer_kind": {k: round(statistics.mean(v), 4) for k, v in by_kind.items()},
                           "per_layer": per_layer}
                    print(json.dumps({k: v for k, v in row.items() if k != "per_layer"}), flush=True)
                    rows.append(row)
                    remove_velora(model)
    return rows


def loss_part(quick: bool, steps: int) -> list[dict]:
    tok = tokenizer()
    batch, seq = 8, 128
    train = text_batches(tok, batch, seq, steps)
    evaluation = text_batches(tok, batch, seq, 4, offset=len(train) * batch)
    rows = []
    variants = [("plain", None, 0), ("velora auto (down_proj), 16 groups", "auto", 16),
                ("velora mlp (gate/up/down), 16 groups", MLP["llama"], 16)]  # fmt: skip
    if not quick:
        variants.append(("velora paper targets, 16 groups", PAPER_TARGETS["llama"], 16))
        variants.append(("velora attention q/k/v + mlp, 16 groups", ATTENTION_AND_MLP["llama"], 16))
    for label, targets, groups in variants:
        model = make_llama("20m", tok.vocab_size)
        if targets is not None:
            apply_velora(model, VeLoRAConfig(target_modules=targets, num_groups=groups))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
        start, losses = time.perf_counter(), []
        model.train()
        for ids in train:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            eval_loss = statistics.mean(model(input_ids=ids, labels=ids).loss.item() for ids in evaluation)
        row = {"variant": label, "steps": steps, "batch": batch, "seq": seq, "lr": 1e-3,
               "train_loss_last10": round(statistics.mean(losses[-10:]), 4), "eval_loss": round(eval_loss, 4),
               "first_loss": round(losses[0], 4), "wall_s": round(time.perf_counter() - start, 1),
               "load_1min": load_average()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]["eval_loss"]
    for r in rows:
        r["eval_loss_vs_plain"] = round(r["eval_loss"] / base, 4)
        r["within_2_percent"] = abs(r["eval_loss"] / base - 1.0) <= 0.02
    return rows


def render(result: dict) -> str:
    """Markdown tables of a results JSON (pasted into docs/methods/velora.md)."""
    out = []
    if result.get("memory"):
        out.append("| model | batch x seq | variant | saved MB | in blocks MB | vs plain (blocks) | est. peak MB | step s |")
        out.append("|---|---|---|---:|---:|---:|---:|---:|")
        layers = {"llama-20m": 4, "llama-60m": 8, "minilm": 6}
        for r in result["memory"]:
            plain = next(p for p in result["memory"] if p["model"] == r["model"] and p["variant"] == "plain")
            peak = r["saved_forward_mb"]
            if "checkpointing" in r["variant"]:  # forward-saved + one block recomputed (plain or compressed)
                uncheckpointed = r["variant"].removeprefix("checkpointing + ")  # its one recomputed block
                per_block = (plain if r["variant"] == "gradient checkpointing" else next(
                    p for p in result["memory"] if p["model"] == r["model"] and p["variant"] == uncheckpointed
                ))["saved_in_blocks_mb"] / layers[r["model"]]
                peak = r["saved_forward_mb"] + per_block
            out.append(
                f"| {r['model']} | {r['batch']} x {r['seq']} | {r['variant']} | {r['saved_forward_mb']:.1f} | "
                f"{r['saved_in_blocks_mb']:.1f} | {r['saved_in_blocks_mb'] / plain['saved_in_blocks_mb']:.2f} | "
                f"{peak:.1f} | {r['step_s_median']:.2f} (load {r['load_1min']:.0f}) |"
            )
    if result.get("cosine"):
        kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
        out.append("\n| model | groups | coeff dtype | init | " + " | ".join(kinds) + " |")
        out.append("|---|---:|---|---|" + "---:|" * len(kinds))
        for r in result["cosine"]:
            cells = " | ".join(f"{r['mean_by_layer_kind'].get(k, float('nan')):.3f}" for k in kinds)
            out.append(f"| {r['model']} | {r['num_groups']} | {r['coefficient_dtype']} | {r['init']} | {cells} |")
    if result.get("loss"):
        out.append("\n| variant | steps | first loss | train loss (last 10) | eval loss | eval vs plain | within 2% |")
        out.append("|---|---:|---:|---:|---:|---:|---|")
        for r in result["loss"]:
            out.append(
                f"| {r['variant']} | {r['steps']} | {r['first_loss']:.3f} | {r['train_loss_last10']:.3f} | "
                f"{r['eval_loss']:.3f} | {r['eval_loss_vs_plain']:.4f} | "
                f"{'yes' if abs(r['eval_loss_vs_plain'] - 1) <= 0.02 else 'no'} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "memory", "cosine", "loss"), default="all")
    parser.add_argument("--loss-steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="fewer timed steps and variants (smoke run)")
    parser.add_argument("--output", default=str(RESULTS / "velora.json"))
    parser.add_argument("--render", action="store_true", help="print the Markdown tables of --output and exit")
    parser.add_argument("--models", nargs="+", choices=("llama-20m", "llama-60m", "minilm"), default=None,
                        help="memory part: only these models (rows of other models already in --output are kept)")
    parser.add_argument("--cosine-sizes", nargs="+", choices=("20m", "60m"), default=None,
                        help="cosine part: only these LLaMA sizes")
    parser.add_argument("--cosine-dtypes", nargs="+", choices=("bfloat16", "float16", "float32"), default=None,
                        help="cosine part: only these coefficient dtypes")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.output).read_text())))
        return
    torch.manual_seed(SEED)
    out = Path(args.output)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = machine()
    result["seed"] = SEED
    result["dtype"] = "float32 weights and activations; VeLoRA coefficients bfloat16 unless stated"
    if args.part in ("all", "memory"):
        rows = memory_part(args.quick, args.models)
        kept = [r for r in result.get("memory", []) if args.models and r["model"] not in args.models]
        result["memory"] = kept + rows
    if args.part in ("all", "cosine"):
        kept = [r for r in result.get("cosine", [])
                if args.cosine_sizes and r["model"].removeprefix("llama-") not in args.cosine_sizes]
        result["cosine"] = kept + cosine_part(args.quick, args.cosine_sizes, args.cosine_dtypes)
    if args.part in ("all", "loss"):
        kept = [r for r in result.get("loss", []) if r["steps"] != args.loss_steps]  # one row set per length
        result["loss"] = kept + loss_part(args.quick, args.loss_steps)
    import sys

    result.setdefault("commands", {})[args.part] = " ".join(["python"] + sys.argv)
    result.setdefault("load_1min_at_end", {})[args.part] = load_average()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

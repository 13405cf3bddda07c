"""GaLore benchmark: LLaMA pretraining on bundled real text, hf_memopt GaLore vs AdamW, 8-bit AdamW, Adafactor and
the peer galore-torch, in one run (each configuration in its own process, so peak RSS is its own). Two rows of the
other memory-first methods (LoQT NF4 layer-wise, BlockLLM 8-bit) sit beside them for docs/min_memory.md's comparison
with Adafactor.

    python benchmarks/bench_galore.py --size 20m --steps 60 --gap 20
    python benchmarks/bench_galore.py --size 60m --steps 30 --gap 10

Writes ``benchmarks/results/galore_<size>.json`` (or ``<--output>.json``) and ``.png`` and prints a Markdown table
(copied to docs/benchmarks.md). Ratios are against AdamW of the same run. ``--repeats N`` runs every configuration N
times (interleaved, each in a fresh process) and reports the range of peak RSS, which varies from process to process
by tens of MB; bytes and losses are the same in every repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, mb, run_isolated  # noqa: E402

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_WEIGHTS = ATTN_MLP + ["embed_tokens", "lm_head"]

# name -> (description, how to build)
CONFIGS = {
    "adamw": "torch AdamW (Trainer default)",
    "adamw_bnb_8bit": "bitsandbytes AdamW8bit (Trainer optim=adamw_bnb_8bit)",
    "adafactor": "Adafactor (Trainer optim=adafactor)",
    "galore_torch": "galore-torch GaLoreAdamW, attn+mlp (peer)",
    "hf_galore_exact": "hf_memopt GaLore AdamW, attn+mlp, exact SVD",
    "hf_galore": "hf_memopt GaLore AdamW, attn+mlp, subspace refresh (default)",
    "hf_galore_8bit": "hf_memopt GaLore AdamW 8-bit, attn+mlp",
    "hf_galore_adafactor": "hf_memopt GaLore Adafactor, attn+mlp",
    "hf_galore_layerwise": "hf_memopt GaLore AdamW layer-wise, attn+mlp",
    "hf_galore_8bit_layerwise": "hf_memopt GaLore AdamW 8-bit layer-wise, attn+mlp",
    "hf_galore_all": "hf_memopt GaLore AdamW, attn+mlp+embeddings+head",
    "hf_galore_8bit_all": "hf_memopt GaLore AdamW 8-bit, attn+mlp+embeddings+head",
    "hf_galore_8bit_layerwise_all": "hf_memopt GaLore AdamW 8-bit layer-wise, attn+mlp+embeddings+head",
    "hf_galore_adafactor_layerwise": "hf_memopt GaLore Adafactor layer-wise, attn+mlp",
    "hf_loqt_layerwise": "hf_memopt LoQT NF4 layer-wise, attn+mlp, Adafactor (Trainer optim=adafactor)",
    "hf_blockllm_8bit": "hf_memopt BlockLLM 8-bit, 5% of attn+mlp + embeddings and head selectable",
}


def run_one(name: str, a: argparse.Namespace) -> dict:
    import torch

    import hf_memopt  # noqa: F401  (reroutes the stock names)
    from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig
    from hf_memopt.tools.recipes.pretrain import run_pretrain

    torch.set_num_threads(a.threads)
    rank = {"20m": 64, "60m": 128, "130m": 192}[a.size]  # d/4
    common = dict(size=a.size, steps=a.steps, seq_len=a.seq, batch_size=a.batch, learning_rate=a.lr,
                  warmup_steps=a.warmup, output_dir=f"out/bench_galore/{name}")
    if a.chunked_loss:  # hf_memopt's chunked LM loss: no full tokens x vocab logits, for every row
        from hf_memopt.shared.chunked_loss import use_chunked_lm_loss

        common["prepare_model"] = lambda model: use_chunked_lm_loss(model, a.chunked_loss)
    galore = dict(rank=rank, update_proj_gap=a.gap, scale=a.scale, target_modules=ATTN_MLP)
    overrides = {"max_grad_norm": 0.0}  # galore-torch and layer-wise runs compare without clipping
    if a.gradient_checkpointing:  # every row recomputes each layer in backward: one hidden state saved per layer
        overrides["gradient_checkpointing"] = True
    if name == "adamw":
        result = run_pretrain(None, training_overrides=overrides, **common)
    elif name in ("adamw_bnb_8bit", "adafactor"):
        result = run_pretrain(None, training_overrides={**overrides, "optim": name}, **common)
    elif name == "hf_loqt_layerwise":  # rank d/4 as GaLore; the quantized init keeps no fp32 weight (no peak at 0)
        loqt = LoQTConfig(rank=rank, quant="nf4", target_modules=ATTN_MLP, layerwise=True, init_weight="quantized",
                          merge_every=a.gap)  # fmt: skip
        result = run_pretrain(loqt, training_overrides={**overrides, "optim": "adafactor"}, **common)
    elif name == "hf_blockllm_8bit":  # from scratch the embeddings and head must train: selectable with the rest
        blockllm = BlockLLMConfig(sparsity=0.95, optimizer="adamw_8bit", train_embeddings=True)
        result = run_pretrain(blockllm, training_overrides=overrides, **common)
    elif name == "galore_torch":
        from galore_torch import GaLoreAdamW

        def peer(model, args):
            targets = [p for n, p in model.named_parameters() if any(f".{t}." in n for t in ATTN_MLP)]
            ids = {id(p) for p in targets}
            rest = [p for p in model.parameters() if id(p) not in ids]
            groups = [{"params": rest}, {"params": targets, "rank": rank, "update_proj_gap": a.gap, "scale": a.scale,
                                          "proj_type": "std"}]
            return GaLoreAdamW(groups, lr=a.lr, no_deprecation_warning=True), None

        result = run_pretrain(None, optimizers=peer, training_overrides=overrides, **common)
    else:
        variant = dict(
            hf_galore_exact=dict(svd_method="exact"),
            hf_galore=dict(),
            hf_galore_8bit=dict(optimizer="adamw_8bit"),
            hf_galore_adafactor=dict(optimizer="adafactor"),
            hf_galore_layerwise=dict(layerwise=True),
            hf_galore_8bit_layerwise=dict(optimizer="adamw_8bit", layerwise=True),
            hf_galore_all=dict(target_modules=ALL_WEIGHTS),
            hf_galore_8bit_all=dict(target_modules=ALL_WEIGHTS, optimizer="adamw_8bit"),
            hf_galore_8bit_layerwise_all=dict(target_modules=ALL_WEIGHTS, optimizer="adamw_8bit", layerwise=True),
            hf_galore_adafactor_layerwise=dict(optimizer="adafactor", layerwise=True),
        )[name]
        result = run_pretrain(GaLoreConfig(**{**galore, **variant}), training_overrides=overrides, **common)
    summary = result.summary()
    summary["name"] = name
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="20m")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--gap", type=int, default=20)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--chunked-loss", type=int, default=0, metavar="TOKENS",
                   help="every row computes the LM loss in chunks of TOKENS tokens (0: the model's own loss)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="every row trains with gradient checkpointing (the Trainer's gradient_checkpointing)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per configuration (peak RSS range)")
    p.add_argument("--output", help="results file stem under benchmarks/results (default: galore_<size>)")
    p.add_argument("--refresh-only", action="store_true", help="only time one projector refresh per method and shape")
    p.add_argument("--update", action="store_true", help="replace only the rows of --configs in the existing JSON")
    p.add_argument("--markdown", action="store_true", help="print the table of the existing JSON and redraw the chart")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-output", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        Path(a.one_output).write_text(json.dumps(run_one(a.one, a)))
        return
    stem = a.output or f"galore_{a.size}"
    if a.markdown:
        report = json.loads((RESULTS / f"{stem}.json").read_text())
        print(markdown(report))
        chart(report, stem)
        return
    if a.refresh_only:
        print(refresh_timings())
        return
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1; got {a.repeats}")
    passthrough = sys.argv[1:]
    names = a.configs.split(",")
    repeats = [[run_isolated(__file__, name, passthrough) for name in names] for _ in range(a.repeats)]
    rows = [with_rss_range([runs[i] for runs in repeats]) for i in range(len(names))]
    path = RESULTS / f"{stem}.json"
    if a.update and path.exists():
        fresh = {r["name"]: r for r in rows}
        previous = json.loads(path.read_text())
        rows = [fresh.pop(r["name"], r) for r in previous["rows"]] + list(fresh.values())
    report = {"machine": machine(), "settings": vars(a), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    chart(report, stem)


def with_rss_range(runs: list[dict]) -> dict:
    """One configuration's row from its repeated runs: the first run's figures, plus every run's peak RSS."""
    row = dict(runs[0])
    row["peak_process_runs"] = [r["memory_bytes"]["peak_process"] for r in runs]
    return row


def refresh_timings(shapes=((512, 1376), (1024, 2752), (2048, 2048)), repeats: int = 3) -> str:
    """Seconds for one projector refresh: exact SVD (galore-torch's choice) vs hf_memopt's subspace iteration, on a
    gradient with a decaying spectrum, cold (first refresh) and warm-started from the previous projector; plus the
    captured energy ||P^T G||_F / ||U_r^T G||_F of the subspace result relative to the exact top-r subspace."""
    import statistics
    import time

    import torch

    from hf_memopt.shared.projector import refresh_projector

    torch.manual_seed(0)
    lines = ["| gradient shape | rank | exact SVD s | subspace cold s | subspace warm s | speed-up (warm) | energy kept |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m, n in shapes:
        r = min(m, n) // 4
        spectrum = torch.logspace(0, -3, min(m, n))
        g = (torch.linalg.qr(torch.randn(m, min(m, n)))[0] * spectrum) @ torch.linalg.qr(torch.randn(n, min(m, n)))[0].T
        sides = (m < n, m >= n)

        def timed(matrix, rank=r, sides=sides, **kw):
            seconds = []
            for _ in range(repeats):
                t = time.perf_counter()
                out = refresh_projector(matrix, rank, sides, generator=torch.Generator().manual_seed(0), **kw)
                seconds.append(time.perf_counter() - t)
            return statistics.median(seconds), out

        exact_s, exact = timed(g, method="exact")
        cold_s, cold = timed(g, method="subspace", iterations=2)
        drifted = g + 0.05 * g.norm() / g.numel() ** 0.5 * torch.randn(m, n)  # the gradient T steps later
        warm_s, _ = timed(drifted, method="subspace", previous=cold, iterations=1)

        def energy(proj, g=g):
            left, right = proj
            return float((left.T @ g).norm() if left is not None else (g @ right.T).norm())

        kept = energy(cold) / energy(exact)
        lines.append(f"| {m} x {n} | {r} | {exact_s:.3f} | {cold_s:.3f} | {warm_s:.3f} | {exact_s / warm_s:.1f}x | "
                     f"{kept:.4f} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    rows = {r["name"]: r for r in report["rows"]}
    base = rows.get("adamw")
    peer = rows.get("galore_torch")
    lines = [
        "| configuration | optimizer state MB | x AdamW | gradients MB | peak RSS MB | wall s / step | CPU s / step | "
        "CPU x galore-torch | final loss | x galore-torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        m = r["memory_bytes"]
        state_ratio = m["optimizer_state"] / base["memory_bytes"]["optimizer_state"] if base else float("nan")
        cpu = r.get("median_step_cpu_seconds", float("nan"))
        rss = r.get("peak_process_runs", [m["peak_process"]])
        rss_text = mb(min(rss)) if len(set(rss)) == 1 else f"{mb(min(rss))}-{mb(max(rss))}"
        t_ratio = f"{cpu / peer['median_step_cpu_seconds']:.2f}" if peer else "-"  # no peer row in this run
        l_ratio = f"{r['final_loss'] / peer['final_loss']:.3f}" if peer else "-"
        lines.append(
            f"| {CONFIGS[name]} | {mb(m['optimizer_state'])} | {state_ratio:.2f} | {mb(m['gradients'])} | "
            f"{rss_text} | {r['median_step_seconds']:.2f} | {cpu:.2f} | {t_ratio} | {r['final_loss']:.3f} | "
            f"{l_ratio} |"
        )
    return "\n".join(lines)


def chart(report: dict, stem: str) -> None:
    from hf_memopt.tools.memory import MemoryBreakdown, plot_memory_breakdown

    runs = {}
    for r in report["rows"]:
        m = dict(r["memory_bytes"])
        runs[r["name"]] = MemoryBreakdown(**m)
    s = report["settings"]
    plot_memory_breakdown(runs, str(RESULTS / f"{stem}.png"),
                          title=f"LLaMA {s['size']} pretraining, batch {s['batch']}x{s['seq']}, fp32, CPU")


if __name__ == "__main__":
    main()

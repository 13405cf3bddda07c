"""The optimizer step alone: hf_memopt GaLore AdamW (32-bit and 8-bit) against galore-torch's GaLoreAdamW on one LLaMA
shape, same gradients, same projection (exact SVD), same refresh cadence.

    python benchmarks/profile_galore.py --size 60m --reps 30
    python benchmarks/profile_galore.py --size 20m --memory

Time: every optimizer gets its own copy of the model and the same gradients (one real backward on a fixed batch of
random tokens); after a first (refresh) step the optimizers step in turn, interleaved, ``--reps`` times, and the
median process CPU time of ``step()`` is reported per optimizer, so a shared, noisy machine slows all of them alike.
The parameters reached are compared at the end (``max |diff|`` against galore-torch).

Memory (``--memory``): per optimizer, after two warm-up steps, the peak of the CPU allocator's tracked bytes during
one ``step()`` above what was allocated before it (``torch.profiler`` memory events) and the growth of the process's
peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) during that step.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import allocator_peak_above_start

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = {"20m": 64, "60m": 128}  # d / 4, as benchmarks/bench_galore.py
NAMES = {
    "galore_torch": "galore-torch GaLoreAdamW",
    "hf_galore": "hf_memopt GaLoreAdamW",
    "hf_galore_8bit": "hf_memopt GaLoreAdamW8bit",
}


def build(name: str, model: torch.nn.Module, rank: int, gap: int) -> torch.optim.Optimizer:
    targets = [p for n, p in model.named_parameters() if any(f".{t}." in n for t in ATTN_MLP)]
    ids = {id(p) for p in targets}
    rest = [p for p in model.parameters() if id(p) not in ids]
    projected = {"params": targets, "rank": rank, "update_proj_gap": gap, "scale": 0.25}
    if name == "galore_torch":
        from galore_torch import GaLoreAdamW

        groups = [{"params": rest}, {**projected, "proj_type": "std"}]
        return GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)
    from hf_memopt.galore import GaLoreAdamW, GaLoreAdamW8bit

    cls = GaLoreAdamW8bit if name == "hf_galore_8bit" else GaLoreAdamW
    return cls([{"params": rest}, {**projected, "svd_method": "exact"}], lr=1e-3, eps=1e-6)


def setups(a: argparse.Namespace) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    from transformers import LlamaForCausalLM

    from hf_memopt.tools.recipes.models import llama_config

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(a.size))
    ids = torch.randint(0, base.config.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    base(input_ids=ids, labels=ids).loss.backward()
    out = {}
    for name in a.configs.split(","):
        model = copy.deepcopy(base)
        for p, q in zip(model.parameters(), base.parameters()):
            p.grad = q.grad.clone()  # deepcopy leaves a Parameter's grad behind
        out[name] = (model, build(name, model, RANKS[a.size], a.gap))
    return out


def time_steps(a: argparse.Namespace) -> dict:
    runs = setups(a)
    for _, opt in runs.values():
        opt.step()  # the first step finds the projectors and creates the state
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.reps):
        for name, (_, opt) in runs.items():
            start = time.process_time()
            opt.step()
            times[name].append(time.process_time() - start)
    rows = {name: {"median_cpu_s": statistics.median(t), "min_cpu_s": min(t)} for name, t in times.items()}
    if "galore_torch" in runs:
        ref = list(runs["galore_torch"][0].parameters())
        for name, (model, _) in runs.items():
            rows[name]["max_abs_diff_vs_galore_torch"] = max(
                float((p - q).abs().max()) for p, q in zip(model.parameters(), ref)
            )
    return rows


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(a: argparse.Namespace) -> dict:
    from torch.profiler import ProfilerActivity, profile

    rows = {}
    for name in a.configs.split(","):
        runs = setups(argparse.Namespace(**{**vars(a), "configs": name}))
        opt = runs[name][1]
        opt.step()
        opt.step()
        gc.collect()
        rss_before = _vm("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        rss_peak = _vm("VmHWM")
        rows[name] = {
            "tracked_peak_above_start_mb": allocator_peak_above_start(prof) / 2**20,
            "rss_growth_during_step_mb": rss_peak - rss_before,
        }
        del runs, opt
        gc.collect()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="20m", choices=sorted(RANKS))
    p.add_argument("--configs", default=",".join(NAMES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--gap", type=int, default=200, help="update_proj_gap (200: no refresh among the timed steps)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory", action="store_true", help="measure transient memory of one step instead of time")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = measure_memory(a) if a.memory else time_steps(a)
    print(json.dumps({"args": vars(a), "torch": torch.__version__, "rows": rows}, indent=1))
    if not a.memory and "galore_torch" in rows:
        ref = rows["galore_torch"]["median_cpu_s"]
        print("| optimizer | median CPU s / step | x galore-torch | max abs diff vs galore-torch |", file=sys.stderr)
        print("|---|---:|---:|---:|", file=sys.stderr)
        for name, row in rows.items():
            print(
                f"| {NAMES[name]} | {row['median_cpu_s']:.4f} | {row['median_cpu_s'] / ref:.2f} | "
                f"{row['max_abs_diff_vs_galore_torch']:.1e} |",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()

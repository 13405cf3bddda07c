"""ZO2's device working set on a CPU: peak live tensor bytes of one offloaded step against plain MeZO and the bound.

Counts, with :class:`hf_memopt.tools.live_tensors.LiveTensorTracker`, every tensor storage allocated during one step
and alive at once (parameters, buffers and the batch existed before and are not counted). On a GPU the device holds
besides: the parameters and buffers outside the blocks and two uploaded blocks (the running one and the prefetched
one), which on a CPU are the stored tensors themselves. The bound of ``scripts/gpu_check.py`` (``zo2_bound``) is two
blocks + outside + the activations of one plain forward at twice the batch (both streams); so the step's tracked
allocations must stay within that activation term. Prints the figures, the tensors alive at each peak, and the
fastest of interleaved step times of both paths (indicative on a loaded machine).

    python scripts/zo2_working_set.py --hidden 256 --layers 4 --batch 4 --seq 128
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_memopt.tools.live_tensors import LiveTensorTracker
from hf_memopt.zo import ZOSGD, ZO2Engine, find_block_list
from hf_memopt.zo.builder import perturbed_losses

MIB = 2**20


def build(hidden: int, layers: int, vocab: int, seq: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), max_position_embeddings=seq,
                         tie_word_embeddings=False, use_cache=False)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def step(model, optimizer, engine, batch, eps=1e-3):
    """One MeZO step: the two perturbed losses (offloaded or in place) and the update."""
    seed = optimizer.sample_seed(0)

    def loss_fn():
        return model(**batch).loss

    with torch.no_grad():
        lp, lm = perturbed_losses(optimizer, engine, loss_fn, seed, eps)
        optimizer.accumulate(0, (float(lp) - float(lm)) / (2 * eps))
        optimizer.step()


def measure(args) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    runs = {}
    for name in ("mezo", "zo2"):
        model = build(args.hidden, args.layers, args.vocab, args.seq)
        optimizer = ZOSGD(list(model.parameters()), lr=1e-4, seed=0)
        engine = None
        if name == "zo2":
            engine = ZO2Engine(model, find_block_list(model)[1], eps=1e-3, device=torch.device("cpu"))
            engine.bind(optimizer)
        step(model, optimizer, engine, batch)  # first step: the engine's one-off self-check forward
        runs[name] = (model, optimizer, engine, [])
    for _ in range(args.steps):  # interleaved: a loaded machine slows both alike
        for model, optimizer, engine, times in runs.values():
            t0 = time.perf_counter()
            step(model, optimizer, engine, batch)
            times.append(time.perf_counter() - t0)
    out = {}
    for name, (model, optimizer, engine, times) in runs.items():

        def label(engine=engine):
            if engine is None:
                return ""
            where = ",".join(b.name for b in engine.loaded) or "outside"
            return f"world={engine.world} {where}"

        with LiveTensorTracker(label) as tracker:
            step(model, optimizer, engine, batch)
        out[name] = {"peak": tracker.peak, "summary": tracker.summary(), "time": times}
    model = build(args.hidden, args.layers, args.vocab, args.seq)
    _, blocks = find_block_list(model)
    sizes = sorted((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), reverse=True)
    stacked = {k: v.repeat(2, 1) for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), LiveTensorTracker() as tracker:
        model(**stacked)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    out["bound"] = {"activations_2B": tracker.peak, "two_blocks": sum(sizes[:2]), "outside": params - sum(sizes)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per path, interleaved (after one warm-up step)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = measure(args)
    b = r["bound"]
    print(
        f"LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32, batch {args.batch} x {args.seq}"
    )
    print(f"bound terms: two blocks {b['two_blocks'] / MIB:.1f} MiB, outside {b['outside'] / MIB:.1f} MiB, "
          f"activations (plain forward at 2B) {b['activations_2B'] / MIB:.1f} MiB")  # fmt: skip
    for name in ("mezo", "zo2"):
        m = r[name]
        print(f"\n{name}: peak tracked {m['peak'] / MIB:.1f} MiB ({m['peak'] / b['activations_2B']:.2f}x the activation "
              f"term); fastest step {min(m['time']):.3f} s")  # fmt: skip
        for label, op, n, nbytes in m["summary"]:
            print(f"  {nbytes / MIB:8.2f} MiB  {n:3d} x {op:40s} {label}")
    ratio = min(r["zo2"]["time"]) / min(r["mezo"]["time"])
    print(f"\nstep time zo2 / mezo: x{ratio:.2f}")


if __name__ == "__main__":
    main()

"""The LM loss alone: how much memory its forward + backward allocates above what was held, per loss implementation.

    python benchmarks/bench_lm_loss_memory.py          # SmolLM2's head (vocab 49,152, width 576), 4 x 512 tokens

One tiny LLaMA layer (intermediate width 64) before SmolLM2's tied head, frozen and stored in bfloat16 as the
min-memory recipes store it, on 4 x 512 random tokens; after a warm-up pass, the CPU allocator's peak above its start
during one forward + backward (``common.allocator_peak_above_start``, what ``torch.cuda.max_memory_allocated`` reads
on a GPU) for: the model's own loss (full logits), TRL's fused LM head as ``SFTTrainer`` installs it (its default tile
and 64-token tiles, set as ``memory.loss_chunk_size`` sets it) and hf_memopt's chunked loss (1024 and 64 tokens).
Writes ``benchmarks/results/lm_loss_memory.json``; docs/min_memory.md quotes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from common import RESULTS, allocator_peak_above_start, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_memopt.shared.chunked_loss import use_chunked_lm_loss  # noqa: E402
from hf_memopt.shared.frozen import freeze_modules  # noqa: E402
from hf_memopt.tools.recipes.instruct import fused_head_token_tile  # noqa: E402

VOCAB, WIDTH, BATCH, TOKENS = 49152, 576, 4, 512
CASES = [("model's own loss", None), ("TRL fused head", None), ("TRL fused head", 64),
         ("hf_memopt chunked loss", 1024), ("hf_memopt chunked loss", 64)]  # fmt: skip


def build() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=TOKENS)  # fmt: skip
    model = LlamaForCausalLM(config)
    freeze_modules(model, ["embed_tokens"], "bfloat16")
    return model


def measure(kind: str, chunk: int | None, ids: torch.Tensor) -> dict:
    model = build()
    if kind == "TRL fused head":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer installs it

        def loss():
            return model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    else:
        if kind == "hf_memopt chunked loss":
            use_chunked_lm_loss(model, chunk)

        def loss():
            return model(input_ids=ids, labels=ids).loss

    with fused_head_token_tile(chunk if kind == "TRL fused head" else None):
        loss().backward()  # warm-up: lazily built tables are not the loss's memory
        model.zero_grad(set_to_none=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            value = loss()
            value.backward()
    peak = allocator_peak_above_start(prof)
    return {"loss": kind, "chunk_tokens": chunk, "value": value.item(), "peak_above_start_bytes": peak}


def main() -> None:
    torch.set_num_threads(1)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    rows = []
    for kind, chunk in CASES:
        rows.append(measure(kind, chunk, ids))
        r = rows[-1]
        print(f"{kind} ({chunk or 'default'}): loss {r['value']:.6f}, "
              f"{r['peak_above_start_bytes'] / 2**20:.1f} MiB above start", flush=True)  # fmt: skip
    out = RESULTS / "lm_loss_memory.json"
    out.write_text(json.dumps({"machine": machine(), "batch": BATCH, "tokens": TOKENS, "vocab": VOCAB,
                               "width": WIDTH, "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

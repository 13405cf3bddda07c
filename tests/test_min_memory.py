"""The min-memory composition (recipes/instruct/smollm2_min_memory.yaml): its recipe settings, frozen 16-bit modules,
and a trained model that saves and reloads as a plain Hugging Face model. Resume and NaN skip of the same
composition are rows of tests/test_resume_matrix.py and tests/test_faults.py (``min_memory_*``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TokenDataset, tiny_llama, training_args
from transformers import AutoModelForCausalLM, Trainer

from hf_memopt import LoQTConfig, attach
from hf_memopt.shared.chunked_loss import use_chunked_lm_loss
from hf_memopt.shared.frozen import freeze_modules
from hf_memopt.shared.swiglu import use_recomputed_swiglu
from hf_memopt.tools.recipes.recipe import MemorySettings, RecipeError, load_recipe, method_configs

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "instruct" / "smollm2_min_memory.yaml"


def test_min_memory_recipes_load_with_their_memory_settings():
    recipe = load_recipe(RECIPE)
    (loqt,) = method_configs(recipe)
    assert isinstance(loqt, LoQTConfig) and loqt.layerwise and loqt.quant == "nf4"
    assert recipe.memory == MemorySettings(freeze_modules=["embed_tokens"], frozen_dtype="bfloat16", loss_chunk_size=64,
                                           recompute_swiglu=True)  # fmt: skip
    assert recipe.training["optim"] == "adamw_bnb_8bit" and recipe.training["gradient_checkpointing"]
    assert recipe.training["max_grad_norm"] == 0.0
    galore = load_recipe(RECIPE.with_name("smollm2_min_memory_galore.yaml"))
    assert galore.method == "velora+galore" and galore.memory.freeze_modules == ["embed_tokens"]
    assert [c.layerwise for c in method_configs(galore) if hasattr(c, "layerwise")] == [True]


@pytest.mark.parametrize(
    ("memory", "match"),
    [
        ({"frozen_dtype": "bfloat16"}, "frozen_dtype needs freeze_modules"),
        ({"freeze_modules": ["embed_tokens"], "frozen_dtype": "int8"}, "frozen_dtype"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
        ({"recompute_swiglu": "often"}, "recompute_swiglu"),
        ({"freeze": ["embed_tokens"]}, "has no field 'freeze'"),
        ({"malloc_mmap_threshold": -1}, r"malloc_mmap_threshold must be an integer in \[0, 33554432\]"),
        ({"malloc_mmap_threshold": 64 * 2**20}, r"malloc_mmap_threshold must be an integer in \[0, 33554432\]"),
    ],
)
def test_bad_memory_settings_raise_one_line_naming_the_key(memory, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(RECIPE, sets=[f"memory={memory}"])


def test_pretraining_recipe_takes_the_chunked_loss_and_a_glue_recipe_refuses_it():
    recipe = load_recipe(ROOT / "recipes" / "pretrain" / "llama_60m.yaml", sets=["memory.loss_chunk_size=1024"])
    assert recipe.memory.loss_chunk_size == 1024
    with pytest.raises(RecipeError, match="memory.loss_chunk_size: pretraining and instruct recipes only"):
        load_recipe(ROOT / "recipes" / "glue" / "rte.yaml", sets=["memory.loss_chunk_size=64"])


def test_fused_head_token_tile_is_set_for_the_run_and_restored_after_an_error():
    from trl.kernels import chunked_logprob

    from hf_memopt.tools.recipes.instruct import fused_head_token_tile

    default = chunked_logprob.TOKEN_CHUNK_SIZE
    with pytest.raises(RuntimeError, match="boom"), fused_head_token_tile(8):
        assert chunked_logprob.TOKEN_CHUNK_SIZE == 8
        raise RuntimeError("boom")
    assert chunked_logprob.TOKEN_CHUNK_SIZE == default
    with pytest.raises(ValueError, match="loss_chunk_size must be an integer >= 1; got 0"), fused_head_token_tile(0):
        pass


def test_a_trl_without_the_fused_head_tile_is_refused_naming_the_setting(monkeypatch):
    import sys

    from hf_memopt.tools.recipes.instruct import fused_head_token_tile

    monkeypatch.setitem(sys.modules, "trl.kernels.chunked_logprob", None)  # as if TRL had no such module
    monkeypatch.delattr("trl.kernels.chunked_logprob", raising=False)
    with pytest.raises(ValueError, match="memory.loss_chunk_size: TRL .* has no fused-head token tile"):
        with fused_head_token_tile(64):
            pass


def test_instruct_recipe_tiles_trls_fused_head_by_loss_chunk_size_with_the_same_losses(tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    from trl.kernels import chunked_logprob

    from hf_memopt.tools.recipes.models import minilm_path
    from hf_memopt.tools.recipes.run import run_recipe

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tiny_llama(vocab=len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    tile_rows = []
    fold = chunked_logprob._forward_tile
    monkeypatch.setattr(
        chunked_logprob, "_forward_tile", lambda tile, *a, **k: tile_rows.append(len(tile)) or fold(tile, *a, **k)
    )

    def run(chunk):
        tile_rows.clear()
        sets = [f"model={tmp_path / 'tiny'}", "data.train_limit=8", "data.eval_limit=4", "data.max_length=48",
                "training.max_steps=2", "training.gradient_accumulation_steps=1", "training.logging_steps=1",
                "training.save_strategy=no", f"output_dir={tmp_path / str(chunk)}",
                *([f"memory.loss_chunk_size={chunk}"] if chunk else [])]  # fmt: skip
        results = run_recipe(load_recipe(ROOT / "recipes" / "instruct" / "alpaca.yaml", sets=sets), progress=False)
        return results, max(tile_rows)

    default, default_rows = run(None)
    tiled, tiled_rows = run(8)
    assert tiled_rows == 8 < default_rows  # 4 sequences of up to 48 tokens: one tile by default
    assert chunked_logprob.TOKEN_CHUNK_SIZE == 4096
    assert tiled["metrics"]["loss"] == pytest.approx(default["metrics"]["loss"], rel=1e-5)
    assert tiled["losses"] == pytest.approx(default["losses"], rel=1e-5)


def test_frozen_bf16_modules_hold_no_gradient_and_compute_as_the_rounded_weights():
    model = tiny_llama(seed=1)
    reference = tiny_llama(seed=1)
    with torch.no_grad():  # what the model computes with: the same weights rounded to bfloat16
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            reference.get_parameter(name).copy_(reference.get_parameter(name).bfloat16().float())
    frozen = freeze_modules(model, ["embed_tokens", "lm_head"], "bfloat16")
    assert frozen == ["model.embed_tokens.weight", "lm_head.weight"]
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.float32
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32
    # the head multiplies in bfloat16 (its input is rounded), the rest is exact
    torch.testing.assert_close(out.logits, reference(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    assert model.lm_head.weight.grad is None and model.model.embed_tokens.weight.grad is None
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_freezing_a_tied_embedding_freezes_the_head_with_it_and_both_compute_as_before():
    def tied():
        model = tiny_llama(seed=1)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        return model

    model, reference = tied(), tied()
    with torch.no_grad():
        reference.lm_head.weight.copy_(reference.lm_head.weight.bfloat16().float())
    assert freeze_modules(model, ["embed_tokens"], "bfloat16") == ["model.embed_tokens.weight", "lm_head.weight"]
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.bfloat16
    # the model's own forward (its own loss, generation) multiplies the tied head in bfloat16 and returns float32
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, reference(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
    assert model.generate(ids[:, :3], max_new_tokens=2, do_sample=False).shape == (2, 5)


def test_composed_run_saves_a_plain_model_that_reloads_with_the_same_outputs(tmp_path):
    model = tiny_llama(seed=2, hidden=64)
    freeze_modules(model, ["embed_tokens", "lm_head"], "bfloat16")
    use_chunked_lm_loss(model, chunk_size=16)
    use_recomputed_swiglu(model)
    args = training_args(tmp_path / "run", max_steps=3, learning_rate=3e-3, max_grad_norm=0.0,
                         optim="adamw_bnb_8bit", gradient_checkpointing=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=16))
    attach(trainer, LoQTConfig(rank=4, quant="nf4", merge_every=2, layerwise=True))
    trainer.train()
    trainer.save_model(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    assert not any("B" == n.rsplit(".", 1)[-1] for n, _ in reloaded.named_parameters())  # no LoQT factors left
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    # the saved weights are W_q + s P B (dequantized) and the bf16 head; the reloaded head multiplies in float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_estimate_predicts_the_measured_composed_run_within_15_percent(tmp_path, quant):
    """``hf-memopt estimate`` with the recipe's settings against the memory report of the same run (tiny LLaMA,
    batch 4 x 16; the report restarted after update 0, LoQT's initialisation)."""
    from hf_memopt import MemoryReportCallback
    from hf_memopt.tools.estimate import estimate_memory
    from hf_memopt.tools.memory import MemoryBreakdown

    class Steady(MemoryReportCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.breakdown = MemoryBreakdown()
                self._activations.peak = self._gradients.peak = 0

    settings = {"freeze_modules": ["embed_tokens", "lm_head"], "frozen_dtype": "bfloat16", "loss_chunk_size": 16,
                "recompute_swiglu": True}
    loqt = {"rank": 4, "quant": quant, "merge_every": 50, "layerwise": True}
    model = tiny_llama(seed=2, hidden=64, vocab=256)
    freeze_modules(model, settings["freeze_modules"], settings["frozen_dtype"])
    use_chunked_lm_loss(model, settings["loss_chunk_size"])
    use_recomputed_swiglu(model)
    args = training_args(tmp_path, max_steps=3, max_grad_norm=0.0, optim="adamw_bnb_8bit",
                         gradient_checkpointing=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=12, seq=16, vocab=256))
    attach(trainer, LoQTConfig(**loqt))
    report = Steady(print_table=False)
    trainer.add_callback(report)
    trainer.train()
    measured = report.breakdown.tensors_total
    predicted = estimate_memory(
        tiny_llama(hidden=64, vocab=256).config, "loqt", batch=4, seq=16, **loqt, **settings,
        optim="adamw_bnb_8bit", gradient_checkpointing=True,
    )["total"]  # fmt: skip
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured, report.breakdown)


def test_estimate_refuses_an_8bit_optim_for_a_method_with_its_own_optimizer():
    from hf_memopt.tools.estimate import estimate_memory

    with pytest.raises(ValueError, match="supplies its own"):
        estimate_memory("llama-20m", "galore", optim="adamw_bnb_8bit")
    with pytest.raises(ValueError, match="frozen_dtype"):
        estimate_memory("llama-20m", "loqt", frozen_dtype="bfloat16")


def test_the_recipe_fixes_the_malloc_mmap_threshold_before_the_model_is_loaded(monkeypatch, tmp_path):
    import hf_memopt.tools.host_memory as host_memory
    from hf_memopt.tools.recipes import run as run_module

    calls = []
    monkeypatch.setattr(host_memory, "set_malloc_mmap_threshold", calls.append)

    class Loaded(Exception):
        pass

    def no_training(*args, **kwargs):
        assert calls == [131072]  # set before the runner loads anything
        raise Loaded

    monkeypatch.setattr("hf_memopt.tools.recipes.pretrain.run_pretrain", no_training)
    recipe = load_recipe(ROOT / "recipes" / "pretrain" / "llama_20m.yaml",
                         sets=["memory.malloc_mmap_threshold=131072", f"output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(Loaded):
        run_module.run_recipe(recipe, progress=False)


def test_malloc_mmap_threshold_is_set_through_glibc_or_refused_by_name(monkeypatch):
    import platform

    from hf_memopt.tools.host_memory import set_malloc_mmap_threshold

    with pytest.raises(ValueError, match=r"malloc_mmap_threshold must be an integer in \[0, 33554432\]"):
        set_malloc_mmap_threshold(2**26)
    if platform.libc_ver()[0] == "glibc":  # glibc accepts it (mallopt returns 1), in a process of its own
        import subprocess
        import sys

        code = "from hf_memopt.tools.host_memory import set_malloc_mmap_threshold; set_malloc_mmap_threshold(131072)"
        subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    with pytest.raises(RuntimeError, match="malloc_mmap_threshold: needs glibc's malloc"):
        set_malloc_mmap_threshold(131072)

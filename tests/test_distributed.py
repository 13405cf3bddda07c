"""Data-parallel training on CPU (gloo, 2 processes): parameters agree across ranks and with one process that sees the
same global batch; configurations that cannot run distributed refuse with a clear error at ``attach()``.

Layer-wise GaLore, ZO and BlockLLM are not wrapped in DDP: they average what they need themselves (the projected
gradients in the hooks; the projected-gradient scalars; the selected blocks' gradients, every gradient on scoring
steps, and the loss of the stall test), so their rows also check that the model stayed unwrapped, switch the averaging
off as a negative control, and count the bytes layer-wise GaLore and BlockLLM sent against what DDP would have sent.
The BlockLLM rows run long enough for a re-selection and check that it chose what the one-process run chose.
LoQT is wrapped (DDP averages B) and averages the gradient its merges collect itself.

One ``torchrun --nproc_per_node 2`` launch of this very file (its ``__main__`` block is the worker) trains every
case and tries every refusal, so the import cost of two processes is paid once. The single-process reference runs in
the pytest process with ``per_device_train_batch_size = 2 x`` the per-rank batch and sequential sampling, so both see
samples 0..7 at step 1, 8..15 at step 2, and so on (accelerate gives rank r the r-th of each world_size batches).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import TokenDataset, launch_ranks, refusal_of, tiny_llama, training_args  # noqa: E402

WORLD = 2
PER_RANK_BATCH = 4
STEPS = 3
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4


def _configs(case: str) -> list:
    """The configs attached, in order, for each case (built in the worker and the reference alike)."""
    from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig, VeLoRAConfig, ZOConfig

    galore = GaLoreConfig(rank=RANK, update_proj_gap=2, target_modules=LLAMA_TARGETS)
    layerwise = GaLoreConfig(rank=RANK, update_proj_gap=2, target_modules=LLAMA_TARGETS, layerwise=True)
    velora = VeLoRAConfig(num_groups=8)
    # merges at updates 0 (the initialisation from a gradient) and 2
    loqt = LoQTConfig(rank=RANK, target_modules="all-linear", merge_every=2)
    loqt_layerwise = LoQTConfig(rank=RANK, target_modules="all-linear", merge_every=2, layerwise=True)
    # recipes/instruct/smollm2_min_memory.yaml's LoQT (with its 8-bit states and checkpointing in CASE_ARGS)
    min_memory = LoQTConfig(rank=RANK, target_modules="all-linear", merge_every=2, layerwise=True, init_weight="quantized")
    velora_mlp = VeLoRAConfig(num_groups=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    loqt_attention = LoQTConfig(rank=RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], merge_every=2)
    # patience 1 (with BLOCKLLM_ARGS): selection 1 at update 1, the loss stalls at update 4, re-selection at update 5;
    # masks (mask_fraction 0.5) are drawn from the averaged gradient of each newly selected block
    blockllm = BlockLLMConfig(sparsity=0.8, patience=1, mask_fraction=0.5)
    blockllm_8bit = BlockLLMConfig(
        sparsity=0.8, patience=1, mask_fraction=0.5, optimizer="adamw_8bit", min_8bit_size=1024
    )
    return {
        "adamw": [],  # the control: if this disagrees, the data split is wrong, not a method
        "galore": [galore],
        "velora": [velora],
        "velora+galore": [velora, galore],
        "galore_layerwise": [layerwise],
        "galore_layerwise_accumulation": [layerwise],
        "velora+galore_layerwise": [velora, layerwise],
        "loqt": [loqt],
        "loqt_layerwise": [loqt_layerwise],
        "min_memory_loqt": [min_memory],
        "velora+loqt": [velora_mlp, loqt_attention],
        "zo": [ZOConfig(n_samples=2, eps=1e-2)],  # a larger eps: (L+ - L-) / 2 eps loses fewer float32 digits
        "blockllm": [blockllm],
        "blockllm_8bit": [blockllm_8bit],
        "blockllm_accumulation": [blockllm],
        "velora+blockllm": [velora, blockllm],
        # the random first selection (the Trainer's seed), exploring blocks averaged before their norms are stored
        "blockllm_stored_norms": [BlockLLMConfig(sparsity=0.8, patience=1, selection="stored_norms", explore_blocks=2)],
        # the configurations that refuse data-parallel training
        "galore_layerwise_clipping": [layerwise],
        "loqt_without_find_unused_parameters": [loqt],
        "zo_offload": [ZOConfig(offload="cpu")],
    }[case]


# BlockLLM: 6 updates at a larger lr, so the loss stalls and a re-selection runs with an update after it; a small
# max_grad_norm, so the Trainer clips (the averaged gradient, whose norm differs from each rank's own)
BLOCKLLM_ARGS = {"max_steps": 6, "learning_rate": 8e-2, "max_grad_norm": 0.2}
BLOCKLLM = ["blockllm", "blockllm_8bit", "velora+blockllm", "blockllm_accumulation", "blockllm_stored_norms"]
# TrainingArguments per case (the single-process reference gets WORLD x the batch); layer-wise GaLore cannot clip
# under DDP, and the accumulation row has 2 micro-batches of 2 sequences per rank per update
CASE_ARGS = {
    **{case: BLOCKLLM_ARGS for case in BLOCKLLM},
    # averaged once per update (scoring updates: once per micro-batch, in the hooks)
    "blockllm_accumulation": {**BLOCKLLM_ARGS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    "galore_layerwise": {"max_grad_norm": 0.0},
    "velora+galore_layerwise": {"max_grad_norm": 0.0},
    "galore_layerwise_accumulation": {
        "max_grad_norm": 0.0, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
    },
    "galore_layerwise_clipping": {"max_grad_norm": 1.0},
    "loqt_layerwise": {"max_grad_norm": 0.0},
    "min_memory_loqt": {"max_grad_norm": 0.0, "optim": "adamw_bnb_8bit", "gradient_checkpointing": True},
    "loqt_without_find_unused_parameters": {"ddp_find_unused_parameters": False},
}  # fmt: skip


def _min_memory_model(model):
    """recipes/instruct/smollm2_min_memory.yaml's model settings: frozen bfloat16 embeddings and head, SwiGLU MLPs
    recomputing SiLU, the chunked LM loss."""
    from hf_memopt.shared.chunked_loss import use_chunked_lm_loss
    from hf_memopt.shared.frozen import freeze_modules
    from hf_memopt.shared.swiglu import use_recomputed_swiglu

    freeze_modules(model, ["embed_tokens", "lm_head"], "bfloat16")
    use_recomputed_swiglu(model)
    return use_chunked_lm_loss(model, chunk_size=16)


CASE_MODELS = {"min_memory_loqt": _min_memory_model}  # case -> the model settings it trains with
TRAINED = [
    "adamw", "galore", "velora", "velora+galore",
    "galore_layerwise", "galore_layerwise_accumulation", "velora+galore_layerwise", "loqt", "loqt_layerwise", "velora+loqt",
    "min_memory_loqt", "zo", *BLOCKLLM,
]  # fmt: skip
# averaging their own gradients, so never wrapped in DDP
SELF_REDUCED = {
    "galore_layerwise", "galore_layerwise_accumulation", "velora+galore_layerwise", "loqt_layerwise", "min_memory_loqt", "zo",
    *BLOCKLLM,
}  # fmt: skip
# the negative control of the rank check: these cases again with their own averaging switched off
UNAVERAGED = ["galore_layerwise", "zo", "blockllm"]
# case -> (exception type, words its message must contain: what fails and why)
REFUSED = {
    "galore_layerwise_clipping": ("ValueError", ["layer-wise", "distributed", "max_grad_norm=0"]),
    "loqt_without_find_unused_parameters": ("ValueError", ["LoQT", "distributed", "ddp_find_unused_parameters=True"]),
    "zo_offload": ("NotImplementedError", ["ZO2", "distributed", "offload=None"]),
}


def _trainer(case: str, output_dir: Path, batch_factor: int = 1, **overrides):
    """The case's trainer; ``batch_factor`` multiplies the per-device batch (WORLD for the one-process reference)."""
    from transformers import Trainer

    from hf_memopt import attach

    args = dict(
        max_steps=STEPS,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=PER_RANK_BATCH,
    )
    args.update(CASE_ARGS.get(case, {}))
    args["per_device_train_batch_size"] *= batch_factor
    args.update(overrides)
    model = CASE_MODELS.get(case, lambda m: m)(tiny_llama(seed=3))
    trainer = Trainer(model=model, args=training_args(output_dir, **args), train_dataset=TokenDataset(n=48))
    for config in _configs(case):
        attach(trainer, config)
    return trainer


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _steps(case: str) -> int:
    return CASE_ARGS.get(case, {}).get("max_steps", STEPS)


def _communication(trainer) -> dict:
    """Layer-wise GaLore's or BlockLLM's byte counters (bytes this rank all-reduced, and what DDP would have)."""
    from hf_memopt.shared.optim_state import unwrap_optimizer

    optimizer = unwrap_optimizer(trainer.optimizer)
    counter = getattr(optimizer, "layerwise", None) or optimizer
    if not hasattr(counter, "communicated_bytes"):
        return {}
    return {"communicated_bytes": counter.communicated_bytes, "ddp_equivalent_bytes": counter.ddp_equivalent_bytes}


def _selection(trainer) -> dict:
    """BlockLLM's selection state after training (empty for other methods)."""
    from hf_memopt.blockllm.optimizer import unwrap_blockllm_optimizer

    optimizer = unwrap_blockllm_optimizer(trainer.optimizer)
    if optimizer is None:
        return {}
    return {
        "num_selections": optimizer.num_selections,
        "selected": optimizer.selected.tolist(),
        "visits": optimizer.visits.tolist(),
    }


class _SwitchOffAveraging(TrainerCallback):
    """``on_train_begin`` (the optimizer exists by then): each rank steps with its own gradients."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        from hf_memopt.shared.optim_state import unwrap_optimizer

        optimizer = unwrap_optimizer(optimizer)
        target = optimizer.layerwise if getattr(optimizer, "layerwise", None) is not None else optimizer
        assert target.distributed
        target.distributed = False


# ---- the worker (run by torchrun) --------------------------------------------------------------------------------------
def _worker(out: Path) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    report: dict = {"trained": {}, "refused": {}}
    for case in TRAINED:
        trainer = _trainer(case, out / case, ddp_backend="gloo")
        report["world_size"] = trainer.args.world_size
        report["parallel_mode"] = str(trainer.args.parallel_mode)
        trainer.train()
        state = {k: v.detach().contiguous().clone() for k, v in trainer.model.state_dict().items()}
        save_file(state, str(out / f"{case}.rank{rank}.safetensors"))
        report["trained"][case] = {
            "losses": _losses(trainer),
            "wrapped": type(trainer.model_wrapped).__name__,
            "selection": _selection(trainer),
            **_communication(trainer),
        }
    for case in UNAVERAGED:
        trainer = _trainer(case, out / f"{case}_unaveraged", ddp_backend="gloo")
        trainer.add_callback(_SwitchOffAveraging())
        trainer.train()
        state = {k: v.detach().contiguous().clone() for k, v in trainer.model.state_dict().items()}
        save_file(state, str(out / f"{case}_unaveraged.rank{rank}.safetensors"))
    for case in REFUSED:
        report["refused"][case] = refusal_of(lambda case=case: _trainer(case, out / case, ddp_backend="gloo").train())
    (out / f"report.rank{rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---- the tests ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Launch the 2-process run once; returns its output folder."""
    out = tmp_path_factory.mktemp("ddp")
    launch_ranks(str(Path(__file__).resolve()), out, WORLD)
    return out


@pytest.fixture(scope="module")
def reports(ddp_run):
    return [json.loads((ddp_run / f"report.rank{r}.json").read_text()) for r in range(WORLD)]


def test_the_run_is_really_data_parallel(reports):
    for report in reports:
        assert report["world_size"] == WORLD and "DISTRIBUTED" in report["parallel_mode"]
        for case, result in report["trained"].items():
            expected = "LlamaForCausalLM" if case in SELF_REDUCED else "DistributedDataParallel"
            assert result["wrapped"] == expected, case


@pytest.mark.parametrize("case", TRAINED)
def test_parameters_are_identical_across_ranks(ddp_run, case):
    from safetensors.torch import load_file

    states = [load_file(str(ddp_run / f"{case}.rank{r}.safetensors")) for r in range(WORLD)]
    assert set(states[0]) == set(states[1])
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("case", UNAVERAGED)
def test_without_their_own_averaging_the_ranks_drift_apart(ddp_run, case):
    """The negative control of the check above: the same run with the averaging switched off (each rank steps with
    its own gradient) leaves the ranks 3e-2 to 6e-2 apart."""
    from safetensors.torch import load_file

    states = [load_file(str(ddp_run / f"{case}_unaveraged.rank{r}.safetensors")) for r in range(WORLD)]
    worst = max((states[1][k] - states[0][k]).abs().max().item() for k in states[0])
    assert worst > 1e-3, worst


# the combinations' one-process references are slow (about 10 s together on the loaded 2-core CPU); their ranks are
# still checked in every run
SLOW_REFERENCES = {"velora+galore_layerwise", "velora+loqt"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_REFERENCES else c for c in TRAINED]
)
def test_ddp_equals_one_process_with_the_same_global_batch(ddp_run, reports, case, tmp_path):
    from safetensors.torch import load_file

    single = _trainer(case, tmp_path, batch_factor=WORLD)
    initial = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
    single.train()
    ddp = load_file(str(ddp_run / f"{case}.rank0.safetensors"))
    moved = 0
    for key, value in single.model.state_dict().items():
        # float32 with a different reduction order (two half-batch means averaged by all-reduce): measured <= 1e-6;
        # a wrong split of the global batch moves parameters by 4e-2. LoQT's P are singular vectors of the averaged
        # gradient, which amplify its rounding by 1 / (singular value gap): measured <= 5.2e-6
        tolerance = 1e-4 if key.endswith(".proj") else 1e-5
        torch.testing.assert_close(ddp[key], value, rtol=tolerance, atol=tolerance, msg=key)
        moved += not torch.equal(initial[key], value)
    assert moved > 0  # the comparison is not between two untouched models
    ddp_losses = reports[0]["trained"][case]["losses"]
    assert len(ddp_losses) == _steps(case)
    assert ddp_losses == pytest.approx(_losses(single), rel=1e-5)
    selection = reports[0]["trained"][case]["selection"]
    assert selection == _selection(single)
    if case == "blockllm_stored_norms":  # the random first selection; its loss does not stall within 6 updates
        assert selection["num_selections"] == 1
    elif case in BLOCKLLM:
        assert selection["num_selections"] == 2  # the re-selection happened, and chose what one process chose


@pytest.mark.parametrize("case", ["adamw", "galore_layerwise", "zo"])
def test_one_process_with_half_the_batch_differs_so_the_comparison_is_sharp(ddp_run, case, tmp_path):
    """The negative control: the one-process run that sees only the per-rank batch is far outside the tolerance."""
    from safetensors.torch import load_file

    wrong = _trainer(case, tmp_path)
    wrong.train()
    ddp = load_file(str(ddp_run / f"{case}.rank0.safetensors"))
    worst = max((ddp[k].float() - v.float()).abs().max().item() for k, v in wrong.model.state_dict().items())
    assert worst > 100 * 1e-5, worst


@pytest.mark.parametrize("case", ["galore_layerwise", "galore_layerwise_accumulation"])
def test_layerwise_galore_all_reduces_projected_gradients_between_refreshes(reports, case):
    """Bytes counted in the hooks: full gradients on the refresh updates 1 and 3 (update_proj_gap 2), on update 2 the
    projected ones of the targets (rank x the larger side: ``proj_type="std"``) and the full ones of embeddings, norms
    and the head; DDP sends every full gradient on every update. The accumulation row sends the same: one all-reduce
    per update, not one per micro-batch."""
    model = tiny_llama(seed=3)
    targets = {f"{n}.weight" for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS}
    full = sum(p.numel() * 4 for p in model.parameters())
    projected = sum(RANK * max(p.shape) * 4 if n in targets else p.numel() * 4 for n, p in model.named_parameters())
    for report in reports:
        sent = report["trained"][case]
        assert sent["ddp_equivalent_bytes"] == STEPS * full
        assert sent["communicated_bytes"] == 2 * full + projected
    assert projected < full / 3  # the projected update really is the small one (3.5x less here)


@pytest.mark.parametrize("case", ["blockllm", "blockllm_8bit", "velora+blockllm"])
def test_blockllm_all_reduces_the_selected_gradients_between_scoring_steps(reports, case):
    """Bytes counted by the optimizer: every selectable gradient (the blocks outside embeddings and head) on the two
    scoring updates (1 and 5); on the other four only the selected ones (at most 1 - sparsity = 20% of the trainable
    parameters) plus one presence flag per parameter and the loss of the stall test. DDP would send every selectable
    gradient on every update."""
    from hf_memopt.blockllm.blocks import build_blocks, selection_budget

    blocks, trainable = build_blocks(tiny_llama(seed=3), "parameter", train_embeddings=False)
    selectable = sum(b.numel for b in blocks) * 4
    per_update = selection_budget(0.8, blocks) * 4 + sum(len(b.params) for b in blocks) * 4 + 8
    for report in reports:
        sent = report["trained"][case]
        assert sent["ddp_equivalent_bytes"] == 6 * selectable
        assert 2 * selectable < sent["communicated_bytes"] <= 2 * selectable + 4 * per_update


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_configurations_that_cannot_run_distributed_refuse_clearly(reports, case):
    kind, words = REFUSED[case]
    for report in reports:
        refusal = report["refused"][case]
        assert refusal is not None, f"{case} trained under DDP without refusing"
        assert refusal["type"] == kind, refusal
        for word in words:
            assert word in refusal["message"], (word, refusal["message"])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))

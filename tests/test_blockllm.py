"""BlockLLM: selection rule, masked AdamW math, scoring hooks, Trainer end-to-end, exact resume, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TokenDataset, tiny_bert_classifier, tiny_llama, training_args
from transformers import Trainer

from hf_memopt import attach
from hf_memopt.blockllm import (
    BlockLLMAdamW,
    BlockLLMAdamW8bit,
    BlockLLMConfig,
    build_blocks,
    create_blockllm_optimizer,
    select_blocks,
)
from hf_memopt.blockllm.blocks import selection_budget
from hf_memopt.blockllm.optimizer import unwrap_blockllm_optimizer
from hf_memopt.core.plan import OptimizerHyperparameters
from hf_memopt.core.registry import METHODS
from hf_memopt.tools.memory import GradientMeter, SavedActivationMeter, optimizer_state_bytes

HP = OptimizerHyperparameters(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8, max_grad_norm=0.0,
                              gradient_accumulation_steps=1)


def _llama_loss(model, seed=0):
    ids = TokenDataset(n=4, seq=12, seed=seed).ids
    return model(input_ids=ids, labels=ids).loss


def _select(opt, indices):
    """Put ``indices`` in the selection directly (bypassing scoring) for math tests."""
    opt.selected = torch.zeros(len(opt.blocks), dtype=torch.bool)
    opt.selected[list(indices)] = True
    opt.visits = opt.selected.long()
    opt.num_selections = 1
    opt.apply_selection()


# ---- the selection rule ----------------------------------------------------------------------------------------------
def _reference_select(norms, visits, n_sel, sizes, budget, penalty):
    scores = [n * math.exp(-penalty * (v / max(n_sel, 1))) for n, v in zip(norms, visits)]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen, total = set(), 0
    for i in order:
        if total + sizes[i] <= budget:
            chosen.add(i)
            total += sizes[i]
    return chosen


@pytest.mark.parametrize("seed", range(5))
def test_select_blocks_ranks_by_visit_discounted_norm_within_budget(seed):
    g = torch.Generator().manual_seed(seed)
    n = 12
    norms = torch.rand(n, generator=g, dtype=torch.float64) * 3
    visits = torch.randint(0, 4, (n,), generator=g)
    sizes = torch.randint(1, 50, (n,), generator=g)
    budget = int(sizes.sum()) // 4
    chosen = select_blocks(norms, visits, 4, sizes, budget, 1.5)
    expected = _reference_select(norms.tolist(), visits.tolist(), 4, sizes.tolist(), budget, 1.5)
    assert set(torch.nonzero(chosen).flatten().tolist()) == expected
    assert int(sizes[chosen].sum()) <= budget


def test_visit_penalty_moves_selection_to_less_visited_blocks():
    norms = torch.tensor([1.0, 0.9])
    sizes = torch.tensor([10, 10])
    assert select_blocks(norms, torch.tensor([0, 0]), 0, sizes, 10, 1.0).tolist() == [True, False]
    assert select_blocks(norms, torch.tensor([3, 0]), 3, sizes, 10, 1.0).tolist() == [False, True]
    assert select_blocks(norms, torch.tensor([3, 0]), 3, sizes, 10, 0.0).tolist() == [True, False]


def test_stall_rule_compares_last_patience_losses_with_mean_since_selection():
    model = tiny_llama()
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.5, patience=3), HP)
    losses = [5.0, 4.0, 3.0, 2.5, 2.4, 3.6, 4.0, 4.4]
    fired = [opt.observe_loss(x) for x in losses]
    ref = []
    for t in range(1, len(losses) + 1):
        h = losses[:t]
        ref.append(len(h) > 3 and sum(h[-3:]) / 3 >= sum(h) / len(h))
    assert fired == ref and any(ref) and not all(ref)


# ---- the update ----------------------------------------------------------------------------------------------------------
def test_adamw_matches_torch_adamw_on_selected_blocks_and_leaves_others_untouched():
    model = tiny_llama(dtype=torch.float64)
    reference = copy.deepcopy(model)
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.7), HP)
    assert isinstance(opt, BlockLLMAdamW)
    chosen = [i for i, b in enumerate(opt.blocks) if "layers.1" in b.name or "norm.weight" == b.name[-11:]]
    _select(opt, chosen[:4])
    names = {n for i in chosen[:4] for n in opt.blocks[i].names}
    ref_params = dict(reference.named_parameters())
    decay = [ref_params[n] for n in names if "norm" not in n]
    no_decay = [ref_params[n] for n in names if "norm" in n]
    for p in reference.parameters():
        p.requires_grad_(p in set(decay) | set(no_decay))
    ref_opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
        weight_decay=0.1,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seed in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            _llama_loss(m, seed).backward()
            o.step()
    ref_after = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if n in names:
            torch.testing.assert_close(p, ref_after[n], rtol=1e-10, atol=1e-12)
            assert not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n
    assert set(opt.state) == {p for n, p in model.named_parameters() if n in names}


def test_mask_updates_only_the_top_fraction_of_coordinates_by_gradient_magnitude():
    model = tiny_llama(dtype=torch.float64)
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.7, mask_fraction=0.25), HP)
    i = next(i for i, b in enumerate(opt.blocks) if b.name.endswith("layers.0.self_attn.q_proj.weight"))
    _select(opt, [i])
    p = opt.blocks[i].params[0]
    before = p.detach().clone()
    _llama_loss(model).backward()
    grad = p.grad.detach().clone()
    opt.step()
    k = math.ceil(0.25 * p.numel())
    expected = torch.zeros(p.numel(), dtype=torch.bool)
    expected[grad.abs().flatten().topk(k).indices] = True
    changed = (p.detach() != before).flatten()
    assert torch.equal(changed, expected)
    assert torch.equal(opt.state[p]["mask"].flatten(), expected)
    # the mask stays fixed for later steps until the next selection
    opt.zero_grad()
    _llama_loss(model, 1).backward()
    opt.step()
    assert torch.equal((p.detach() != before).flatten(), expected)


def test_8bit_matches_bitsandbytes_adamw8bit_on_a_selected_block():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 128))
    w_ref = torch.nn.Parameter(w.detach().clone())
    from hf_memopt.blockllm.blocks import Block

    opt = BlockLLMAdamW8bit([w], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, blocks=[Block("w", [w], ["w"])], budget=10**6)
    _select(opt, [0])
    ref = bnb.optim.AdamW8bit([w_ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, min_8bit_size=4096)
    for step in range(4):
        g = torch.randn(64, 128, generator=torch.Generator().manual_seed(step))
        w.grad, w_ref.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert opt.state[w]["state1"].dtype == torch.uint8
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-5)


# ---- scoring -------------------------------------------------------------------------------------------------------------
def test_scoring_reads_every_block_norm_and_keeps_only_selected_gradients():
    model = tiny_llama(dtype=torch.float64)
    reference = copy.deepcopy(model)
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.8), HP)
    _select(opt, [0])
    opt.begin_scoring()
    assert all(p.requires_grad for b in opt.blocks for p in b.params)
    _llama_loss(model).backward()
    kept = [p for b in opt.blocks for p in b.params if p.grad is not None]
    assert kept == opt.blocks[0].params  # gradients of unselected blocks were dropped inside backward
    named = dict(reference.named_parameters())
    for p in reference.parameters():
        p.requires_grad_(False)
    for b in opt.blocks:
        for n in b.names:
            named[n].requires_grad_(True)
    _llama_loss(reference).backward()
    expected = torch.stack([torch.sqrt(sum(named[n].grad.pow(2).sum() for n in b.names)) for b in opt.blocks])
    torch.testing.assert_close(opt._norms_sq.sqrt(), expected, rtol=1e-10, atol=0)
    opt.step()
    state_p = opt.blocks[0].params[0]
    m_before = opt.state[state_p]["exp_avg"].clone()
    chosen = opt.finish_scoring()
    assert chosen.tolist() == select_blocks(expected, torch.tensor([1] + [0] * (len(expected) - 1)), 1, opt.sizes,
                                            opt.budget, 1.0).tolist()
    for i, b in enumerate(opt.blocks):
        for p in b.params:
            assert p.requires_grad == bool(chosen[i])
            assert (p in opt.state) == (bool(chosen[i]) and i == 0)
    if chosen[0]:  # moments of a block that stays selected are kept
        assert torch.equal(opt.state[state_p]["exp_avg"], m_before)
    assert opt.visits[chosen].min() >= 1 and opt.loss_count == 0 and not opt.recent_losses


# ---- selection from stored norms (the official code's selection) ---------------------------------------------------------
def _official_pick(grad_norm_dict, visit_freq, update_step, sizes, budget):
    """The official ``_adjust_parameters`` (blockllm_torch/blockllm.py of RAmruthaVignesh/blockllm), transcribed: rank
    the stored norms by ``norm / exp(visit_freq / update_step)``, take names while the running count stays below the
    budget; a random fill follows only when the stored names run out first (the test asserts they do not)."""
    order = sorted(grad_norm_dict, key=lambda n: grad_norm_dict[n] / math.exp(visit_freq[n] / update_step),
                   reverse=True)
    chosen, running = [], 0
    for name in order:
        running += sizes[name]
        if running >= budget:
            break
        chosen.append(name)
    assert running >= budget, "the example must not reach the official random fill"
    return chosen


def test_stored_norm_selection_picks_what_the_official_rule_picks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(6, 6, bias=False) for _ in range(8)]).double()
    blocks, _ = build_blocks(model, "parameter", train_embeddings=False)
    # 3 blocks of 36 fit in 118 and a 4th does not: the official break and our skip-and-continue agree here
    opt = BlockLLMAdamW(model.parameters(), lr=1e-2, blocks=blocks, budget=118, selection="stored_norms",
                        explore_blocks=2, visit_penalty=0.0)
    opt.select_at_random(seed=0)
    assert int(opt.selected.sum()) == 3 and int(opt.exploring.sum()) == 2
    x = torch.randn(5, 6, dtype=torch.float64)
    official = {}  # grad_norm_dict: after each step, the norm of every parameter with requires_grad
    for step in range(2):  # 2 steps x 2 exploring blocks: 4 of the 5 unselected blocks get measured
        opt.zero_grad()
        model(x * (step + 1)).pow(2).sum().backward()
        for b in blocks:
            if b.params[0].requires_grad:
                official[b.name] = b.params[0].grad.norm().item()
        opt.step()
        opt.end_step(None)
    assert len(official) == 7
    measured = [i for i, b in enumerate(blocks) if b.name in official]
    torch.testing.assert_close(opt.grad_norms[measured], torch.tensor([official[blocks[i].name] for i in measured],
                                                                      dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.isnan(opt.grad_norms[[i for i in range(8) if i not in measured]]).all()
    # at its first re-selection the official visit frequencies are all equal (the initial shuffle does not count a
    # visit), so its discount is uniform: visit_penalty=0 here
    expected = _official_pick(official, {b.name: 1 / 8 for b in blocks}, 3, {b.name: 36 for b in blocks}, 118)
    chosen = opt.select_from_stored_norms()
    assert {blocks[i].name for i in torch.nonzero(chosen).flatten().tolist()} == set(expected)


def test_exploring_blocks_rotate_through_the_unselected_ones_measured_longest_ago():
    model = tiny_llama(dtype=torch.float64)
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.8, selection="stored_norms", explore_blocks=3),
                                    HP)
    _select(opt, [1, 2])
    opt._choose_exploring()
    seen = []
    for seed in range(4):
        opt.apply_selection()
        explored = torch.nonzero(opt.exploring).flatten().tolist()
        seen += explored
        assert {id(p) for p in model.parameters() if p.requires_grad} == {
            id(p) for i in [1, 2, *explored] for p in opt.blocks[i].params}
        _llama_loss(model, seed).backward()
        opt.step()
        assert all(p.grad is None for i in explored for p in opt.blocks[i].params)  # measured, then dropped
        opt.zero_grad()
        opt.end_step(None)
    unselected = [i for i in range(len(opt.blocks)) if i not in (1, 2)]
    assert seen == unselected[:12]  # never-measured first, in model order, 3 a step


def test_blocks_larger_than_the_budget_are_never_explored():
    model = tiny_llama()
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.9, selection="stored_norms", explore_blocks=4), HP)
    _select(opt, [0])
    opt._choose_exploring()
    opt.apply_selection()
    too_large = {i for i, b in enumerate(opt.blocks) if b.numel > opt.budget}
    assert too_large  # the MLP matrices (2304) exceed 10% of the selectable parameters
    explored = set(torch.nonzero(opt.exploring).flatten().tolist())
    for seed in range(len(opt.blocks) // 4):
        _llama_loss(model, seed).backward()
        opt.step()
        opt.zero_grad()
        opt.end_step(None)
        explored |= set(torch.nonzero(opt.exploring).flatten().tolist())
    assert explored == set(range(len(opt.blocks))) - too_large - {0}


def _reselection_step(selection):
    """Peak gradient bytes, saved activation bytes and the parameters that got a gradient, on the step whose
    backward serves a re-selection: the scoring step (full_backward) or a step whose loss stalls (stored_norms)."""
    model = tiny_llama(dtype=torch.float64)
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.8, patience=1, selection=selection), HP)
    top = [i for i, b in enumerate(opt.blocks) if "layers.1.mlp" in b.name]
    _select(opt, top)
    opt._choose_exploring()
    opt.end_step(1.0)  # a first loss, so the next one can stall
    if selection == "full_backward":
        opt.begin_scoring()
        assert opt.scoring
    else:
        opt.apply_selection()
    received = set()
    hooks = [p.register_hook(lambda g, p=p: received.add(id(p))) for p in model.parameters() if p.requires_grad]
    meter = GradientMeter(model)
    with SavedActivationMeter(model) as saved:
        loss = _llama_loss(model)
    loss.backward()
    meter.sample(model)
    for h in hooks:
        h.remove()
    meter.remove()
    exploring = torch.nonzero(opt.exploring).flatten().tolist()
    opt.step()
    before = opt.num_selections
    opt.zero_grad()
    opt.end_step(2.0)  # a rising loss: stall
    assert opt.num_selections == before + 1  # the selection was made on this step's norms
    return meter.peak, saved.peak, received, opt, top, exploring


def test_reselection_from_stored_norms_needs_no_full_backward():
    full_peak, full_saved, full_received, opt, top, _ = _reselection_step("full_backward")
    assert full_received == {id(p) for b in opt.blocks for p in b.params}  # every weight gradient computed
    peak, saved, received, opt, top, exploring = _reselection_step("stored_norms")
    assert exploring and received == {id(p) for i in top + exploring for p in opt.blocks[i].params}
    assert peak == 8 * sum(opt.blocks[i].numel for i in top + exploring)  # the selection + the exploring block
    assert peak < full_peak and saved < full_saved


def test_stall_test_runs_only_on_multiples_of_stall_check_interval():
    opt = create_blockllm_optimizer(tiny_llama(), BlockLLMConfig(sparsity=0.5, patience=1, stall_check_interval=3),
                                    HP)
    _select(opt, [0])
    started = []
    for loss in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]:
        opt.end_step(loss)  # a rising loss stalls on every step from the 2nd
        started.append(opt.scoring)
        if opt.scoring:
            break
    assert started == [False, False, True]


# ---- data parallelism: a simulated second rank (the real 2-process launch is tests/test_distributed.py) -----------------
class _TwoRanks:
    """Stands in for ``all_reduce_mean_`` with one other rank, whose tensor ``peer(own)`` returns; records the calls."""

    def __init__(self, peer):
        self.peer = peer
        self.calls = 0

    def __call__(self, tensor):
        self.calls += 1
        tensor.add_(self.peer(tensor.clone())).div_(2)
        return tensor.numel() * tensor.element_size()


def test_update_averages_the_selected_gradients_once_and_a_missing_one_counts_as_zero(monkeypatch):
    model = tiny_llama(dtype=torch.float64)
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.8), HP)
    opt.distributed = True
    _select(opt, [0, 1, 2])
    p0, p1, p2 = (opt.blocks[i].params[0] for i in range(3))
    g0, h0, h1 = (torch.randn_like(p0), torch.randn_like(p0), torch.randn_like(p1))
    p0.grad = g0.clone()  # p1 has no gradient on this rank, the other rank has one; p2 has none anywhere
    # the other rank's bucket: one presence flag per parameter, then the gradients in order
    peer = torch.cat([torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), h0.flatten(), h1.flatten(),
                      torch.zeros(p2.numel(), dtype=torch.float64)])
    reduce = _TwoRanks(lambda own: peer)
    monkeypatch.setattr("hf_memopt.blockllm.optimizer.all_reduce_mean_", reduce)
    opt.average_gradients()
    opt.average_gradients()  # once per update: the Trainer integration calls it before clipping, step() again
    assert reduce.calls == 1
    torch.testing.assert_close(p0.grad, (g0 + h0) / 2, rtol=0, atol=0)
    torch.testing.assert_close(p1.grad, h1 / 2, rtol=0, atol=0)
    assert p2.grad is None
    assert opt.communicated_bytes == peer.numel() * 8
    before = p0.detach().clone()
    opt.step()
    assert reduce.calls == 1 and not torch.equal(p0, before)
    assert opt.ddp_equivalent_bytes == sum(p.numel() * 8 for b in opt.blocks for p in b.params)
    opt.step()  # the next update averages again
    assert reduce.calls == 2
    opt.average_gradients()
    opt.begin_update()  # an update whose step() was skipped (GradScaler overflow) must not leave the next unaveraged
    opt.average_gradients()
    assert reduce.calls == 4


def test_scoring_under_data_parallelism_ranks_blocks_by_the_norm_of_the_averaged_gradient(monkeypatch):
    model = tiny_llama(dtype=torch.float64)
    local = copy.deepcopy(model)
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.8), HP)
    reference = create_blockllm_optimizer(local, BlockLLMConfig(sparsity=0.8), HP)
    opt.distributed = True
    reduce = _TwoRanks(lambda own: 5 * own)  # the other rank's gradient is 5x this one's: the mean is 3x
    monkeypatch.setattr("hf_memopt.blockllm.optimizer.all_reduce_mean_", reduce)
    for o, m in ((opt, model), (reference, local)):
        _select(o, [0])
        o.begin_scoring()
        _llama_loss(m).backward()
    params = [p for b in opt.blocks for p in b.params]
    assert reduce.calls == len(params)  # one all-reduce per gradient, inside backward
    torch.testing.assert_close(opt._norms_sq.sqrt(), 3 * reference._norms_sq.sqrt(), rtol=1e-12, atol=0)
    kept, kept_local = opt.blocks[0].params[0], reference.blocks[0].params[0]
    torch.testing.assert_close(kept.grad, 3 * kept_local.grad, rtol=1e-12, atol=0)  # the update uses the mean too
    opt.step()
    assert reduce.calls == len(params)  # already averaged: the update sends nothing more
    assert opt.communicated_bytes == sum(p.numel() * 8 for p in params)


def test_stall_test_reads_the_loss_averaged_over_ranks(monkeypatch):
    opt = create_blockllm_optimizer(tiny_llama(), BlockLLMConfig(sparsity=0.8), HP)
    monkeypatch.setattr("hf_memopt.blockllm.optimizer.all_reduce_mean_", _TwoRanks(lambda own: own + 2))
    assert opt.mean_over_ranks(torch.tensor(4.0)) == 4.0  # not distributed: this rank's own loss
    opt.distributed = True
    assert opt.mean_over_ranks(torch.tensor(4.0)) == 5.0


def test_update_buckets_split_by_dtype_and_size(monkeypatch):
    from hf_memopt.blockllm import optimizer

    monkeypatch.setattr(optimizer, "_BUCKET_NUMEL", 10)
    a, b, c, d = torch.zeros(4), torch.zeros(3, dtype=torch.float64), torch.zeros(5), torch.zeros(12)
    e = torch.zeros(2)
    buckets = optimizer._buckets([a, b, c, d, e])
    assert [[id(t) for t in bucket] for bucket in buckets] == [[id(a), id(c)], [id(b)], [id(d)], [id(e)]]


def test_embeddings_and_head_frozen_by_default_and_selectable_when_asked():
    model = tiny_llama()
    blocks, _ = build_blocks(model, "parameter", train_embeddings=False)
    names = {n for b in blocks for n in b.names}
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    blocks, _ = build_blocks(tiny_llama(), "parameter", train_embeddings=True)
    assert "lm_head.weight" in {n for b in blocks for n in b.names}
    layer_blocks, _ = build_blocks(tiny_llama(), "layer", train_embeddings=False)
    assert [b.name for b in layer_blocks] == ["model.layers.0", "model.layers.1", "model.norm.weight"]


# ---- the budget: (1 - sparsity) of the selectable parameters ---------------------------------------------------------------
# what the official code counts (blockllm_torch/blockllm.py: total_params over the groups left after removing every
# "embed" / "lm_head" name); written out per model so the test does not reuse the code under test
SELECTABLE = {
    "llama": (tiny_llama, ("model.embed_tokens.", "lm_head.")),
    "bert": (tiny_bert_classifier, ("word_embeddings.", "position_embeddings.", "token_type_embeddings.")),
}


@pytest.mark.parametrize("model_name", sorted(SELECTABLE))
@pytest.mark.parametrize("sparsity", [0.5, 0.95])
def test_budget_is_one_minus_sparsity_of_the_selectable_parameters(model_name, sparsity):
    build, frozen = SELECTABLE[model_name]
    model = build()
    trainable = sum(p.numel() for p in model.parameters())
    selectable = sum(p.numel() for n, p in model.named_parameters() if not any(f in n for f in frozen))
    assert selectable < trainable
    opt = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=sparsity), HP)
    assert opt.budget == math.floor((1 - sparsity) * selectable + 1e-9)
    assert (opt.selectable_numel, opt.trainable_numel) == (selectable, trainable)
    assert selection_budget(sparsity, opt.blocks) == opt.budget


def test_blocks_larger_than_the_budget_are_named_once_at_attach(tmp_path, caplog):
    model = tiny_llama()
    sizes = {n: p.numel() for n, p in model.named_parameters() if not n.startswith(("model.embed_tokens.", "lm_head."))}
    budget = math.floor((1 - 0.95) * sum(sizes.values()) + 1e-9)
    too_large = sorted(n for n, size in sizes.items() if size > budget)
    assert too_large and len(too_large) < len(sizes)  # the case: some blocks fit, some never can
    with caplog.at_level("WARNING", logger="hf_memopt.blockllm.builder"):
        trainer = _trainer(tmp_path, model=model, max_steps=1, config=BlockLLMConfig(sparsity=0.95))
        trainer.train()  # the optimizer is built from the same blocks: no second warning
    warnings = [r.getMessage() for r in caplog.records if "can never be selected" in r.getMessage()]
    assert len(warnings) == 1
    assert f"{len(too_large)} of {len(sizes)} blocks" in warnings[0] and f"budget of {budget}" in warnings[0]
    assert too_large[0] in warnings[0]


def test_no_warning_when_every_block_fits_the_budget(caplog):
    with caplog.at_level("WARNING", logger="hf_memopt.blockllm.builder"):
        create_blockllm_optimizer(tiny_llama(), BlockLLMConfig(sparsity=0.5), HP)
    assert not [r for r in caplog.records if "can never be selected" in r.getMessage()]


@pytest.mark.parametrize("model_name", sorted(SELECTABLE))
def test_trainer_logs_the_selection_as_a_fraction_of_selectable_and_of_trainable_parameters(tmp_path, model_name):
    build, frozen = SELECTABLE[model_name]
    model = build()
    trainable = sum(p.numel() for p in model.parameters())
    selectable = sum(p.numel() for n, p in model.named_parameters() if not any(f in n for f in frozen))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 10), generator=g)
    data = [{"input_ids": ids[i], "labels": ids[i] if model_name == "llama" else ids[i, 0] % 2} for i in range(16)]
    trainer = _trainer(tmp_path, model=model, dataset=data, max_steps=3, config=BlockLLMConfig(sparsity=0.7))
    trainer.train()
    opt = unwrap_blockllm_optimizer(trainer.optimizer)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("blockllm_selected_of_selectable" in h for h in logged)
    assert logged[-1]["blockllm_selected_of_selectable"] == opt.selected_numel / selectable
    assert logged[-1]["blockllm_selected_of_trainable"] == opt.selected_numel / trainable
    assert opt.selected_numel <= math.floor(0.3 * selectable + 1e-9)
    largest = max(b.numel for b in opt.blocks)
    assert opt.selected_numel > 0.3 * selectable - largest  # the budget is used, not 0.3 of all trainable parameters


# ---- Trainer -------------------------------------------------------------------------------------------------------------
def _trainer(tmp_path, model=None, dataset=None, config=None, **overrides):
    model = model or tiny_llama()
    args = training_args(tmp_path, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=dataset or TokenDataset(n=64))
    attach(trainer, config or BlockLLMConfig(sparsity=0.8, patience=2))
    return trainer


def test_trainer_trains_only_selected_blocks_and_loss_goes_down(tmp_path):
    trainer = _trainer(tmp_path, max_steps=24, learning_rate=2e-2)
    embed_before = trainer.model.model.embed_tokens.weight.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) / 4 < sum(losses[1:5]) / 4
    opt = unwrap_blockllm_optimizer(trainer.optimizer)
    assert opt.num_selections >= 2  # the first selection and at least one re-selection after a stall
    assert torch.equal(trainer.model.model.embed_tokens.weight, embed_before)
    selected = {id(p) for i, b in enumerate(opt.blocks) if opt.selected[i] for p in b.params}
    assert {id(p) for p in trainer.model.parameters() if p.requires_grad} == selected
    assert opt.selected_numel <= opt.budget
    assert set(map(id, opt.state)) <= selected
    full_adam = 8 * sum(p.numel() for p in tiny_llama().parameters())
    assert optimizer_state_bytes(trainer.optimizer) <= 0.2 * full_adam


def test_trainer_with_gradient_accumulation_and_reentrant_checkpointing(tmp_path):
    trainer = _trainer(
        tmp_path, max_steps=8, gradient_accumulation_steps=2, per_device_train_batch_size=2,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
        config=BlockLLMConfig(sparsity=0.8, patience=1, optimizer="adamw_8bit"),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    opt = unwrap_blockllm_optimizer(trainer.optimizer)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("embed" not in n and "lm_head" not in n for n in changed)
    # blocks inside checkpointed layers get gradients only if the frozen embeddings' output requires grad
    selected = {n for i, b in enumerate(opt.blocks) if opt.selected[i] for n in b.names}
    assert any(".layers." in n for n in selected)
    assert selected <= changed


def test_encoder_classifier_trains(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (64, 10), generator=g)
    labels = (ids[:, 0] >= 32).long()
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(64)]
    trainer = _trainer(tmp_path, model=tiny_bert_classifier(), dataset=data, max_steps=20, learning_rate=2e-2,
                       config=BlockLLMConfig(sparsity=0.8, patience=3))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert min(losses[-5:]) < losses[0]


def test_resume_with_stored_norm_selection_is_exact(tmp_path):
    # lr 1 makes the loss stall; tested on even steps only, it re-selects at steps 6 and 8, after the checkpoint
    config = BlockLLMConfig(sparsity=0.8, patience=1, selection="stored_norms", explore_blocks=2,
                            stall_check_interval=2)
    straight = _trainer(tmp_path / "a", max_steps=10, learning_rate=1.0, config=config)
    straight.train()
    first = _trainer(tmp_path / "b", max_steps=10, learning_rate=1.0, save_strategy="steps", save_steps=5,
                     config=config)
    first.train()
    resumed = _trainer(tmp_path / "c", max_steps=10, learning_rate=1.0, config=config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-5"))
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    a, c = unwrap_blockllm_optimizer(straight.optimizer), unwrap_blockllm_optimizer(resumed.optimizer)
    assert a.num_selections == c.num_selections == 3  # the random first selection and two re-selections
    for key in ("selected", "visits", "exploring", "norm_steps"):
        assert torch.equal(getattr(a, key), getattr(c, key)), key
    torch.testing.assert_close(a.grad_norms, c.grad_norms, rtol=0, atol=0, equal_nan=True)
    assert a.step_count == c.step_count == 10


def test_resume_from_checkpoint_is_exact(tmp_path):
    # lr 3e-2 / patience 1 re-selects at steps 4, 7, 10; checkpoint-6 is saved with a scoring step pending
    config = BlockLLMConfig(sparsity=0.8, patience=1, mask_fraction=0.5)
    straight = _trainer(tmp_path / "a", max_steps=10, learning_rate=3e-2, config=config)
    straight.train()
    first = _trainer(tmp_path / "b", max_steps=10, learning_rate=3e-2, save_strategy="steps", save_steps=6,
                     config=config)
    first.train()  # the same 10 steps; a fresh trainer resumes from its step-6 checkpoint
    saved = torch.load(tmp_path / "b" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert saved["blockllm"]["num_selections"] == 2 and saved["blockllm"]["scoring"]
    assert any("mask" in s for s in saved["state"].values())
    resumed = _trainer(tmp_path / "c", max_steps=10, learning_rate=3e-2, config=config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    a, c = unwrap_blockllm_optimizer(straight.optimizer), unwrap_blockllm_optimizer(resumed.optimizer)
    assert a.num_selections == c.num_selections == 4
    assert torch.equal(a.visits, c.visits) and torch.equal(a.selected, c.selected)
    assert (a.loss_sum, a.loss_count, list(a.recent_losses)) == (c.loss_sum, c.loss_count, list(c.recent_losses)) and a.scoring == c.scoring
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert a.state.get(p, {}).keys() == c.state.get(q, {}).keys()
        for key, value in a.state.get(p, {}).items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(c.state[q][key]))


# ---- bad input -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"patience": 0}, "patience"),
     ({"optimizer": "sgd"}, "optimizer"), ({"mask_fraction": 0.0}, "mask_fraction"),
     ({"block_granularity": "row"}, "block_granularity"), ({"visit_penalty": -1.0}, "visit_penalty"),
     ({"selection": "scores"}, "selection"), ({"explore_blocks": -1}, "explore_blocks"),
     ({"explore_blocks": 1.5}, "explore_blocks"), ({"stall_check_interval": 0}, "stall_check_interval")],
)
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockLLMConfig(**kwargs)


def test_selection_that_would_be_empty_raises_at_attach(tmp_path):
    with pytest.raises(ValueError, match="selection would be empty"):
        _trainer(tmp_path, config=BlockLLMConfig(sparsity=0.9999))


def test_registered_under_its_name():
    assert METHODS["blockllm"].config_cls is BlockLLMConfig


def test_checkpoints_with_the_old_full_loss_history_still_load_and_give_the_same_stall_decisions():
    from hf_memopt.blockllm.optimizer import _STATE_KEY

    model = tiny_llama()
    config = BlockLLMConfig(sparsity=0.8, patience=3)
    reference = create_blockllm_optimizer(model, config, HP)
    losses = [5.0, 4.0, 3.5, 3.4, 3.3]
    for loss in losses:
        reference.observe_loss(loss)
    old = reference.state_dict()
    old[_STATE_KEY] = {k: v for k, v in old[_STATE_KEY].items() if k not in ("loss_sum", "loss_count", "recent_losses")}
    old[_STATE_KEY]["loss_history"] = torch.tensor(losses, dtype=torch.float64)
    loaded = create_blockllm_optimizer(model, config, HP)
    loaded.load_state_dict(old)
    assert (loaded.loss_sum, loaded.loss_count, list(loaded.recent_losses)) == (
        reference.loss_sum, reference.loss_count, list(reference.recent_losses))
    for loss in (3.35, 3.4, 3.6):
        assert loaded.observe_loss(loss) == reference.observe_loss(loss)

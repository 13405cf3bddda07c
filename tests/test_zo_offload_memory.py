"""ZO2's working set stays within its bound; the live-tensor tracker that measures it counts exactly.

The bound (``scripts/gpu_check.py``'s ``zo2_bound``, ZO2 arXiv 2503.12668 Sec. 4) is two blocks + everything outside
the blocks + the activations of one plain forward of both streams' batches (2B rows). On a CPU the parameters outside
the blocks and the stored blocks exist before the step, so the step's own allocations (the private working copy of a
block, perturbed copies of parameters outside the blocks, activations of both streams) must fit in two blocks + those
activations. The shape makes the logits dominate, as on the GPU check's LLaMA-130M (vocab 32000): an engine that keeps
both streams' logits while one stream's loss runs exceeds it (the pre-deferral engine: 795 kB against 613 kB).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from hf_memopt.tools.live_tensors import LiveTensorTracker
from hf_memopt.zo import ZOSGD, ZO2Engine, find_block_list
from hf_memopt.zo.perturb import perturb_

VOCAB, BATCH, SEQ, EPS = 2048, 2, 16, 1e-3


def _setup(offload: bool):
    model = tiny_llama(vocab=VOCAB).eval()
    model.config.use_cache = False
    optimizer = ZOSGD(list(model.parameters()), lr=1e-4, seed=0)
    engine = None
    if offload:
        engine = ZO2Engine(model, find_block_list(model)[1], eps=EPS, device=torch.device("cpu"))
        engine.bind(optimizer)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return model, optimizer, engine, {"input_ids": ids, "labels": ids}


def _step(model, optimizer, engine, batch) -> None:
    seed = optimizer.sample_seed(0)
    with torch.no_grad():
        if engine is not None:
            loss_plus, loss_minus = engine.perturbed_losses(lambda: model(**batch).loss, seed)
        else:
            params = optimizer.trainable()
            perturb_(params, seed, EPS)
            loss_plus = model(**batch).loss
            perturb_(params, seed, -2 * EPS)
            loss_minus = model(**batch).loss
            perturb_(params, seed, EPS)
        optimizer.accumulate(0, (float(loss_plus) - float(loss_minus)) / (2 * EPS))
        optimizer.step()


def _step_peak(offload: bool) -> tuple[int, torch.nn.Module]:
    """Peak tracked bytes of one steady step (the first one runs the engine's one-off self-check forward)."""
    model, optimizer, engine, batch = _setup(offload)
    _step(model, optimizer, engine, batch)
    with LiveTensorTracker() as tracker:
        _step(model, optimizer, engine, batch)
    return tracker.peak, model


def test_offloaded_step_allocates_at_most_two_blocks_plus_a_plain_forward_of_both_streams(one_thread):
    peak, model = _step_peak(offload=True)
    _, blocks = find_block_list(model)
    sizes = sorted((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), reverse=True)
    stacked = torch.randint(0, VOCAB, (2 * BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), LiveTensorTracker() as tracker:
        model(input_ids=stacked)
    bound = sum(sizes[:2]) + tracker.peak
    assert peak <= bound, f"ZO2 step allocated {peak} bytes at once; bound {bound} (two blocks {sum(sizes[:2])})"


def test_offloaded_step_holds_at_most_plain_mezo_plus_two_blocks(one_thread):
    """Each stream's tail (head, loss) runs alone, as in plain MeZO: only the block working copies come on top."""
    zo2, model = _step_peak(offload=True)
    mezo, _ = _step_peak(offload=False)
    _, blocks = find_block_list(model)
    two = sum(sorted((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), reverse=True)[:2])
    assert zo2 <= mezo + two, (zo2, mezo, two)


def test_tracker_counts_new_storages_once_and_frees_them_with_their_last_view():
    x = torch.zeros(100, dtype=torch.float64)  # exists before: never counted
    with LiveTensorTracker() as tracker:
        a = x + 1  # 800 bytes
        view = a[10:]  # a view: no new storage
        b = torch.ones(50, dtype=torch.float32)  # 200 bytes
        assert tracker.live == 1000
        del a
        assert tracker.live == 1000  # the view keeps a's storage alive
        del view, b
        assert tracker.live == 0
        x.add_(1)  # in place into a storage that existed before
        assert tracker.live == 0
    assert tracker.peak == 1000


@pytest.mark.parametrize("autocast", [False, True])
def test_deferred_minus_stream_runs_under_the_autocast_it_was_recorded_in(one_thread, autocast):
    """The -eps tail outside the blocks (norm, head, loss) runs after the model's autocast region has closed; it must
    still run as the forward did. Only block parameters train, so the engine's -eps values are bit for bit plain
    MeZO's (+eps z, then -2 eps z) and the losses must agree exactly; the other setting differs."""
    runs = []
    for offload in (True, False):
        model, _, _, batch = _setup(offload=False)
        for name, p in model.named_parameters():
            p.requires_grad_(".layers." in name)
        optimizer = ZOSGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, seed=0)
        engine = None
        if offload:
            engine = ZO2Engine(model, find_block_list(model)[1], eps=EPS, device=torch.device("cpu"))
            engine.bind(optimizer)
        runs.append((model, optimizer, engine))

    def loss_of(model, enabled=autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            return model(**batch).loss.float()

    (model, optimizer, engine), (plain, plain_optimizer, _) = runs
    seed = optimizer.sample_seed(0)
    with torch.no_grad():
        _, minus = engine.perturbed_losses(lambda: loss_of(model), seed)
        perturb_(plain_optimizer.trainable(), seed, EPS)
        perturb_(plain_optimizer.trainable(), seed, -2 * EPS)
        expected, other = loss_of(plain), loss_of(plain, enabled=not autocast)
    torch.testing.assert_close(minus, expected, rtol=0, atol=0)
    assert other != expected

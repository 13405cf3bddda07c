"""LoQT: layer math against float64 references, merge / error compensation, schedule, Trainer training, plain
saving and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TokenDataset, allocator_peak_of, tiny_bert_classifier, tiny_llama, training_args
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainerCallback

from hf_memopt import MemoryReportCallback, attach
from hf_memopt.loqt import LoQTConfig, LoQTLinear, loqt_layers, quantize_with_error_compensation
from hf_memopt.loqt.quant import dequantize, quantize
from hf_memopt.tools.estimate import estimate_memory

QUANTS = ["nf4", "fp4", "int8", None]


def _layer(quant="nf4", side="right", rank=3, m=12, n=20, bias=True, quantize_projection=False, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(n, m, bias=bias)
    layer = LoQTLinear(base, rank=rank, scale=0.5, side=side, quant=quant, quantize_projection=quantize_projection)
    return base, layer


def _set_factors(layer: LoQTLinear, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = layer.proj.shape if not layer.quantize_projection else None
    p = torch.linalg.qr(
        torch.randn(layer.out_features if layer.side == "left" else layer.in_features, layer.rank, generator=g)
    )[0]
    p = p if layer.side == "left" else p.t()
    with torch.no_grad():
        if layer.quantize_projection:
            data, absmax = quantize(p, layer.quant, layer.quant_block_size)
            layer.proj_q.copy_(data)
            layer.proj_absmax.copy_(absmax)
        else:
            assert shape == p.shape
            layer.proj.copy_(p)
        layer.B.copy_(torch.randn(layer.B.shape, generator=g))
        layer.merges.fill_(1)  # as after the initialisation: forward uses the quantized weight


# ---- configuration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"quant": "nf3"}, "quant"),
        ({"quant": "int4"}, "quant"),
        ({"rank": 0}, "rank"),
        ({"merge_every": 0}, "merge_every"),
        ({"merge_growth": 0.9}, "merge_growth"),
        ({"max_merge_interval": 0}, "max_merge_interval"),
        ({"error_compensation_steps": -1}, "error_compensation_steps"),
        ({"scale": 0.0}, "scale"),
        ({"proj_type": "full"}, "proj_type"),
        ({"quant": None, "quantize_projection": True}, "quantize_projection"),
        ({"quant_block_size": 100}, "quant_block_size"),
        ({"optimizer_state_on_merge": "rotate"}, "optimizer_state_on_merge"),
        ({"merge_schedule": "linear"}, "merge_schedule"),
        ({"layerwise": "yes"}, "layerwise"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoQTConfig(**kwargs)


def test_attach_rejects_rank_above_a_target_shape(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="rank must be in"):
        attach(trainer, LoQTConfig(rank=33, target_modules=["q_proj"]))


def test_default_merge_schedule_is_the_official_exponential_rule():
    config = LoQTConfig(merge_every=100, merge_growth=1.2)
    # official get_proj_update_steps: 0, then gap, then + gap + int(1.2**k) for k = 1, 2, ...
    assert config.merge_steps(506) == [0, 100, 201, 302, 403, 505]
    assert len(config.merge_steps(10_000)) == 40
    assert [u for u in range(506) if config.is_merge_step(u)] == [0, 100, 201, 302, 403, 505]
    # gap 4, growth 1.5: int(1.5) = 1, int(2.25) = 2, int(3.375) = 3
    assert LoQTConfig(merge_every=4, merge_growth=1.5).merge_steps(30) == [0, 4, 9, 15, 22]


def test_geometric_and_static_schedules_and_the_interval_cap():
    geometric = LoQTConfig(merge_every=4, merge_growth=1.5, merge_schedule="geometric")
    # intervals: 4, 6, 9, round(13.5) = 14, round(20.25) = 20
    assert geometric.merge_steps(60) == [0, 4, 10, 19, 33, 53]
    assert len(LoQTConfig(merge_every=100, merge_growth=1.2, merge_schedule="geometric").merge_steps(10_000)) == 17
    capped = LoQTConfig(merge_every=4, merge_growth=1.5, merge_schedule="geometric", max_merge_interval=8)
    assert capped.merge_steps(40) == [0, 4, 10, 18, 26, 34]
    assert LoQTConfig(merge_every=3, merge_schedule="static").merge_steps(10) == [0, 3, 6, 9]


def test_defaults_match_the_official_pretraining_scripts():
    config = LoQTConfig()
    assert (config.quant, config.quantize_projection, config.error_compensation_steps) == ("nf4", True, 5)
    assert (config.merge_every, config.merge_growth, config.merge_schedule, config.scale) == (
        100,
        1.2,
        "exponential",
        0.5,
    )
    with pytest.raises(ValueError, match="quantize_projection=False"):  # nothing to quantize P with
        LoQTConfig(quant=None)


# ---- quantization and the layer's math ------------------------------------------------------------------------------


@pytest.mark.parametrize("quant, max_rel_error", [("nf4", 0.12), ("fp4", 0.15), ("int8", 0.02)])
def test_quantize_round_trip_matches_bitsandbytes(quant, max_rel_error):
    import bitsandbytes.functional as F

    w = torch.randn(24, 40)
    data, absmax = quantize(w, quant, 64)
    back = dequantize(data, absmax, quant, tuple(w.shape), 64)
    if quant == "int8":
        ref = F.dequantize_blockwise(*F.quantize_blockwise(w, blocksize=64))
    else:
        ref = F.dequantize_4bit(*F.quantize_4bit(w, blocksize=64, quant_type=quant))
    torch.testing.assert_close(back, ref, rtol=0, atol=0)
    assert ((back - w).norm() / w.norm()).item() < max_rel_error


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(512, 1376), (70, 96), (24, 40), (3, 64)])
def test_4bit_dequantization_reads_the_codes_in_flat_block_order(quant, shape):
    """Reference written in torch: byte k holds values 2k (high nibble) and 2k + 1, each block of 64 consecutive
    values (in row-major order) is scaled by its absmax. bitsandbytes 0.50's CPU kernel, given the 2-D shape, reads
    other blocks where the last dimension is an odd multiple of 32 (1376, LLaMA 60M's MLP width; 96)."""
    import bitsandbytes.functional as F

    w = torch.randn(shape)
    data, absmax = quantize(w, quant, 64)
    codes = data.reshape(-1)
    nibbles = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1)[: w.numel()].long()
    table = F.get_4bit_type(quant, device="cpu").float()
    reference = (table[nibbles] * absmax.repeat_interleave(64)[: w.numel()]).view(shape)
    torch.testing.assert_close(dequantize(data, absmax, quant, shape, 64), reference, rtol=0, atol=0)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_layer_forward_and_backward_match_float64_reference(quant, side):
    _, layer = _layer(quant=quant, side=side, quantize_projection=quant is not None and side == "left")
    _set_factors(layer)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)

    w = layer.frozen_weight().double()
    p, b = layer.projector().double(), layer.B.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    eff = w + 0.5 * (p @ b if side == "left" else b @ p)
    y_ref = x64 @ eff.t() + layer.bias.detach().double()
    y_ref.backward(gy.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.B.grad.double(), b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), gy.double().sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(20,), (5, 20), (2, 5, 20), (2, 3, 5, 20)], ids=["1d", "2d", "3d", "4d"])
def test_output_takes_in_place_ops_and_keeps_its_gradients(shape):
    """An in-place ReLU (or residual add) after the layer works for every input rank, as after nn.Linear."""
    _, layer = _layer(quant="int8", side="left")
    _set_factors(layer)
    x = torch.randn(*shape, requires_grad=True)
    torch.relu_(layer(x)).sum().backward()
    w = layer.effective_weight().double()
    x64 = x.detach().double().requires_grad_(True)
    torch.relu(x64 @ w.t() + layer.bias.detach().double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_autocast_computes_every_product_in_its_dtype_as_before(side):
    """Under bf16 autocast (the Trainer's ``bf16=True``) the layer computes in bf16 and trains B, as nn.Linear would."""
    _, layer = _layer(quant="int8", side=side)
    _set_factors(layer)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    expected = x.detach() @ layer.effective_weight().t() + layer.bias.detach()
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)
    assert x.grad.dtype == torch.float32 and layer.B.grad.dtype == torch.float32
    assert layer.B.grad.abs().sum() > 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_and_backward_make_no_output_sized_temporaries(side):
    """Beyond its output, forward allocates only the dequantized weight and the rank-wide x I^T, and backward only
    the gradients it returns: autograd's product, scaled copy and sum would be three more output-sized tensors in
    forward (an in-place add on a view of the output, two in backward), alive at once at the recomputed layer's peak
    under gradient checkpointing (docs/min_memory.md, the composed recipe's true peak)."""
    _, layer = _layer(quant="int8", side=side, rank=4, m=256, n=32)
    _set_factors(layer)
    x = torch.randn(4096, 32, requires_grad=True)
    grad_y = torch.randn(4096, 256)
    layer(x).backward(grad_y)  # warm-up

    def forward_and_backward():
        layer(x).backward(grad_y)

    output, weight, rank_wide, grad_x = 4096 * 256 * 4, 256 * 32 * 4, 4096 * 4 * 4, 4096 * 32 * 4
    assert output <= allocator_peak_of(lambda: layer(x)) <= output + weight + rank_wide + (1 << 16)
    # x's gradient arrives by two paths (the frozen product and x I^T), summed by autograd
    assert allocator_peak_of(forward_and_backward) <= output + weight + rank_wide + 2 * grad_x + (1 << 16)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_casting_the_layer_keeps_its_quantization_scales_in_float32(quant, dtype):
    """``model.to(dtype)`` (the Trainer's ``bf16_full_eval``) casts buffers; the absmax scales must stay float32:
    bitsandbytes reads them as float32, so int8 weights with cast scales dequantized to garbage (1e19)."""
    _, layer = _layer(quant=quant, side="left", rank=4, m=16, n=64, quantize_projection=True)
    _set_factors(layer)
    weight, projector = layer.frozen_weight(), layer.projector()
    layer.to(dtype)
    assert layer.weight_absmax.dtype == layer.proj_absmax.dtype == torch.float32
    assert layer.B.dtype == dtype
    torch.testing.assert_close(layer.frozen_weight(), weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.projector(), projector, rtol=0, atol=0)


@pytest.mark.parametrize(("quant", "n"), [("int8", 64), ("int8", 100), ("nf4", 100), ("fp4", 96), (None, 100)])
def test_row_blocks_give_the_whole_weights_rows_outputs_and_gradients(quant, n):
    """Dequantizing a block of rows at a time (``dequantize_chunk_elements``) reads each block from its own slice of
    the codes and absmax: the same rows as the whole weight, so the same outputs and gradients (float64). n = 100
    with 64-value blocks needs blocks of 16 rows to start on a quantization block."""
    _, whole = _layer(quant=quant, side="left", rank=4, m=70, n=n)
    _, blocked = _layer(quant=quant, side="left", rank=4, m=70, n=n)
    blocked.dequantize_chunk_elements = 40 * n  # 40 rows, rounded down to the alignment
    for layer in (whole, blocked):
        _set_factors(layer)
    blocks = list(blocked.frozen_row_blocks(torch.float64))
    aligned = quant is not None and n == 100  # 16-row multiples: 40 rows round down to 32
    assert [(a, b) for a, b, _ in blocks] == ([(0, 32), (32, 64), (64, 70)] if aligned else [(0, 40), (40, 70)])
    assert torch.equal(torch.cat([rows for _, _, rows in blocks]), whole.frozen_weight(torch.float64))
    whole.double(), blocked.double()
    x = torch.randn(3, 5, n, dtype=torch.float64, requires_grad=True)
    x_blocked = x.detach().clone().requires_grad_(True)
    grad_y = torch.randn(3, 5, 70, dtype=torch.float64)
    y, y_blocked = whole(x), blocked(x_blocked)
    (y * grad_y).sum().backward()
    (y_blocked * grad_y).sum().backward()
    torch.testing.assert_close(y_blocked, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_blocked.grad, x.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(blocked.B.grad, whole.B.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_blocks_sum_a_16_bit_input_gradient_in_float32(dtype):
    """In 16 bits the blocks' partial products are summed in float32 and rounded once, as one matmul does: a 16-bit
    running sum rounded once per block (256 blocks: 1.9% error in bfloat16 against 0.28%) is not what is returned."""
    _, layer = _layer(quant="nf4", side="left", rank=4, m=2048, n=256)
    _set_factors(layer)
    x, grad_y = torch.randn(64, 256), torch.randn(64, 2048)
    reference = grad_y.double() @ layer.frozen_weight(torch.float64)
    layer.to(dtype)
    errors = []
    for chunk in (None, 256):
        layer.dequantize_chunk_elements = chunk
        x16 = x.to(dtype).requires_grad_(True)
        layer(x16).backward(grad_y.to(dtype))
        errors.append(((x16.grad.double() - reference).norm() / reference.norm()).item())
    assert errors[1] <= 1.05 * errors[0], errors


def test_row_blocks_keep_no_whole_dequantized_weight_alive():
    """With 64 KiB blocks, forward and backward of a 1 MiB int8 weight hold at most a few blocks of it as floats,
    never the whole dequantized weight (for the composed min-memory recipe's true peak, docs/min_memory.md)."""
    _, layer = _layer(quant="int8", side="left", rank=4, m=1024, n=256)
    _set_factors(layer)
    x = torch.randn(64, 256, requires_grad=True)
    grad_y = torch.randn(64, 1024)
    weight, block = 1024 * 256 * 4, 64 * 256 * 4
    output, rank_wide, grad_x = 64 * 1024 * 4, 64 * 4 * 4, 64 * 256 * 4

    def forward_and_backward():
        layer(x).backward(grad_y)

    forward_and_backward()  # warm-up
    whole = allocator_peak_of(forward_and_backward)
    assert whole >= weight  # the whole dequantized weight is alive at some point
    layer.dequantize_chunk_elements = block // 4
    blocked = allocator_peak_of(forward_and_backward)
    assert blocked <= output + rank_wide + 2 * grad_x + 3 * block + (1 << 16)
    assert blocked <= whole - weight + 4 * block


@pytest.mark.parametrize("side", ["left", "right"])
def test_collected_gradient_gives_top_singular_vectors_and_no_B_gradient(side):
    _, layer = _layer(quant="nf4", side=side, rank=3)
    _set_factors(layer)
    x = torch.randn(4, 7, layer.in_features)
    gy = torch.randn(4, 7, layer.out_features)
    layer.collecting = True
    layer(x).backward(gy)
    assert layer.B.grad is None  # B is held out of the merge step's update

    # reference: dL/dW of y = x W^T is gy^T x, summed over tokens; its top-3 singular vectors in float64
    G = gy.reshape(-1, layer.out_features).double().t() @ x.reshape(-1, layer.in_features).double()
    U, _, Vh = torch.linalg.svd(G)
    ref = U[:, :3] if side == "left" else Vh[:3].t()
    got = layer._next_proj.double() if side == "left" else layer._next_proj.double().t()
    torch.testing.assert_close(got @ got.t(), ref @ ref.t(), rtol=0, atol=1e-6)  # same subspace


@pytest.mark.parametrize("quant", ["nf4", "int8", None])
def test_merge_changes_outputs_by_exactly_the_quantization_error(quant):
    _, layer = _layer(quant=quant, side="right", m=16, n=64)
    _set_factors(layer)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        target = layer.effective_weight()
        layer.merge(error_compensation_steps=0)
        after = layer(x)
    assert torch.count_nonzero(layer.B) == 0
    if quant is None:
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        return
    quantized = dequantize(*quantize(target, quant, 64), quant, tuple(target.shape), 64)
    weight_error = quantized - target
    # the output moves by x (Q(W) - W)^T and nothing else ...
    torch.testing.assert_close(after - before, x @ weight_error.t(), rtol=1e-4, atol=1e-5)
    # ... which is bounded by the quantization error of the weight
    bound = x.norm(dim=1, keepdim=True) * torch.linalg.matrix_norm(weight_error, ord=2)
    assert ((after - before).norm(dim=1, keepdim=True) <= bound + 1e-5).all()
    assert (weight_error.norm() / target.norm()).item() < (0.12 if quant == "nf4" else 0.02)


def test_model_outputs_move_only_by_quantization_error_at_a_merge():
    torch.manual_seed(0)
    model = tiny_llama(hidden=64)
    from hf_memopt.loqt import convert_to_loqt

    layers = convert_to_loqt(model, LoQTConfig(rank=4, quant="nf4", target_modules="all-linear"))
    for i, layer in enumerate(layers.values()):
        _set_factors(layer, seed=i)
        with torch.no_grad():
            layer.B.mul_(0.05)
    ids = TokenDataset(n=2)[0]["input_ids"][None]
    with torch.no_grad():
        before = model(ids).logits
        reference = tiny_llama(hidden=64)  # same architecture, plain Linear layers holding Q(W_q + s P B)
        ref_state = {}
        for name, layer in layers.items():
            w = layer.effective_weight()
            ref_state[f"{name}.weight"] = dequantize(*quantize(w, "nf4", 64), "nf4", tuple(w.shape), 64)
        reference.load_state_dict(
            {**{k: v for k, v in model.state_dict().items() if "." in k}, **ref_state}, strict=False
        )
        for layer in layers.values():
            layer.merge(0)
        after = model(ids).logits
        expected = reference(ids).logits
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
    # NF4 moves each weight by ~9 % (relative); through 14 quantized matrices the logits move by about as much
    relative_change = ((after - before).norm() / before.norm()).item()
    assert 0 < relative_change < 0.25


def test_error_compensation_solves_B_by_least_squares_and_never_does_worse():
    torch.manual_seed(0)
    target = torch.randn(32, 64)
    P = torch.linalg.qr(torch.randn(64, 8))[0].t()  # right side: r x n
    plain = quantize_with_error_compensation(target, P, 0.5, "right", 0, "nf4", 64)
    comp = quantize_with_error_compensation(target, P, 0.5, "right", 5, "nf4", 64)

    def error(data, absmax, B):
        return (target - dequantize(data, absmax, "nf4", (32, 64), 64) - 0.5 * B @ P).norm().item()

    assert torch.count_nonzero(plain[2]) == 0
    assert error(*comp) < error(*plain)
    # normal equations: the residual left after s B P is orthogonal to the row space of P
    residual = target - dequantize(comp[0], comp[1], "nf4", (32, 64), 64) - 0.5 * comp[2] @ P
    torch.testing.assert_close(residual @ P.t(), torch.zeros(32, 8), rtol=0, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_quantized_initialisation_keeps_no_full_precision_weight_and_merges_to_the_same_codes(side):
    torch.manual_seed(0)
    base = nn.Linear(64, 16)
    W = base.weight.detach().clone()
    layer = LoQTLinear(base, rank=3, scale=0.5, side=side, quant="nf4", init_weight="quantized")
    assert layer.pending_weight is None and "pending_weight" not in dict(layer.named_buffers())
    codes = layer.weight_q.clone()
    torch.testing.assert_close(layer.frozen_weight(), dequantize(*quantize(W, "nf4", 64), "nf4", (16, 64), 64))
    x, gy = torch.randn(5, 64), torch.randn(5, 16)
    layer.collecting = True
    layer(x).backward(gy)
    layer.merge(error_compensation_steps=5)
    # Q(Q(W)) = Q(W): the initialising merge keeps the codes; the residual is zero, so is the compensating B
    assert torch.equal(layer.weight_q, codes) and torch.count_nonzero(layer.B) == 0 and int(layer.merges) == 1
    G = gy.double().t() @ x.double()
    U, _, Vh = torch.linalg.svd(G)
    ref = U[:, :3] if side == "left" else Vh[:3].t()
    P = layer.projector().double()
    got = P if side == "left" else P.t()
    torch.testing.assert_close(got @ got.t(), ref @ ref.t(), rtol=0, atol=1e-6)  # P: the gradient's top subspace


def test_full_precision_initialisation_weight_is_a_counted_buffer_never_saved_and_freed_at_the_merge():
    from hf_memopt.tools.memory import buffer_bytes

    _, layer = _layer(quant="nf4", m=16, n=64)
    assert layer.pending_weight.shape == (16, 64) and "pending_weight" not in layer.state_dict()
    before = buffer_bytes(layer)
    x = torch.randn(5, 64)
    layer.collecting = True
    layer(x).sum().backward()
    layer.merge()
    assert layer.pending_weight is None
    assert before - buffer_bytes(layer) == 16 * 64 * 4


@pytest.mark.parametrize("init_weight", ["full_precision", "quantized"])
def test_memory_report_counts_the_initialisation_weight_only_when_kept(tmp_path, init_weight):
    config = LoQTConfig(rank=3, merge_every=2, target_modules="all-linear", init_weight=init_weight)
    trainer = _trainer(tmp_path, config, max_steps=3)
    memory = MemoryReportCallback(print_table=False, track_activations=False)
    trainer.add_callback(memory)
    trainer.train()
    from hf_memopt.tools.memory import buffer_bytes

    steady = buffer_bytes(trainer.model)
    kept = sum(layer.out_features * layer.in_features * 4 for layer in loqt_layers(trainer.model).values())
    assert memory.breakdown.buffers == steady + (kept if init_weight == "full_precision" else 0)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(v) for v in losses)


# ---- Trainer ------------------------------------------------------------------------------------------------------


def _trainer(tmp_path, config, model=None, dataset=None, **overrides):
    args = training_args(tmp_path, **{"learning_rate": 3e-3, **overrides})
    trainer = Trainer(model=model or tiny_llama(), args=args, train_dataset=dataset or TokenDataset())
    attach(trainer, config)
    return trainer


def test_trainer_pretraining_loss_goes_down_and_merges_on_schedule(tmp_path):
    config = LoQTConfig(
        rank=4, merge_every=3, merge_schedule="static", error_compensation_steps=2, target_modules="all-linear"
    )
    trainer = _trainer(tmp_path, config, max_steps=10, learning_rate=1e-2)
    memory = MemoryReportCallback(print_table=False)  # its gradient hooks must cope with merge steps
    trainer.add_callback(memory)
    trainer.train()
    assert memory.breakdown.optimizer_state > 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert {int(layer.merges) for layer in loqt_layers(trainer.model).values()} == {4}  # updates 0, 3, 6, 9


def test_merges_count_optimizer_updates_under_gradient_accumulation(tmp_path):
    config = LoQTConfig(rank=2, merge_every=2, merge_schedule="static", target_modules=["q_proj", "down_proj"])
    trainer = _trainer(tmp_path, config, max_steps=5, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer.train()
    assert {int(layer.merges) for layer in loqt_layers(trainer.model).values()} == {3}  # updates 0, 2, 4


@pytest.mark.parametrize("policy, expected_step", [("reset", 1), ("keep", 2)])
def test_B_optimizer_state_at_a_merge(tmp_path, policy, expected_step):
    config = LoQTConfig(
        rank=2, merge_every=2, merge_schedule="static", target_modules=["q_proj"], optimizer_state_on_merge=policy
    )
    trainer = _trainer(tmp_path, config, max_steps=4)
    trainer.train()
    # updates 0 and 2 merge (B skipped); B is updated at 1 and 3; "reset" dropped its state at update 2
    state = trainer.optimizer.optimizer.state
    for layer in loqt_layers(trainer.model).values():
        assert int(state[layer.B]["step"]) == expected_step


def test_save_model_writes_a_plain_model_that_loads_without_hf_memopt(tmp_path):
    config = LoQTConfig(rank=4, merge_every=2, merge_schedule="static", target_modules="all-linear")
    trainer = _trainer(tmp_path, config, max_steps=3)
    trainer.train()
    trainer.save_model(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not any(isinstance(m, LoQTLinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    ids = TokenDataset(n=2)[1]["input_ids"][None]
    model = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, LoQTLinear) for m in model.modules())  # the trained model itself is unchanged


def test_fine_tuning_a_classifier_saves_a_plain_classifier(tmp_path):
    model = tiny_bert_classifier()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 8), generator=g)
    labels = (ids[:, 0] % 2).long()
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(16)]
    config = LoQTConfig(rank=4, quant="int8", merge_every=2, target_modules=["query", "value", "intermediate.dense"])
    trainer = _trainer(tmp_path, config, model=model, dataset=data, max_steps=3)
    trainer.train()
    trainer.save_model(tmp_path / "cls")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_train_only_factors_trains_the_b_factors_and_the_classifier_and_nothing_else(tmp_path):
    """The official GLUE fine-tuning (run_glue.py freezes the model, then trains the adapters and the classifier)."""
    model = tiny_bert_classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 8), generator=g)
    data = [{"input_ids": ids[i], "labels": (ids[i, 0] % 2).long()} for i in range(16)]
    config = LoQTConfig(rank=4, quant="int8", merge_every=50, target_modules=["query", "value"], train_only_factors=True)
    trainer = _trainer(tmp_path, config, model=model, dataset=data, max_steps=3, learning_rate=1e-2)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith(".B") or n.startswith("classifier.") for n in trainable)
    assert {"classifier.weight", "classifier.bias"} <= set(trainable)
    trainer.train()
    after = dict(model.named_parameters())
    for name, value in before.items():
        changed = not torch.equal(after[name], value) if name in after else None
        if name.startswith("classifier."):
            assert changed, name
        elif changed is not None:  # targeted weights became quantized buffers; every other parameter is unchanged
            assert not changed, name


@pytest.mark.parametrize("quant, quantize_projection", [("nf4", True), (None, False)])
def test_resume_from_checkpoint_is_exact(tmp_path, quant, quantize_projection):
    config = dict(
        rank=3,
        quant=quant,
        quantize_projection=quantize_projection,
        merge_every=2,
        merge_growth=1.5,
        error_compensation_steps=2,
        target_modules="all-linear",
    )
    # merges at updates 0, 2, 5 (intervals 2, 2 + int(1.5)): one before the checkpoint at 4, one after it
    straight = _trainer(tmp_path / "a", LoQTConfig(**config), max_steps=8)
    straight.train()
    first = _trainer(tmp_path / "b", LoQTConfig(**config), max_steps=8, save_strategy="steps", save_steps=4)
    first.args.max_steps = 8
    first.train()
    resumed = _trainer(tmp_path / "b", LoQTConfig(**config), max_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert any(k.endswith("weight_q") for k in a) == (quant is not None)
    opt_a, opt_b = straight.optimizer.optimizer, resumed.optimizer.optimizer
    for pa, pb in zip(straight.model.parameters(), resumed.model.parameters()):
        for key in opt_a.state.get(pa, {}):
            torch.testing.assert_close(opt_b.state[pb][key], opt_a.state[pa][key], rtol=0, atol=0)
    assert math.isclose(straight.state.log_history[-2]["loss"], resumed.state.log_history[-2]["loss"])


def test_layers_compressed_by_velora_are_refused_instead_of_silently_replaced(tmp_path):
    from hf_memopt import VeLoRAConfig

    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenDataset())
    attach(trainer, VeLoRAConfig(num_groups=8))
    with pytest.raises(ValueError, match="target_modules: .* already rewritten by VeLoRA"):
        attach(trainer, LoQTConfig(rank=4, target_modules="all-linear"))


# ---- layer-wise (per-parameter) updates -------------------------------------------------------------------------


class _GradientsAtStep(TrainerCallback):
    """Records, at every ``on_pre_optimizer_step``, the names of trainable parameters still holding a ``.grad``."""

    def __init__(self):
        self.held: list[list[str]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.held.append([n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None])


def _layerwise_pair(tmp_path, dtype=torch.float64, quant=None, **overrides):
    """The same LoQT run (a merge at updates 0, 2 and 5) whole-model and layer-wise; returns both trainers."""
    runs = []
    for layerwise in (False, True):
        config = LoQTConfig(
            rank=3,
            quant=quant,
            quantize_projection=quant is not None,
            merge_every=2,
            merge_growth=1.5,
            error_compensation_steps=2,
            target_modules="all-linear",
            layerwise=layerwise,
        )
        args = dict(max_steps=6, max_grad_norm=0.0, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.1)
        trainer = _trainer(
            tmp_path / str(layerwise), config, model=tiny_llama(seed=3, dtype=dtype), **{**args, **overrides}
        )
        trainer.train()
        runs.append(trainer)
    return runs


@pytest.mark.parametrize("quant, accumulation", [(None, 2), ("nf4", 1)])
def test_layerwise_equals_whole_model_updates_with_accumulation_and_merges(tmp_path, quant, accumulation):
    whole, layerwise = _layerwise_pair(
        tmp_path, quant=quant, gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation
    )
    a, b = whole.model.state_dict(), layerwise.model.state_dict()
    assert {int(layer.merges) for layer in loqt_layers(layerwise.model).values()} == {3}  # updates 0, 2, 5
    for key in a:
        torch.testing.assert_close(b[key], a[key], msg=key)  # float64 defaults: rtol 1e-7, atol 1e-7
    opt_a, opt_b = whole.optimizer.optimizer, layerwise.optimizer.optimizer
    for pa, pb in zip(whole.model.parameters(), layerwise.model.parameters()):
        for key, value in opt_a.state.get(pa, {}).items():
            torch.testing.assert_close(opt_b.state[pb][key], value)
    # the LR scheduler is honoured: the same warm-up + linear decay, one step per update
    lrs = [[h["learning_rate"] for h in t.state.log_history if "learning_rate" in h] for t in (whole, layerwise)]
    assert lrs[0] == lrs[1] and len(set(lrs[1])) == 5  # 0, rising, falling
    # the logged gradient norm is the one the hooks measured, equal to the whole-model one (not the 0 of freed .grad)
    norms = [[h["grad_norm"] for h in t.state.log_history if "grad_norm" in h] for t in (whole, layerwise)]
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]))
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (whole, layerwise)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]))
    assert not torch.equal(
        a["model.embed_tokens.weight"],
        tiny_llama(seed=3, dtype=torch.float64).state_dict()["model.embed_tokens.weight"],
    )  # the embedding trained (inside backward in the layer-wise run)


def test_layerwise_holds_no_gradient_at_the_optimizer_step_and_lowers_the_gradient_peak(tmp_path):
    peaks, held = {}, None
    for layerwise in (False, True):
        config = LoQTConfig(rank=3, merge_every=2, target_modules="all-linear", layerwise=layerwise)
        trainer = _trainer(tmp_path / str(layerwise), config, max_steps=4, max_grad_norm=0.0)
        watch, memory = _GradientsAtStep(), MemoryReportCallback(print_table=False, track_activations=False)
        trainer.add_callback(watch)
        trainer.add_callback(memory)
        trainer.train()
        peaks[layerwise] = memory.breakdown.gradients
        if layerwise:
            held = watch.held
        else:
            assert all(watch.held)  # the check can fail: whole-model updates hold gradients here
    assert len(held) == 4 and held == [[]] * 4  # updates 0 and 2 merge, 1 and 3 train B
    assert peaks[True] < peaks[False] / 2
    # the peak is one gradient, the largest (embedding or head), as hf-memopt estimate predicts for layer-wise LoQT
    tiny_llama().config.save_pretrained(tmp_path / "config")
    estimate = estimate_memory(
        str(tmp_path / "config"), "loqt", batch=4, seq=16, rank=3, target_modules="all-linear", layerwise=True
    )
    assert estimate["gradients"] == peaks[True] == 64 * 32 * 4  # the fp32 embedding (or head), vocab x hidden


def test_layerwise_resume_from_checkpoint_is_exact(tmp_path):
    config = dict(rank=3, quant="nf4", merge_every=2, merge_growth=1.5, target_modules="all-linear", layerwise=True)
    overrides = dict(max_steps=8, max_grad_norm=0.0, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    straight = _trainer(tmp_path / "a", LoQTConfig(**config), **overrides)
    straight.train()
    first = _trainer(tmp_path / "b", LoQTConfig(**config), save_strategy="steps", save_steps=4, **overrides)
    first.train()
    resumed = _trainer(tmp_path / "b", LoQTConfig(**config), **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    opt_a, opt_b = straight.optimizer.optimizer, resumed.optimizer.optimizer
    for pa, pb in zip(straight.model.parameters(), resumed.model.parameters()):
        for key in opt_a.state.get(pa, {}):
            torch.testing.assert_close(opt_b.state[pb][key], opt_a.state[pa][key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_grad_norm": 1.0}, "max_grad_norm=0"),
        ({"max_grad_norm": 0.0, "fp16": True}, "fp16"),
    ],
)
def test_layerwise_refuses_what_it_cannot_do_exactly(tmp_path, overrides, message):
    args = training_args(tmp_path, **{"use_cpu": "fp16" not in overrides, **overrides})  # fp16 is refused on CPU
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset())
    with pytest.raises(ValueError, match=message):
        attach(trainer, LoQTConfig(rank=4, layerwise=True))
    assert not loqt_layers(trainer.model)  # refused before the model was converted

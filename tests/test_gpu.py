"""CUDA equals CPU: the device paths of ZO2 offloading, 8-bit GaLore, VeLoRA and LoQT against their CPU twins.

Marked ``gpu`` (excluded by default; ``pytest -m gpu tests/test_gpu.py``) and skipped without a CUDA device.
``scripts/gpu_check.sh`` runs them first. TF32 is switched off so that float32 matmuls are float32 on both sides.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TokenDataset, tiny_llama, training_args
from transformers import Trainer

from hf_memopt import LoQTConfig, VeLoRAConfig, attach
from hf_memopt.galore import GaLoreAdamW, GaLoreAdamW8bit
from hf_memopt.loqt import convert_to_loqt
from hf_memopt.velora import apply_velora
from hf_memopt.zo import ZOConfig, zo_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_zo2_offload_on_cuda_equals_plain_mezo_on_cuda(tmp_path):
    runs = {}
    for offload in ("none", "cpu"):
        model = tiny_llama(seed=0)
        args = training_args(tmp_path / offload, use_cpu=False, learning_rate=5e-3, max_steps=3)
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
        attach(trainer, ZOConfig(eps=1e-2, offload=offload))
        assert (zo_engine(trainer) is not None) == (offload == "cpu")
        trainer.train()
        assert model.lm_head.weight.device.type == "cuda"
        params = {n: p.detach().cpu() for n, p in model.named_parameters()}
        runs[offload] = (params, [h["loss"] for h in trainer.state.log_history if "loss" in h])
    initial = dict(tiny_llama(seed=0).named_parameters())
    assert max((runs["none"][0][n] - initial[n]).abs().max().item() for n in initial) > 1e-4
    # float32 throughout; ZO2 runs the +eps and -eps halves as one stacked batch (other kernels, other reduction
    # order) and never perturbs the stored copy, so the two agree to float32 rounding: 1e-5 absolute on weights of
    # size ~0.02 moved by ~1e-3 (the CPU twin of this test holds at 2e-6)
    for name, p in runs["none"][0].items():
        torch.testing.assert_close(runs["cpu"][0][name], p, rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(runs["cpu"][1], runs["none"][1], rtol=1e-5, atol=1e-5)


def _gradient(shape: tuple[int, ...], g: torch.Generator, rank: int = 16) -> torch.Tensor:
    """A gradient whose top ``rank`` singular values are 16, 15, ..., 1 over a noise floor of spectral norm ~0.4.

    A Gaussian gradient's singular values crowd together, so its singular vectors are ill-conditioned: LAPACK and
    cuSOLVER return visibly different projectors for the same matrix (seen on an H200: 721 of 131072 elements of a
    float32 GaLore step apart by up to 1e-4). Separated values make the top-``rank`` vectors well defined.
    """
    if len(shape) != 2:
        return torch.randn(shape, generator=g)
    u = torch.linalg.qr(torch.randn(shape[0], rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], rank, generator=g))[0]
    s = torch.arange(rank, 0, -1, dtype=torch.float32)
    return u @ torch.diag(s) @ v.T + 0.01 * torch.randn(shape, generator=g)


def test_galore_8bit_step_on_cuda_equals_the_cpu_step():
    g = torch.Generator().manual_seed(0)
    # a projected weight whose projected gradient (16 x 512 = 8192 values) takes the 8-bit kernel, a plain weight
    # over bitsandbytes' 4096-value threshold (8-bit) and a small one (32-bit path)
    weights = [torch.randn(256, 512, generator=g) * 0.02, torch.randn(80, 64, generator=g) * 0.02,
               torch.randn(300, generator=g)]  # fmt: skip
    grads = [[_gradient(w.shape, g) for w in weights] for _ in range(3)]
    lr = 1e-3

    def run(device: str) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(w.clone().to(device)) for w in weights]
        groups = [{"params": params[:1], "rank": 16, "update_proj_gap": 200, "svd_method": "exact"},
                  {"params": params[1:]}]  # fmt: skip
        optimizer = GaLoreAdamW8bit(groups, lr=lr)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.to(device)
            optimizer.step()
        assert "state1" in optimizer.state[params[0]] and "state1" in optimizer.state[params[1]]
        return [p.detach().cpu() for p in params]

    cuda, cpu = run("cuda"), run("cpu")
    # three steps moved every tensor by several times the tolerance below (the projected one at GaLore scale 0.25)
    assert min((p - w).abs().max().item() for p, w in zip(cpu, weights)) > lr / 2
    # The exact SVD's singular vectors may differ in sign between LAPACK and cuSOLVER; Adam's update is invariant to
    # that. The 8-bit kernels agree except where a moment lands on an 8-bit code boundary and rounds the other way on
    # the other device (seen on an H200: 1 element of 5120 apart by 1.4e-4 after three steps of lr 1e-3): at most
    # 0.1 % of the elements may be over lr / 10 apart, none over lr / 2.
    _assert_all_close(("projected", "plain_8bit", "plain_32bit"), cuda, cpu, atol=lr / 10, outliers=(1e-3, lr / 2))


def test_galore_32bit_step_on_cuda_equals_the_cpu_step():
    """The float32 twin of the 8-bit test: separates the projection (SVD on cuSOLVER vs LAPACK) from the 8-bit
    kernels when the 8-bit test fails."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(256, 512, generator=g) * 0.02, torch.randn(300, generator=g)]
    grads = [[_gradient(w.shape, g) for w in weights] for _ in range(3)]
    lr = 1e-3

    def run(device: str) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(w.clone().to(device)) for w in weights]
        groups = [{"params": params[:1], "rank": 16, "update_proj_gap": 200, "svd_method": "exact"},
                  {"params": params[1:]}]  # fmt: skip
        optimizer = GaLoreAdamW(groups, lr=lr)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.to(device)
            optimizer.step()
        return [p.detach().cpu() for p in params]

    # float32 moments: only rounding separates the devices (Adam's first steps are ~lr * sign, well conditioned)
    _assert_all_close(("projected", "plain"), run("cuda"), run("cpu"), atol=lr / 100)


def _assert_all_close(names, actual, expected, atol: float, outliers: tuple[float, float] | None = None) -> None:
    """Every pair within ``atol``, or with ``outliers=(fraction, max_atol)`` at most that fraction of each tensor's
    elements over ``atol`` and none over ``max_atol``. The message reports every pair (max |diff|, count over atol)."""
    report, ok = [], True
    for name, a, b in zip(names, actual, expected):
        diff = (a - b).abs()
        over = (diff > atol).sum().item()
        report.append(f"{name}: max |diff| {diff.max().item():.3g}, {over} of {diff.numel()} over {atol:.3g}")
        if outliers is None:
            ok &= over == 0
        else:
            ok &= over <= outliers[0] * diff.numel() and diff.max().item() <= outliers[1]
    assert ok, "; ".join(report)


def _loqt_with_factors(model):
    # P kept in full precision (quantize_projection=False), so the test can set it exactly
    config = LoQTConfig(rank=4, quant="nf4", quantize_projection=False, target_modules="all-linear")
    layers = convert_to_loqt(model, config)
    for i, layer in enumerate(layers.values()):
        g = torch.Generator().manual_seed(i)
        rows = layer.out_features if layer.side == "left" else layer.in_features
        p = torch.linalg.qr(torch.randn(rows, layer.rank, generator=g))[0]
        with torch.no_grad():
            layer.proj.copy_(p if layer.side == "left" else p.t())
            layer.B.copy_(0.05 * torch.randn(layer.B.shape, generator=g))
    return model


def _velora(model):
    apply_velora(model, VeLoRAConfig(num_groups=8, coefficient_dtype="float32"))
    return model


TRANSFORMS = {"velora": _velora, "loqt": _loqt_with_factors}


@pytest.mark.parametrize("method", sorted(TRANSFORMS))
def test_forward_and_backward_on_cuda_equal_the_cpu_ones(method):
    batch = {k: torch.stack([TokenDataset()[i][k] for i in range(4)]) for k in ("input_ids", "labels")}

    def run(device: str):
        model = tiny_llama(seed=0, hidden=64).to(device)  # quantization (LoQT) happens on the device under test
        model = TRANSFORMS[method](model)
        out = model(**{k: v.to(device) for k, v in batch.items()})
        out.loss.backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach().cpu(), grads

    (cuda_logits, cuda_grads), (cpu_logits, cpu_grads) = run("cuda"), run("cpu")
    assert cuda_grads.keys() == cpu_grads.keys() and cpu_grads
    # float32, TF32 off: the devices differ only by summation order (1e-5 on logits of size ~1); NF4 codes are
    # found by nearest-value search on both, so a weight near the middle of two codes is the one way they could part
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-4, atol=1e-5)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)

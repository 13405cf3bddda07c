"""GaLore: projector math, parity with galore-torch, layer-wise equivalence, Trainer paths, resume, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TokenDataset, tiny_bert_classifier, tiny_llama, training_args
from transformers import Trainer

import hf_memopt
from hf_memopt import GaLoreConfig, MemoryReportCallback, attach
from hf_memopt.core.plan import OptimizerHyperparameters
from hf_memopt.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, create_galore_optimizer
from hf_memopt.shared.projector import low_rank_svd, project, project_back, projection_sides, refresh_projector
from hf_memopt.tools.memory import optimizer_state_bytes

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hparams(**overrides) -> OptimizerHyperparameters:
    values = dict(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=0.0, gradient_accumulation_steps=1)
    values.update(overrides)
    return OptimizerHyperparameters(**values)


def batches(n: int, seed: int = 0, batch: int = 4):
    data = TokenDataset(n=n * batch, seed=seed)
    return [data.ids[i * batch : (i + 1) * batch] for i in range(n)]


def train_plain(model, optimizer, ids_list, accumulation: int = 1, clip: float = 0.0):
    """A plain PyTorch loop; ``accumulation`` micro-batches per update, boundary flag exposed for layer-wise mode."""
    window = {"boundary": True}
    if optimizer.layerwise is not None:
        optimizer.layerwise.is_boundary = lambda: window["boundary"]
    for start in range(0, len(ids_list), accumulation):
        chunk = ids_list[start : start + accumulation]
        for i, ids in enumerate(chunk):
            window["boundary"] = i == len(chunk) - 1
            loss = model(input_ids=ids, labels=ids).loss / len(chunk)
            loss.backward()
        if clip and optimizer.layerwise is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------------
# projector math


@pytest.mark.parametrize(
    "proj_type, shape, expected",
    [
        ("std", (8, 4), (False, True)),
        ("std", (4, 8), (True, False)),
        ("reverse_std", (8, 4), (True, False)),
        ("left", (8, 4), (True, False)),
        ("right", (4, 8), (False, True)),
        ("full", (4, 8), (True, True)),
    ],
)
def test_projection_sides_follow_proj_type_and_shape(proj_type, shape, expected):
    assert projection_sides(proj_type, shape) == expected


def test_project_and_project_back_match_the_paper_equations_in_float64():
    torch.manual_seed(0)
    g = torch.randn(6, 5, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    left, right = u[:, :2], vh[:2]
    # R = P^T G Q^T ; back: alpha * P N Q  (Eq. 5-6)
    torch.testing.assert_close(project(g, left, None).double(), (left.T @ g).float().double())
    low = left.T @ g @ right.T
    torch.testing.assert_close(project_back(low, left, right, 0.5), 0.5 * left @ low @ right)


def test_subspace_iteration_finds_the_dominant_subspace_of_a_low_rank_gradient():
    torch.manual_seed(0)
    m, n, r = 120, 80, 6
    signal = torch.randn(m, r) @ torch.diag(torch.linspace(10, 5, r)) @ torch.randn(r, n)
    g = signal + 0.01 * torch.randn(m, n)
    u_exact = torch.linalg.svd(g, full_matrices=False)[0][:, :r]
    u, vh = low_rank_svd(g, r, iterations=2, generator=torch.Generator().manual_seed(0))
    # principal angles: ||U_exact^T U|| singular values all close to 1
    cosines = torch.linalg.svdvals(u_exact.T @ u)
    assert cosines.min() > 0.999
    assert torch.allclose(u.T @ u, torch.eye(r), atol=1e-5) and torch.allclose(vh @ vh.T, torch.eye(r), atol=1e-5)


def test_warm_started_refresh_tracks_a_rotated_subspace():
    torch.manual_seed(1)
    m, n, r = 100, 60, 4
    g1 = torch.randn(m, r) @ torch.randn(r, n) * 3 + 0.01 * torch.randn(m, n)
    left, _ = refresh_projector(g1, r, (True, False), method="subspace", generator=torch.Generator().manual_seed(0))
    g2 = g1 + 0.5 * torch.randn(m, r) @ torch.randn(r, n)  # the gradient subspace drifts
    warm, _ = refresh_projector(g2, r, (True, False), method="subspace", previous=(left, None), iterations=1)
    exact = torch.linalg.svd(g2, full_matrices=False)[0][:, :r]
    assert torch.linalg.svdvals(exact.T @ warm).min() > 0.99


def test_failed_exact_svd_falls_back_and_logs(monkeypatch, caplog):
    def broken_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken_svd)
    g = torch.randn(30, 20)
    with caplog.at_level("WARNING"):
        monkeypatch.undo()  # keep the small SVD inside the fallback working, break only the full one
        monkeypatch.setattr("hf_memopt.shared.projector._exact_svd", lambda *a: broken_svd())
        left, right = refresh_projector(g, 3, (True, False), method="exact", name="w")
    assert left.shape == (30, 3) and right is None
    assert "exact SVD failed for w" in caplog.text


def test_non_finite_gradient_keeps_the_previous_projector(caplog):
    previous = (torch.linalg.qr(torch.randn(10, 2))[0], None)
    g = torch.full((10, 6), float("nan"))
    with caplog.at_level("WARNING"):
        left, _ = refresh_projector(g, 2, (True, False), method="subspace", previous=previous, name="w")
    assert left is previous[0] and "non-finite gradient" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# optimizer numerics


def reference_galore_step(param, grad, state, rule, *, lr, rank=None, gap=1, scale=1.0, wd=0.0):
    """Slow, obvious float64 twin of one GaLore update: exact SVD, std projection (none when ``rank`` is None),
    ``rule(state, low, t)`` returns the low-rank step (lr included), decoupled weight decay before the update."""
    state["step"] = state.get("step", 0) + 1
    if rank is None:
        return param * (1 - lr * wd) - rule(state, grad, state["step"])
    m, n = param.shape
    if (state["step"] - 1) % gap == 0:
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        state["P"] = vh[:rank] if m >= n else u[:, :rank]
    p = state["P"]
    low = grad @ p.T if m >= n else p.T @ grad
    step = rule(state, low, state["step"])
    back = (step @ p if m >= n else p @ step) * scale
    return param * (1 - lr * wd) - back


def galore_adam_rule(lr, betas, eps):
    """The reference GaLoreAdamW: step size lr sqrt(1 - b2^t) / (1 - b1^t), eps added to sqrt(v)."""

    def rule(state, low, t):
        state["m"] = betas[0] * state.get("m", 0) + (1 - betas[0]) * low
        state["v"] = betas[1] * state.get("v", 0) + (1 - betas[1]) * low * low
        return lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t) * state["m"] / (state["v"].sqrt() + eps)

    return rule


def textbook_adam_rule(lr, betas, eps):
    """Adam as written in Kingma & Ba (Alg. 1): bias-corrected moments, eps added to sqrt(v_hat)."""

    def rule(state, low, t):
        state["m"] = betas[0] * state.get("m", 0) + (1 - betas[0]) * low
        state["v"] = betas[1] * state.get("v", 0) + (1 - betas[1]) * low * low
        m_hat, v_hat = state["m"] / (1 - betas[0] ** t), state["v"] / (1 - betas[1] ** t)
        return lr * m_hat / (v_hat.sqrt() + eps)

    return rule


def adafactor_rule(lr, beta1=None, eps1=1e-30, clip=1.0, decay=-0.8):
    """Adafactor (Shazeer & Stern 2018, Alg. 4-5 with update clipping), the factored second moment written as
    V_hat = R C / mean(R); with ``beta1`` the step is an average of lr-scaled clipped updates (transformers)."""

    def rule(state, low, t):
        beta2t = 1 - t**decay
        sq = low * low + eps1
        if low.dim() == 2:
            state["R"] = beta2t * state.get("R", 0) + (1 - beta2t) * sq.mean(dim=1)
            state["C"] = beta2t * state.get("C", 0) + (1 - beta2t) * sq.mean(dim=0)
            v_hat = torch.outer(state["R"], state["C"]) / state["R"].mean()
        else:
            v_hat = state["V"] = beta2t * state.get("V", 0) + (1 - beta2t) * sq
        u = low / v_hat.sqrt()
        u = u / max(1.0, float(u.pow(2).mean().sqrt()) / clip)
        if beta1 is None:
            return lr * u
        state["M"] = beta1 * state.get("M", 0) + (1 - beta1) * lr * u
        return state["M"]

    return rule


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_galore_adamw_matches_a_float64_reference_including_refresh_and_weight_decay(shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    ref_w, ref_state = w.detach().clone(), {}
    opt = GaLoreAdamW(
        [{"params": [w], "rank": 3, "update_proj_gap": 2, "scale": 0.5, "svd_method": "exact"}],
        lr=0.1, weight_decay=0.05, eps=1e-8,
    )
    rule = galore_adam_rule(0.1, (0.9, 0.999), 1e-8)
    for _ in range(5):
        grad = torch.randn(*shape, dtype=torch.float64)
        w.grad = grad.clone()
        opt.step()
        ref_w = reference_galore_step(ref_w, grad, ref_state, rule, lr=0.1, rank=3, gap=2, scale=0.5, wd=0.05)
        # float64 end to end (projector and moments too): agreement to float64 rounding
        torch.testing.assert_close(w.detach(), ref_w, rtol=1e-12, atol=1e-12)
    assert opt.state[w]["exp_avg"].dtype == torch.float64


def test_galore_adamw_matches_galore_torch_update_for_update():
    galore_torch = pytest.importorskip("galore_torch")
    ours_model, ref_model = tiny_llama(seed=3), tiny_llama(seed=3)
    config = GaLoreConfig(rank=4, update_proj_gap=3, scale=0.25, target_modules=LLAMA_TARGETS, svd_method="exact")
    ours = create_galore_optimizer(ours_model, config, hparams(lr=3e-3, eps=1e-6))
    names = {n for n, _ in ours_model.named_parameters()}
    target_names = {n for n in names if any(f".{t}." in n for t in LLAMA_TARGETS)}
    ref_params = dict(ref_model.named_parameters())
    ref = galore_torch.GaLoreAdamW(
        [
            {"params": [ref_params[n] for n in sorted(names - target_names)]},
            {"params": [ref_params[n] for n in sorted(target_names)], "rank": 4, "update_proj_gap": 3, "scale": 0.25,
             "proj_type": "std"},
        ],
        lr=3e-3, eps=1e-6, weight_decay=0.0, no_deprecation_warning=True,
    )
    for ids in batches(7):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_galore_adafactor_matches_galore_torch_adafactor_update_for_update(beta1):
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    w_ours = torch.nn.Parameter(torch.randn(16, 10))
    w_ref = torch.nn.Parameter(w_ours.detach().clone())
    group = {"rank": 4, "update_proj_gap": 2, "scale": 0.25}
    ours = GaLoreAdafactor(
        [{"params": [w_ours], **group, "svd_method": "exact"}], lr=1e-2, weight_decay=0.05, beta1=beta1
    )
    ref = galore_torch.GaLoreAdafactor(
        [{"params": [w_ref], **group, "proj_type": "std"}],
        lr=1e-2,
        weight_decay=0.05,
        beta1=beta1,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
    )
    for step in range(6):
        for opt in (ours, ref):  # a changing lr: the first moment averages lr-scaled updates in both
            opt.param_groups[0]["lr"] = 1e-2 / (1 + step)
        grad = torch.randn(16, 10)
        w_ours.grad, w_ref.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(w_ours, w_ref, rtol=1e-5, atol=1e-6)
    assert ("exp_avg" in ours.state[w_ours]) == (beta1 is not None)
    if beta1 is not None:
        torch.testing.assert_close(ours.state[w_ours]["exp_avg"], ref.state[w_ref]["exp_avg"], rtol=1e-5, atol=1e-7)


def float64_twin_cases():
    """(optimizer factory, float64 twin rule) pairs; each runs a projected 12 x 7 weight and an unprojected bias."""
    return {
        "adamw": (
            lambda groups: GaLoreAdamW(groups, lr=0.05, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1),
            galore_adam_rule(0.05, (0.8, 0.99), 1e-3),
        ),
        # small tensors (here all: R is 12 x 3) take bitsandbytes' 32-bit path, textbook Adam's eps convention
        "adamw_8bit": (
            lambda groups: GaLoreAdamW8bit(groups, lr=0.05, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1),
            textbook_adam_rule(0.05, (0.8, 0.99), 1e-3),
        ),
        "adafactor": (lambda groups: GaLoreAdafactor(groups, lr=0.05, weight_decay=0.1), adafactor_rule(0.05)),
        "adafactor_beta1": (
            lambda groups: GaLoreAdafactor(groups, lr=0.05, weight_decay=0.1, beta1=0.8),
            adafactor_rule(0.05, beta1=0.8),
        ),
    }


@pytest.mark.parametrize("case", sorted(float64_twin_cases()))
def test_each_optimizer_in_float64_matches_its_float64_twin(case):
    make, rule = float64_twin_cases()[case]
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 7, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    opt = make([{"params": [w], "rank": 3, "update_proj_gap": 2, "scale": 0.5, "svd_method": "exact"}, {"params": [b]}])
    ref_w, ref_b, state_w, state_b = w.detach().clone(), b.detach().clone(), {}, {}
    for _ in range(5):
        gw, gb = torch.randn(12, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        ref_w = reference_galore_step(ref_w, gw, state_w, rule, lr=0.05, rank=3, gap=2, scale=0.5, wd=0.1)
        ref_b = reference_galore_step(ref_b, gb, state_b, rule, lr=0.05, wd=0.1)
        torch.testing.assert_close(w.detach(), ref_w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.detach(), ref_b, rtol=1e-12, atol=1e-12)
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert states and all(t.dtype == torch.float64 for t in states)


def test_8bit_optimizer_steps_as_bitsandbytes_adamw8bit_on_small_and_large_tensors():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    shapes = [(10, 20), (20,), (64, 80)]  # 200 and 20 values: 32-bit path; 5120 >= min_8bit_size: 8-bit
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    # eps 1e-3 and beta2 0.99 make eps's convention visible (the reference GaLore one differs by ~1e-3 relative)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1)
    opt, ref_opt = GaLoreAdamW8bit(ours, **hp), bnb.optim.AdamW8bit(ref, **hp)
    for _ in range(6):
        for a, b in zip(ours, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
        # same moments, same kernels; only lr is folded differently on the 8-bit path (a float32 ulp)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    small, large = opt.state[ours[0]], opt.state[ours[2]]
    assert small["exp_avg"].dtype == torch.float32 and large["state1"].dtype == torch.uint8
    torch.testing.assert_close(small["exp_avg"], ref_opt.state[ref[0]]["state1"], rtol=0, atol=0)
    torch.testing.assert_close(small["exp_avg_sq"], ref_opt.state[ref[0]]["state2"], rtol=0, atol=0)
    assert torch.equal(large["state1"], ref_opt.state[ref[2]]["state1"])


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_updates_in_slices_equal_whole_tensor_updates_bit_for_bit(cls, monkeypatch):
    """Element-wise rules step large tensors slice by slice (bounded temporaries); the result must not change."""
    import hf_memopt.galore.optimizer as galore_optimizer

    # 1000 x 300 unprojected and a 700 x 400 projected R (8-bit codes), neither a multiple of the 768-value slice
    shapes = [(700, 530), (1000, 300), (37,)]

    def run(slice_elements):
        monkeypatch.setitem(galore_optimizer._SLICE_ELEMENTS, "cpu", slice_elements)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
        opt = cls(
            [{"params": params[:1], "rank": 400, "update_proj_gap": 2, "svd_method": "exact"}, {"params": params[1:]}],
            lr=1e-2, weight_decay=0.1,
        )  # fmt: skip
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
                p.grad[:3] = 0.0  # whole zero 8-bit blocks, like the rows of unused tokens in an embedding
            opt.step()
        return params, opt.state

    sliced, sliced_state = run(3 * 256)
    whole, whole_state = run(1 << 30)
    for a, b in zip(sliced, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(sliced, whole):
        for key, value in whole_state[b].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(sliced_state[a][key], value, rtol=0, atol=0, msg=key)


def test_8bit_moments_of_a_float64_weight_track_float64_adam():
    torch.manual_seed(0)
    w8 = torch.nn.Parameter(torch.randn(128, 96, dtype=torch.float64))
    start, ref_w, ref_state = w8.detach().clone(), w8.detach().clone(), {}
    opt = GaLoreAdamW8bit([{"params": [w8], "rank": 48, "scale": 1.0, "svd_method": "exact"}], lr=1e-3, eps=1e-8)
    rule = textbook_adam_rule(1e-3, (0.9, 0.999), 1e-8)
    for _ in range(3):
        grad = torch.randn(128, 96, dtype=torch.float64)
        w8.grad = grad.clone()
        opt.step()
        ref_w = reference_galore_step(ref_w, grad, ref_state, rule, lr=1e-3, rank=48, gap=200)
    state = opt.state[w8]
    assert state["state1"].dtype == torch.uint8 and state["proj_right"].dtype == torch.float64
    assert w8.dtype == torch.float64
    update8, update64 = (w8.detach() - start).flatten(), (ref_w - start).flatten()
    assert torch.nn.functional.cosine_similarity(update8, update64, dim=0) > 0.99
    assert update8.norm() / update64.norm() == pytest.approx(1.0, abs=0.05)


def test_adafactor_first_moment_survives_a_state_dict_round_trip_and_old_checkpoints_load():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(16, 10)) for _ in range(3)]

    def make(w, beta1):
        return GaLoreAdafactor(
            [{"params": [w], "rank": 4, "update_proj_gap": 2, "svd_method": "exact"}], lr=1e-2, beta1=beta1
        )

    opt = make(weights[0], 0.9)
    grads = [torch.randn(16, 10) for _ in range(5)]
    for grad in grads[:3]:
        weights[0].grad = grad.clone()
        opt.step()
    weights[1].data.copy_(weights[0].data)
    resumed = make(weights[1], None)  # the saved groups' beta1 wins, as every saved hyperparameter does
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.param_groups[0]["beta1"] == 0.9
    for grad in grads[3:]:
        for w, o in ((weights[0], opt), (weights[1], resumed)):
            w.grad = grad.clone()
            o.step()
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=0)

    old = make(weights[2], None)
    weights[2].grad = grads[0].clone()
    old.step()
    saved = old.state_dict()
    del saved["param_groups"][0]["beta1"]  # written before the first moment existed
    fresh = make(weights[2], None)
    fresh.load_state_dict(saved)
    weights[2].grad = grads[1].clone()
    fresh.step()
    assert fresh.param_groups[0]["beta1"] is None and "exp_avg" not in fresh.state[weights[2]]


def test_adafactor_beta1_reaches_the_optimizer_through_the_config():
    model = tiny_llama()
    config = GaLoreConfig(rank=4, target_modules=LLAMA_TARGETS, optimizer="adafactor", adafactor_beta1=0.9)
    opt = create_galore_optimizer(model, config, hparams())
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert {g["beta1"] for g in opt.param_groups} == {0.9}
    assert opt.state[q]["exp_avg"].shape == (32, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta1": 1.0}, "beta1"),
        ({"beta1": -0.1}, "beta1"),
        ({"clip_threshold": 0.0}, "clip_threshold"),
        ({"decay_rate": 0.5}, "decay_rate"),
    ],
)
def test_adafactor_rejects_out_of_range_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaLoreAdafactor([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_8bit_states_are_uint8_and_track_float32_adam():
    torch.manual_seed(0)
    w8 = torch.nn.Parameter(torch.randn(128, 96))
    w32 = torch.nn.Parameter(w8.detach().clone())
    start = w8.detach().clone()
    group = {"rank": 48, "update_proj_gap": 100, "scale": 1.0, "svd_method": "exact"}
    opt8 = GaLoreAdamW8bit([{"params": [w8], **group}], lr=1e-3, eps=1e-8)
    opt32 = GaLoreAdamW([{"params": [w32], **group}], lr=1e-3, eps=1e-8)
    for _ in range(3):
        grad = torch.randn(128, 96)
        w8.grad, w32.grad = grad.clone(), grad.clone()
        opt8.step()
        opt32.step()
    state = opt8.state[w8]
    assert state["state1"].dtype == torch.uint8 and state["state1"].shape == (128, 48)
    assert state["absmax1"].numel() == math.ceil(128 * 48 / 256)
    update8, update32 = (w8.detach() - start).flatten(), (w32.detach() - start).flatten()
    assert torch.nn.functional.cosine_similarity(update8, update32, dim=0) > 0.99
    assert update8.norm() / update32.norm() == pytest.approx(1.0, abs=0.05)


def test_optimizer_state_is_projected_size_and_reported_by_memory_accounting():
    model = tiny_llama(hidden=64)
    config = GaLoreConfig(rank=8, target_modules=LLAMA_TARGETS)
    opt = create_galore_optimizer(model, config, hparams())
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    q = model.model.layers[0].self_attn.q_proj.weight  # 64 x 64: projected to 64 x 8
    st = opt.state[q]
    assert st["exp_avg"].shape == (64, 8) and st["proj_right"].shape == (8, 64) and "proj_left" not in st
    adam = torch.optim.AdamW(tiny_llama(hidden=64).parameters())
    full = sum(2 * p.numel() * 4 for p in model.parameters())
    assert optimizer_state_bytes(opt) < full
    assert optimizer_state_bytes(adam) == 0  # lazily created: nothing before the first step


# ---------------------------------------------------------------------------------------------------------------
# layer-wise mode


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "adafactor"])
@pytest.mark.parametrize("accumulation, clip", [(1, 0.0), (2, 0.0), (1, 0.05)])
def test_layerwise_updates_equal_the_whole_model_optimizer(optimizer, accumulation, clip):
    base = tiny_llama(seed=1)
    data = batches(8, seed=2)
    results = []
    for layerwise in (False, True):
        model = copy.deepcopy(base)
        config = GaLoreConfig(rank=4, update_proj_gap=3, target_modules=LLAMA_TARGETS, optimizer=optimizer,
                              layerwise=layerwise, svd_method="exact")
        opt = create_galore_optimizer(
            model, config, hparams(lr=5e-3, max_grad_norm=clip, gradient_accumulation_steps=accumulation)
        )
        train_plain(model, opt, data, accumulation=accumulation, clip=clip)
        if opt.layerwise is not None:
            opt.layerwise.remove()
        results.append(model)
    for (name, a), b in zip(results[0].named_parameters(), results[1].parameters()):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=name)
    assert not torch.equal(results[0].lm_head.weight, base.lm_head.weight)


def test_layerwise_frees_gradients_during_backward():
    model = tiny_llama(seed=1)
    config = GaLoreConfig(rank=4, target_modules=LLAMA_TARGETS, layerwise=True)
    opt = create_galore_optimizer(model, config, hparams())
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert opt.last_grad_norm is not None and opt.last_grad_norm > 0
    opt.layerwise.remove()


def test_layerwise_refuses_clipping_with_gradient_accumulation():
    with pytest.raises(ValueError, match="cannot clip"):
        create_galore_optimizer(
            tiny_llama(), GaLoreConfig(rank=4, target_modules=LLAMA_TARGETS, layerwise=True),
            hparams(max_grad_norm=1.0, gradient_accumulation_steps=2),
        )


# ---------------------------------------------------------------------------------------------------------------
# Trainer integration


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_stock_optim_string_uses_hf_memopt_and_honours_training_arguments(tmp_path):
    args = training_args(
        tmp_path, optim="galore_adamw_8bit", optim_target_modules=LLAMA_TARGETS,
        optim_args="rank=4,update_proj_gap=5,scale=0.25,proj_type=std", weight_decay=0.01,
        adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7, max_steps=12,
    )
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset())
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, GaLoreAdamW8bit)
    projected = [g for g in opt.param_groups if g["rank"] is not None]
    assert projected[0]["rank"] == 4 and projected[0]["betas"] == (0.8, 0.99) and projected[0]["eps"] == 1e-7
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.01, 0.0}  # norms get no decay
    assert losses(trainer)[-1] < losses(trainer)[0]


def test_stock_optim_args_reject_unknown_keys(tmp_path):
    args = training_args(tmp_path, optim="galore_adamw", optim_target_modules=LLAMA_TARGETS, optim_args="rnak=4")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="optim_args key 'rnak'"):
        trainer.train()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "adafactor"])
def test_attach_trains_a_classifier_and_reports_memory(tmp_path, optimizer):
    from torch.utils.data import TensorDataset  # noqa: F401

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (32, 12), generator=g)
    labels = (ids[:, 0] > 34).long()
    dataset = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    callback = MemoryReportCallback(print_table=False)
    trainer = Trainer(model=tiny_bert_classifier(), args=training_args(tmp_path, max_steps=16, learning_rate=3e-3),
                      train_dataset=dataset, callbacks=[callback])
    attach(trainer, GaLoreConfig(rank=4, target_modules=["query", "key", "value", "dense"], optimizer=optimizer))
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]
    logged = trainer.state.log_history[0]
    assert logged["mem/optimizer_state_mb"] > 0 and logged["mem/parameters_mb"] > 0
    assert callback.breakdown.activations > 0 and callback.breakdown.gradients > 0


def test_layerwise_through_trainer_logs_the_true_grad_norm_and_steps_the_scheduler(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=5, max_grad_norm=1.0),
                      train_dataset=TokenDataset())
    attach(trainer, GaLoreConfig(rank=4, target_modules=LLAMA_TARGETS, layerwise=True))
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 5 and all(n > 0 for n in norms)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # linear decay, one scheduler step per update


@pytest.mark.parametrize("layerwise, accumulation", [(False, 1), (True, 1), (True, 2)])
def test_trainer_resume_reproduces_the_uninterrupted_run(tmp_path, layerwise, accumulation):
    def run(max_steps, output_dir, resume=None):
        args = training_args(
            output_dir, max_steps=max_steps, save_strategy="steps", save_steps=3, max_grad_norm=0.0 if accumulation > 1 else 1.0,
            gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation,
        )
        trainer = Trainer(model=tiny_llama(seed=5), args=args, train_dataset=TokenDataset(n=48))
        attach(trainer, GaLoreConfig(rank=4, update_proj_gap=2, target_modules=LLAMA_TARGETS, layerwise=layerwise))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(6, tmp_path / "a")  # saves checkpoint-3 on the way
    resumed = run(6, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    state = torch.load(tmp_path / "a" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert any("proj_right" in s or "proj_left" in s for s in state["state"].values())
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_attach_works_on_trainer_subclasses(tmp_path):
    class MyTrainer(Trainer):
        pass

    trainer = MyTrainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=2), train_dataset=TokenDataset())
    attach(trainer, GaLoreConfig(rank=4, target_modules=LLAMA_TARGETS))
    trainer.train()
    assert hf_memopt.core.attach.attached_configs(trainer)[0].rank == 4


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"scale": 0}, "scale"),
        ({"proj_type": "diagonal"}, "proj_type"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"svd_method": "qr"}, "svd_method"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "(unclosed"}, "target_modules"),
        ({"layerwise": "yes"}, "layerwise"),
        ({"optimizer": "adafactor", "adafactor_beta1": 1.0}, "adafactor_beta1"),
        ({"optimizer": "adamw", "adafactor_beta1": 0.9}, "adafactor_beta1"),
    ],
)
def test_invalid_config_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GaLoreConfig(**kwargs)


@pytest.mark.parametrize(
    "config, message",
    [
        (GaLoreConfig(rank=4, target_modules=["q_proj", "no_such_layer"]), "'no_such_layer' matches no module"),
        (GaLoreConfig(rank=4, target_modules=["input_layernorm"]), "only Linear, Embedding, Conv1D"),
        (GaLoreConfig(rank=4, target_modules=r".*nothing.*"), "matches no"),
    ],
)
def test_bad_targets_are_rejected_at_attach(tmp_path, config, message):
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenDataset())
    with pytest.raises(ValueError, match=message):
        attach(trainer, config)


def test_attach_refuses_a_trainer_that_already_has_an_optimizer(tmp_path):
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(), optimizers=(opt, None))
    with pytest.raises(ValueError, match="already has an optimizer"):
        attach(trainer, GaLoreConfig(rank=4, target_modules=LLAMA_TARGETS))

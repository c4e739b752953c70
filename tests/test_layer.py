"""CELoRALinear against independent references: PEFT's LoRA, hand-written formulas."""
from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from celora_dist import CELoRALinear, on_optimizer_step, telemetry
from celora_dist.selection import topk_indices

from .conftest import OneLinear, decaying_weight

# fp32 agreement with an independent reference: only summation order differs.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def make_layer(m=48, n=40, r=6, r0=5, keep=0.5, refresh_every=3, dtype=torch.float32, seed=0,
               bias=True, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(n, m, bias=bias)
    with torch.no_grad():
        base.weight.copy_(decaying_weight(m, n, seed=seed))
    base = base.to(dtype)
    layer = CELoRALinear(base, r=r, alpha=16, rslora=True, r0=r0, keep=keep,
                         refresh_every=refresh_every, **kw)
    with torch.no_grad():  # a non-zero B so the LoRA terms of every gradient are exercised
        layer.lora_B.weight.normal_(0, 0.1)
    return layer


def run_backward(layer, x, grad):
    """One forward/backward; returns (dX, dA, dB, G) with G the upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        p.grad = None
    y = layer(x)
    y.backward(grad)
    return x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()


def peft_twin(layer: CELoRALinear, dropout: float = 0.0):
    """PEFT's LoRA on the same W0, b, A, B as ``layer`` (rsLoRA, same alpha)."""
    m, n = layer.out_features, layer.in_features
    ref = OneLinear(n, m, bias=layer.base_layer.bias is not None)
    ref.proj.load_state_dict(layer.base_layer.state_dict())
    alpha = layer.scaling * math.sqrt(layer.r)
    peft_model = get_peft_model(ref, LoraConfig(r=layer.r, lora_alpha=alpha, use_rslora=True,
                                                target_modules=["proj"], lora_dropout=dropout))
    proj = peft_model.base_model.model.proj
    with torch.no_grad():
        proj.lora_A["default"].weight.copy_(layer.lora_A.weight)
        proj.lora_B["default"].weight.copy_(layer.lora_B.weight)
    assert proj.scaling["default"] == pytest.approx(layer.scaling)
    return peft_model, proj


@pytest.mark.parametrize("shape", [(2, 7, 40), (11, 40)])
@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_exact_steps_equal_peft_lora(shape, keep):
    """keep=1 always, and the first (refresh) step of any keep, equal PEFT's LoRA."""
    layer = make_layer(keep=keep)
    peft_model, proj = peft_twin(layer)
    x = torch.randn(*shape)
    grad = torch.randn(*shape[:-1], layer.out_features)
    dX, dA, dB = run_backward(layer, x, grad)

    xr = x.clone().requires_grad_(True)
    y_ref = peft_model(xr)
    y_ref.backward(grad)
    torch.testing.assert_close(layer(x), y_ref, **FP32_TOL)
    torch.testing.assert_close(dX, xr.grad, **FP32_TOL)
    torch.testing.assert_close(dA, proj.lora_A["default"].weight.grad, **FP32_TOL)
    torch.testing.assert_close(dB, proj.lora_B["default"].weight.grad, **FP32_TOL)


def test_keep_one_stays_equal_to_peft_over_steps():
    layer = make_layer(keep=1.0, refresh_every=1)
    assert layer.is_exact and layer.B0 is None and layer.A0 is None
    peft_model, proj = peft_twin(layer)
    for step in range(3):
        x, grad = torch.randn(5, 40), torch.randn(5, 48)
        dX, dA, _ = run_backward(layer, x, grad)
        xr = x.clone().requires_grad_(True)
        proj.lora_A["default"].weight.grad = None
        peft_model(xr).backward(grad)
        torch.testing.assert_close(dX, xr.grad, **FP32_TOL)
        torch.testing.assert_close(dA, proj.lora_A["default"].weight.grad, **FP32_TOL)
        on_optimizer_step(layer)
        assert layer.selected is None


def test_dropout_matches_peft_with_same_mask():
    layer = make_layer(keep=1.0, dropout=0.3).train()
    peft_model, proj = peft_twin(layer, dropout=0.3)
    peft_model.train()
    x, grad = torch.randn(6, 40), torch.randn(6, 48)
    torch.manual_seed(123)
    dX, dA, dB = run_backward(layer, x, grad)
    xr = x.clone().requires_grad_(True)
    torch.manual_seed(123)
    peft_model(xr).backward(grad)
    torch.testing.assert_close(dX, xr.grad, **FP32_TOL)
    torch.testing.assert_close(dA, proj.lora_A["default"].weight.grad, **FP32_TOL)
    torch.testing.assert_close(dB, proj.lora_B["default"].weight.grad, **FP32_TOL)


@torch.no_grad()
def seed_formula_dx(layer: CELoRALinear, G: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """(G B0) A0 + G[:, I] Ws[I] + s (G B) A with Ws materialised, in float64."""
    W = layer.base_layer.weight.double()
    B0, A0 = layer.B0.double(), layer.A0.double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    Ws = W - B0 @ A0
    G = G.double()
    return (G @ B0) @ A0 + G[:, selected] @ Ws[selected] + layer.scaling * (G @ B) @ A


@pytest.mark.parametrize("dtype,tol", [
    (torch.float32, dict(rtol=1e-5, atol=1e-5)),
    # bf16: 8-bit mantissa on inputs and on the small intermediate G[:, Ī] B0[Ī].
    (torch.bfloat16, dict(rtol=3e-2, atol=3e-2)),
    (torch.float16, dict(rtol=5e-3, atol=5e-3)),
])
@pytest.mark.parametrize("m,n,keep,r0", [(48, 40, 0.5, 5), (37, 53, 0.3, 0), (64, 17, 0.9, 3)])
def test_approximate_dx_equals_seed_formula(dtype, tol, m, n, keep, r0):
    layer = make_layer(m=m, n=n, r0=r0, keep=keep, dtype=dtype, refresh_every=100)
    g = torch.Generator().manual_seed(1)
    selected = torch.randperm(m, generator=g)[: layer.k].sort().values
    layer.set_selected(selected)
    layer.step = 1  # not a refresh step: the approximate path runs
    x = torch.randn(3, 4, n).to(dtype)
    grad = torch.randn(3, 4, m).to(dtype)
    dX, _, _ = run_backward(layer, x, grad)
    ref = seed_formula_dx(layer, grad.reshape(-1, m), selected).reshape(3, 4, n)
    scale = ref.abs().max()
    torch.testing.assert_close(dX.double() / scale, ref / scale, **tol)
    # and the approximation really differs from the exact gradient (keep < 1)
    exact = grad.reshape(-1, m).double() @ layer.base_layer.weight.double()
    assert not torch.allclose(dX.reshape(-1, n).double(), exact, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("r0", [5, 0])
def test_approximate_dx_with_dropout_and_a_changed_selection(r0):
    """Dropout routes the LoRA term to the dropped-out input; a new selection is used at once.

    Reference by hand (float64): x.grad = (G B0) A0 + G[:, I] Ws[I] + mask ⊙ s (G B) A, and
    dA = s (G B)ᵀ (mask ⊙ x), for two different selections in a row.
    """
    p = 0.3
    layer = make_layer(r0=r0, keep=0.5, dropout=p, refresh_every=100).train()
    m, n = layer.out_features, layer.in_features
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        selected = torch.randperm(m, generator=g)[: layer.k].sort().values
        layer.set_selected(selected)
        layer.step = 1  # not a refresh step
        x, grad = torch.randn(9, n, generator=g), torch.randn(9, m, generator=g)
        torch.manual_seed(7)
        dX, dA, _ = run_backward(layer, x, grad)
        torch.manual_seed(7)
        mask = nn.functional.dropout(torch.ones_like(x), p, training=True).double()
        Gd = grad.double()
        A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
        lora_term = layer.scaling * (Gd @ B) @ A
        ref = seed_formula_dx(layer, grad, selected) - lora_term + mask * lora_term
        torch.testing.assert_close(dX.double(), ref, **FP32_TOL)
        torch.testing.assert_close(dA.double(), layer.scaling * (Gd @ B).t() @ (mask * x.double()), **FP32_TOL)


def test_selection_is_topk_of_gradient_score():
    layer = make_layer(m=48, n=40, keep=0.4, refresh_every=2)
    x, grad = torch.randn(9, 40), torch.randn(9, 48) * torch.linspace(0.1, 3, 48)
    run_backward(layer, x, grad)
    on_optimizer_step(layer)
    Ws = layer.base_layer.weight.double() - layer.B0.double() @ layer.A0.double()
    score = grad.double().norm(dim=0) * Ws.norm(dim=1)
    expected = torch.topk(score, layer.k).indices.sort().values
    assert torch.equal(layer.selected, expected)


def test_static_selection_is_topk_of_residual_row_norms():
    layer = make_layer(m=48, n=40, keep=0.4, score="static")
    run_backward(layer, torch.randn(9, 40), torch.randn(9, 48))
    on_optimizer_step(layer)
    Ws = layer.base_layer.weight.double() - layer.B0.double() @ layer.A0.double()
    expected = torch.topk(Ws.norm(dim=1), layer.k).indices.sort().values
    assert torch.equal(layer.selected, expected)


def test_topk_ties_go_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5])
    assert topk_indices(scores, 2).tolist() == [1, 3]
    assert topk_indices(scores, 4).tolist() == [1, 2, 3, 4]
    # against an independent definition: a stable descending sort, on heavily tied scores
    for trial in range(200):
        g = torch.Generator().manual_seed(trial)
        n = int(torch.randint(1, 60, (1,), generator=g))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        s = torch.randint(0, 5, (n,), generator=g).float()
        expected = torch.sort(torch.sort(s, descending=True, stable=True).indices[:k]).values
        assert torch.equal(topk_indices(s, k), expected), (s, k)
    with pytest.raises(ValueError, match="k=0"):
        topk_indices(scores, 0)


def test_schedule_first_backward_exact_and_refresh_only_every_tau():
    layer = make_layer(keep=0.5, refresh_every=3)
    W = layer.base_layer.weight
    history = []
    for step in range(7):
        for micro in range(3):  # gradient accumulation: 3 backwards per optimizer step
            x, grad = torch.randn(4, 40), torch.randn(4, 48) * torch.rand(48) ** 4
            dX, _, _ = run_backward(layer, x, grad)
            exact = grad @ W + layer.scaling * (grad @ layer.lora_B.weight) @ layer.lora_A.weight
            is_exact = torch.allclose(dX, exact, **FP32_TOL)
            assert is_exact == (step % 3 == 0), (step, micro)
            assert layer.step == step  # micro-batches do not advance the schedule
        on_optimizer_step(layer)
        history.append(layer.selected.clone())
    # indices change only when a refresh step (0, 3, 6) has just finished
    for step in (1, 2, 4, 5):
        assert torch.equal(history[step], history[step - 1]), step
    assert not torch.equal(history[3], history[2])


def test_refresh_step_measures_true_error_of_indices_in_use():
    layer = make_layer(keep=0.5, refresh_every=2)
    run_backward(layer, torch.randn(4, 40), torch.randn(4, 48))
    on_optimizer_step(layer)
    in_use = layer.selected.clone()
    on_optimizer_step(layer)  # step 1: no backward needed for the check
    x, grad = torch.randn(4, 40), torch.randn(4, 48)
    run_backward(layer, x, grad)  # step 2: refresh, exact, measures error of in_use
    on_optimizer_step(layer)
    with torch.no_grad():
        exact = grad.double() @ layer.base_layer.weight.double() + \
            layer.scaling * (grad.double() @ layer.lora_B.weight.double()) @ layer.lora_A.weight.double()
    approx = seed_formula_dx(layer, grad, in_use)
    expected = float((approx - exact).norm() / exact.norm())
    report = telemetry(layer)[""]
    assert report["rel_error"] == pytest.approx(expected, rel=1e-4)
    assert report["step"] == 2 and report["k"] == layer.k


def relative_error(m, n, keep, r0, seed=0):
    """True relative dX error of the gradient-score top-k on a realistic G."""
    layer = make_layer(m=m, n=n, keep=keep, r0=r0, refresh_every=1000, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    # Heavy-tailed column energy, as in real activation gradients.
    grad = torch.randn(64, m, generator=g) * torch.rand(m, generator=g) ** 3
    layer.set_selected(layer_topk(layer, grad))
    layer.step = 1
    dX, _, _ = run_backward(layer, torch.randn(64, n, generator=g), grad)
    with torch.no_grad():
        exact = grad @ layer.base_layer.weight + layer.scaling * (grad @ layer.lora_B.weight) @ layer.lora_A.weight
    return float((dX - exact).norm() / exact.norm())


@torch.no_grad()
def layer_topk(layer, grad):
    Ws = layer.base_layer.weight - layer.B0 @ layer.A0
    return topk_indices(grad.norm(dim=0) * Ws.norm(dim=1), layer.k)


def test_error_falls_with_keep_and_r0_and_is_zero_at_keep_one():
    by_keep = [relative_error(96, 80, keep, r0=4) for keep in (0.2, 0.4, 0.6, 0.8, 0.95)]
    assert all(a > b for a, b in zip(by_keep, by_keep[1:])), by_keep
    by_r0 = [relative_error(96, 80, 0.4, r0=r0) for r0 in (0, 4, 16, 32)]
    assert all(a > b for a, b in zip(by_r0, by_r0[1:])), by_r0
    # keep = 1 through the approximate code path (all rows selected, Ī empty): exact.
    layer = make_layer(m=48, n=40, keep=0.5)
    layer.k = 48
    layer.set_selected(torch.arange(48))
    layer.step = 1
    x, grad = torch.randn(5, 40), torch.randn(5, 48)
    dX, _, _ = run_backward(layer, x, grad)
    exact = grad @ layer.base_layer.weight + layer.scaling * (grad @ layer.lora_B.weight) @ layer.lora_A.weight
    torch.testing.assert_close(dX, exact, **FP32_TOL)


def test_no_tensor_of_w0_size_besides_w0():
    m, n = 64, 56
    layer = make_layer(m=m, n=n, keep=0.5, r0=6)
    w_ptr = layer.base_layer.weight.data_ptr()
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        if t.data_ptr() != w_ptr:
            assert t.numel() < m * n // 4, name
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(torch.randn(3, n, requires_grad=True))
    for t in saved:
        assert t.data_ptr() == w_ptr or t.numel() < m * n // 4, tuple(t.shape)
    y.sum().backward()


def test_input_without_grad_still_trains_lora_and_scores():
    layer = make_layer(keep=0.5, refresh_every=2)
    x = torch.randn(4, 40)  # requires_grad False, like a frozen embedding's output
    y = layer(x)
    y.backward(torch.randn(4, 48))
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    on_optimizer_step(layer)
    assert layer.selected is not None and layer.selected.numel() == layer.k


def test_gradient_checkpointing_gives_same_gradients():
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(keep=0.5, refresh_every=2)
    run_backward(layer, torch.randn(4, 40), torch.randn(4, 48))
    on_optimizer_step(layer)
    on_optimizer_step(layer)
    layer.step = 1  # approximate step
    x, grad = torch.randn(2, 5, 40), torch.randn(2, 5, 48)
    dX, dA, dB = run_backward(layer, x, grad)
    for use_reentrant in (False, True):
        xc = x.clone().requires_grad_(True)
        layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
        checkpoint(layer, xc, use_reentrant=use_reentrant).backward(grad)
        torch.testing.assert_close(xc.grad, dX, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_A.weight.grad, dA, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B.weight.grad, dB, rtol=0, atol=0)


def test_double_lora_factors_are_contiguous():
    """DeepSpeed's engine broadcasts parameters via ``p.data.view(torch.uint8)``, which
    fails on the column-major factors LAPACK returns (engine init crashed under ZeRO 0-2)."""
    layer = make_layer(keep=0.5)
    for p in (layer.B0, layer.A0):
        assert p.is_contiguous()
        p.data.view(torch.uint8)  # what DeepSpeed does; raises for stride(-1) != 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_scores_row_blocks_equal_float64_column_norms(dtype):
    """(300, 4000) spans three 2 MiB row blocks of the CPU score pass; T = 0 gives zeros."""
    from celora_dist.ops.amm import _SCORE_BLOCK_ELEMS, gradient_scores

    G = torch.randn(300, 4000, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert G.shape[0] > _SCORE_BLOCK_ELEMS // G.shape[1] * 2  # really more than two blocks
    out = gradient_scores(G)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), (G.double() ** 2).sum(0), rtol=1e-5, atol=0)
    assert torch.equal(gradient_scores(G[:0]), torch.zeros(4000))
